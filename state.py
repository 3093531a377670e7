"""The state a training step touches, built for a config, and its checkpoint form.

G and D are the networks themselves (compiled in place when asked). G_synced and D_synced are the passes whose
backward updates that network: under torchrun they go through DistributedDataParallel, which averages the
gradients over processes; alone they are G and D. Every other pass (G under no_grad in D's update, a frozen D in
G's update) calls the network itself, so no gradient of it is ever averaged by mistake.
"""
import dataclasses
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

import data
import distributed
from augment import diff_augment
from checkpoint import LATEST, atomic_save, load_checkpoint
from config import ConfigError, TrainConfig, check_resumable
from distributed import Job, noise_seed
from ema import standing_statistics
from models import build_models, noise, sample_inputs
from utils import SimulatedBf16, autocast_dtype, memory_format_for, resolved_precision


@dataclass
class TrainState:
    """Everything a training step touches; all of it goes into a checkpoint (state_dict)."""

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
    G_synced: Callable | None = None  # None: G itself
    D_synced: Callable | None = None
    step: int = 0
    wall_time: float = 0.0  # seconds of training so far, summed over every process that resumed the run
    cpu_time: float = 0.0  # CPU seconds of this process (rank 0's in a checkpoint) spent training, likewise
    ema_stale: bool = False  # G_ema's weights moved since its BatchNorm statistics were last computed

    def __post_init__(self):
        # `is None`, not truthiness: a DDP module has no __len__ to answer bool()
        self.G_synced = self.G if self.G_synced is None else self.G_synced
        self.D_synced = self.D if self.D_synced is None else self.D_synced

    def autocast(self):
        return nullcontext() if self.amp_dtype is None else torch.autocast(self.device.type, dtype=self.amp_dtype)

    def numerics(self):
        """What a whole training step (backward included) runs in: SimulatedBf16 for precision 'bf16-sim'."""
        return SimulatedBf16() if self.config.precision == "bf16-sim" else nullcontext()

    @property
    def precision(self) -> str:
        """What training computes in, as runs record it: 'fp32', 'bf16', 'fp16' or 'bf16-sim'."""
        return resolved_precision(self.config.precision, self.device)

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
        return noise(n, self.config.z_dim, self.noise).to(self.device, non_blocking=True)

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
        """G's inputs (z, labels) for n samples drawn from `generator`, on the run's device."""
        z, labels = sample_inputs(self.G, n, generator)
        return z.to(self.device), None if labels is None else labels.to(self.device)

    def training_seconds(self) -> float:
        """Training time by the clock the config's budgets count (wall or CPU)."""
        return self.cpu_time if self.config.clock == "cpu" else self.wall_time

    # ------------------------------------------------------------------------------------------ checkpoint form

    def state_dict(self) -> dict:
        """The whole training state as one dict of tensors and plain values (what checkpoints hold)."""
        name, keys, *rest = np.random.get_state()  # its key array as a list: the file loads with weights_only=True
        rng = {"torch": torch.get_rng_state(), "noise": self.noise.get_state(), "python": random.getstate(),
               "numpy": (name, keys.tolist(), *rest)}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "G": self.G.state_dict(), "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict() if self.G_ema is not None else None,
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "scaler": {"G": self.scaler_G.state_dict(), "D": self.scaler_D.state_dict()},
            "step": self.step, "wall_time": self.wall_time, "cpu_time": self.cpu_time,
            "config": dataclasses.asdict(self.config), "rng": rng, "loader": self.loader.state_dict(),
        }

    def load_state_dict(self, checkpoint: dict) -> None:
        """Restore a state built for the same config from a checkpoint dict."""
        self.G.load_state_dict(checkpoint["G"])
        self.D.load_state_dict(checkpoint["D"])
        if self.G_ema is not None:  # the EMA the run kept; or, resumed with one it did not keep, one starting as G
            kept = checkpoint.get("G_ema") is not None
            self.G_ema.load_state_dict(checkpoint["G_ema"] if kept else checkpoint["G"])
            self.ema_stale = not kept
        self.opt_G.load_state_dict(checkpoint["opt_G"])
        self.opt_D.load_state_dict(checkpoint["opt_D"])
        self.scaler_G.load_state_dict(checkpoint["scaler"]["G"])
        self.scaler_D.load_state_dict(checkpoint["scaler"]["D"])
        self.loader.load_state_dict(checkpoint["loader"])
        rng = checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        if self.job.is_main:
            self.noise.set_state(rng["noise"])
        else:  # checkpoints hold rank 0's stream; the others restart theirs from the step, whatever the old world size
            self.noise.manual_seed(noise_seed(self.config.seed, self.job.rank, checkpoint["step"]))
        random.setstate(rng["python"])
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = checkpoint["step"]
        self.wall_time = checkpoint.get("wall_time", 0.0)  # checkpoints before these fields count from the resume
        self.cpu_time = checkpoint.get("cpu_time", 0.0)

    def save(self, run_dir: Path) -> Path:
        """Write run_dir/checkpoints/latest.pt, and a step_N.pt copy every checkpoint_every steps."""
        folder = run_dir / "checkpoints"
        self.sampler()  # the EMA generator's BatchNorm statistics up to date in the file
        checkpoint = self.state_dict()
        atomic_save(checkpoint, folder / LATEST)
        if self.step % self.config.checkpoint_every == 0:
            atomic_save(checkpoint, folder / f"step_{self.step:06d}.pt")
        return folder / LATEST

    def restore(self, run_dir: Path) -> None:
        """Continue from a run directory's newest intact checkpoint; refused if the run trained with other settings."""
        checkpoint = load_checkpoint(run_dir, self.device)
        check_resumable(checkpoint["config"], self.config)
        self.load_state_dict(checkpoint)


