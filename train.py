"""Train SAGAN (Zhang et al. 2018, https://arxiv.org/abs/1805.08318) or its no-attention (DCGAN) baseline.

    python train.py --dataset mnist --steps 2000              # SAGAN on MNIST, run dir under runs/
    python train.py --dataset mnist --steps 2000 --no-attn    # the DCGAN baseline
    python train.py --dataset mnist --preset original         # the original project's recipe
    python train.py --dataset celeba --compare --out runs/cmp # both arms, same seed, data order and noise
    python train.py --resume runs/cmp/with_attention --steps 4000
    torchrun --nproc_per_node=4 train.py --dataset celeba     # DDP: global batch = 4 x --batch-size

This file reads top to bottom: the config, the losses, the state a step touches, the steps, the loop, the
command line. The run directory's files live in rundir.py, torchrun's plumbing in distributed.py.
Every TrainConfig field is a flag (`batch_size` -> `--batch-size`); notebooks call train(config).
"""
import argparse
import dataclasses
import math
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Dataset

import data
import distributed
import rundir
from attention import ATTENTION_VARIANTS
from augment import diff_augment, parse_policy
from blocks import INITS, initialise
from checkpoint import CheckpointError, checkpoint_files, generator_kwargs, model_module, read_config
from distributed import Job, any_process, mean_over_processes, noise_seed
from ema import standing_statistics, update_ema
from utils import autocast_dtype, memory_format_for, precision_name

LOSSES = ("hinge", "nonsaturating", "wgan-gp")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ---------------------------------------------------------------------------------------------- config

