"""SAGAN and its no-attention (DCGAN) baseline for 1x28x28 images (MNIST).

Layer shapes follow the original project; unlike it, the attention layers are really applied.
"""
from torch import nn

from attention import SelfAttention
from blocks import DiscriminatorBase, GeneratorBase, down_block, up_block

__all__ = ["Generator", "Discriminator", "SelfAttention", "IMAGE_SHAPE"]

IMAGE_SHAPE = (1, 28, 28)


class Generator(GeneratorBase):
    """z (100) -> 512x3x3 -> 256x7x7 -> 128x14x14 -> attention -> 1x28x28, tanh."""

    image_shape = IMAGE_SHAPE

    def layers(self) -> list[nn.Module]:
        d, sn = self.conv_dim, self.spectral_norm
        return [
            *up_block(self.z_dim, d * 8, 3, 1, 0, sn),  # 1 -> 3
            *up_block(d * 8, d * 4, 3, 2, 0, sn),  # 3 -> 7
            *up_block(d * 4, d * 2, 4, 2, 1, sn),  # 7 -> 14
            *self.attention(d * 2),
            nn.ConvTranspose2d(d * 2, IMAGE_SHAPE[0], 4, 2, 1),  # 14 -> 28
        ]


class Discriminator(DiscriminatorBase):
    """1x28x28 -> 64x14x14 -> 128x7x7 -> 256x3x3 -> attention -> one logit."""

    image_shape = IMAGE_SHAPE

    def layers(self) -> list[nn.Module]:
        d, sn = self.conv_dim, self.spectral_norm
        return [
            *down_block(IMAGE_SHAPE[0], d, sn),  # 28 -> 14
            *down_block(d, d * 2, sn),  # 14 -> 7
            *down_block(d * 2, d * 4, sn),  # 7 -> 3
            *self.attention(d * 4),
            nn.Conv2d(d * 4, 1, 4, 2, 1),  # 3 -> 1
        ]
