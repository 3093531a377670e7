"""Train SAGAN or its no-attention baseline: hinge loss, TTUR, optional EMA and AMP, exact resume.

    python train.py --dataset mnist --steps 2000              # SAGAN on MNIST, run dir under runs/
    python train.py --dataset mnist --steps 2000 --no-attn    # the DCGAN baseline
    python train.py --dataset celeba --compare --out runs/cmp # both arms, same seed, data order and noise
    python train.py --resume runs/cmp/with_attention --steps 4000
    torchrun --nproc_per_node=4 train.py --dataset celeba   # DDP: global batch = 4 x --batch-size

Every TrainConfig field is a flag (`batch_size` -> `--batch-size`); notebooks call train(config).
"""
import argparse
import csv
import dataclasses
import io
import json
import math
import random
import signal
import sys
import threading
import time
import typing
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Dataset
from torchvision.utils import save_image

import data
from augment import diff_augment, parse_policy
from blocks import INITS, initialise
from checkpoint import (LATEST, CheckpointError, atomic_save, atomic_write_text, checkpoint_files, generator_kwargs,
                        load_checkpoint, model_module, read_config)
from ema import standing_statistics, update_ema
from utils import memory_format_for, pick_device, to_unit_range

LOSSES = ("hinge", "nonsaturating", "wgan-gp")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
IMAGE_SIZES = {"mnist": 28, "mnist-5k": 28}  # every other dataset trains the 64x64 model
GRID_CLASSES = 16  # a conditional run's sample grid shows the first 16 classes, one row each


