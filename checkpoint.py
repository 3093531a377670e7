"""Checkpoints: atomic writes, loading, and a one-call generator loader for runs and published weights."""
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils import memory_format_for

LATEST = "latest.pt"


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves `path` half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint dict at `path` (a file or a run directory)."""
    return torch.load(checkpoint_path(path), map_location=device, weights_only=False)


def model_module(image_size: int):
    """The model file for an image size: model_28 or model_64."""
    import model_28
    import model_64

    modules = {28: model_28, 64: model_64}
    if image_size not in modules:
        raise ValueError(f"No model for image size {image_size}; available: {sorted(modules)}")
    return modules[image_size]


def load_generator(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A generator in eval mode from a run directory, a training checkpoint or a published weights file.

    Returns (G, info) where info holds 'model_kwargs', 'image_size', 'dataset', 'step', 'ema' and 'config'.
    With ema=True the EMA weights are used when the run kept them.
    """
    state = load_checkpoint(path, device)
    if "model_kwargs" in state:  # a published weights file
        kwargs, image_size, config = state["model_kwargs"], state["image_size"], state.get("config", {})
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
            "step": state.get("step"), "ema": used_ema, "config": config}
    return G, info


def generator_kwargs(config: dict) -> dict:
    """The Generator constructor keywords recorded in a training config (older configs lack the newer ones,
    whose constructor defaults are what those runs trained with)."""
    kwargs = {key: config[key] for key in ("attn", "z_dim", "conv_dim", "spectral_norm", "attn_variant")}
    if config.get("g_attn_sizes") is not None:
        kwargs["attn_sizes"] = tuple(config["g_attn_sizes"])
    return kwargs


def read_config(run_dir: str | Path) -> dict:
    """A run directory's config.json."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json: is it a run directory written by train.py?")
    return json.loads(path.read_text())
