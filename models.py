"""Which network a config means: the model file for an image size, the constructor keywords a run's config implies,
and the inputs a generator samples from (seeded noise and, for a conditional G, labels)."""
import torch
from torch import nn

import model_28
import model_64
from blocks import initialise

MODEL_FILES = {28: model_28, 64: model_64}


def model_module(image_size: int):
    """The model file for an image size: model_28 or model_64."""
    if image_size not in MODEL_FILES:
        raise ValueError(f"No model for image size {image_size}; available: {sorted(MODEL_FILES)}")
    return MODEL_FILES[image_size]


def generator_kwargs(config: dict) -> dict:
    """The Generator constructor keywords recorded in a training config (older configs lack the newer ones,
    whose constructor defaults are what those runs trained with)."""
    kwargs = {key: config[key] for key in ("attn", "z_dim", "conv_dim", "spectral_norm", "attn_variant")}
    if config.get("g_attn_sizes") is not None:
        kwargs["attn_sizes"] = tuple(config["g_attn_sizes"])
    if config.get("num_classes"):  # runs before conditioning was a field had per-class tables
        kwargs |= {"num_classes": config["num_classes"], "conditioning": config.get("conditioning", "per-class")}
    return kwargs


def discriminator_kwargs(config: dict) -> dict:
    """The Discriminator constructor keywords of a training config."""
    kwargs = {key: config[key] for key in ("attn", "conv_dim", "spectral_norm", "attn_variant")}
    kwargs["attn_sizes"] = None if config.get("d_attn_sizes") is None else tuple(config["d_attn_sizes"])
    kwargs["num_classes"] = config.get("num_classes") or 0
    kwargs["conditioning"] = config.get("conditioning", "per-class")
    return kwargs


def build_models(config: dict) -> tuple[nn.Module, nn.Module]:
    """G and D for a training config (as a dict), seeded so that both arms of a comparison start alike."""
    torch.manual_seed(config["seed"])
    module = model_module(config["image_size"])
    G = module.Generator(**generator_kwargs(config))
    D = module.Discriminator(**discriminator_kwargs(config))
    initialise(G, config["init"])
    initialise(D, config["init"])
    return G, D


def noise(n: int, z_dim: int, seed: int | torch.Generator = 0) -> torch.Tensor:
    """n standard-normal noise vectors (n, z_dim) on the CPU, from a seed or a generator: the same numbers on every
    device."""
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    return torch.randn(n, z_dim, generator=generator)


def sample_inputs(G: nn.Module, n: int, seed: int | torch.Generator = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What n samples of G need: seeded noise and, for a conditional G, labels with equal shares of every class."""
    return noise(n, G.z_dim, seed), G.balanced_labels(n)


def class_rows(z: torch.Tensor, classes: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of a grid with one row per class and the same noise down each column: z (k, z_dim) repeated for every
    class, and each class repeated k times."""
    classes = torch.as_tensor(classes)
    return z.repeat(len(classes), 1), classes.repeat_interleave(len(z))