def _help(text: str, default=None, **kwargs):
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Every knob of a run; defaults are the original project's (batch 64, TTUR 1e-4 / 4e-4, betas 0 / 0.9)."""

    # data
    dataset: str = _help("mnist, mnist-5k, celeba, folder or synthetic", "mnist")
    data_root: str | None = _help("data folder (default: $SAGAN_DATA, else ./data); for 'folder', the image folder")
    image_size: int = _help("28 (model_28.py) or 64 (model_64.py); 0 = 28 for MNIST, 64 otherwise", 0)
    synthetic_size: int = _help("number of images of the synthetic set", 2048)
    # model
    attn: bool = _help("self-attention layers (--no-attn: the DCGAN baseline)", True)
    attn_variant: str = _help("'original' (q/k C/2, v C) or 'paper' (q/k C/8, v C/2, pooled keys)", "original")
    g_attn_sizes: tuple[int, ...] | None = _help("sizes of G's feature maps that attention follows (default: the original's, "
                                                 "14 at 28x28, 16 32 at 64x64)")
    d_attn_sizes: tuple[int, ...] | None = _help("sizes of D's feature maps that attention follows (default: the original's, "
                                                 "3 at 28x28, 8 4 at 64x64)")
    z_dim: int = _help("noise dimension", 100)
    conv_dim: int = _help("base channel width", 64)
    spectral_norm: bool = _help("spectral norm in G and D (--no-spectral-norm: plain DCGAN layers)", True)
    conditional: bool = _help("class-conditional G (conditional BatchNorm) and D (projection), trained on the labels", False)
    num_classes: int = _help("classes of a conditional run (0: as many as the dataset has)", 0)
    init: str = _help("weight initialisation: default (torch's), normal (DCGAN's N(0, 0.02)) or orthogonal", "default")
    # optimisation
    steps: int = _help("generator updates in total", 2000)
    minutes: float = _help("also stop after this many minutes of training (evaluation not counted); 0 = no limit", 0.0)
    clock: str = _help("what --minutes, --eval-minutes and --checkpoint-minutes count: 'wall' (elapsed time) or 'cpu' "
                       "(this process's CPU time, which other programs on the machine do not eat into)", "wall")
    batch_size: int = _help("images per batch (per process)", 64)
    g_lr: float = _help("generator learning rate", 1e-4)
    d_lr: float = _help("discriminator learning rate (TTUR: 4x the generator's)", 4e-4)
    beta1: float = _help("Adam beta1", 0.0)
    beta2: float = _help("Adam beta2", 0.9)
    loss: str = _help("hinge, nonsaturating (classic DCGAN) or wgan-gp", "hinge")
    gp_weight: float = _help("gradient-penalty weight for wgan-gp", 10.0)
    r1_weight: float = _help("R1: weight gamma of the zero-centred gradient penalty gamma/2 E||grad D(real)||^2; 0 = off", 0.0)
    r1_every: int = _help("apply R1 every N steps, scaled by N (lazy regularisation, as in StyleGAN2)", 16)
    augment: str = _help("DiffAugment policy for everything D sees: '' (off), e.g. 'translation,cutout' or "
                         "'color,translation,cutout'", "")
    d_steps: int = _help("discriminator updates per generator update (5 is usual for wgan-gp)", 1)
    reuse_fakes: bool = _help("the G update reuses the D update's fakes: one G forward per step instead of two", False)
    ema_decay: float = _help("EMA of G's weights for samples and evaluation; 0 = off (0.999 is usual)", 0.0)
    ema_start: int = _help("the EMA copies G until this step, then averages", 0)
    seed: int = _help("seeds weights, data order, noise and the fixed sample noise", 0)
    # machine
    device: str = _help("auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps", "auto")
    precision: str = _help("auto (bf16 or fp16 on CUDA, fp32 elsewhere), fp32, bf16 or fp16", "auto")
    channels_last: bool | None = _help("channels_last memory format (default: on for the CPU, off on CUDA and MPS)")
    compile: bool = _help("torch.compile G and D", False)
    threads: int = _help("CPU threads for torch (0: torch's default)", 0)
    num_workers: int = _help("data-loading workers (-1: 4 on CUDA for image files, else 0)", -1)
    sync_bn: bool = _help("under torchrun, SyncBatchNorm in G: batch statistics over all processes (CUDA only)", False)
    # outputs
    out: str | None = _help("run directory (default: runs/<timestamp>-<dataset>-<arm>)")
    sample_every: int = _help("save an 8x8 grid of the fixed noise every N steps", 100)
    log_every: int = _help("append to metrics.csv every N steps", 10)
    checkpoint_every: int = _help("keep checkpoints/step_N.pt every N steps (latest.pt is written then too)", 500)
    checkpoint_minutes: float = _help("also write checkpoints/latest.pt every N minutes of training; 0 = off", 5.0)
    eval_every: int = _help("evaluate sample quality every N steps (0: never)", 0)
    eval_minutes: float = _help("also evaluate every N minutes of training (0: never)", 0.0)
    eval_n: int = _help("generated images per evaluation during training", 1000)
    quiet: bool = _help("no progress bar", False)

    def __post_init__(self):
        if not self.image_size:
            self.image_size = IMAGE_SIZES.get(self.dataset, 64)
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
        require(self.attn_variant in ("original", "paper"), "attn_variant", "'original' or 'paper'")
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
        for name in ("minutes", "checkpoint_minutes", "eval_minutes", "r1_weight"):
            require(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "a finite number >= 0")
        require(self.num_workers >= -1, "num_workers", "-1 (auto), 0 or a positive integer")
        for name in ("g_lr", "d_lr"):
            require(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name, "a positive finite number")
        for name in ("beta1", "beta2", "ema_decay"):
            require(0 <= getattr(self, name) < 1, name, "in [0, 1)")
        require(math.isfinite(self.gp_weight) and self.gp_weight >= 0, "gp_weight", "a finite number >= 0")

    @property
    def channels(self) -> int:
        return model_module(self.image_size).IMAGE_SHAPE[0]


