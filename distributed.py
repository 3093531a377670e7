"""Running under torchrun: this process's place in the job, its device, and the few collectives training needs.

Without torchrun every function here is a no-op around a job of one process, so single-process runs and the
notebooks never touch torch.distributed.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from utils import pick_device


@dataclass(frozen=True)
class Job:
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


def join(device_preference: str) -> tuple[Job, torch.device]:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo otherwise); this
    process's device (CUDA: the local rank's GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_preference)
    if world_size == 1:
        return Job(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Job(rank, world_size, local_rank), device


def synced(module: nn.Module, job: Job, device: torch.device) -> nn.Module:
    """The module wrapped in DistributedDataParallel (its gradients averaged over processes), or as it is alone."""
    if not job.enabled:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def mean_over_processes(values: dict[str, torch.Tensor], job: Job) -> dict[str, torch.Tensor]:
    """Each metric averaged over all processes (unchanged in a single process)."""
    if not job.enabled:
        return values
    stacked = torch.stack([v.float() for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, stacked / job.world_size))


def any_process(flag: bool, job: Job, device: torch.device) -> bool:
    """True when `flag` is set in any process, so that every process takes the same branch."""
    if not job.enabled:
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def shared_choice(value: str, job: Job) -> str:
    """Rank 0's value, in every process."""
    if not job.enabled:
        return value
    chosen = [value]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def noise_seed(seed: int, rank: int, step: int = 0) -> int:
    """The noise stream of one process: distinct per rank, so that processes draw different z."""
    return seed + 1 + 1_000_003 * rank + 7_919 * step


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process on its own."""
    return not dist.is_initialized() or dist.get_rank() == 0


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
