"""Helpers the notebooks and scripts share around training: device choice and image conversion."""
import torch


def pick_device(preference: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; anything else is passed to torch.device as given."""
    if preference != "auto":
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={preference!r} was asked for, but CUDA is not available here; use 'auto' or 'cpu'")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device={preference!r} was asked for, but Apple MPS is not available here; use 'auto' or 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def memory_format_for(device: torch.device, channels_last: bool | None = None) -> torch.memory_format:
    """channels_last when asked, or by default on the CPU, where oneDNN's convolutions then skip their
    layout reorders (BENCHMARKS.md); contiguous by default on CUDA and MPS."""
    if channels_last is None:
        channels_last = device.type == "cpu"
    return torch.channels_last if channels_last else torch.contiguous_format


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Model images in [-1, 1] -> [0, 1], clamped."""
    return images.add(1).div(2).clamp(0, 1)
