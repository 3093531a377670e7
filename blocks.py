"""What model_28.py and model_64.py share: their conv blocks and the Generator/Discriminator bases."""
import torch
from torch import nn

from attention import ATTENTION_VARIANTS, SelfAttention, attention_gammas
from spectral import maybe_spectral_norm


def up_block(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int, spectral_norm: bool) -> list[nn.Module]:
    """Generator block: (spectral-normed) ConvTranspose2d, BatchNorm, ReLU."""
    conv = nn.ConvTranspose2d(in_channels, out_channels, kernel, stride, padding)
    return [maybe_spectral_norm(conv, spectral_norm), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def down_block(in_channels: int, out_channels: int, spectral_norm: bool) -> list[nn.Module]:
    """Discriminator block: (spectral-normed) 4x4 stride-2 Conv2d halving the size, LeakyReLU(0.1)."""
    conv = nn.Conv2d(in_channels, out_channels, 4, 2, 1)
    return [maybe_spectral_norm(conv, spectral_norm), nn.LeakyReLU(0.1, inplace=True)]


class _GANNetwork(nn.Module):
    """Holds the constructor options and builds attention layers that vanish when attn=False."""

    def __init__(self, attn: bool, conv_dim: int, spectral_norm: bool, attn_variant: str):
        super().__init__()
        if attn_variant not in ATTENTION_VARIANTS:
            raise ValueError(f"attn_variant must be one of {ATTENTION_VARIANTS}, got {attn_variant!r}")
        if conv_dim < 8 or conv_dim % 8:
            raise ValueError(f"conv_dim must be a positive multiple of 8, got {conv_dim}")
        self.attn, self.conv_dim, self.spectral_norm, self.attn_variant = attn, conv_dim, spectral_norm, attn_variant

    def attention(self, channels: int) -> list[nn.Module]:
        """An attention layer over `channels`, or nothing for the no-attention baseline."""
        if not self.attn:
            return []
        # The original project's attention convs are plain; the authors' release normalises them too.
        return [SelfAttention(channels, self.attn_variant, spectral_norm=self.spectral_norm and self.attn_variant == "paper")]

    def attention_gammas(self) -> list[float]:
        """Every attention layer's gamma, in forward order, for logging."""
        return attention_gammas(self)


class GeneratorBase(_GANNetwork):
    """z of shape (B, z_dim) or (B, z_dim, 1, 1) -> images (B, C, H, W) in [-1, 1]."""

    image_shape: tuple[int, int, int]

    def __init__(self, attn: bool = True, z_dim: int = 100, conv_dim: int = 64, spectral_norm: bool = True,
                 attn_variant: str = "original"):
        super().__init__(attn, conv_dim, spectral_norm, attn_variant)
        if z_dim < 1:
            raise ValueError(f"z_dim must be positive, got {z_dim}")
        self.z_dim = z_dim
        self.net = nn.Sequential(*self.layers(), nn.Tanh())

    def layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() not in (2, 4) or z.shape[1] != self.z_dim or z.shape[2:] not in ((), (1, 1)):
            raise ValueError(f"Generator expects z of shape (B, {self.z_dim}) or (B, {self.z_dim}, 1, 1), got {tuple(z.shape)}")
        return self.net(z.view(z.shape[0], self.z_dim, 1, 1))


class DiscriminatorBase(_GANNetwork):
    """Images (B, C, H, W) -> one real/fake logit per image, shape (B,)."""

    image_shape: tuple[int, int, int]

    def __init__(self, attn: bool = True, conv_dim: int = 64, spectral_norm: bool = True, attn_variant: str = "original"):
        super().__init__(attn, conv_dim, spectral_norm, attn_variant)
        self.net = nn.Sequential(*self.layers())

    def layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"Discriminator expects images of shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        return self.net(x).flatten()
