"""SAGAN and its no-attention (DCGAN) baseline for 1x28x28 images (MNIST).

The layers and shapes are the original project's (https://github.com/franknb/Self-attention-DCGAN); unlike it,
the attention layers are really applied. The convolutions of G's and D's blocks are spectral-normed (spectral.py),
their output convolutions and (except attn_variant="paper") the attention's 1x1 convolutions are not, as in the
original; G's blocks are ConvTranspose2d + BatchNorm + ReLU, D's Conv2d + LeakyReLU(0.1) (blocks.py). Attention follows G's 14x14 map and
D's 3x3 map; `attn_sizes` may move it to any map whose `self.attention(size, ...)` line is below, and attn=False
(the baseline) leaves it out. Shapes are (B, C, H, W) with conv_dim = 64.
"""
from torch import nn

from attention import SelfAttention
from blocks import DiscriminatorBase, GeneratorBase

__all__ = ["Generator", "Discriminator", "SelfAttention", "IMAGE_SHAPE"]

IMAGE_SHAPE = (1, 28, 28)


class Generator(GeneratorBase):
    """z (B, 100) -> images (B, 1, 28, 28) in [-1, 1]."""

    image_shape = IMAGE_SHAPE
    default_attn_sizes = (14,)

    def build(self) -> list[nn.Module]:
        d = self.conv_dim
        return [                                          # z as (B, 100, 1, 1)
            *self.up_block(self.z_dim, d * 8, 3, 1, 0),  # (B, 512, 3, 3)
            *self.attention(3, d * 8),
            *self.up_block(d * 8, d * 4, 3, 2, 0),       # (B, 256, 7, 7)
            *self.attention(7, d * 4),
            *self.up_block(d * 4, d * 2, 4, 2, 1),       # (B, 128, 14, 14)
            *self.attention(14, d * 2),                  # (B, 128, 14, 14): attends over 196 positions
            nn.ConvTranspose2d(d * 2, 1, 4, 2, 1),       # (B, 1, 28, 28)
            nn.Tanh(),
        ]


class Discriminator(DiscriminatorBase):
    """Images (B, 1, 28, 28) -> one real/fake logit each, (B,)."""

    image_shape = IMAGE_SHAPE
    default_attn_sizes = (3,)

    def build(self) -> list[nn.Module]:
        d = self.conv_dim
        return [                                  # (B, 1, 28, 28)
            *self.down_block(1, d),               # (B, 64, 14, 14)
            *self.attention(14, d),
            *self.down_block(d, d * 2),           # (B, 128, 7, 7)
            *self.attention(7, d * 2),
            *self.down_block(d * 2, d * 4),       # (B, 256, 3, 3)
            *self.attention(3, d * 4),            # (B, 256, 3, 3): attends over 9 positions
            nn.Conv2d(d * 4, 1, 4, 2, 1),         # (B, 1, 1, 1): the logit
        ]
