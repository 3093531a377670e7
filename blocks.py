"""What model_28.py and model_64.py share: their conv blocks, the Generator/Discriminator bases, initialisation."""
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from attention import ATTENTION_VARIANTS, SelfAttention, attention_gammas
from spectral import maybe_spectral_norm

INITS = ("default", "normal", "orthogonal")


def up_block(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int, spectral_norm: bool) -> list[nn.Module]:
    """Generator block: (spectral-normed) ConvTranspose2d, BatchNorm, ReLU."""
    conv = nn.ConvTranspose2d(in_channels, out_channels, kernel, stride, padding)
    return [maybe_spectral_norm(conv, spectral_norm), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def down_block(in_channels: int, out_channels: int, spectral_norm: bool) -> list[nn.Module]:
    """Discriminator block: (spectral-normed) 4x4 stride-2 Conv2d halving the size, LeakyReLU(0.1)."""
    conv = nn.Conv2d(in_channels, out_channels, 4, 2, 1)
    return [maybe_spectral_norm(conv, spectral_norm), nn.LeakyReLU(0.1, inplace=True)]


@dataclass
class Stage:
    """A block of layers whose output is a (channels, size, size) map: a place an attention layer may follow."""

    layers: list[nn.Module]
    size: int
    channels: int


class _GANNetwork(nn.Module):
    """Holds the constructor options and assembles stages, with attention after the stages of `attn_sizes`.

    Subclasses define `stages()` (the conv blocks in order), `head()` (the last layer) and
    `default_attn_sizes` (where the original project puts attention).
    """

    default_attn_sizes: tuple[int, ...]

    def __init__(self, attn: bool, conv_dim: int, spectral_norm: bool, attn_variant: str,
                 attn_sizes: tuple[int, ...] | None):
        super().__init__()
        if attn_variant not in ATTENTION_VARIANTS:
            raise ValueError(f"attn_variant must be one of {ATTENTION_VARIANTS}, got {attn_variant!r}")
        if conv_dim < 8 or conv_dim % 8:
            raise ValueError(f"conv_dim must be a positive multiple of 8, got {conv_dim}")
        self.attn, self.conv_dim, self.spectral_norm, self.attn_variant = attn, conv_dim, spectral_norm, attn_variant
        self.attn_sizes = tuple(self.default_attn_sizes if attn_sizes is None else attn_sizes)

    def assemble(self) -> list[nn.Module]:
        """Every stage's layers, an attention layer after each stage whose size is in attn_sizes, then the head."""
        layers, sizes = [], []
        for stage in self.stages():  # built one at a time, so weights draw from the seed in forward order
            layers += stage.layers
            sizes.append(stage.size)
            if self.attn and stage.size in self.attn_sizes:
                layers.append(self.attention(stage.channels))
        unknown = sorted(set(self.attn_sizes) - set(sizes))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no {unknown} feature map for attention; its maps are {sizes}")
        return layers + [self.head()]

    def stages(self) -> Iterator[Stage]:
        raise NotImplementedError

    def head(self) -> nn.Module:
        raise NotImplementedError

    def attention(self, channels: int) -> SelfAttention:
        # The original project's attention convs are plain; the authors' release normalises them too.
        return SelfAttention(channels, self.attn_variant, spectral_norm=self.spectral_norm and self.attn_variant == "paper")

    def attention_gammas(self) -> list[float]:
        """Every attention layer's gamma, in forward order, for logging."""
        return attention_gammas(self)


class GeneratorBase(_GANNetwork):
    """z of shape (B, z_dim) or (B, z_dim, 1, 1) -> images (B, C, H, W) in [-1, 1]."""

    image_shape: tuple[int, int, int]

    def __init__(self, attn: bool = True, z_dim: int = 100, conv_dim: int = 64, spectral_norm: bool = True,
                 attn_variant: str = "original", attn_sizes: tuple[int, ...] | None = None):
        super().__init__(attn, conv_dim, spectral_norm, attn_variant, attn_sizes)
        if z_dim < 1:
            raise ValueError(f"z_dim must be positive, got {z_dim}")
        self.z_dim = z_dim
        self.net = nn.Sequential(*self.assemble(), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() not in (2, 4) or z.shape[1] != self.z_dim or z.shape[2:] not in ((), (1, 1)):
            raise ValueError(f"Generator expects z of shape (B, {self.z_dim}) or (B, {self.z_dim}, 1, 1), got {tuple(z.shape)}")
        return self.net(z.view(z.shape[0], self.z_dim, 1, 1))


class DiscriminatorBase(_GANNetwork):
    """Images (B, C, H, W) -> one real/fake logit per image, shape (B,)."""

    image_shape: tuple[int, int, int]

    def __init__(self, attn: bool = True, conv_dim: int = 64, spectral_norm: bool = True, attn_variant: str = "original",
                 attn_sizes: tuple[int, ...] | None = None):
        super().__init__(attn, conv_dim, spectral_norm, attn_variant, attn_sizes)
        self.net = nn.Sequential(*self.assemble())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"Discriminator expects images of shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        return self.net(x).flatten()


@torch.no_grad()
def initialise(model: nn.Module, scheme: str) -> None:
    """Re-initialise conv and linear weights: 'default' leaves torch's, 'normal' is DCGAN's N(0, 0.02) with biases
    at 0 and BatchNorm gains N(1, 0.02), 'orthogonal' is BigGAN's. Spectral-norm vectors are then re-estimated."""
    if scheme not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {scheme!r}")
    if scheme == "default":
        return
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            weight = module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight") else module.weight
            if scheme == "normal":
                nn.init.normal_(weight, 0.0, 0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            else:
                nn.init.orthogonal_(weight)
        elif isinstance(module, nn.BatchNorm2d) and module.affine and scheme == "normal":
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight") and module.training:
            for _ in range(15):  # as many power iterations as torch runs when it first normalises a weight
                module.weight