class ConfigError(ValueError):
    """A configuration value that makes no sense, or a resume that does not match its run."""


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is left as it was."""


# Fields a resumed run may change; every other field must match the run's config.json.
RESUMABLE_OVERRIDES = {"steps", "minutes", "clock", "device", "precision", "channels_last", "compile", "threads", "num_workers",
                       "sync_bn", "sample_every", "log_every", "checkpoint_every", "checkpoint_minutes", "eval_every",
                       "eval_minutes", "eval_n", "quiet", "data_root", "out"}

# The original project's training recipe (github.com/franknb/Self-attention-DCGAN), one switch away: --preset original.
PRESETS = {
    "default": {},
    "original": dict(g_lr=1e-4, d_lr=4e-4, beta1=0.0, beta2=0.9, batch_size=64, loss="hinge", d_steps=1, z_dim=100,
                     conv_dim=64, attn_variant="original", g_attn_sizes=None, d_attn_sizes=None, spectral_norm=True,
                     init="default", augment="", r1_weight=0.0, reuse_fakes=False, ema_decay=0.0, ema_start=0),
}


def complete_config(saved: dict) -> dict:
    """A run's config.json with the fields it predates filled in as that run trained: a field added later
    takes the original recipe's value where that preset sets it (the behaviour before the field existed),
    otherwise its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return defaults | PRESETS["original"] | saved


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
    # The fused attention kernels have no double backward; the math kernel is the same function.
    with torch.autocast(real.device.type, enabled=False), sdpa_kernel([SDPBackend.MATH]):
        (grad,) = torch.autograd.grad(_logits(D, mixed, labels).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def _logits(D: nn.Module, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """D's logits, passing labels only to a conditional D (any critic module works unconditionally)."""
    return D(images) if labels is None else D(images, labels)


def r1_penalty(D: nn.Module, real: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): mean of ||grad_x D(x)||^2 at real images, computed in fp32."""
    real = real.detach().float().requires_grad_(True)
    with torch.autocast(real.device.type, enabled=False), sdpa_kernel([SDPBackend.MATH]):
        (grad,) = torch.autograd.grad(_logits(D, real, labels).sum(), real, create_graph=True)
    return grad.flatten(1).square().sum(dim=1).mean()


# ---------------------------------------------------------------------------------------------- processes

@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_preference: str) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo otherwise)."""
    import os

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Distributed(), pick_device(device_preference)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(device_preference)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank), device


def mean_over_processes(values: dict[str, torch.Tensor], job: Distributed) -> dict[str, torch.Tensor]:
    """Each metric averaged over all processes (unchanged in a single process)."""
    if not job.enabled:
        return values
    stacked = torch.stack([v.float() for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, stacked / job.world_size))


def any_process(flag: bool, job: Distributed, device: torch.device) -> bool:
    """True when `flag` is set in any process, so that every process takes the same branch."""
    if not job.enabled:
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


# ---------------------------------------------------------------------------------------------- state

@dataclass
class TrainState:
    """Everything a training step touches; all of it goes into a checkpoint."""

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
    noise: torch.Generator  # CPU generator for z and GP mixing: the same numbers on every device
    amp_dtype: torch.dtype | None
    job: Distributed = Distributed()
    # What the steps call: G and D compiled when asked ("local"), and wrapped in DDP under torchrun
    # ("synced"). Only passes whose backward updates that network go through its DDP wrapper.
    G_local: Callable = None
    D_local: Callable = None
    G_synced: Callable = None
    D_synced: Callable = None
    step: int = 0
    wall_time: float = 0.0  # seconds of training so far, summed over every process that resumed the run
    cpu_time: float = 0.0  # CPU seconds of this process (rank 0's in a checkpoint) spent training, likewise
    ema_stale: bool = False  # G_ema's weights moved since its BatchNorm statistics were last computed

    def __post_init__(self):
        # `is None`, not truthiness: a compiled module has no __len__ to answer bool().
        self.G_local = self.G if self.G_local is None else self.G_local
        self.D_local = self.D if self.D_local is None else self.D_local
        self.G_synced = self.G_local if self.G_synced is None else self.G_synced
        self.D_synced = self.D_local if self.D_synced is None else self.D_synced

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def sample_z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.config.z_dim, generator=self.noise).to(self.device, non_blocking=True)

    def sample_labels(self, n: int) -> torch.Tensor | None:
        """Uniformly drawn classes for n fakes of a conditional run; None otherwise."""
        if not self.config.conditional:
            return None
        return torch.randint(self.config.num_classes, (n,), generator=self.noise).to(self.device, non_blocking=True)

    def training_seconds(self) -> float:
        """Training time by the clock the config's budgets count (wall or CPU)."""
        return self.cpu_time if self.config.clock == "cpu" else self.wall_time

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
        z = torch.randn(n, self.config.z_dim, generator=generator).to(self.device)
        return z, None if self.G.balanced_labels(n) is None else self.G.balanced_labels(n).to(self.device)

    @property
    def memory_format(self) -> torch.memory_format:
        """Of G, D and the real batches."""
        return memory_format_for(self.device, self.config.channels_last)

    def next_real(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch of real images and, in a conditional run, their labels."""
        images, labels = next(self.loader) if self.config.conditional else (next(self.loader), None)
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return images, None if labels is None else labels.to(self.device, non_blocking=True)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on a device; None means plain fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return None  # CPU bf16 only pays on CPUs with AMX; ask for it with --precision bf16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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


def build_state(config: TrainConfig, dataset: Dataset, device: torch.device, job: Distributed = Distributed()) -> TrainState:
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
    betas = (config.beta1, config.beta2)
    amp_dtype = resolve_precision(config.precision, device)
    use_scaler = amp_dtype == torch.float16
    loader = data.EndlessLoader(dataset, config.batch_size, seed=config.seed, rank=job.rank, world_size=job.world_size,
                                num_workers=_num_workers(config, dataset, device), pin_memory=device.type == "cuda",
                                labels=config.conditional)
    state = TrainState(
        config=config, device=device, G=G, D=D, G_ema=G_ema,
        opt_G=torch.optim.Adam(G.parameters(), config.g_lr, betas=betas),
        opt_D=torch.optim.Adam(D.parameters(), config.d_lr, betas=betas),
        scaler_G=torch.amp.GradScaler(device.type, enabled=use_scaler),
        scaler_D=torch.amp.GradScaler(device.type, enabled=use_scaler),
        loader=loader, noise=torch.Generator().manual_seed(noise_seed(config.seed, job.rank)), amp_dtype=amp_dtype, job=job,
    )
    if config.compile:
        state.G_local = state.G_synced = torch.compile(G)
        state.D_local = state.D_synced = torch.compile(D)
    if job.enabled:
        ids = [device.index] if device.type == "cuda" else None
        G_ddp, D_ddp = DistributedDataParallel(G, device_ids=ids), DistributedDataParallel(D, device_ids=ids)
        state.G_synced = torch.compile(G_ddp) if config.compile else G_ddp
        state.D_synced = torch.compile(D_ddp) if config.compile else D_ddp
    return state


def noise_seed(seed: int, rank: int, step: int = 0) -> int:
    """The noise stream of one process: distinct per rank, so that processes draw different z."""
    return seed + 1 + 1_000_003 * rank + 7_919 * step


def _num_workers(config: TrainConfig, dataset: Dataset, device: torch.device) -> int:
    if config.num_workers >= 0:
        return config.num_workers
    in_memory = isinstance(dataset, data.TensorImages)
    return 4 if device.type == "cuda" and not in_memory else 0


# ---------------------------------------------------------------------------------------------- one step

Fakes = tuple[torch.Tensor, torch.Tensor | None]  # generated images and, in a conditional run, their labels


def discriminator_step(state: TrainState, fakes: Fakes | None = None) -> dict[str, torch.Tensor]:
    """One D update on a real batch and a batch of detached fakes (drawn here unless given)."""
    config, D = state.config, state.D
    real, real_labels = state.next_real()
    if fakes is None:
        with torch.no_grad(), state.autocast():  # no graph through G: D's loss never reaches it
            fake_labels = state.sample_labels(real.shape[0])
            fakes = state.G_local(state.sample_z(real.shape[0]), fake_labels), fake_labels
    fake, fake_labels = fakes[0].detach(), fakes[1]
    labels = None if real_labels is None else torch.cat([real_labels, fake_labels])
    with state.autocast():
        # D has no batch statistics, so one pass over real and fake equals two (and runs one power iteration).
        d_real, d_fake = state.D_synced(state.augment(torch.cat([real, fake])), labels).float().chunk(2)
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
    """A batch from fresh noise with G's graph kept, for G's update (through DDP's G when synced)."""
    with state.autocast():
        labels = state.sample_labels(state.config.batch_size)
        return state.G_synced(state.sample_z(state.config.batch_size), labels), labels


def generator_step(state: TrainState, fakes: Fakes | None = None) -> dict[str, torch.Tensor]:
    """One G update through a frozen D: D's weights, grads and power-iteration vectors are left untouched.
    `fakes`, if given, come from fakes_for_G; otherwise G makes a batch from fresh noise here."""
    fake, labels = fakes if fakes is not None else fakes_for_G(state)
    D = state.D
    D.eval().requires_grad_(False)  # eval: spectral norm reuses its vectors; no grads: no wasted weight gradients
    try:
        with state.autocast():
            loss = generator_loss(state.config.loss, state.D_local(state.augment(fake), labels).float())
        state.opt_G.zero_grad(set_to_none=True)
        state.scaler_G.scale(loss).backward()
        state.scaler_G.step(state.opt_G)
        state.scaler_G.update()
    finally:
        D.train().requires_grad_(True)
    if state.G_ema is not None:
        # state.step counts the steps before this one: the update of step ema_start is the first that averages
        update_ema(state.G_ema, state.G, state.config.ema_decay if state.step + 1 >= state.config.ema_start else 0.0)
        state.ema_stale = True
    return {"g_loss": loss.detach()}


def train_step(state: TrainState) -> dict[str, torch.Tensor]:
    """d_steps discriminator updates, then one generator update; returns the step's metrics as tensors.

    With reuse_fakes, G runs once per step: the last D update trains on its batch (detached), and the G
    update back-propagates through the same batch and the updated D, as the PyTorch DCGAN example does.
    Without it, the G update draws fresh noise and runs G again, as the original project does."""
    for _ in range(state.config.d_steps - 1):
        discriminator_step(state)
    fakes = fakes_for_G(state) if state.config.reuse_fakes else None
    metrics = discriminator_step(state, fakes)
    metrics |= generator_step(state, fakes)
    state.step += 1
    return metrics


# ---------------------------------------------------------------------------------------------- checkpoints

def state_dict(state: TrainState) -> dict:
    """The whole training state as one dict (what checkpoints hold)."""
    rng = {"torch": torch.get_rng_state(), "noise": state.noise.get_state(), "python": random.getstate(),
           "numpy": _plain_numpy_state(np.random.get_state())}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "G": state.G.state_dict(), "D": state.D.state_dict(),
        "G_ema": state.G_ema.state_dict() if state.G_ema is not None else None,
        "opt_G": state.opt_G.state_dict(), "opt_D": state.opt_D.state_dict(),
        "scaler": {"G": state.scaler_G.state_dict(), "D": state.scaler_D.state_dict()},
        "step": state.step, "wall_time": state.wall_time, "cpu_time": state.cpu_time, "config": dataclasses.asdict(state.config), "rng": rng, "loader": state.loader.state_dict(),
    }


def _plain_numpy_state(numpy_state: tuple) -> tuple:
    """numpy's RNG state with its key array as a list, so that the checkpoint loads with weights_only=True."""
    name, keys, *rest = numpy_state
    return (name, keys.tolist(), *rest)


def load_state_dict(state: TrainState, checkpoint: dict) -> None:
    """Restore a TrainState built for the same config from a checkpoint dict."""
    state.G.load_state_dict(checkpoint["G"])
    state.D.load_state_dict(checkpoint["D"])
    if state.G_ema is not None:
        state.G_ema.load_state_dict(checkpoint["G_ema"])
    state.opt_G.load_state_dict(checkpoint["opt_G"])
    state.opt_D.load_state_dict(checkpoint["opt_D"])
    state.scaler_G.load_state_dict(checkpoint["scaler"]["G"])
    state.scaler_D.load_state_dict(checkpoint["scaler"]["D"])
    state.loader.load_state_dict(checkpoint["loader"])
    rng = checkpoint["rng"]
    torch.set_rng_state(rng["torch"])
    if state.job.is_main:
        state.noise.set_state(rng["noise"])
    else:  # checkpoints hold rank 0's stream; the others restart theirs from the step, whatever the old world size
        state.noise.manual_seed(noise_seed(state.config.seed, state.job.rank, checkpoint["step"]))
    random.setstate(rng["python"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state.step = checkpoint["step"]
    state.wall_time = checkpoint.get("wall_time", 0.0)  # checkpoints before these fields count from the resume
    state.cpu_time = checkpoint.get("cpu_time", 0.0)


def save_checkpoint(state: TrainState, run_dir: Path) -> Path:
    """Write checkpoints/latest.pt atomically, and keep a step_N.pt copy every checkpoint_every steps."""
    folder = run_dir / "checkpoints"
    state.sampler()  # the EMA generator's BatchNorm statistics up to date in the file
    checkpoint = state_dict(state)
    atomic_save(checkpoint, folder / LATEST)
    if state.step % state.config.checkpoint_every == 0:
        atomic_save(checkpoint, folder / f"step_{state.step:06d}.pt")
    return folder / LATEST


def check_resumable(saved: dict, config: TrainConfig) -> None:
    """Refuse to resume with settings that would make a different run."""
    wanted = dataclasses.asdict(config)
    saved = dataclasses.asdict(TrainConfig(**complete_config(saved)))  # as the run trained, lists read as tuples
    clashes = [f"{name}: run has {saved[name]!r}, asked for {wanted[name]!r}"
               for name in wanted if name not in RESUMABLE_OVERRIDES and saved[name] != wanted[name]]
    if clashes:
        raise ConfigError("Cannot resume: these settings differ from the run's config.json (start a new run instead):\n  "
                          + "\n  ".join(clashes))


# ---------------------------------------------------------------------------------------------- run directory

class RunLog:
    """metrics.csv, sample grids and (when installed) TensorBoard events of one run directory."""

    def __init__(self, run_dir: Path, columns: list[str], resume_step: int):
        self.run_dir, self.columns = run_dir, columns
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.csv_path = run_dir / "metrics.csv"
        self._trim_after(resume_step)
        new = not self.csv_path.exists()
        self._file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._file, columns)
        if new:
            self._csv.writeheader()
        self._tensorboard = _tensorboard_writer(run_dir)

    def _trim_after(self, step: int) -> None:
        """Drop rows logged after the checkpoint a resumed run restarts from (they will be logged again), and a
        last row cut short by a crash; rewritten atomically, so a crash now loses nothing."""
        if not self.csv_path.exists():
            return
        with open(self.csv_path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if None not in row.values() and row["step"].isdigit()]
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(row for row in rows if int(row["step"]) <= step)
        atomic_write_text(text.getvalue(), self.csv_path)

    def metrics(self, row: dict[str, float]) -> None:
        self._csv.writerow(row)
        self._file.flush()
        if self._tensorboard:
            for name, value in row.items():
                if name != "step" and value != "":
                    self._tensorboard.add_scalar(name, value, row["step"])

    def grid(self, images: torch.Tensor, step: int) -> Path:
        path = self.run_dir / "samples" / f"step_{step:06d}.png"
        tmp = path.with_name(f".{path.name}.tmp.png")
        save_image(to_unit_range(images), tmp, nrow=8, padding=2)
        tmp.replace(path)
        if self._tensorboard:
            self._tensorboard.add_images("samples", to_unit_range(images), step)
        return path

    def close(self) -> None:
        self._file.close()
        if self._tensorboard:
            self._tensorboard.close()


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir))