def build_state(config: TrainConfig, dataset: Dataset, device: torch.device, job: Job = Job()) -> TrainState:
    """Fresh models, optimizers and loader for `config` on `device` (this process's share under torchrun)."""
    if config.precision == "bf16-sim" and device.type != "cpu":
        raise ConfigError(f"precision 'bf16-sim' simulates bf16 on a CPU; on {device} use 'bf16' (or 'auto')")
    if config.precision == "bf16-sim" and config.compile:
        raise ConfigError("precision 'bf16-sim' runs eagerly (torch.compile does not trace through its dispatch mode); "
                          "drop --compile")
    settings = dataclasses.asdict(config)
    G, D = build_models(settings)
    if config.sync_bn and job.enabled:
        if device.type != "cuda":
            raise ConfigError("sync_bn needs CUDA: torch's SyncBatchNorm does not run on the CPU; drop --sync-bn")
        G = nn.SyncBatchNorm.convert_sync_batchnorm(G)
    memory_format = memory_format_for(device, config.channels_last)
    G, D = G.to(device, memory_format=memory_format), D.to(device, memory_format=memory_format)
    G_ema = None
    if config.ema_decay > 0:
        G_ema = build_models(settings)[0].to(device, memory_format=memory_format).eval().requires_grad_(False)
        G_ema.load_state_dict(G.state_dict())
    if config.compile:  # in place: state dicts keep their keys, and every pass of G and D runs compiled
        G.compile()
        D.compile()
    amp_dtype = autocast_dtype(config.precision, device)
    workers = config.num_workers if config.num_workers >= 0 else \
        4 if device.type == "cuda" and not isinstance(dataset, data.TensorImages) else 0
    return TrainState(
        config=config, device=device, G=G, D=D, G_ema=G_ema,
        opt_G=torch.optim.Adam(G.parameters(), config.g_lr, betas=(config.beta1, config.beta2)),
        opt_D=torch.optim.Adam(D.parameters(), config.d_lr, betas=(config.beta1, config.beta2)),
        scaler_G=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        scaler_D=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        loader=data.EndlessLoader(dataset, config.batch_size, seed=config.seed, rank=job.rank, world_size=job.world_size,
                                  num_workers=workers, pin_memory=device.type == "cuda", labels=config.conditional),
        noise=torch.Generator().manual_seed(noise_seed(config.seed, job.rank)), amp_dtype=amp_dtype, job=job,
        G_synced=distributed.synced(G, job, device) if job.enabled else None,
        D_synced=distributed.synced(D, job, device) if job.enabled else None,
    )
