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
import json
import math
import random
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
from checkpoint import LATEST, atomic_save, generator_kwargs, load_checkpoint, model_module, read_config
from utils import memory_format_for, pick_device, to_unit_range

LOSSES = ("hinge", "nonsaturating", "wgan-gp")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
IMAGE_SIZES = {"mnist": 28, "mnist-5k": 28}  # every other dataset trains the 64x64 model


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
    z_dim: int = _help("noise dimension", 100)
    conv_dim: int = _help("base channel width", 64)
    spectral_norm: bool = _help("spectral norm in G and D (--no-spectral-norm: plain DCGAN layers)", True)
    # optimisation
    steps: int = _help("generator updates in total", 2000)
    batch_size: int = _help("images per batch (per process)", 64)
    g_lr: float = _help("generator learning rate", 1e-4)
    d_lr: float = _help("discriminator learning rate (TTUR: 4x the generator's)", 4e-4)
    beta1: float = _help("Adam beta1", 0.0)
    beta2: float = _help("Adam beta2", 0.9)
    loss: str = _help("hinge, nonsaturating (classic DCGAN) or wgan-gp", "hinge")
    gp_weight: float = _help("gradient-penalty weight for wgan-gp", 10.0)
    d_steps: int = _help("discriminator updates per generator update (5 is usual for wgan-gp)", 1)
    reuse_fakes: bool = _help("the G update reuses the D update's fakes: one G forward per step instead of two", False)
    ema_decay: float = _help("EMA of G's weights for samples and evaluation; 0 = off (0.999 is usual)", 0.0)
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
    checkpoint_every: int = _help("keep checkpoints/step_N.pt every N steps (latest.pt is always kept)", 500)
    eval_every: int = _help("evaluate sample quality every N steps (0: never)", 0)
    eval_n: int = _help("generated images per evaluation during training", 1000)
    quiet: bool = _help("no progress bar", False)

    def __post_init__(self):
        if not self.image_size:
            self.image_size = IMAGE_SIZES.get(self.dataset, 64)
        self.validate()

    def validate(self) -> None:
        """Refuse nonsensical values up front, naming the field."""
        def require(ok: bool, name: str, expected: str):
            if not ok:
                raise ConfigError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        require(self.dataset in data.DATASETS, "dataset", f"one of {', '.join(data.DATASETS)}")
        require(self.image_size in (28, 64), "image_size", "28 or 64")
        require(self.attn_variant in ("original", "paper"), "attn_variant", "'original' or 'paper'")
        require(self.loss in LOSSES, "loss", f"one of {', '.join(LOSSES)}")
        require(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
        for name in ("steps", "batch_size", "z_dim", "d_steps", "sample_every", "log_every", "checkpoint_every", "eval_n", "synthetic_size"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "a positive integer")
        require(self.conv_dim >= 8 and self.conv_dim % 8 == 0, "conv_dim", "a positive multiple of 8")
        for name in ("eval_every", "threads"):
            require(getattr(self, name) >= 0, name, "0 or a positive integer")
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
RESUMABLE_OVERRIDES = {"steps", "device", "precision", "channels_last", "compile", "threads", "num_workers", "sync_bn",
                       "sample_every", "log_every", "checkpoint_every", "eval_every", "eval_n", "quiet", "data_root", "out"}


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


def gradient_penalty(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
    """WGAN-GP: mean of (||grad_x D(x)|| - 1)^2 at random interpolates of real and fake, computed in fp32."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=noise).to(real.device)
    mixed = torch.lerp(fake.float(), real.float(), alpha).requires_grad_(True)
    # The fused attention kernels have no double backward; the math kernel is the same function.
    with torch.autocast(real.device.type, enabled=False), sdpa_kernel([SDPBackend.MATH]):
        (grad,) = torch.autograd.grad(D(mixed).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


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

    @property
    def memory_format(self) -> torch.memory_format:
        """Of G, D and the real batches."""
        return memory_format_for(self.device, self.config.channels_last)

    def next_real(self) -> torch.Tensor:
        return next(self.loader).to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)


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
                             attn_variant=config.attn_variant)
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
                                num_workers=_num_workers(config, dataset, device), pin_memory=device.type == "cuda")
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

def discriminator_step(state: TrainState, fake: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One D update on a real batch and a batch of detached fakes (drawn here unless given)."""
    config, D = state.config, state.D
    real = state.next_real()
    if fake is None:
        with torch.no_grad(), state.autocast():
            fake = state.G_local(state.sample_z(real.shape[0]))  # no graph through G: D's loss never reaches it
    fake = fake.detach()
    with state.autocast():
        # D has no batch statistics, so one pass over real and fake equals two (and runs one power iteration).
        d_real, d_fake = state.D_synced(torch.cat([real, fake])).float().chunk(2)
        loss = discriminator_loss(config.loss, d_real, d_fake)
    if config.loss == "wgan-gp":
        loss = loss + config.gp_weight * gradient_penalty(D, real, fake, state.noise)
    state.opt_D.zero_grad(set_to_none=True)
    state.scaler_D.scale(loss).backward()
    state.scaler_D.step(state.opt_D)
    state.scaler_D.update()
    return {"d_loss": loss.detach(), "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean()}


def fakes_for_G(state: TrainState) -> torch.Tensor:
    """A batch from fresh noise with G's graph kept, for G's update (through DDP's G when synced)."""
    with state.autocast():
        return state.G_synced(state.sample_z(state.config.batch_size))


def generator_step(state: TrainState, fake: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One G update through a frozen D: D's weights, grads and power-iteration vectors are left untouched.
    `fake`, if given, comes from fakes_for_G; otherwise G makes a batch from fresh noise here."""
    if fake is None:
        fake = fakes_for_G(state)
    D = state.D
    D.eval().requires_grad_(False)  # eval: spectral norm reuses its vectors; no grads: no wasted weight gradients
    try:
        with state.autocast():
            loss = generator_loss(state.config.loss, state.D_local(fake).float())
        state.opt_G.zero_grad(set_to_none=True)
        state.scaler_G.scale(loss).backward()
        state.scaler_G.step(state.opt_G)
        state.scaler_G.update()
    finally:
        D.train().requires_grad_(True)
    if state.G_ema is not None:
        update_ema(state.G_ema, state.G, state.config.ema_decay)
    return {"g_loss": loss.detach()}


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for weights; buffers (BatchNorm statistics and
    spectral-norm vectors) describe the current weights, so they are copied, not averaged."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def train_step(state: TrainState) -> dict[str, torch.Tensor]:
    """d_steps discriminator updates, then one generator update; returns the step's metrics as tensors.

    With reuse_fakes, G runs once per step: the last D update trains on its batch (detached), and the G
    update back-propagates through the same batch and the updated D, as the PyTorch DCGAN example does.
    Without it, the G update draws fresh noise and runs G again, as the original project does."""
    for _ in range(state.config.d_steps - 1):
        discriminator_step(state)
    fake = fakes_for_G(state) if state.config.reuse_fakes else None
    metrics = discriminator_step(state, fake)
    metrics |= generator_step(state, fake)
    state.step += 1
    return metrics


# ---------------------------------------------------------------------------------------------- checkpoints

def state_dict(state: TrainState) -> dict:
    """The whole training state as one dict (what checkpoints hold)."""
    rng = {"torch": torch.get_rng_state(), "noise": state.noise.get_state(), "python": random.getstate(),
           "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "G": state.G.state_dict(), "D": state.D.state_dict(),
        "G_ema": state.G_ema.state_dict() if state.G_ema is not None else None,
        "opt_G": state.opt_G.state_dict(), "opt_D": state.opt_D.state_dict(),
        "scaler": {"G": state.scaler_G.state_dict(), "D": state.scaler_D.state_dict()},
        "step": state.step, "wall_time": state.wall_time, "config": dataclasses.asdict(state.config), "rng": rng, "loader": state.loader.state_dict(),
    }


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
    np.random.set_state(rng["numpy"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state.step = checkpoint["step"]
    state.wall_time = checkpoint.get("wall_time", 0.0)  # checkpoints before this field count from the resume


def save_checkpoint(state: TrainState, run_dir: Path) -> Path:
    """Write checkpoints/latest.pt atomically, and keep a step_N.pt copy every checkpoint_every steps."""
    folder = run_dir / "checkpoints"
    checkpoint = state_dict(state)
    atomic_save(checkpoint, folder / LATEST)
    if state.step % state.config.checkpoint_every == 0:
        atomic_save(checkpoint, folder / f"step_{state.step:06d}.pt")
    return folder / LATEST


def check_resumable(saved: dict, config: TrainConfig) -> None:
    """Refuse to resume with settings that would make a different run."""
    wanted = dataclasses.asdict(config)
    # A field missing from config.json is newer than the run, which therefore ran with the field's default
    # (new fields must default to the old behaviour, as reuse_fakes does).
    saved = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | saved
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
        """Drop rows logged after the checkpoint a resumed run restarts from: they will be logged again."""
        if not self.csv_path.exists():
            return
        with open(self.csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(row for row in rows if int(row["step"]) <= step)

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


@torch.no_grad()
def sample(G: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Images for noise z with G in eval mode (BatchNorm's running statistics stay put), then back to train mode."""
    was_training = G.training
    G.eval()
    try:
        return G(z).float()
    finally:
        G.train(was_training)


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
    run_dir = _shared_run_dir(config, job)
    config.out = str(run_dir)
    state = build_state(config, dataset, device, job)
    fixed_z = _open_run(state, run_dir, resume)

    gamma_columns = [f"gamma_G{i}" for i in range(len(state.G.attention_gammas()))] + \
                    [f"gamma_D{i}" for i in range(len(state.D.attention_gammas()))]
    evaluator = _evaluator(config, device) if job.is_main else None
    columns = ["step", "d_loss", "g_loss", "d_real", "d_fake", *gamma_columns, "img_per_s", "wall_time",
               *(evaluator.columns if evaluator else [])]
    log = RunLog(run_dir, columns, state.step) if job.is_main else None
    sampler = state.G_ema if state.G_ema is not None else state.G
    progress = _progress_bar(config, state.step, disable=config.quiet or not job.is_main)
    last_good = run_dir / "checkpoints" / LATEST
    clock, images_since = time.perf_counter(), 0
    wall_start = clock - state.wall_time
    try:
        with stop_at_step_boundary() as stop_requested:
            while state.step < config.steps:
                metrics = train_step(state)
                step = state.step
                state.wall_time = time.perf_counter() - wall_start
                images_since += config.batch_size * job.world_size
                # A NaN in any process reaches every process's weights through the gradient all-reduce
                # within this step, so all processes stop here together.
                if not all(torch.isfinite(value) for value in metrics.values()):
                    values = ", ".join(f"{k}={v.item():.4g}" for k, v in metrics.items())
                    kept = f"the last good checkpoint, {last_good}, is intact" if last_good.exists() else "no checkpoint was written yet"
                    raise NonFiniteLossError(f"Non-finite loss at step {step} ({values}); {kept}. "
                                             "Try lower learning rates, --precision fp32 or --loss hinge.")
                progress.update(1)
                if step % config.log_every == 0 or step == config.steps:
                    metrics = mean_over_processes(metrics, job)
                    now = time.perf_counter()
                    row = {"step": step, **{k: round(v.item(), 5) for k, v in metrics.items()},
                           **dict(zip(gamma_columns, [round(g, 5) for g in state.G.attention_gammas() + state.D.attention_gammas()])),
                           "img_per_s": round(images_since / (now - clock), 2), "wall_time": round(state.wall_time, 2)}
                    clock, images_since = now, 0
                    if evaluator and config.eval_every and step % config.eval_every == 0:
                        row |= evaluator(sampler, config.eval_n)
                    if log:
                        log.metrics(row)
                    progress.set_postfix(_postfix(row, gamma_columns), refresh=False)
                stopping = any_process(stop_requested.is_set(), job, device)
                if job.is_main:
                    if step % config.sample_every == 0 or step == config.steps:
                        grid = log.grid(sample(sampler, fixed_z), step)
                        if on_sample:
                            on_sample(step, grid)
                    if step % config.checkpoint_every == 0 or step == config.steps or stopping:
                        last_good = save_checkpoint(state, run_dir)
                if stopping:  # checkpointed above; raising tells callers (compare, notebooks) to stop too
                    raise KeyboardInterrupt(f"Stopped at step {step}; checkpoint saved. "
                                            f"Resume with: python train.py --resume {run_dir}")
    finally:
        progress.close()
        if log:
            log.close()
    return run_dir


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


def _open_run(state: TrainState, run_dir: Path, resume: bool) -> torch.Tensor | None:
    """Restore a resumed run (every process) and write config.json and fixed_z.pt (rank 0); returns the fixed noise."""
    config, is_main = state.config, state.job.is_main
    if resume:
        checkpoint = load_checkpoint(run_dir, state.device)
        check_resumable(checkpoint["config"], config)
        load_state_dict(state, checkpoint)
        fixed_z = torch.load(run_dir / "fixed_z.pt")
    else:
        if (run_dir / "checkpoints" / LATEST).exists():
            raise ConfigError(f"{run_dir} already holds a run: resume it (--resume {run_dir}) or choose another --out")
        fixed_z = torch.randn(64, config.z_dim, generator=torch.Generator().manual_seed(config.seed))
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            torch.save(fixed_z, run_dir / "fixed_z.pt")
    if not is_main:
        return None
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    return fixed_z.to(state.device)


def _evaluator(config: TrainConfig, device: torch.device):
    """evaluate.TrainingEvaluator for runs that evaluate during training, else None."""
    if not config.eval_every:
        return None
    import evaluate

    return evaluate.TrainingEvaluator(config.dataset, device=device, data_root=config.data_root, seed=config.seed)


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
    runs = {}
    for name, attn in (("without_attention", False), ("with_attention", True)):
        run_dir = root / name
        arm = dataclasses.replace(config, attn=attn, out=str(run_dir))
        runs[name] = train(arm, resume=(run_dir / "checkpoints" / LATEST).exists(), **kwargs)
    return runs


# ---------------------------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> tuple[dict, argparse.Namespace]:
    """Flags for every TrainConfig field (only those given are returned), plus --resume and --compare."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)  # `X | None` -> X
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"{f.metadata['help']} (default: {f.default})")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its latest checkpoint")
    parser.add_argument("--compare", action="store_true", help="train the attention model and its baseline, same seed")
    args = parser.parse_args(argv)
    extras = argparse.Namespace(resume=args.__dict__.pop("resume"), compare=args.__dict__.pop("compare"))
    return vars(args), extras


def config_from_args(overrides: dict, extras: argparse.Namespace) -> TrainConfig:
    """A new run's config from the flags, or a resumed run's config.json with the flags that may change."""
    if not extras.resume:
        return TrainConfig(**overrides)
    saved = read_config(Path(extras.resume) / "with_attention" if extras.compare else extras.resume)
    config = TrainConfig(**{**saved, **overrides, "out": extras.resume})
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
    except (ConfigError, data.DataError, FileNotFoundError, NonFiniteLossError) as error:
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