def default_run_dir(config: TrainConfig) -> Path:
    arm = "attn" if config.attn else "noattn"
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{config.dataset}-{arm}"


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


# ---------------------------------------------------------------------------------------------- the loop

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
    job, device = setup_distributed(config.device)
    if dataset is None:
        dataset, config.dataset = load_training_data(config)
    if config.conditional:
        config.num_classes = classes_of(dataset, config)
    run_dir = _shared_run_dir(config, job)
    config.out = str(run_dir)
    state = build_state(config, dataset, device, job)
    fixed_inputs = _open_run(state, run_dir, resume)

    gamma_columns = [f"gamma_G{i}" for i in range(len(state.G.attention_gammas()))] + \
                    [f"gamma_D{i}" for i in range(len(state.D.attention_gammas()))]
    evaluator = _evaluator(config, device) if job.is_main else None
    eval_columns = evaluator.columns if evaluator else []
    if evaluator and state.G_ema is not None:
        eval_columns += [f"ema_{column}" for column in evaluator.columns]
    columns = ["step", "d_loss", "g_loss", "d_real", "d_fake", *gamma_columns, "img_per_s", "wall_time", "cpu_time", *eval_columns]
    log = RunLog(run_dir, columns, state.step) if job.is_main else None
    progress = _progress_bar(config, state.step, disable=config.quiet or not job.is_main)
    last_good = run_dir / "checkpoints" / LATEST
    clock = Stopwatch(state.wall_time, state.cpu_time)
    logged_at, images_since = state.wall_time, 0
    try:
        with stop_at_step_boundary() as stop_requested:
            last = state.step >= config.steps or out_of_time(state)
            while not last:
                before = state.training_seconds()
                metrics = train_step(state)
                step, (state.wall_time, state.cpu_time) = state.step, clock.read()
                images_since += config.batch_size * job.world_size
                # A NaN in any process reaches every process's weights through the gradient all-reduce
                # within this step, so all processes stop here together.
                if not all(torch.isfinite(value) for value in metrics.values()):
                    values = ", ".join(f"{k}={v.item():.4g}" for k, v in metrics.items())
                    kept = f"the last good checkpoint, {last_good}, is intact" if last_good.exists() else "no checkpoint was written yet"
                    raise NonFiniteLossError(f"Non-finite loss at step {step} ({values}); {kept}. "
                                             "Try lower learning rates, --precision fp32 or --loss hinge.")
                progress.update(1)
                last = step >= config.steps or any_process(job.is_main and out_of_time(state), job, device)
                evaluating = evaluator is not None and (last or due(step, config.eval_every, before,
                                                                    state.training_seconds(), config.eval_minutes))
                if step % config.log_every == 0 or last or evaluating:
                    metrics = mean_over_processes(metrics, job)
                    row = {"step": step, **{k: round(v.item(), 5) for k, v in metrics.items()},
                           **dict(zip(gamma_columns, [round(g, 5) for g in state.G.attention_gammas() + state.D.attention_gammas()])),
                           "img_per_s": round(images_since / max(state.wall_time - logged_at, 1e-9), 2),
                           "wall_time": round(state.wall_time, 2), "cpu_time": round(state.cpu_time, 2)}
                    logged_at, images_since = state.wall_time, 0
                    if evaluating:
                        with clock.paused():  # measuring is not training: the budget and img/s leave it out
                            row |= evaluate_generators(state, evaluator)
                    if log:
                        log.metrics(row)
                    progress.set_postfix(_postfix(row, gamma_columns), refresh=False)
                stopping = any_process(stop_requested.is_set(), job, device)
                if job.is_main:
                    if step % config.sample_every == 0 or last:
                        grid = log.grid(state.sampler().sample(*fixed_inputs), step)
                        if on_sample:
                            on_sample(step, grid)
                    if last or stopping or due(step, config.checkpoint_every, before, state.training_seconds(),
                                               config.checkpoint_minutes):
                        last_good = save_checkpoint(state, run_dir)
                if stopping:  # checkpointed above; raising tells callers (compare, notebooks) to stop too
                    raise KeyboardInterrupt(f"Stopped at step {step}; checkpoint saved. "
                                            f"Resume with: python train.py --resume {run_dir}")
    finally:
        progress.close()
        if log:
            log.close()
    return run_dir


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


