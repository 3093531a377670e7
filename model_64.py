"""SAGAN and its no-attention (DCGAN) baseline for 3x64x64 images (CelebA), two attention layers each.

`attn_sizes` moves them: G's maps are 4, 8, 16 and 32 pixels wide, D's 32, 16, 8 and 4.
"""
from collections.abc import Iterator

from torch import nn

from attention import SelfAttention
from blocks import DiscriminatorBase, GeneratorBase, Stage, down_block, up_block

__all__ = ["Generator", "Discriminator", "SelfAttention", "IMAGE_SHAPE"]

IMAGE_SHAPE = (3, 64, 64)


class Generator(GeneratorBase):
    """z (100) -> 512x4x4 -> 256x8x8 -> 128x16x16 -> attention -> 64x32x32 -> attention -> 3x64x64, tanh."""

    image_shape = IMAGE_SHAPE
    default_attn_sizes = (16, 32)

    def stages(self) -> Iterator[Stage]:
        d, sn, k = self.conv_dim, self.spectral_norm, self.num_classes
        yield Stage(up_block(self.z_dim, d * 8, 4, 1, 0, sn, k), 4, d * 8)  # 1 -> 4
        yield Stage(up_block(d * 8, d * 4, 4, 2, 1, sn, k), 8, d * 4)  # 4 -> 8
        yield Stage(up_block(d * 4, d * 2, 4, 2, 1, sn, k), 16, d * 2)  # 8 -> 16
        yield Stage(up_block(d * 2, d, 4, 2, 1, sn, k), 32, d)  # 16 -> 32

    def head(self) -> nn.Module:
        return nn.ConvTranspose2d(self.conv_dim, IMAGE_SHAPE[0], 4, 2, 1)  # 32 -> 64


class Discriminator(DiscriminatorBase):
    """3x64x64 -> 64x32x32 -> 128x16x16 -> 256x8x8 -> attention -> 512x4x4 -> attention -> one logit."""

    image_shape = IMAGE_SHAPE
    default_attn_sizes = (8, 4)

    def stages(self) -> Iterator[Stage]:
        d, sn = self.conv_dim, self.spectral_norm
        yield Stage(down_block(IMAGE_SHAPE[0], d, sn), 32, d)  # 64 -> 32
        yield Stage(down_block(d, d * 2, sn), 16, d * 2)  # 32 -> 16
        yield Stage(down_block(d * 2, d * 4, sn), 8, d * 4)  # 16 -> 8
        yield Stage(down_block(d * 4, d * 8, sn), 4, d * 8)  # 8 -> 4

    def head(self) -> nn.Module:
        return nn.Conv2d(self.conv_dim * 8, 1, 4, 1, 0)  # 4 -> 1
