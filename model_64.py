"""SAGAN and its no-attention (DCGAN) baseline for 3x64x64 images (CelebA), two attention layers each."""
from torch import nn

from attention import SelfAttention
from blocks import DiscriminatorBase, GeneratorBase, down_block, up_block

__all__ = ["Generator", "Discriminator", "SelfAttention", "IMAGE_SHAPE"]

IMAGE_SHAPE = (3, 64, 64)


class Generator(GeneratorBase):
    """z (100) -> 512x4x4 -> 256x8x8 -> 128x16x16 -> attention -> 64x32x32 -> attention -> 3x64x64, tanh."""

    image_shape = IMAGE_SHAPE

    def layers(self) -> list[nn.Module]:
        d, sn = self.conv_dim, self.spectral_norm
        return [
            *up_block(self.z_dim, d * 8, 4, 1, 0, sn),  # 1 -> 4
            *up_block(d * 8, d * 4, 4, 2, 1, sn),  # 4 -> 8
            *up_block(d * 4, d * 2, 4, 2, 1, sn),  # 8 -> 16
            *self.attention(d * 2),
            *up_block(d * 2, d, 4, 2, 1, sn),  # 16 -> 32
            *self.attention(d),
            nn.ConvTranspose2d(d, IMAGE_SHAPE[0], 4, 2, 1),  # 32 -> 64
        ]


class Discriminator(DiscriminatorBase):
    """3x64x64 -> 64x32x32 -> 128x16x16 -> 256x8x8 -> attention -> 512x4x4 -> attention -> one logit."""

    image_shape = IMAGE_SHAPE

    def layers(self) -> list[nn.Module]:
        d, sn = self.conv_dim, self.spectral_norm
        return [
            *down_block(IMAGE_SHAPE[0], d, sn),  # 64 -> 32
            *down_block(d, d * 2, sn),  # 32 -> 16
            *down_block(d * 2, d * 4, sn),  # 16 -> 8
            *self.attention(d * 4),
            *down_block(d * 4, d * 8, sn),  # 8 -> 4
            *self.attention(d * 8),
            nn.Conv2d(d * 8, 1, 4, 1, 0),  # 4 -> 1
        ]