def evaluate_generators(state: TrainState, evaluator) -> dict[str, float]:
    """The evaluator's columns for G, and for the EMA generator (prefixed ema_) when the run keeps one."""
    row = evaluator(state.G, state.config.eval_n)
    if state.G_ema is not None:
        row |= {f"ema_{name}": value for name, value in evaluator(state.sampler(), state.config.eval_n).items()}
    return row


def classes_of(dataset: Dataset, config: TrainConfig) -> int:
    """The number of classes a conditional run trains on: the dataset's, which config.num_classes must match."""
    classes = len(getattr(dataset, "classes", []))
    if classes < 2:
        raise ConfigError(f"conditional training needs labelled data, and {config.dataset} has no classes: use mnist, "
                          f"mnist-5k or a folder with one subfolder per class")
    if config.num_classes not in (0, classes):
        raise ConfigError(f"num_classes is {config.num_classes}, but {config.dataset} has {classes} classes")
    return classes


def load_training_data(config: TrainConfig) -> tuple[Dataset, str]:
    """The whole training set of config.dataset (MNIST falls back to mnist-5k offline), and its name."""
    size = config.synthetic_size if config.dataset == "synthetic" else None
    return data.load_dataset_with_fallback(config.dataset, config.data_root, image_size=config.image_size,
                                           channels=config.channels, size=size, seed=config.seed)


