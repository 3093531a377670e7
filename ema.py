"""An exponential moving average of G's weights, with BatchNorm statistics that describe it.

Averaging the weights is not enough for a generator with BatchNorm: the live G's running statistics
describe the live weights' activations, not the averaged ones', and sampling the average with them
gives worse images than the live G (measured in BENCHMARKS.md). As BigGAN does ("standing statistics"),
the average's statistics are recomputed from its own activations before it is used: a cumulative mean
over a fixed set of noise batches, so the result depends on the averaged weights alone.
"""
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

STANDING_BATCHES = 16
STANDING_BATCH_SIZE = 64
STANDING_SEED = 1234  # fixed: the statistics are a function of the weights, the same in a run and its resumption


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema's weights <- decay * ema's + (1 - decay) * model's. Spectral-norm vectors are copied (the live ones
    estimate the average's top singular vectors well, as they move slowly); BatchNorm statistics are left for
    standing_statistics."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    for ema_module, module in zip(ema.modules(), model.modules()):
        if not isinstance(module, _BatchNorm):
            for ema_buffer, buffer in zip(ema_module.buffers(recurse=False), module.buffers(recurse=False)):
                ema_buffer.copy_(buffer)


@torch.no_grad()
def standing_statistics(G: nn.Module, sample_inputs, batches: int = STANDING_BATCHES,
                        batch_size: int = STANDING_BATCH_SIZE) -> None:
    """Recompute every BatchNorm's running mean and variance of G as the average over `batches` batches of
    G's own activations, from `sample_inputs(n, generator)` (a function returning G's positional inputs).
    Leaves G in eval mode; nothing but BatchNorm buffers changes (spectral norm stays in eval mode)."""
    norms = [module for module in G.modules() if isinstance(module, _BatchNorm)]
    G.eval()
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a cumulative average over all batches, not an exponential one
        norm.train()
    generator = torch.Generator().manual_seed(STANDING_SEED)
    try:
        for _ in range(batches):
            G(*sample_inputs(batch_size, generator))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        G.eval()
