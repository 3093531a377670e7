"""What model_28.py and model_64.py share: their conv blocks, the Generator/Discriminator bases, initialisation."""
import torch
from torch import nn
from torch.nn.utils import parametrize

from attention import SelfAttention, attention_gammas
from spectral import maybe_spectral_norm

INITS = ("default", "normal", "orthogonal")
# How a conditional G hears its class: 'shared' (BigGAN's: one class embedding, mapped by a linear layer per BatchNorm
# to its gain and bias) or 'per-class' (a table of gains and biases per class in each BatchNorm, as before).
CONDITIONINGS = ("shared", "per-class")
CLASS_EMBEDDING_DIM = 128  # BigGAN's shared embedding width


def up_block(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int, spectral_norm: bool,
             num_classes: int = 0, conditioning: str = "shared") -> list[nn.Module]:
    """Generator block: (spectral-normed) ConvTranspose2d, BatchNorm (class-conditional when num_classes), ReLU."""
    conv = nn.ConvTranspose2d(in_channels, out_channels, kernel, stride, padding)
    if not num_classes:
        norm = nn.BatchNorm2d(out_channels)
    elif conditioning == "shared":
        norm = SharedClassBatchNorm2d(out_channels, CLASS_EMBEDDING_DIM, spectral_norm)
    else:
        norm = ConditionalBatchNorm2d(out_channels, num_classes)
    return [maybe_spectral_norm(conv, spectral_norm), norm, nn.ReLU(inplace=True)]


def down_block(in_channels: int, out_channels: int, spectral_norm: bool) -> list[nn.Module]:
    """Discriminator block: (spectral-normed) 4x4 stride-2 Conv2d halving the size, LeakyReLU(0.1)."""
    conv = nn.Conv2d(in_channels, out_channels, 4, 2, 1)
    return [maybe_spectral_norm(conv, spectral_norm), nn.LeakyReLU(0.1, inplace=True)]


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine parameters of its own, then a gain and a bias per class (as in the SAGAN authors'
    release and BigGAN): the class chooses how each channel is scaled and shifted. Starts as plain BatchNorm."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


class SharedClassBatchNorm2d(nn.Module):
    """BatchNorm without affine parameters of its own, then gain 1 + W_g e and bias W_b e from the class embedding e
    that the generator shares across its BatchNorms (BigGAN's conditional BatchNorm). Every class moves through the
    shared W_g and W_b as well as its own embedding, so a class's gains move many times faster under Adam than the
    entries of a per-class table (each of which moves at most about the learning rate a step)."""

    def __init__(self, channels: int, embedding_dim: int, spectral_norm: bool):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = maybe_spectral_norm(nn.Linear(embedding_dim, channels, bias=False), spectral_norm)
        self.bias = maybe_spectral_norm(nn.Linear(embedding_dim, channels, bias=False), spectral_norm)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * (1 + self.gain(embedding))[:, :, None, None] + self.bias(embedding)[:, :, None, None]


CLASS_NORMS = (ConditionalBatchNorm2d, SharedClassBatchNorm2d)


