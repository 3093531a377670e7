"""What a run is: TrainConfig (every knob, each a validated flag of train.py), the named recipes and arms, and the
rules a resumed run follows.

A recipe is 'default' (TrainConfig's defaults), 'original' (the original project's), or either followed by changes
joined with '+': 'stage-1+betas-0.5' is the default with two changes (stage-1 is the default before the recipe
study's stage 2), 'original+lr-2e-4' the original with one.
The CLI (--recipe), study.py, results.py, the Makefile and the notebooks all name recipes this way.
"""
import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import data
from attention import ATTENTION_VARIANTS
from augment import parse_policy
from blocks import CONDITIONINGS, INITS
from models import model_module

LOSSES = ("hinge", "nonsaturating", "wgan-gp")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "bf16-sim")


def _field(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every knob of a run. The defaults are the default recipe (README, Recipe study); TrainConfig.from_recipe('original')
    gives the original project's."""

    # data
    dataset: str = _field("mnist", "mnist, mnist-5k, celeba, folder or synthetic")
    data_root: str | None = _field(None, "data folder (default: $SAGAN_DATA, else ./data); for 'folder', the image folder")
    image_size: int = _field(0, "28 (model_28.py) or 64 (model_64.py); 0 = 28 for MNIST, 64 otherwise")
    synthetic_size: int = _field(2048, "number of images of the synthetic set")
    # model
    attn: bool = _field(True, "self-attention layers (--no-attn: the DCGAN baseline)")
    attn_variant: str = _field("original", "'original' (q/k C/2, v C, raw scores), 'scaled' (the same, scores / sqrt(C/2)) "
                                           "or 'paper' (q/k C/8, v C/2, pooled keys)")
    g_attn_sizes: tuple[int, ...] | None = _field(None, "sizes of G's feature maps that attention follows (default: the "
                                                        "original's, 14 at 28x28, 16 32 at 64x64)")
    d_attn_sizes: tuple[int, ...] | None = _field(None, "sizes of D's feature maps that attention follows (default: the "
                                                        "original's, 3 at 28x28, 8 4 at 64x64)")
    z_dim: int = _field(100, "noise dimension")
    conv_dim: int = _field(64, "base channel width")
    spectral_norm: bool = _field(True, "spectral norm in G and D (--no-spectral-norm: plain DCGAN layers)")
    conditional: bool = _field(False, "class-conditional G (conditional BatchNorm) and D (projection), trained on labels")
    num_classes: int = _field(0, "classes of a conditional run (0: as many as the dataset has)")
    conditioning: str = _field("shared", "how a conditional G hears its class: 'shared' (BigGAN's: one class embedding, "
                                         "a linear map to each BatchNorm's gain and bias) or 'per-class' (a table of "
                                         "gains and biases per class in each BatchNorm)")
    init: str = _field("default", "weight initialisation: default (torch's), normal (DCGAN's N(0, 0.02)) or orthogonal")
    # optimisation
    steps: int = _field(2000, "generator updates in total")
    minutes: float = _field(0.0, "also stop after this many minutes of training (evaluation not counted); 0 = no limit")
    clock: str = _field("wall", "what --minutes, --eval-minutes and --checkpoint-minutes count: 'wall' (elapsed time) or "
                                "'cpu' (this process's CPU time, which other programs on the machine do not eat into)")
    # equal rates 4e-4 with reuse_fakes and an EMA: the recipe study's winner at 30 CPU-minutes (README, Recipe study); equal
    # rates because the original TTUR (1e-4 / 4e-4) lets D win outright for hundreds of steps
    batch_size: int = _field(64, "images per batch (per process)")
    g_lr: float = _field(4e-4, "generator learning rate")
    d_lr: float = _field(4e-4, "discriminator learning rate")
    beta1: float = _field(0.0, "Adam beta1")
    beta2: float = _field(0.9, "Adam beta2")
    loss: str = _field("hinge", "hinge, nonsaturating (classic DCGAN) or wgan-gp")
    gp_weight: float = _field(10.0, "gradient-penalty weight for wgan-gp")
    r1_weight: float = _field(0.0, "R1: weight gamma of the zero-centred gradient penalty gamma/2 E||grad D(real)||^2; 0 = off")
    r1_every: int = _field(16, "apply R1 every N steps, scaled by N (lazy regularisation, as in StyleGAN2)")
    augment: str = _field("", "DiffAugment policy for everything D sees: '' (off), e.g. 'translation,cutout' or "
                              "'color,translation,cutout'")
    d_steps: int = _field(1, "discriminator updates per generator update (5 is usual for wgan-gp)")
    reuse_fakes: bool = _field(True, "the G update reuses the D update's fakes: one G forward per step instead of two")
    ema_decay: float = _field(0.999, "EMA of G's weights for samples and evaluation (training never reads it); 0 = off")
    ema_start: int = _field(0, "the EMA copies G until this step, then averages")
    ema_rampup: float = _field(0.05, "cap the EMA's half-life at this fraction of the images seen so far (stylegan2-ada "
                                    "uses 0.05): early on it averages over a short, growing window; 0 = off")
    lr_decay: float = _field(0.0, "decay both learning rates linearly to 0 over this last fraction of the budget "
                                  "(--steps, or --minutes when that ends first); 0 = constant rates")
    seed: int = _field(0, "seeds weights, data order, noise and the fixed sample noise")
    # machine
    device: str = _field("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    precision: str = _field("auto", "auto (bf16 where the GPU or CPU runs it natively, fp16 on older GPUs, fp32 "
                                    "elsewhere), fp32, bf16, fp16, or bf16-sim (CPU: bf16's numbers at near fp32 speed "
                                    "where bf16 is not native, to measure what bf16 does to training)")
    channels_last: bool | None = _field(None, "channels_last memory format (default: on for the CPU, off on CUDA and MPS)")
    compile: bool = _field(False, "torch.compile G and D")
    threads: int = _field(0, "CPU threads for torch (0: torch's default)")
    num_workers: int = _field(-1, "data-loading workers (-1: 4 on CUDA for image files, else 0)")
    sync_bn: bool = _field(False, "under torchrun, SyncBatchNorm in G: batch statistics over all processes (CUDA only)")
    # outputs
    out: str | None = _field(None, "run directory (default: runs/<timestamp>-<dataset>-<arm>)")
    sample_every: int = _field(100, "save an 8x8 grid of the fixed noise every N steps")
    log_every: int = _field(10, "append to metrics.csv every N steps")
    checkpoint_every: int = _field(500, "keep checkpoints/step_N.pt every N steps (latest.pt is written then too)")
    checkpoint_minutes: float = _field(5.0, "also write checkpoints/latest.pt every N minutes of training; 0 = off")
    eval_every: int = _field(0, "evaluate sample quality every N steps (0: never)")
    eval_minutes: float = _field(0.0, "also evaluate every N minutes of training (0: never)")
    eval_n: int = _field(1000, "generated images per evaluation during training")
    quiet: bool = _field(False, "no progress bar")

    def __post_init__(self):
        if not self.image_size:
            self.image_size = data.image_size_for(self.dataset)
        for name in ("g_attn_sizes", "d_attn_sizes"):  # config.json holds lists
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    @classmethod
    def from_recipe(cls, recipe: str = "default", **overrides) -> "TrainConfig":
        """A config from a recipe name ('default', 'original', 'stage-1+betas-0.5', ...), with `overrides` on top."""
        return cls(**{**recipe_settings(recipe), **overrides})

    def validate(self) -> None:
        """Refuse nonsensical values up front, naming the field."""
        def require(ok: bool, name: str, expected: str):
            if not ok:
                raise ConfigError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        require(self.dataset in data.DATASETS, "dataset", f"one of {', '.join(data.DATASETS)}")
        require(self.image_size in (28, 64), "image_size", "28 or 64")
        require(self.attn_variant in ATTENTION_VARIANTS, "attn_variant", f"one of {', '.join(ATTENTION_VARIANTS)}")
        require(self.init in INITS, "init", f"one of {', '.join(INITS)}")
        require(self.conditioning in CONDITIONINGS, "conditioning", f"one of {', '.join(CONDITIONINGS)}")
        require(self.clock in ("wall", "cpu"), "clock", "'wall' or 'cpu'")
        try:
            parse_policy(self.augment)
        except ValueError as error:
            raise ConfigError(f"augment: {error}") from None
        require(self.loss in LOSSES, "loss", f"one of {', '.join(LOSSES)}")
        require(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
        for name in ("steps", "batch_size", "z_dim", "d_steps", "sample_every", "log_every", "checkpoint_every", "eval_n",
                     "synthetic_size", "r1_every"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "a positive integer")
        require(self.conv_dim >= 8 and self.conv_dim % 8 == 0, "conv_dim", "a positive multiple of 8")
        require(self.conditional or self.num_classes == 0, "num_classes", "0 without --conditional")
        require(self.num_classes == 0 or self.num_classes >= 2, "num_classes", "0 (from the data) or at least 2")
        for name in ("eval_every", "threads", "ema_start"):
            require(getattr(self, name) >= 0, name, "0 or a positive integer")
        for name in ("minutes", "checkpoint_minutes", "eval_minutes", "r1_weight", "gp_weight"):
            require(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "a finite number >= 0")
        require(self.num_workers >= -1, "num_workers", "-1 (auto), 0 or a positive integer")
        for name in ("g_lr", "d_lr"):
            require(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name, "a positive finite number")
        for name in ("beta1", "beta2", "ema_decay"):
            require(0 <= getattr(self, name) < 1, name, "in [0, 1)")
        require(0 <= self.ema_rampup and math.isfinite(self.ema_rampup), "ema_rampup", "a finite number >= 0")
        require(0 <= self.lr_decay <= 1, "lr_decay", "in [0, 1]")

    @property
    def channels(self) -> int:
        return model_module(self.image_size).IMAGE_SHAPE[0]


class ConfigError(ValueError):
    """A configuration value that makes no sense, or a resume that does not match its run."""


# ---------------------------------------------------------------------------------------------- recipes and arms

# The original project's recipe (https://github.com/franknb/Self-attention-DCGAN): every field it fixes.
ORIGINAL = dict(g_lr=1e-4, d_lr=4e-4, beta1=0.0, beta2=0.9, batch_size=64, loss="hinge", d_steps=1, z_dim=100, conv_dim=64,
                attn_variant="original", g_attn_sizes=None, d_attn_sizes=None, spectral_norm=True, init="default",
                augment="", r1_weight=0.0, reuse_fakes=False, ema_decay=0.0, ema_start=0, ema_rampup=0.0, lr_decay=0.0,
                conditioning="per-class")
# Every named recipe or change of one: the fields it sets. 'default' and 'original' are whole recipes; the others
# change whatever recipe comes before them in a '+'-joined name.
RECIPES = {
    "default": {},
    "original": ORIGINAL,
    # the default from the recipe study's stage 1 until its stage 2 (the CelebA pair's lost first attempts trained with it)
    "stage-1": dict(batch_size=64, g_lr=2e-4, d_lr=2e-4, reuse_fakes=False, ema_decay=0.0, ema_rampup=0.0),
    "reuse-fakes": dict(reuse_fakes=True),
    "lr-2e-4": dict(g_lr=2e-4, d_lr=2e-4),
    "lr-4e-4": dict(g_lr=4e-4, d_lr=4e-4),
    "betas-0.5": dict(beta1=0.5, beta2=0.999),
    "lr-decay": dict(lr_decay=0.5),
    "ema": dict(ema_decay=0.999, ema_rampup=0.05),
    "d-attn-7": dict(d_attn_sizes=(7,)),
    "paper": dict(attn_variant="paper"),
    "scaled": dict(attn_variant="scaled"),
    "diffaugment": dict(augment="translation,cutout"),
    "r1": dict(r1_weight=0.1),
    "d-steps-2": dict(d_steps=2),
    "batch-16": dict(batch_size=16),
    "batch-32": dict(batch_size=32),
    "batch-128": dict(batch_size=128),
    "conditional": dict(conditional=True),
    "per-class": dict(conditioning="per-class"),
}
WHOLE_RECIPES = ("default", "original")


def recipe_settings(recipe: str) -> dict:
    """The fields a recipe name sets: its base ('default' unless it starts with 'original') and each change in turn."""
    parts = recipe.split("+")
    unknown = [part for part in parts if part not in RECIPES]
    if unknown:
        raise ConfigError(f"unknown recipe {', '.join(map(repr, unknown))} in {recipe!r}: a recipe is 'default', 'original' "
                          f"or changes joined by '+' ({', '.join(name for name in RECIPES if name not in WHOLE_RECIPES)}), "
                          f"e.g. 'original+reuse-fakes'")
    misplaced = [part for part in parts[1:] if part in WHOLE_RECIPES]
    if misplaced:
        raise ConfigError(f"{misplaced[0]!r} is a whole recipe: it can only come first in {recipe!r}")
    settings = {}
    for part in parts:
        settings |= RECIPES[part]
    return settings


def canonical_recipe(recipe: str) -> str:
    """A recipe's one spelling, which names its folders: 'default+x' is 'x', as the default is every change's base."""
    recipe_settings(recipe)
    parts = recipe.split("+")
    return "+".join(parts[1:]) if parts[0] == "default" and len(parts) > 1 else recipe


@dataclass(frozen=True)
class Arm:
    """One side of a comparison: the network with or without attention, and its name wherever a reader looks."""

    attn: bool
    label: str
    weights: str  # the published generator's name: weights/<weights>_<dataset>.pt (the original project's names)


# The two arms, in the order comparisons show them (the baseline left, SAGAN right). Run folders use the keys.
ARMS = {"baseline": Arm(attn=False, label="baseline (no attention)", weights="dcgan"),
        "sagan": Arm(attn=True, label="SAGAN", weights="sagan")}


# Folder names of the arms in comparisons made before the arms were named; such folders resume under their old name.
LEGACY_ARM_FOLDERS = {"baseline": "without_attention", "sagan": "with_attention"}


def arm_folder(root: Path, arm: str) -> Path:
    """The run folder of one arm of the comparison in `root`: <root>/<arm>, or its older name where only that exists."""
    legacy = root / LEGACY_ARM_FOLDERS[arm]
    return legacy if legacy.is_dir() and not (root / arm).exists() else root / arm


def arm_of(config: "TrainConfig | dict") -> str:
    """'sagan' or 'baseline': which arm a config (or config.json) trains."""
    attn = config["attn"] if isinstance(config, dict) else config.attn
    return "sagan" if attn else "baseline"


# ---------------------------------------------------------------------------------------------- resuming

# Fields a resumed run may change; every other field must match the run's config.json. The EMA's are among them:
# training never reads the EMA, so a run may start one when it resumes (G and D train on bitwise as without it).
RESUMABLE_OVERRIDES = {"steps", "minutes", "clock", "device", "precision", "channels_last", "compile", "threads",
                       "num_workers", "sync_bn", "sample_every", "log_every", "checkpoint_every", "checkpoint_minutes",
                       "eval_every", "eval_minutes", "eval_n", "quiet", "data_root", "out",
                       "ema_decay", "ema_start", "ema_rampup"}


def complete_config(saved: dict) -> dict:
    """A run's config.json with the fields it predates filled in as that run trained: a field added later
    takes the original recipe's value where that recipe sets it (the behaviour before the field existed),
    otherwise its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return defaults | ORIGINAL | saved


def check_resumable(saved: dict, config: TrainConfig) -> None:
    """Refuse to resume with settings that would make a different run."""
    wanted = dataclasses.asdict(config)
    saved = dataclasses.asdict(TrainConfig(**complete_config(saved)))  # as the run trained, lists read as tuples
    if wanted["num_classes"] == 0:  # 'as many as the dataset has': the count the run wrote down when it started
        wanted["num_classes"] = saved["num_classes"]
    clashes = [f"{name}: run has {saved[name]!r}, asked for {wanted[name]!r}"
               for name in wanted if name not in RESUMABLE_OVERRIDES and saved[name] != wanted[name]]
    if saved["lr_decay"] and (saved["steps"], saved["minutes"]) != (wanted["steps"], wanted["minutes"]):
        clashes.append(f"steps and minutes: run has {saved['steps']!r} and {saved['minutes']!r}, asked for "
                       f"{wanted['steps']!r} and {wanted['minutes']!r}; with lr_decay the learning rates decay over the "
                       f"budget, so a new budget would change the schedule it has half run")
    if clashes:
        raise ConfigError("Cannot resume: these settings differ from the run's config.json (start a new run instead):\n  "
                          + "\n  ".join(clashes))


def resumed_config(saved: dict, **overrides) -> TrainConfig:
    """The config a run resumes with: its config.json as it trained, with `overrides` of the fields that may change."""
    config = TrainConfig(**{**complete_config(saved), **overrides})
    check_resumable(saved, config)
    return config


# ---------------------------------------------------------------------------------------------- flags

def add_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every TrainConfig field (`batch_size` -> `--batch-size`); only those given reach the namespace."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)  # `X | None` -> X
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=f.metadata["help"])
        elif typing.get_origin(kind) is tuple:  # tuple[int, ...]: --g-attn-sizes 7 14
            parser.add_argument(flag, type=typing.get_args(kind)[0], nargs="+", default=argparse.SUPPRESS,
                                metavar="SIZE", help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"{f.metadata['help']} (default: {f.default})")


def field_overrides(namespace: argparse.Namespace) -> dict:
    """The TrainConfig fields given as flags in a namespace parsed with add_flags."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {name: value for name, value in vars(namespace).items() if name in names}


# ---------------------------------------------------------------------------------------------- notebooks

IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit"}  # what a kernel's namespace holds before any cell runs
PARAMETER_TYPES = (bool, int, float, str, tuple, list, type(None))  # what a parameters cell can hold


def notebook_config(namespace: dict, notebook_settings: tuple[str, ...]) -> tuple[TrainConfig, dict]:
    """The run config and the notebook's own settings from a notebook's parameters cell (and what papermill -p
    injected after it): `recipe` picks the recipe, a TrainConfig field set to anything but None overrides it, the
    names in notebook_settings are returned apart, and any other name is a ConfigError naming it.

    It reads the plain values (numbers, strings, lists, None) of `namespace` (globals()), so the notebook's own cells
    keep their plain values out of globals (comprehensions, attributes), and the cell can be run again."""
    values = {name: value for name, value in namespace.items()
              if not name.startswith("_") and name not in IPYTHON_NAMES and isinstance(value, PARAMETER_TYPES)}
    recipe = values.pop("recipe", "default")
    settings = {name: values.pop(name) for name in notebook_settings if name in values}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown setting {', '.join(map(repr, unknown))} in the parameters cell: neither a TrainConfig "
                          f"field (python train.py --help lists them) nor one of this notebook's "
                          f"({', '.join(notebook_settings)}); a name you defined in a later cell: restart the kernel "
                          f"and run all")
    return TrainConfig.from_recipe(recipe, **{name: value for name, value in values.items() if value is not None}), settings
