"""SAGAN and its no-attention (DCGAN) baseline for 3x64x64 images (CelebA), two attention layers in each network.

The layers and shapes are the original project's (https://github.com/franknb/Self-attention-DCGAN), after the
SAGAN authors' release. The convolutions of G's and D's blocks are spectral-normed (spectral.py), their output
convolutions and (except attn_variant="paper") the attention's 1x1 convolutions are not, as in the original; G's
blocks are ConvTranspose2d + BatchNorm + ReLU, D's Conv2d + LeakyReLU(0.1) (blocks.py). Attention follows G's 16x16 and 32x32 maps and D's 8x8
and 4x4 maps; `attn_sizes` may move it to any map whose `self.attention(size, ...)` line is below, and attn=False
(the baseline) leaves it out. Shapes are (B, C, H, W) with conv_dim = 64.
"""
from torch import nn

from attention import SelfAttention
from blocks import DiscriminatorBase, GeneratorBase

__all__ = ["Generator", "Discriminator", "SelfAttention", "IMAGE_SHAPE"]

IMAGE_SHAPE = (3, 64, 64)


class Generator(GeneratorBase):
    """z (B, 100) -> images (B, 3, 64, 64) in [-1, 1]."""

    image_shape = IMAGE_SHAPE
    default_attn_sizes = (16, 32)

    def build(self) -> list[nn.Module]:
        d = self.conv_dim
        return [                                          # z as (B, 100, 1, 1)
            *self.up_block(self.z_dim, d * 8, 4, 1, 0),  # (B, 512, 4, 4)
            *self.attention(4, d * 8),
            *self.up_block(d * 8, d * 4, 4, 2, 1),       # (B, 256, 8, 8)
            *self.attention(8, d * 4),
            *self.up_block(d * 4, d * 2, 4, 2, 1),       # (B, 128, 16, 16)
            *self.attention(16, d * 2),                  # (B, 128, 16, 16): attends over 256 positions
            *self.up_block(d * 2, d, 4, 2, 1),           # (B, 64, 32, 32)
            *self.attention(32, d),                      # (B, 64, 32, 32): attends over 1,024 positions
            nn.ConvTranspose2d(d, 3, 4, 2, 1),           # (B, 3, 64, 64)
            nn.Tanh(),
        ]


class Discriminator(DiscriminatorBase):
    """Images (B, 3, 64, 64) -> one real/fake logit each, (B,)."""

    image_shape = IMAGE_SHAPE
    default_attn_sizes = (8, 4)

    def build(self) -> list[nn.Module]:
        d = self.conv_dim
        return [                                  # (B, 3, 64, 64)
            *self.down_block(3, d),               # (B, 64, 32, 32)
            *self.attention(32, d),
            *self.down_block(d, d * 2),           # (B, 128, 16, 16)
            *self.attention(16, d * 2),
            *self.down_block(d * 2, d * 4),       # (B, 256, 8, 8)
            *self.attention(8, d * 4),            # (B, 256, 8, 8): attends over 64 positions
            *self.down_block(d * 4, d * 8),       # (B, 512, 4, 4)
            *self.attention(4, d * 8),            # (B, 512, 4, 4): attends over 16 positions
            nn.Conv2d(d * 8, 1, 4, 1, 0),         # (B, 1, 1, 1): the logit
        ]