class _GANNetwork(nn.Module):
    """Holds the constructor options; the model files' build() lists the layers, and this assembles them.

    build() calls up_block/down_block for the convolutions and attention(size, channels) after each feature map
    where attention may go: it returns the layer when `size` is in attn_sizes (by default the original project's
    places, https://github.com/franknb/Self-attention-DCGAN), and nothing otherwise.
    """

    default_attn_sizes: tuple[int, ...]

    def __init__(self, attn: bool, conv_dim: int, spectral_norm: bool, attn_variant: str,
                 attn_sizes: tuple[int, ...] | None, num_classes: int, conditioning: str):
        super().__init__()
        if num_classes < 0 or num_classes == 1:
            raise ValueError(f"num_classes must be 0 (unconditional) or at least 2, got {num_classes}")
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        self.num_classes, self.conditioning = num_classes, conditioning
        if conv_dim < 8 or conv_dim % 8:
            raise ValueError(f"conv_dim must be a positive multiple of 8, got {conv_dim}")
        self.attn, self.conv_dim, self.spectral_norm, self.attn_variant = attn, conv_dim, spectral_norm, attn_variant
        self.attn_sizes = tuple(self.default_attn_sizes if attn_sizes is None else attn_sizes)

    def build(self) -> list[nn.Module]:
        raise NotImplementedError

    def assemble(self) -> nn.Sequential:
        """build()'s layers, in order (weights draw from the seed in that order), after checking attn_sizes."""
        self._sizes = []
        layers = self.build()
        unknown = sorted(set(self.attn_sizes) - set(self._sizes))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no {unknown} feature map for attention; its maps are {self._sizes}")
        return nn.Sequential(*layers)

    def up_block(self, in_channels: int, out_channels: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
        return up_block(in_channels, out_channels, kernel, stride, padding, self.spectral_norm, self.num_classes,
                        self.conditioning)

    def down_block(self, in_channels: int, out_channels: int) -> list[nn.Module]:
        return down_block(in_channels, out_channels, self.spectral_norm)

    def attention(self, size: int, channels: int) -> list[nn.Module]:
        """[SelfAttention] over the (channels, size, size) map before it when attention goes there, else []."""
        self._sizes.append(size)
        if not (self.attn and size in self.attn_sizes):
            return []
        # The original project's attention convs are plain; the authors' release normalises them too.
        return [SelfAttention(channels, self.attn_variant, spectral_norm=self.spectral_norm and self.attn_variant == "paper")]

    def attention_gammas(self) -> list[float]:
        """Every attention layer's gamma, in forward order, for logging."""
        return attention_gammas(self)

    def check_labels(self, y: torch.Tensor | None, batch: int) -> None:
        """Labels are required by a conditional model, refused by an unconditional one, and must be in range."""
        name = type(self).__name__
        if not self.num_classes:
            if y is not None:
                raise ValueError(f"this {name} is unconditional (num_classes=0): call it without labels")
            return
        if y is None:
            raise ValueError(f"this {name} is class-conditional: pass labels y, a LongTensor of shape ({batch},) "
                             f"with values in 0..{self.num_classes - 1}")
        if y.dtype != torch.long or tuple(y.shape) != (batch,):
            raise ValueError(f"{name} expects labels y as a LongTensor of shape ({batch},), got {y.dtype} {tuple(y.shape)}")
        if not torch.compiler.is_compiling() and len(y) and not 0 <= int(y.min()) <= int(y.max()) < self.num_classes:
            raise ValueError(f"{name} has {self.num_classes} classes: labels must lie in 0..{self.num_classes - 1}, "
                             f"got {int(y.min())}..{int(y.max())}")


class GeneratorBase(_GANNetwork):
    """z of shape (B, z_dim) or (B, z_dim, 1, 1) -> images (B, C, H, W) in [-1, 1]."""

    image_shape: tuple[int, int, int]

    def __init__(self, attn: bool = True, z_dim: int = 100, conv_dim: int = 64, spectral_norm: bool = True,
                 attn_variant: str = "original", attn_sizes: tuple[int, ...] | None = None, num_classes: int = 0,
                 conditioning: str = "shared"):
        super().__init__(attn, conv_dim, spectral_norm, attn_variant, attn_sizes, num_classes, conditioning)
        if z_dim < 1:
            raise ValueError(f"z_dim must be positive, got {z_dim}")
        self.z_dim = z_dim
        if num_classes and conditioning == "shared":
            self.class_embedding = nn.Embedding(num_classes, CLASS_EMBEDDING_DIM)
        self.net = self.assemble()

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, z_dim) and, for a conditional G, class labels y (B,) -> images."""
        if z.dim() not in (2, 4) or z.shape[1] != self.z_dim or z.shape[2:] not in ((), (1, 1)):
            raise ValueError(f"Generator expects z of shape (B, {self.z_dim}) or (B, {self.z_dim}, 1, 1), got {tuple(z.shape)}")
        self.check_labels(y, z.shape[0])
        x = z.view(z.shape[0], self.z_dim, 1, 1)
        if not self.num_classes:
            return self.net(x)
        condition = self.class_embedding(y) if self.conditioning == "shared" else y
        for layer in self.net:
            x = layer(x, condition) if isinstance(layer, CLASS_NORMS) else layer(x)
        return x

    @torch.no_grad()
    def sample(self, z: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
        """Images for z (and labels y) in eval mode, in fp32 on z's device, computed in batches on G's device:
        BatchNorm uses its running statistics and spectral norm its stored vectors, so sampling changes nothing.
        G's mode is restored afterwards."""
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            batches = [self(z_part.to(device), None if y is None else y_part.to(device)).float().to(z.device)
                       for z_part, y_part in zip(z.split(batch_size), (z if y is None else y).split(batch_size))]
        finally:
            self.train(was_training)
        return torch.cat(batches)

    def balanced_labels(self, n: int) -> torch.Tensor | None:
        """0, 1, ..., K-1, 0, 1, ... for n samples of a conditional G (equal shares of every class); None otherwise."""
        return torch.arange(n) % self.num_classes if self.num_classes else None


class DiscriminatorBase(_GANNetwork):
    """Images (B, C, H, W) -> one real/fake logit per image, shape (B,)."""

    image_shape: tuple[int, int, int]

    def __init__(self, attn: bool = True, conv_dim: int = 64, spectral_norm: bool = True, attn_variant: str = "original",
                 attn_sizes: tuple[int, ...] | None = None, num_classes: int = 0, conditioning: str = "shared"):
        super().__init__(attn, conv_dim, spectral_norm, attn_variant, attn_sizes, num_classes, conditioning)
        self.net = self.assemble()
        if num_classes:  # the projection discriminator's class embedding (Miyato & Koyama 2018)
            embed = nn.Embedding(num_classes, self.net[-1].in_channels)  # as wide as what the logit layer reads
            if conditioning == "shared":
                # xavier, as mimicry's SNGAN: torch's N(0, 1) rows, rescaled by spectral norm, barely turn in training
                nn.init.xavier_uniform_(embed.weight)
            self.embed = maybe_spectral_norm(embed, spectral_norm)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) and, for a conditional D, class labels y (B,) -> logits (B,).

        Conditional: the logit gains the projection <embed(y), sum over positions of the head's input features>.
        """
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"Discriminator expects images of shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        self.check_labels(y, x.shape[0])
        if not self.num_classes:
            return self.net(x).flatten()
        features = self.net[:-1](x)
        projection = (self.embed(y) * features.sum(dim=(2, 3))).sum(dim=1)
        return self.net[-1](features).flatten() + projection


@torch.no_grad()
def initialise(model: nn.Module, scheme: str) -> None:
    """Re-initialise conv and linear weights: 'default' leaves torch's, 'normal' is DCGAN's N(0, 0.02) with biases
    at 0 and BatchNorm gains N(1, 0.02), 'orthogonal' is BigGAN's. Spectral-norm vectors are then re-estimated."""
    if scheme not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {scheme!r}")
    if scheme == "default":
        return
    class_norms = {id(m) for norm in model.modules() if isinstance(norm, ConditionalBatchNorm2d) for m in (norm.gain, norm.bias)}
    # per-class tables start at gain 1 and bias 0, like plain BatchNorm's; shared ones are linear layers, initialised
    for module in model.modules():
        if id(module) in class_norms:
            continue
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
