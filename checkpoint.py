"""Checkpoints: atomic writes, safe loading with a fallback to older copies, and a one-call generator loader.

Every file is read with torch.load(weights_only=True): checkpoints and weights files hold tensors and plain
values only, so a file carrying a pickled object is refused unread (loading it could run its code). The one
exception allowed is numpy's array, in which checkpoints written before the project stored its RNG state
as a list kept numpy's RNG state.
"""
import json
import os
import pickle
import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import generator_kwargs, model_module
from utils import memory_format_for

LATEST = "latest.pt"
STEP_COPY = re.compile(r"step_(\d+)\.pt")
# What older checkpoints need beyond torch's weights-only types: numpy's RNG state as an ndarray of uint32.
LEGACY_SAFE_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be used; the message names the file and what to do."""


class DamagedCheckpoint(CheckpointError):
    """The file is truncated, empty or not a torch file."""


class UnsafeCheckpoint(CheckpointError):
    """The file carries pickled Python objects, which loading would run; it was refused unread."""


@contextmanager
def _replacing(path: str | Path):
    """A binary file to write, created beside `path` and renamed over it once complete (and synced to disk):
    a crash never leaves `path` half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temporary file and a rename."""
    with _replacing(path) as f:
        torch.save(obj, f)


def atomic_write_text(text: str, path: str | Path) -> None:
    """A text file written through a temporary file and a rename."""
    atomic_write_bytes(text.encode(), path)


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """A file of these bytes written through a temporary file and a rename."""
    with _replacing(path) as f:
        f.write(data)


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file given itself or its run directory (whose checkpoints/latest.pt is taken)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / LATEST
        if not candidate.is_file():
            raise FileNotFoundError(f"{path} is a folder without checkpoints/{LATEST}: is it a run directory written by train.py?")
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}: give a run directory, a checkpoint file or a published weights file")
    return path


def read_file(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """A checkpoint or weights file, loaded with weights_only=True; CheckpointError says why it cannot be."""
    try:
        with torch.serialization.safe_globals(LEGACY_SAFE_GLOBALS):
            return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        blocked = re.search(r"(unsupported global[^\n]*)", str(error), re.IGNORECASE)
        if blocked:
            raise UnsafeCheckpoint(
                f"{path} was refused unread: it carries a pickled Python object ({blocked.group(1).strip()}), which "
                f"loading would run. This project's checkpoints and weights files hold tensors and plain values only; "
                f"load it with torch.load(weights_only=False) yourself only if you trust where it came from") from None
        raise DamagedCheckpoint(f"{path} is not a readable torch file ({_reason(error)})") from None
    except FileNotFoundError:
        raise
    except Exception as error:  # a truncated or garbled file fails in many ways: zip, OSError, EOFError, ...
        raise DamagedCheckpoint(f"{path} is damaged or incomplete ({_reason(error)})") from None


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:120]}" if text else type(error).__name__


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """A run's checkpoints, newest first: latest.pt, then the step_N.pt copies from the highest step down."""
    folder = Path(run_dir) / "checkpoints"
    copies = sorted((path for path in folder.glob("step_*.pt") if STEP_COPY.fullmatch(path.name)),
                    key=lambda path: int(STEP_COPY.fullmatch(path.name).group(1)), reverse=True)
    return [path for path in [folder / LATEST, *copies] if path.is_file()]


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint dict at `path`: a file, or a run directory's newest intact checkpoint.

    When a run's latest.pt cannot be read (a full disk, a copy cut short), the newest intact step_N.pt is used,
    with a warning naming both; when none is intact, DamagedCheckpoint says so.
    """
    path = Path(path)
    if not path.is_dir():
        return read_file(checkpoint_path(path), device)
    candidates = checkpoint_files(path)
    if not candidates:
        checkpoint_path(path)  # raises the usual FileNotFoundError
    damaged = []
    for candidate in candidates:
        try:
            checkpoint = read_file(candidate, device)
        except DamagedCheckpoint as error:
            damaged.append(error)
            continue
        if damaged:
            warnings.warn(f"{damaged[0]}; using {candidate} (step {checkpoint['step']}) instead", stacklevel=2)
        return checkpoint
    raise DamagedCheckpoint(f"{damaged[0]}, and no intact step_N.pt copy is beside it: {path} cannot be resumed or "
                            f"evaluated. Restore the file from a backup, or start the run again with a new --out")


def load_generator(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A generator in eval mode from a run directory, a training checkpoint or a published weights file.

    Returns (G, info) where info holds 'model_kwargs', 'image_size', 'dataset', 'step', 'ema', 'config' and, for a
    published weights file, 'score' (the score it was published with, its protocol and command; else None).
    With ema=True the EMA weights are used when the run kept them.
    """
    state = load_checkpoint(path, device)
    if "model_kwargs" in state:  # a published weights file
        kwargs, image_size, config = state["model_kwargs"], state["image_size"], state.get("config", {})
        if kwargs.get("num_classes"):  # files published before conditioning was a keyword had per-class tables
            kwargs = {"conditioning": "per-class", **kwargs}
        weights, used_ema = state["G"], bool(state.get("ema", False))
    else:
        config = state["config"]
        kwargs = generator_kwargs(config)
        image_size = config["image_size"]
        used_ema = ema and state.get("G_ema") is not None
        weights = state["G_ema"] if used_ema else state["G"]
    G = model_module(image_size).Generator(**kwargs)
    G.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    device = torch.device(device)
    G.to(device, memory_format=memory_format_for(device)).eval()
    info = {"model_kwargs": kwargs, "image_size": image_size, "dataset": config.get("dataset", state.get("dataset")),
            "step": state.get("step"), "ema": used_ema, "config": config, "score": state.get("score")}
    return G, info


def read_config(run_dir: str | Path) -> dict:
    """A run directory's config.json."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json: is it a run directory written by train.py?")
    return json.loads(path.read_text())