def _field(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every knob of a run. The defaults are the original recipe with equal learning rates; --preset original gives
    the original project's recipe itself (TTUR 1e-4 / 4e-4)."""

    # data
    dataset: str = _field("mnist", "mnist, mnist-5k, celeba, folder or synthetic")
    data_root: str | None = _field(None, "data folder (default: $SAGAN_DATA, else ./data); for 'folder', the image folder")
    image_size: int = _field(0, "28 (model_28.py) or 64 (model_64.py); 0 = 28 for MNIST, 64 otherwise")
    synthetic_size: int = _field(2048, "number of images of the synthetic set")
    # model
    attn: bool = _field(True, "self-attention layers (--no-attn: the DCGAN baseline)")
    attn_variant: str = _field("original", "'original' (q/k C/2, v C) or 'paper' (q/k C/8, v C/2, pooled keys)")
    g_attn_sizes: tuple[int, ...] | None = _field(None, "sizes of G's feature maps that attention follows (default: the "
                                                        "original's, 14 at 28x28, 16 32 at 64x64)")
    d_attn_sizes: tuple[int, ...] | None = _field(None, "sizes of D's feature maps that attention follows (default: the "
                                                        "original's, 3 at 28x28, 8 4 at 64x64)")
    z_dim: int = _field(100, "noise dimension")
    conv_dim: int = _field(64, "base channel width")
    spectral_norm: bool = _field(True, "spectral norm in G and D (--no-spectral-norm: plain DCGAN layers)")
    conditional: bool = _field(False, "class-conditional G (conditional BatchNorm) and D (projection), trained on labels")
    num_classes: int = _field(0, "classes of a conditional run (0: as many as the dataset has)")
    init: str = _field("default", "weight initialisation: default (torch's), normal (DCGAN's N(0, 0.02)) or orthogonal")
    # optimisation
    steps: int = _field(2000, "generator updates in total")
    minutes: float = _field(0.0, "also stop after this many minutes of training (evaluation not counted); 0 = no limit")
    clock: str = _field("wall", "what --minutes, --eval-minutes and --checkpoint-minutes count: 'wall' (elapsed time) or "
                                "'cpu' (this process's CPU time, which other programs on the machine do not eat into)")
    batch_size: int = _field(64, "images per batch (per process)")
    # equal rates: the original TTUR (1e-4 / 4e-4) lets D win outright for hundreds of steps (BENCHMARKS.md, Recipe)
    g_lr: float = _field(2e-4, "generator learning rate")
    d_lr: float = _field(2e-4, "discriminator learning rate")
    beta1: float = _field(0.0, "Adam beta1")
    beta2: float = _field(0.9, "Adam beta2")
    loss: str = _field("hinge", "hinge, nonsaturating (classic DCGAN) or wgan-gp")
    gp_weight: float = _field(10.0, "gradient-penalty weight for wgan-gp")
    r1_weight: float = _field(0.0, "R1: weight gamma of the zero-centred gradient penalty gamma/2 E||grad D(real)||^2; 0 = off")
    r1_every: int = _field(16, "apply R1 every N steps, scaled by N (lazy regularisation, as in StyleGAN2)")
    augment: str = _field("", "DiffAugment policy for everything D sees: '' (off), e.g. 'translation,cutout' or "
                              "'color,translation,cutout'")
    d_steps: int = _field(1, "discriminator updates per generator update (5 is usual for wgan-gp)")
    reuse_fakes: bool = _field(False, "the G update reuses the D update's fakes: one G forward per step instead of two")
    ema_decay: float = _field(0.0, "EMA of G's weights for samples and evaluation; 0 = off (0.999 is usual)")
    ema_start: int = _field(0, "the EMA copies G until this step, then averages")
    ema_rampup: float = _field(0.0, "cap the EMA's half-life at this fraction of the images seen so far (stylegan2-ada "
                                    "uses 0.05): early on it averages over a short, growing window; 0 = off")
    lr_decay: float = _field(0.0, "decay both learning rates linearly to 0 over this last fraction of the budget "
                                  "(--steps, or --minutes when that ends first); 0 = constant rates")
    seed: int = _field(0, "seeds weights, data order, noise and the fixed sample noise")
    # machine
    device: str = _field("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    precision: str = _field("auto", "auto (bf16 where the GPU or CPU runs it natively, fp16 on older GPUs, fp32 "
                                    "elsewhere), fp32, bf16 or fp16")
    channels_last: bool | None = _field(None, "channels_last memory format (default: on for the CPU, off on CUDA and MPS)")
    compile: bool = _field(False, "torch.compile G and D")
    threads: int = _field(0, "CPU threads for torch (0: torch's default)")
    num_workers: int = _field(-1, "data-loading workers (-1: 4 on CUDA for image files, else 0)")
    sync_bn: bool = _field(False, "under torchrun, SyncBatchNorm in G: batch statistics over all processes (CUDA only)")
    # outputs
    out: str | None = _field(None, "run directory (default: runs/<timestamp>-<dataset>-<arm>)")
    sample_every: int = _field(100, "save an 8x8 grid of the fixed noise every N steps")
    log_every: int = _field(10, "append to metrics.csv every N steps")
    checkpoint_every: int = _field(500, "keep checkpoints/step_N.pt every N steps (latest.pt is written then too)")
    checkpoint_minutes: float = _field(5.0, "also write checkpoints/latest.pt every N minutes of training; 0 = off")
    eval_every: int = _field(0, "evaluate sample quality every N steps (0: never)")
    eval_minutes: float = _field(0.0, "also evaluate every N minutes of training (0: never)")
    eval_n: int = _field(1000, "generated images per evaluation during training")
    quiet: bool = _field(False, "no progress bar")

    def __post_init__(self):
        if not self.image_size:
            self.image_size = data.image_size_for(self.dataset)
        for name in ("g_attn_sizes", "d_attn_sizes"):  # config.json holds lists
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "TrainConfig":
        """A config from a named set of defaults (PRESETS), with `overrides` on top."""
        if preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        return cls(**{**PRESETS[preset], **overrides})

    def validate(self) -> None:
        """Refuse nonsensical values up front, naming the field."""
        def require(ok: bool, name: str, expected: str):
            if not ok:
                raise ConfigError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        require(self.dataset in data.DATASETS, "dataset", f"one of {', '.join(data.DATASETS)}")
        require(self.image_size in (28, 64), "image_size", "28 or 64")
        require(self.attn_variant in ATTENTION_VARIANTS, "attn_variant", f"one of {', '.join(ATTENTION_VARIANTS)}")
        require(self.init in INITS, "init", f"one of {', '.join(INITS)}")
        require(self.clock in ("wall", "cpu"), "clock", "'wall' or 'cpu'")
        try:
            parse_policy(self.augment)
        except ValueError as error:
            raise ConfigError(f"augment: {error}") from None
        require(self.loss in LOSSES, "loss", f"one of {', '.join(LOSSES)}")
        require(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
        for name in ("steps", "batch_size", "z_dim", "d_steps", "sample_every", "log_every", "checkpoint_every", "eval_n",
                     "synthetic_size", "r1_every"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "a positive integer")
        require(self.conv_dim >= 8 and self.conv_dim % 8 == 0, "conv_dim", "a positive multiple of 8")
        require(self.conditional or self.num_classes == 0, "num_classes", "0 without --conditional")
        require(self.num_classes == 0 or self.num_classes >= 2, "num_classes", "0 (from the data) or at least 2")
        for name in ("eval_every", "threads", "ema_start"):
            require(getattr(self, name) >= 0, name, "0 or a positive integer")
        for name in ("minutes", "checkpoint_minutes", "eval_minutes", "r1_weight", "gp_weight"):
            require(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "a finite number >= 0")
        require(self.num_workers >= -1, "num_workers", "-1 (auto), 0 or a positive integer")
        for name in ("g_lr", "d_lr"):
            require(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name, "a positive finite number")
        for name in ("beta1", "beta2", "ema_decay"):
            require(0 <= getattr(self, name) < 1, name, "in [0, 1)")
        require(0 <= self.ema_rampup and math.isfinite(self.ema_rampup), "ema_rampup", "a finite number >= 0")
        require(0 <= self.lr_decay <= 1, "lr_decay", "in [0, 1]")

    @property
    def channels(self) -> int:
        return model_module(self.image_size).IMAGE_SHAPE[0]


class ConfigError(ValueError):
    """A configuration value that makes no sense, or a resume that does not match its run."""


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is left as it was."""


# The recipe of the original project (https://github.com/franknb/Self-attention-DCGAN), one switch away.
PRESETS = {
    "default": {},
    "original": dict(g_lr=1e-4, d_lr=4e-4, beta1=0.0, beta2=0.9, batch_size=64, loss="hinge", d_steps=1, z_dim=100,
                     conv_dim=64, attn_variant="original", g_attn_sizes=None, d_attn_sizes=None, spectral_norm=True,
                     init="default", augment="", r1_weight=0.0, reuse_fakes=False, ema_decay=0.0, ema_start=0,
                     ema_rampup=0.0, lr_decay=0.0),
}

# Fields a resumed run may change; every other field must match the run's config.json.
RESUMABLE_OVERRIDES = {"steps", "minutes", "clock", "device", "precision", "channels_last", "compile", "threads",
                       "num_workers", "sync_bn", "sample_every", "log_every", "checkpoint_every", "checkpoint_minutes",
                       "eval_every", "eval_minutes", "eval_n", "quiet", "data_root", "out"}


def complete_config(saved: dict) -> dict:
    """A run's config.json with the fields it predates filled in as that run trained: a field added later
    takes the original recipe's value where that preset sets it (the behaviour before the field existed),
    otherwise its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return defaults | PRESETS["original"] | saved


def check_resumable(saved: dict, config: TrainConfig) -> None:
    """Refuse to resume with settings that would make a different run."""
    wanted = dataclasses.asdict(config)
    saved = dataclasses.asdict(TrainConfig(**complete_config(saved)))  # as the run trained, lists read as tuples
    clashes = [f"{name}: run has {saved[name]!r}, asked for {wanted[name]!r}"
               for name in wanted if name not in RESUMABLE_OVERRIDES and saved[name] != wanted[name]]
    if clashes:
        raise ConfigError("Cannot resume: these settings differ from the run's config.json (start a new run instead):\n  "
                          + "\n  ".join(clashes))


# ---------------------------------------------------------------------------------------------- losses

def discriminator_loss(kind: str, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """D's loss on its logits for real and (detached) fake images, without any gradient penalty."""
    if kind == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    if kind == "nonsaturating":
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    if kind == "wgan-gp":
        return d_fake.mean() - d_real.mean()
    raise ConfigError(f"loss must be one of {LOSSES}, got {kind!r}")


def generator_loss(kind: str, d_fake: torch.Tensor) -> torch.Tensor:
    """G's loss on D's logits for fresh fakes."""
    if kind == "nonsaturating":
        return F.softplus(-d_fake).mean()
    return -d_fake.mean()  # hinge and WGAN share it


def gradient_penalty(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, noise: torch.Generator,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP: mean of (||grad_x D(x)|| - 1)^2 at random interpolates of real and fake, computed in fp32."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=noise).to(real.device)
    mixed = torch.lerp(fake.float(), real.float(), alpha).requires_grad_(True)
    return (_input_gradient(D, mixed, labels).flatten(1).norm(dim=1) - 1).square().mean()


def r1_penalty(D: nn.Module, real: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): mean of ||grad_x D(x)||^2 at real images, computed in fp32."""
    return _input_gradient(D, real.detach().float().requires_grad_(True), labels).flatten(1).square().sum(dim=1).mean()


def _input_gradient(D: nn.Module, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """d(sum of D's logits)/d(images), with its graph kept for the penalty's own backward."""
    # The fused attention kernels have no double backward; the math kernel is the same function.
    with torch.autocast(images.device.type, enabled=False), sdpa_kernel([SDPBackend.MATH]):
        logits = D(images) if labels is None else D(images, labels)  # any critic module works unconditionally
        (grad,) = torch.autograd.grad(logits.sum(), images, create_graph=True)
    return grad


# ---------------------------------------------------------------------------------------------- state

@dataclass
class TrainState:
    """Everything a training step touches; all of it goes into a checkpoint (rundir.state_dict)."""

    config: TrainConfig
    device: torch.device
    G: nn.Module
    D: nn.Module
    G_ema: nn.Module | None
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    scaler_G: torch.amp.GradScaler
    scaler_D: torch.amp.GradScaler
    loader: data.EndlessLoader
    noise: torch.Generator  # CPU generator for z, labels, augmentation and GP mixing: the same numbers on every device
    amp_dtype: torch.dtype | None
    job: Job = Job()
    # How the steps call G and D (compiled when asked). X_updating is the one pass whose backward updates X: under
    # torchrun it goes through X's DDP wrapper, which averages X's gradients over processes. Every other pass
    # (X_plain: G under no_grad in D's update, a frozen D in G's update) must not, so it calls X itself.
    G_updating: Callable = None
    G_plain: Callable = None
    D_updating: Callable = None
    D_plain: Callable = None
    step: int = 0
    wall_time: float = 0.0  # seconds of training so far, summed over every process that resumed the run
    cpu_time: float = 0.0  # CPU seconds of this process (rank 0's in a checkpoint) spent training, likewise
    ema_stale: bool = False  # G_ema's weights moved since its BatchNorm statistics were last computed

    def __post_init__(self):
        # `is None`, not truthiness: a compiled module has no __len__ to answer bool().
        self.G_plain = self.G if self.G_plain is None else self.G_plain
        self.D_plain = self.D if self.D_plain is None else self.D_plain
        self.G_updating = self.G_plain if self.G_updating is None else self.G_updating
        self.D_updating = self.D_plain if self.D_updating is None else self.D_updating

    def autocast(self):
        return nullcontext() if self.amp_dtype is None else torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def memory_format(self) -> torch.memory_format:
        """Of G, D and the real batches."""
        return memory_format_for(self.device, self.config.channels_last)

    def next_real(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch of real images and, in a conditional run, their labels."""
        images, labels = next(self.loader) if self.config.conditional else (next(self.loader), None)
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return images, None if labels is None else labels.to(self.device, non_blocking=True)

    def sample_z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.config.z_dim, generator=self.noise).to(self.device, non_blocking=True)

    def sample_labels(self, n: int) -> torch.Tensor | None:
        """Uniformly drawn classes for n fakes of a conditional run; None otherwise."""
        if not self.config.conditional:
            return None
        return torch.randint(self.config.num_classes, (n,), generator=self.noise).to(self.device, non_blocking=True)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """What D sees of any image: the DiffAugment policy applied, or the images as they are."""
        return diff_augment(images, self.config.augment, self.noise) if self.config.augment else images

    def sampler(self) -> nn.Module:
        """The generator that samples and is evaluated: the EMA one, with fresh BatchNorm statistics, if kept."""
        if self.G_ema is None:
            return self.G
        if self.ema_stale:
            standing_statistics(self.G_ema, self.generator_inputs)
            self.ema_stale = False
        return self.G_ema

    def generator_inputs(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """G's inputs (z, labels) for n samples drawn from `generator`, with equal shares of the classes."""
        labels = self.G.balanced_labels(n)
        z = torch.randn(n, self.config.z_dim, generator=generator).to(self.device)
        return z, None if labels is None else labels.to(self.device)

    def training_seconds(self) -> float:
        """Training time by the clock the config's budgets count (wall or CPU)."""
        return self.cpu_time if self.config.clock == "cpu" else self.wall_time


def build_models(config: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """G and D for the config, seeded so that both arms of a comparison start alike."""
    torch.manual_seed(config.seed)
    module = model_module(config.image_size)
    G = module.Generator(**generator_kwargs(dataclasses.asdict(config)))
    D = module.Discriminator(attn=config.attn, conv_dim=config.conv_dim, spectral_norm=config.spectral_norm,
                             attn_variant=config.attn_variant, attn_sizes=config.d_attn_sizes,
                             num_classes=config.num_classes)
    initialise(G, config.init)
    initialise(D, config.init)
    return G, D


def build_state(config: TrainConfig, dataset: Dataset, device: torch.device, job: Job = Job()) -> TrainState:
    """Fresh models, optimizers and loader for `config` on `device` (this process's share under torchrun)."""
    G, D = build_models(config)
    if config.sync_bn and job.enabled:
        if device.type != "cuda":
            raise ConfigError("sync_bn needs CUDA: torch's SyncBatchNorm does not run on the CPU; drop --sync-bn")
        G = nn.SyncBatchNorm.convert_sync_batchnorm(G)
    memory_format = memory_format_for(device, config.channels_last)
    G, D = G.to(device, memory_format=memory_format), D.to(device, memory_format=memory_format)
    G_ema = None
    if config.ema_decay > 0:
        G_ema = build_models(config)[0].to(device, memory_format=memory_format).eval().requires_grad_(False)
        G_ema.load_state_dict(G.state_dict())
    amp_dtype = autocast_dtype(config.precision, device)
    workers = config.num_workers if config.num_workers >= 0 else \
        4 if device.type == "cuda" and not isinstance(dataset, data.TensorImages) else 0
    state = TrainState(
        config=config, device=device, G=G, D=D, G_ema=G_ema,
        opt_G=torch.optim.Adam(G.parameters(), config.g_lr, betas=(config.beta1, config.beta2)),
        opt_D=torch.optim.Adam(D.parameters(), config.d_lr, betas=(config.beta1, config.beta2)),
        scaler_G=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        scaler_D=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        loader=data.EndlessLoader(dataset, config.batch_size, seed=config.seed, rank=job.rank, world_size=job.world_size,
                                  num_workers=workers, pin_memory=device.type == "cuda", labels=config.conditional),
        noise=torch.Generator().manual_seed(noise_seed(config.seed, job.rank)), amp_dtype=amp_dtype, job=job,
    )
    maybe_compile = torch.compile if config.compile else (lambda module: module)
    state.G_plain, state.D_plain = maybe_compile(G), maybe_compile(D)
    state.G_updating = maybe_compile(distributed.synced(G, job, device)) if job.enabled else state.G_plain
    state.D_updating = maybe_compile(distributed.synced(D, job, device)) if job.enabled else state.D_plain
    return state


# ---------------------------------------------------------------------------------------------- one step

Fakes = tuple[torch.Tensor, torch.Tensor | None]  # generated images and, in a conditional run, their labels


def discriminator_step(state: TrainState, fakes: Fakes | None = None) -> dict[str, torch.Tensor]:
    """One D update on a real batch and a batch of detached fakes (drawn here unless given)."""
    config, D = state.config, state.D
    real, real_labels = state.next_real()
    if fakes is None:
        with torch.no_grad(), state.autocast():  # no graph through G: D's loss never reaches it
            fake_labels = state.sample_labels(real.shape[0])
            fakes = state.G_plain(state.sample_z(real.shape[0]), fake_labels), fake_labels
    fake, fake_labels = fakes[0].detach(), fakes[1]
    labels = None if real_labels is None else torch.cat([real_labels, fake_labels])
    with state.autocast():
        # D has no batch statistics, so one pass over real and fake equals two (and runs one power iteration).
        d_real, d_fake = state.D_updating(state.augment(torch.cat([real, fake])), labels).float().chunk(2)
        loss = discriminator_loss(config.loss, d_real, d_fake)
    if config.loss == "wgan-gp":
        loss = loss + config.gp_weight * gradient_penalty(D, real, fake, state.noise, real_labels)
    if config.r1_weight and state.step % config.r1_every == 0:
        loss = loss + config.r1_weight / 2 * config.r1_every * r1_penalty(D, state.augment(real), real_labels)
    state.opt_D.zero_grad(set_to_none=True)
    state.scaler_D.scale(loss).backward()
    state.scaler_D.step(state.opt_D)
    state.scaler_D.update()
    return {"d_loss": loss.detach(), "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean()}


def fakes_for_G(state: TrainState) -> Fakes:
    """A batch from fresh noise with G's graph kept, for G's update."""
    with state.autocast():
        labels = state.sample_labels(state.config.batch_size)
        return state.G_updating(state.sample_z(state.config.batch_size), labels), labels


def generator_step(state: TrainState, fakes: Fakes | None = None) -> dict[str, torch.Tensor]:
    """One G update through a frozen D: D's weights, grads and power-iteration vectors are left untouched.
    `fakes`, if given, come from fakes_for_G; otherwise G makes a batch from fresh noise here."""
    fake, labels = fakes if fakes is not None else fakes_for_G(state)
    D = state.D
    D.eval().requires_grad_(False)  # eval: spectral norm reuses its vectors; no grads: no wasted weight gradients
    try:
        with state.autocast():
            loss = generator_loss(state.config.loss, state.D_plain(state.augment(fake), labels).float())
        state.opt_G.zero_grad(set_to_none=True)
        state.scaler_G.scale(loss).backward()
        state.scaler_G.step(state.opt_G)
        state.scaler_G.update()
    finally:
        D.train().requires_grad_(True)
    if state.G_ema is not None:
        update_ema(state.G_ema, state.G, ema_decay_at(state.config, state.step + 1))  # state.step: steps before this
        state.ema_stale = True
    return {"g_loss": loss.detach()}


def ema_decay_at(config: TrainConfig, step: int) -> float:
    """The EMA's decay in the update of step `step` (from 1): 0 before ema_start (the EMA copies G), then
    ema_decay, with its half-life capped at ema_rampup x the steps so far (stylegan2-ada's ramp in images seen)."""
    if step < config.ema_start:
        return 0.0
    if config.ema_rampup:
        return min(config.ema_decay, 0.5 ** (1 / (config.ema_rampup * step)))
    return config.ema_decay


def learning_rate_scale(state: TrainState) -> float:
    """1 until the last lr_decay of the budget, then falling linearly to 0 at its end. The budget is --steps, or
    --minutes of training by the run's clock when those run out first."""
    config = state.config
    done = state.step / config.steps
    if config.minutes:
        done = max(done, state.training_seconds() / (60 * config.minutes))
    return min(1.0, max(0.0, 1 - done) / config.lr_decay)


def train_step(state: TrainState) -> dict[str, torch.Tensor]:
    """d_steps discriminator updates, then one generator update; returns the step's metrics as tensors.

    With reuse_fakes, G runs once per step: the last D update trains on its batch (detached), and the G
    update back-propagates through the same batch and the updated D, as the PyTorch DCGAN example does.
    Without it, the G update draws fresh noise and runs G again, as the original project does."""
    if state.config.lr_decay:
        scale = learning_rate_scale(state)
        for optimizer, lr in ((state.opt_G, state.config.g_lr), (state.opt_D, state.config.d_lr)):
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
    for _ in range(state.config.d_steps - 1):
        discriminator_step(state)
    fakes = fakes_for_G(state) if state.config.reuse_fakes else None
    metrics = discriminator_step(state, fakes)
    metrics |= generator_step(state, fakes)
    state.step += 1
    return metrics


# ---------------------------------------------------------------------------------------------- the loop

class Stopwatch:
    """Seconds of training by the wall clock and by this process's CPU clock: counting on from a resumed run's
    totals, and leaving out what runs while paused."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0):
        self._wall_origin = time.perf_counter() - wall
        self._cpu_origin = time.process_time() - cpu

    def read(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds)."""
        return time.perf_counter() - self._wall_origin, time.process_time() - self._cpu_origin

    @contextmanager
    def paused(self):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._wall_origin += time.perf_counter() - wall
            self._cpu_origin += time.process_time() - cpu


def due(step: int, every_steps: int, seconds_before: float, seconds_after: float, every_minutes: float) -> bool:
    """A periodic task is due at a multiple of `every_steps` (0: never), or when the step carried the training time
    over a multiple of `every_minutes` (0: never)."""
    by_steps = every_steps > 0 and step % every_steps == 0
    period = every_minutes * 60
    return by_steps or (period > 0 and seconds_after // period > seconds_before // period)


def out_of_time(state: TrainState) -> bool:
    """The run has used its time budget (config.minutes)."""
    return 0 < state.config.minutes * 60 <= state.training_seconds()


def check_finite(metrics: dict[str, torch.Tensor], step: int, run_dir: Path) -> None:
    """Stop at a NaN or infinite loss. A NaN in any process reaches every process's weights through the gradient
    all-reduce within the step, so all processes stop here together."""
    if all(torch.isfinite(value) for value in metrics.values()):
        return
    values = ", ".join(f"{k}={v.item():.4g}" for k, v in metrics.items())
    latest = run_dir / "checkpoints" / "latest.pt"
    kept = f"the last good checkpoint, {latest}, is intact" if latest.exists() else "no checkpoint was written yet"
    raise NonFiniteLossError(f"Non-finite loss at step {step} ({values}); {kept}. "
                             "Try lower learning rates, --precision fp32 or --loss hinge.")


def training_scorer(config: TrainConfig, device: torch.device) -> Callable[[nn.Module], dict[str, float]] | None:
    """A function scoring a generator for metrics.csv (evaluate.score on eval_n samples of the same seeded
    noise every time, so the curve is comparable), or None for a run that never evaluates."""
    if not (config.eval_every or config.eval_minutes):
        return None
    import evaluate

    names = evaluate.metric_names(config.dataset, conditional=config.conditional)
    if "inception_fid" in names:
        evaluate.load_inception(device=device)  # fail before training starts, not at the first evaluation

    def scorer(G: nn.Module) -> dict[str, float]:
        images, labels = evaluate.generate(G, config.eval_n, seed=config.seed)
        scores = evaluate.score(images, config.dataset, labels=labels, data_root=config.data_root, device=device)
        return {name: round(scores[name], 4) for name in names}

    scorer.names = names
    return scorer


def evaluation_row(state: TrainState, scorer) -> dict[str, float]:
    """The scorer's columns for G, and for the EMA generator (prefixed ema_) when the run keeps one."""
    row = scorer(state.G)
    if state.G_ema is not None:
        row |= {f"ema_{name}": value for name, value in scorer(state.sampler()).items()}
    return row


def log_columns(state: TrainState, scorer) -> list[str]:
    gammas = [f"gamma_{net}{i}" for net in "GD" for i in range(len(getattr(state, net).attention_gammas()))]
    evaluations = scorer.names + [f"ema_{name}" for name in scorer.names if state.G_ema is not None] if scorer else []
    return ["step", "d_loss", "g_loss", "d_real", "d_fake", *gammas, "img_per_s", "wall_time", "cpu_time", *evaluations]


def train(config: TrainConfig, *, dataset: Dataset | None = None, resume: bool = False,
          on_sample: Callable[[int, Path], None] | None = None) -> Path:
    """Train according to `config`; returns the run directory.

    dataset: use this dataset instead of loading config.dataset (items: (image in [-1, 1], label)).
    resume: continue the run in config.out from its latest checkpoint (train.py --resume does this).
    on_sample: called with (step, grid path) after each sample grid (the notebooks show it inline).
    Ctrl-C checkpoints at the next step boundary, then raises KeyboardInterrupt.
    Under torchrun every process calls this; only rank 0 writes the run directory.
    """
    config = dataclasses.replace(config)  # the caller's config stays as it was
    if config.threads:
        torch.set_num_threads(config.threads)
    job, device = distributed.join(config.device)
    if dataset is None:
        dataset, config.dataset = load_training_data(config)
    if config.conditional:
        config.num_classes = classes_of(dataset, config)
    run_dir = rundir.run_dir_for(config, job)
    config.out = str(run_dir)
    if not resume and checkpoint_files(run_dir):
        raise ConfigError(f"{run_dir} already holds a run: resume it (--resume {run_dir}) or choose another --out")
    state = build_state(config, dataset, device, job)
    grid_inputs = rundir.open_run(state, run_dir, resume, check_resumable)
    scorer = training_scorer(config, device) if job.is_main else None
    log = rundir.RunLog(run_dir, log_columns(state, scorer), state.step) if job.is_main else None
    if job.is_main:
        rundir.record_session(state, run_dir)
    progress = progress_bar(config, state.step, precision_name(state.amp_dtype), disable=config.quiet or not job.is_main)
    clock = Stopwatch(state.wall_time, state.cpu_time)
    logged_at, images_since = state.wall_time, 0
    last = state.step >= config.steps or out_of_time(state)
    with stop_at_step_boundary() as stop_requested, closing(log, progress):
        while not last:
            before = state.training_seconds()
            metrics = train_step(state)
            state.wall_time, state.cpu_time = clock.read()
            check_finite(metrics, state.step, run_dir)
            progress.update(1)
            images_since += config.batch_size * job.world_size
            last = state.step >= config.steps or any_process(job.is_main and out_of_time(state), job, device)
            evaluating = scorer is not None and (last or due(state.step, config.eval_every, before,
                                                             state.training_seconds(), config.eval_minutes))
            if state.step % config.log_every == 0 or last or evaluating:
                seconds = max(state.wall_time - logged_at, 1e-9)
                row = metrics_row(state, mean_over_processes(metrics, job), images_since / seconds)
                logged_at, images_since = state.wall_time, 0
                if evaluating:
                    with clock.paused():  # measuring is not training: the budget and img/s leave it out
                        row |= evaluation_row(state, scorer)
                if log:
                    log.metrics(row)
                progress.set_postfix(postfix(row), refresh=False)
            stopping = any_process(stop_requested.is_set(), job, device)
            if job.is_main and (state.step % config.sample_every == 0 or last):
                grid = log.grid(state.sampler().sample(*grid_inputs), state.step)
                if on_sample:
                    on_sample(state.step, grid)
            if job.is_main and (last or stopping or due(state.step, config.checkpoint_every, before,
                                                        state.training_seconds(), config.checkpoint_minutes)):
                rundir.save_checkpoint(state, run_dir)
            if stopping:  # checkpointed above; raising tells callers (compare, notebooks) to stop too
                raise KeyboardInterrupt(f"Stopped at step {state.step}; checkpoint saved. "
                                        f"Resume with: python train.py --resume {run_dir}")
    return run_dir


def metrics_row(state: TrainState, metrics: dict[str, torch.Tensor], images_per_second: float) -> dict[str, float]:
    """A metrics.csv row: the step's losses and mean logits, the attention gammas, throughput and times."""
    gammas = {f"gamma_{net}{i}": round(gamma, 5) for net in "GD"
              for i, gamma in enumerate(getattr(state, net).attention_gammas())}
    return {"step": state.step, **{name: round(value.item(), 5) for name, value in metrics.items()}, **gammas,
            "img_per_s": round(images_per_second, 2), "wall_time": round(state.wall_time, 2),
            "cpu_time": round(state.cpu_time, 2)}


def load_training_data(config: TrainConfig) -> tuple[Dataset, str]:
    """The whole training set of config.dataset (MNIST falls back to mnist-5k offline), and its name."""
    size = config.synthetic_size if config.dataset == "synthetic" else None
    return data.load_dataset_with_fallback(config.dataset, config.data_root, image_size=config.image_size,
                                           channels=config.channels, size=size, seed=config.seed)


def classes_of(dataset: Dataset, config: TrainConfig) -> int:
    """The number of classes a conditional run trains on: the dataset's, which config.num_classes must match."""
    classes = len(getattr(dataset, "classes", []))
    if classes < 2:
        raise ConfigError(f"conditional training needs labelled data, and {config.dataset} has no classes: use mnist, "
                          f"mnist-5k or a folder with one subfolder per class")
    if config.num_classes not in (0, classes):
        raise ConfigError(f"num_classes is {config.num_classes}, but {config.dataset} has {classes} classes")
    return classes


@contextmanager
def stop_at_step_boundary():
    """Ctrl-C (or a notebook's interrupt) sets a flag the loop checks between steps, so the run can
    checkpoint a consistent state and stop; a second Ctrl-C interrupts at once."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        requested.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def closing(*closables):
    """Close each of these that is not None on the way out, however the block ends."""
    try:
        yield
    finally:
        for closable in closables:
            if closable is not None:
                closable.close()


def progress_bar(config: TrainConfig, start: int, precision: str, disable: bool):
    from tqdm.auto import tqdm

    arm = "SAGAN" if config.attn else "baseline"
    return tqdm(total=config.steps, initial=start, disable=disable, desc=f"{arm} {config.dataset} {precision}",
                unit="step", dynamic_ncols=True)


def postfix(row: dict) -> dict[str, str]:
    """What the progress bar shows of a metrics row."""
    shown = {"D": f"{row['d_loss']:.3f}", "G": f"{row['g_loss']:.3f}", "img/s": f"{row['img_per_s']:.0f}"}
    gammas = [value for name, value in row.items() if name.startswith("gamma_")]
    if gammas:
        shown["gamma"] = " ".join(f"{gamma:+.3f}" for gamma in gammas)
    return shown


def compare(config: TrainConfig, **kwargs) -> dict[str, Path]:
    """Train the attention model and its baseline with the same seed, data order and fixed noise.

    Run directories: <out>/without_attention and <out>/with_attention; an arm that already has a
    checkpoint is resumed, so calling compare again continues both. kwargs go to train().
    """
    root = Path(config.out) if config.out else Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{config.dataset}-compare"
    return {name: train_or_resume(dataclasses.replace(config, attn=attn, out=str(root / name)), **kwargs)
            for name, attn in (("without_attention", False), ("with_attention", True))}


def train_or_resume(config: TrainConfig, **kwargs) -> Path:
    """train(config), resuming config.out when it already holds a checkpoint, so calling it again continues the run."""
    return train(config, resume=config.out is not None and bool(checkpoint_files(config.out)), **kwargs)


# ---------------------------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> tuple[dict, argparse.Namespace]:
    """Flags for every TrainConfig field (only those given are returned), plus --resume, --compare and --preset."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)  # `X | None` -> X
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=f.metadata["help"])
        elif typing.get_origin(kind) is tuple:  # tuple[int, ...]: --g-attn-sizes 7 14
            parser.add_argument(flag, type=typing.get_args(kind)[0], nargs="+", default=argparse.SUPPRESS,
                                metavar="SIZE", help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"{f.metadata['help']} (default: {f.default})")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its latest checkpoint")
    parser.add_argument("--compare", action="store_true", help="train the attention model and its baseline, same seed")
    parser.add_argument("--preset", choices=PRESETS, default="default",
                        help="start from these defaults; other flags override them ('original': the original project's recipe)")
    args = parser.parse_args(argv)
    extras = argparse.Namespace(**{name: args.__dict__.pop(name) for name in ("resume", "compare", "preset")})
    return vars(args), extras


def config_from_args(overrides: dict, extras: argparse.Namespace) -> TrainConfig:
    """A new run's config from the flags, or a resumed run's config.json with the flags that may change."""
    if not extras.resume:
        return TrainConfig.from_preset(extras.preset, **overrides)
    if extras.preset != "default":
        raise ConfigError("--preset sets up a new run; a resumed run keeps the settings in its config.json")
    saved = read_config(Path(extras.resume) / "with_attention" if extras.compare else extras.resume)
    config = TrainConfig(**{**complete_config(saved), **overrides, "out": extras.resume})
    check_resumable(saved, config)
    return config


def main(argv: list[str] | None = None) -> int:
    overrides, extras = parse_args(argv)
    try:
        config = config_from_args(overrides, extras)
        if extras.compare:
            message = "\n".join(f"{name}: {path}" for name, path in compare(config).items())
        else:
            message = f"run directory: {train(config, resume=bool(extras.resume))}"
        if distributed.is_main_process():
            print(message)
    except (ConfigError, data.DataError, FileNotFoundError, NonFiniteLossError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(interrupt or "Interrupted.", file=sys.stderr)
        return 130
    finally:
        distributed.leave()
    return 0


if __name__ == "__main__":
    sys.exit(main())
