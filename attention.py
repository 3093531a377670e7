"""The self-attention block of SAGAN (Zhang et al. 2018, https://arxiv.org/abs/1805.08318), fused and explicit.

Each pixel's feature vector (a column of the (B, C, H, W) map, N = H*W pixels) queries every
pixel's key; the softmax over keys weights the values, and the result is added back to the input
scaled by a learned gamma that starts at 0, so the block is the identity at initialisation.

The fused path calls F.scaled_dot_product_attention and never materialises the N x N map. Torch's
CPU flash kernel needs query, key and value of equal width, but SAGAN's query/key are narrower than
its value; zero-padding query and key to the value's width leaves every dot product, hence every
output and gradient, exactly as it was. The explicit path builds the map and returns it, for pictures.

Speed: the three 1x1 projections run as one matrix product over the pixel sequence, which hands the
kernel pixel-major rows without the transposing copies of three NCHW convs; gamma is folded into the
last linear map (the values, or the 'paper' output conv): exact algebra, and at gamma = 0 the output
is x + 0 == x bit for bit.
"""
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from spectral import maybe_spectral_norm

AttentionVariant = Literal["original", "scaled", "paper"]
ATTENTION_VARIANTS = ("original", "scaled", "paper")


def _matrix(conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 conv's (possibly spectral-normed) weight as an (out, in) matrix."""
    return conv.weight.flatten(1)


class SelfAttention(nn.Module):
    """SAGAN self-attention over the H*W pixels of a (B, C, H, W) feature map.

    variant='original' (the original project, https://github.com/franknb/Self-attention-DCGAN): query/key C/2,
    value C, full-resolution keys, and raw scores q.k, as SAGAN has them.
    variant='scaled': the original with scores q.k / sqrt(C/2), as in Vaswani et al.'s attention, so that wide
    queries and keys do not saturate the softmax.
    variant='paper' (the SAGAN authors' release, BigGAN): query/key C/8, value C/2, keys and values
    2x2 max-pooled, and a 1x1 output conv back to C channels.
    """

    def __init__(self, channels: int, variant: AttentionVariant = "original", spectral_norm: bool = False):
        super().__init__()
        if variant not in ATTENTION_VARIANTS:
            raise ValueError(f"attn_variant must be one of {ATTENTION_VARIANTS}, got {variant!r}")
        qk_channels, value_channels = (channels // 8, channels // 2) if variant == "paper" else (channels // 2, channels)
        sn = lambda conv: maybe_spectral_norm(conv, spectral_norm)  # noqa: E731
        self.variant = variant
        self.scale = qk_channels ** -0.5 if variant == "scaled" else 1.0
        self.query = sn(nn.Conv2d(channels, qk_channels, 1))
        self.key = sn(nn.Conv2d(channels, qk_channels, 1))
        self.value = sn(nn.Conv2d(channels, value_channels, 1))
        self.out = sn(nn.Conv2d(value_channels, channels, 1)) if variant == "paper" else nn.Identity()
        self.gamma = nn.Parameter(torch.zeros(()))

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, N, W), keys (B, Nk, W) and values (B, Nk, W) as pixel-major sequences, W the value
        width: queries and keys zero-padded to it, and in the 'original' variant the values times gamma."""
        value_weight, value_bias = _matrix(self.value), self.value.bias
        if self.variant != "paper":
            value_weight, value_bias = self.gamma * value_weight, self.gamma * value_bias
        weight = torch.cat([_matrix(self.query), _matrix(self.key), value_weight])
        bias = torch.cat([self.query.bias, self.key.bias, value_bias])
        qk_width, width = self.query.out_channels, value_weight.shape[0]
        q, k, v = F.linear(x.flatten(2).transpose(1, 2), weight, bias).split([qk_width, qk_width, width], dim=-1)
        if self.variant == "paper":
            k, v = (self._pool(t, x.shape[2:]) for t in (k, v))
        return F.pad(q, (0, width - qk_width)), F.pad(k, (0, width - qk_width)), v

    @staticmethod
    def _pool(sequence: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """2x2 max-pool a pixel-major sequence (B, N, W) of an (H, W) map."""
        grid = sequence.transpose(1, 2).unflatten(2, size)
        return F.max_pool2d(grid, 2).flatten(2).transpose(1, 2)

    def _output(self, attended: torch.Tensor) -> torch.Tensor:
        """The attended values (B, N, W) mapped back to C channels and scaled by gamma."""
        if self.variant != "paper":
            return attended  # gamma is already in the values
        return F.linear(attended, self.gamma * _matrix(self.out), self.gamma * self.out.bias)

    def _attend_fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # The SDPA kernels keep the softmax in fp32 under autocast; an explicit scale (1.0: SAGAN's raw q.k), as the
        # padding of q and k would change SDPA's default 1/sqrt(width).
        return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=self.scale).squeeze(1)

    def _attend_explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.bmm(q, k.transpose(1, 2))
        attention = torch.softmax((scores if self.scale == 1.0 else scores * self.scale).float(), dim=-1)
        return torch.bmm(attention.to(v.dtype), v), attention

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """Output (B, C, H, W); with return_attention, also the map (B, N, Nk) whose rows sum to 1."""
        q, k, v = self._project(x)
        if return_attention:
            attended, attention = self._attend_explicit(q, k, v)
        else:
            attended = self._attend_fused(q, k, v)
        out = x + self._output(attended).transpose(1, 2).unflatten(2, x.shape[2:])
        return (out, attention) if return_attention else out

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}"


def attention_layers(model: nn.Module) -> list[SelfAttention]:
    """The model's attention blocks, in forward order."""
    return [m for m in model.modules() if isinstance(m, SelfAttention)]


def attention_gammas(model: nn.Module) -> list[float]:
    """Each attention block's gamma, in forward order (empty without attention)."""
    return [layer.gamma.item() for layer in attention_layers(model)]
