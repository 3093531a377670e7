"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

D sees every image, real or fake, through the same random augmentation in both updates, so it cannot
memorise the real set, and G's gradient flows back through the augmentation (every op here is
differentiable in the image). The policy is a comma-separated list, applied in order:

  translation  shift by up to 1/8 of the side in each direction, zero-filled (as the paper's code)
  cutout       zero a square of half the side at a random centre (clipped at the border)
  color        random brightness, saturation and contrast, per image

Random numbers come from the caller's torch.Generator (on the CPU) and are moved to the images'
device, so an augmented run is as reproducible, and as resumable, as a plain one.
"""
from collections.abc import Callable

import torch

TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def _uniform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One uniform [0, 1) number per image, shaped (B, 1, 1, 1) to broadcast over it."""
    return torch.rand(x.shape[0], 1, 1, 1, generator=generator).to(x.device, x.dtype)


def _offsets(x: torch.Tensor, low: int, high: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer (row, column) offsets in [low, high] per image, each (B, 1)."""
    rows, cols = torch.randint(low, high + 1, (2, x.shape[0], 1), generator=generator).to(x.device)
    return rows, cols


def translation(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by whole pixels, up to TRANSLATION_RATIO of its side, filling with zeros."""
    _, _, height, width = x.shape
    shift = int(height * TRANSLATION_RATIO + 0.5)
    dy, dx = _offsets(x, -shift, shift, generator)
    padded = torch.nn.functional.pad(x, [shift] * 4)
    rows = torch.arange(height, device=x.device) + shift - dy  # (B, H): the padded row each output row reads
    cols = torch.arange(width, device=x.device) + shift - dx
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Zero a square of CUTOUT_RATIO of the side in each image, centred anywhere in it."""
    _, _, height, width = x.shape
    size = int(height * CUTOUT_RATIO + 0.5)
    top, left = _offsets(x, 0, height - 1, generator)
    top, left = top - size // 2, left - size // 2
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    inside_rows = (rows >= top) & (rows < top + size)  # (B, H)
    inside_cols = (cols >= left) & (cols < left + size)
    keep = ~(inside_rows[:, :, None] & inside_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


def color(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness +-0.5, saturation x[0, 2] and contrast x[0.5, 1.5], as in the paper's code."""
    x = x + (_uniform(x, generator) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(x, generator) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(x, generator) + 0.5) + mean


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "translation": translation, "cutout": cutout, "color": color,
}


def parse_policy(policy: str) -> list[str]:
    """'translation,cutout' -> ['translation', 'cutout']; '' -> []; unknown names are refused."""
    names = [name.strip() for name in policy.split(",") if name.strip()]
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation {', '.join(unknown)}: choose from {', '.join(AUGMENTATIONS)}")
    return names


def diff_augment(x: torch.Tensor, policy: str, generator: torch.Generator) -> torch.Tensor:
    """x (B, C, H, W) through every augmentation of the policy, each drawn independently per image."""
    for name in parse_policy(policy):
        x = AUGMENTATIONS[name](x, generator)
    return x
