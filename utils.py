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


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Model images in [-1, 1] -> [0, 1], clamped."""
    return images.add(1).div(2).clamp(0, 1)
