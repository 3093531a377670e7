"""The EMA generator: weights averaged, spectral-norm vectors copied, BatchNorm statistics recomputed from itself."""
import torch
from torch import nn

import model_28
from ema import standing_statistics, update_ema


def _G(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return model_28.Generator(conv_dim=16)


def _inputs(n: int, generator: torch.Generator) -> tuple[torch.Tensor]:
    return (torch.randn(n, 100, generator=generator),)


def test_update_averages_weights_copies_spectral_vectors_and_leaves_batchnorm_statistics():
    ema, live = _G(0), _G(1)
    with torch.no_grad():
        live(torch.randn(8, 100))  # moves live's BatchNorm statistics and power-iteration vectors
    before = {name: t.clone() for name, t in ema.state_dict().items()}
    update_ema(ema, live, decay=0.75)
    state, live_state = ema.state_dict(), live.state_dict()
    for name, tensor in state.items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(tensor, before[name]), name
        elif name.endswith(("_u", "_v")):
            assert torch.equal(tensor, live_state[name]), name
        else:
            torch.testing.assert_close(tensor, 0.75 * before[name] + 0.25 * live_state[name], rtol=0, atol=1e-6)


def test_decay_zero_copies_the_weights_exactly():
    ema, live = _G(0), _G(1)
    update_ema(ema, live, decay=0.0)
    assert all(torch.equal(p, q) for p, q in zip(ema.parameters(), live.parameters()))


def test_standing_statistics_are_the_mean_over_batches_of_the_models_own_activations():
    G = _G(0)
    with torch.no_grad():
        for layer in G.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.fill_(5.0)  # stale statistics that describe other weights
    standing_statistics(G, _inputs, batches=3, batch_size=16)
    assert not G.training
    # By hand: run the same three batches in train mode through a copy; each BatchNorm's batch mean and
    # unbiased variance, averaged over the batches.
    reference = _G(0)
    norms = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    seen = {id(norm): [] for norm in norms}
    hooks = [norm.register_forward_hook(lambda m, i, o: seen[id(m)].append(i[0])) for norm in norms]
    generator = torch.Generator().manual_seed(1234)
    reference.eval()
    for norm in norms:
        norm.train()
    with torch.no_grad():
        for _ in range(3):
            reference(*_inputs(16, generator))
    for hook in hooks:
        hook.remove()
    for ours, norm in zip([m for m in G.modules() if isinstance(m, nn.BatchNorm2d)], norms):
        batches = seen[id(norm)]
        mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
        var = torch.stack([b.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for b in batches]).mean(0)
        torch.testing.assert_close(ours.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.running_var, var, rtol=1e-4, atol=1e-5)
        assert ours.momentum == 0.1, "the momentum is restored"


def test_standing_statistics_leave_weights_and_spectral_vectors_alone_and_depend_on_weights_only():
    G = _G(0)
    before = {name: t.clone() for name, t in G.state_dict().items() if "running" not in name and "num_batches" not in name}
    standing_statistics(G, _inputs)
    first = {name: t.clone() for name, t in G.state_dict().items()}
    assert all(torch.equal(G.state_dict()[name], t) for name, t in before.items())
    standing_statistics(G, _inputs)
    assert all(torch.equal(G.state_dict()[name], t) for name, t in first.items())
