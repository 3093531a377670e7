"""SAGAN and its no-attention (DCGAN) baseline for 1x28x28 images (MNIST).

Layer shapes follow the original project (https://github.com/franknb/Self-attention-DCGAN); unlike it, the
attention layers are really applied.
`attn_sizes` moves them: G's maps are 3, 7 and 14 pixels wide, D's 14, 7 and 3.
"""
from collections.abc import Iterator

from torch import nn

from attention import SelfAttention
from blocks import DiscriminatorBase, GeneratorBase, Stage, down_block, up_block

__all__ = ["Generator", "Discriminator", "SelfAttention", "IMAGE_SHAPE"]

IMAGE_SHAPE = (1, 28, 28)


class Generator(GeneratorBase):
    """z (100) -> 512x3x3 -> 256x7x7 -> 128x14x14 -> attention -> 1x28x28, tanh."""

    image_shape = IMAGE_SHAPE
    default_attn_sizes = (14,)

    def stages(self) -> Iterator[Stage]:
        d, sn, k = self.conv_dim, self.spectral_norm, self.num_classes
        yield Stage(up_block(self.z_dim, d * 8, 3, 1, 0, sn, k), 3, d * 8)  # 1 -> 3
        yield Stage(up_block(d * 8, d * 4, 3, 2, 0, sn, k), 7, d * 4)  # 3 -> 7
        yield Stage(up_block(d * 4, d * 2, 4, 2, 1, sn, k), 14, d * 2)  # 7 -> 14

    def head(self) -> nn.Module:
        return nn.ConvTranspose2d(self.conv_dim * 2, IMAGE_SHAPE[0], 4, 2, 1)  # 14 -> 28


class Discriminator(DiscriminatorBase):
    """1x28x28 -> 64x14x14 -> 128x7x7 -> 256x3x3 -> attention -> one logit."""

    image_shape = IMAGE_SHAPE
    default_attn_sizes = (3,)

    def stages(self) -> Iterator[Stage]:
        d, sn = self.conv_dim, self.spectral_norm
        yield Stage(down_block(IMAGE_SHAPE[0], d, sn), 14, d)  # 28 -> 14
        yield Stage(down_block(d, d * 2, sn), 7, d * 2)  # 14 -> 7
        yield Stage(down_block(d * 2, d * 4, sn), 3, d * 4)  # 7 -> 3

    def head(self) -> nn.Module:
        return nn.Conv2d(self.conv_dim * 4, 1, 4, 2, 1)  # 3 -> 1