def _shared_run_dir(config: TrainConfig, job: Distributed) -> Path:
    """config.out, or a fresh timestamped folder chosen by rank 0 for every process."""
    if config.out:
        return Path(config.out)
    chosen = [str(default_run_dir(config))]
    if job.enabled:
        dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def _open_run(state: TrainState, run_dir: Path, resume: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Restore a resumed run (every process) and write config.json and fixed_z.pt (rank 0); returns the inputs
    of the sample grids (rank 0): the 64 fixed noise vectors, or in a conditional run the first 8 of them
    repeated for each class (up to GRID_CLASSES), one row per class."""
    config, is_main = state.config, state.job.is_main
    if is_main:
        for stale in [*run_dir.glob(".*.tmp"), *run_dir.glob("checkpoints/.*.tmp"), *run_dir.glob("samples/.*.tmp.png")]:
            stale.unlink()  # left by a process killed while writing; the file it was replacing is intact
    if resume and not checkpoint_files(run_dir):
        warnings.warn(f"{run_dir} has no checkpoint yet (it stopped before its first one): starting it from step 0")
        resume = False
    if resume:
        checkpoint = load_checkpoint(run_dir, state.device)
        check_resumable(checkpoint["config"], config)
        load_state_dict(state, checkpoint)
    elif checkpoint_files(run_dir):
        raise ConfigError(f"{run_dir} already holds a run: resume it (--resume {run_dir}) or choose another --out")
    if not is_main:
        return None
    fixed_z = torch.randn(64, config.z_dim, generator=torch.Generator().manual_seed(config.seed))
    atomic_save(fixed_z, run_dir / "fixed_z.pt")
    atomic_write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n", run_dir / "config.json")
    if not config.conditional:
        return fixed_z, None
    rows = min(config.num_classes, GRID_CLASSES)
    return fixed_z[:8].repeat(rows, 1), torch.arange(rows).repeat_interleave(8)


def _evaluator(config: TrainConfig, device: torch.device):
    """evaluate.TrainingEvaluator for runs that evaluate during training, else None."""
    if not (config.eval_every or config.eval_minutes):
        return None
    import evaluate

    return evaluate.TrainingEvaluator(config.dataset, device=device, data_root=config.data_root, seed=config.seed,
                                      conditional=config.conditional)


def _progress_bar(config: TrainConfig, start: int, disable: bool):
    from tqdm.auto import tqdm

    arm = "SAGAN" if config.attn else "baseline"
    return tqdm(total=config.steps, initial=start, disable=disable, desc=f"{arm} {config.dataset}",
                unit="step", dynamic_ncols=True)


def _postfix(row: dict, gamma_columns: list[str]) -> dict[str, str]:
    postfix = {"D": f"{row['d_loss']:.3f}", "G": f"{row['g_loss']:.3f}", "img/s": f"{row['img_per_s']:.0f}"}
    if gamma_columns:
        postfix["gamma"] = " ".join(f"{row[c]:+.3f}" for c in gamma_columns)
    return postfix


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
    """Flags for every TrainConfig field (only those given are returned), plus --resume and --compare."""
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
            runs = compare(config)
            message = "\n".join(f"{name}: {path}" for name, path in runs.items())
        else:
            message = f"run directory: {train(config, resume=bool(extras.resume))}"
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(message)
    except (ConfigError, data.DataError, FileNotFoundError, NonFiniteLossError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(interrupt or "Interrupted.", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
