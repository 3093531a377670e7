"""data.py: real MNIST and CelebA from SAGAN_DATA, offline behaviour, messy folders, resumable sharded loading."""
import gzip
import hashlib
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from data import DataError, EndlessLoader, load_dataset, load_dataset_with_fallback, resolve_data_root

MNIST_TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(scope="module")
def mnist(data_root):
    return load_dataset("mnist", data_root, image_size=28, channels=1)


@pytest.fixture
def offline(monkeypatch):
    """Every download goes through a proxy on a closed local port, so it fails at once even with internet."""
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    for variable in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen caches its proxy settings on first use


def assert_images(images, shape):
    assert images.shape == shape and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1


def save_jpeg(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)
    return path


def celeba_like(index: int) -> Image.Image:
    """A 178x218 image: red bands over the top and bottom 20 rows, which the centre crop must remove."""
    image = Image.new("RGB", (178, 218), (255, 0, 0))
    image.paste((0, 10 * index, 255), (0, 20, 178, 198))
    return image


def test_data_root_is_argument_then_env_then_default(monkeypatch, tmp_path):
    monkeypatch.setenv("SAGAN_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("SAGAN_DATA")
    assert resolve_data_root(None) == Path("data")


def test_real_mnist_has_the_published_class_counts(mnist):
    assert len(mnist) == 60_000
    assert torch.bincount(mnist.labels).tolist() == MNIST_TRAIN_CLASS_COUNTS
    assert_images(mnist.images, (60_000, 1, 28, 28))
    assert mnist.images.min() == -1 and mnist.images.max() == 1
    image, label = mnist[0]
    assert image.shape == (1, 28, 28) and label == 5  # MNIST's first training digit is a 5


def test_mnist_test_split_resized_to_rgb(data_root):
    test_set = load_dataset("mnist", data_root, image_size=32, channels=3, train=False, size=100)
    assert len(test_set) == 100 and test_set[0][1] == 7  # MNIST's first test digit is a 7
    assert_images(test_set.images, (100, 3, 32, 32))
    assert torch.equal(test_set.images[:, 0], test_set.images[:, 2])


def test_offline_mnist_download_names_the_files_and_folder(tmp_path, offline):
    with pytest.raises(DataError) as error:
        load_dataset("mnist", tmp_path, image_size=28, channels=1)
    message = str(error.value)
    assert "could not be downloaded" in message
    assert f"{tmp_path / 'MNIST' / 'raw'}/" in message
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert name in message


def test_mnist_falls_back_to_mnist_5k_with_a_notice(tmp_path, offline):
    with pytest.warns(UserWarning, match="mnist-5k"):
        dataset, name = load_dataset_with_fallback("mnist", tmp_path, image_size=28, channels=1)
    assert name == "mnist-5k" and len(dataset) == 5000


def test_mnist_5k_has_5000_digits_of_all_classes():
    digits = load_dataset("mnist-5k", image_size=28, channels=1)
    assert_images(digits.images, (5000, 1, 28, 28))
    assert torch.bincount(digits.labels).tolist() == [500] * 10
    assert set(digits.labels[:50].tolist()) == set(range(10))  # shuffled: a small prefix holds every digit


def test_mnist_5k_digits_are_real_mnist_training_digits(mnist):
    digits = load_dataset("mnist-5k", image_size=28, channels=1)
    mnist_label = {hashlib.md5(image.numpy().tobytes()).hexdigest(): label
                   for image, label in zip(mnist.images, mnist.labels.tolist())}
    found = [mnist_label.get(hashlib.md5(image.numpy().tobytes()).hexdigest()) for image in digits.images]
    assert found == digits.labels.tolist()


def test_mnist_reads_extracted_files_and_rejects_damaged_ones(data_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(gzip.decompress((data_root / "MNIST" / "raw" / f"{name}.gz").read_bytes()))
    assert len(load_dataset("mnist", tmp_path, image_size=28, channels=1, train=False)) == 10_000
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    with pytest.raises(DataError, match="t10k"):
        load_dataset("mnist", tmp_path, image_size=28, channels=1, train=False)


@pytest.fixture
def messy_folder(tmp_path):
    """Mixed formats and modes in nested folders, plus a corrupt image, a non-image file and a hidden file."""
    folder = tmp_path / "images"
    (folder / "nested" / "deeper").mkdir(parents=True)
    Image.new("L", (40, 30), 0).save(folder / "a_gray.png")
    save_jpeg(folder / "b_photo.JPG", Image.new("RGB", (30, 40), (255, 0, 0)))
    Image.new("RGBA", (32, 32), (0, 0, 255, 0)).save(folder / "nested" / "c_transparent.png")
    Image.new("P", (32, 32), 3).save(folder / "nested" / "deeper" / "d_palette.gif")
    Image.new("RGB", (32, 32), (0, 255, 0)).save(folder / "nested" / "e_green.webp")
    (folder / "nested" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"junk")
    return folder


def test_folder_loads_mixed_formats_and_skips_corrupt_files(messy_folder):
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable") as records:
        rgb = load_dataset("folder", messy_folder, image_size=16, channels=3)
    assert len(records) == 1
    assert [path.name for path in rgb.files] == [
        "a_gray.png", "b_photo.JPG", "c_transparent.png", "d_palette.gif", "e_green.webp"]
    images = torch.stack([rgb[i][0] for i in range(len(rgb))])
    assert_images(images, (5, 3, 16, 16))
    assert rgb[0][1] == -1
    mean_colour = images.mean(dim=(2, 3))
    assert torch.allclose(mean_colour[0], torch.tensor([-1.0, -1, -1]))                # black gray image
    assert torch.allclose(mean_colour[1], torch.tensor([1.0, -1, -1]), atol=0.05)      # red JPEG
    assert torch.allclose(mean_colour[2], torch.tensor([1.0, 1, 1]))                   # transparent -> white
    assert torch.allclose(mean_colour[4], torch.tensor([-1.0, 1, -1]), atol=0.05)     # green WebP

    with pytest.warns(UserWarning, match="skipped 1"):
        gray = load_dataset("folder", messy_folder, image_size=16, channels=1)
    assert_images(gray[1][0], (1, 16, 16))


def test_images_over_pils_decompression_bomb_limit_are_skipped_with_a_warning(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (12000, 12000)).save(folder / "huge.png")  # 144 million pixels: a 140 KB file
    Image.new("L", (32, 32), 255).save(folder / "small.png")
    with pytest.warns(UserWarning, match=r"skipped 1 image file\(s\) over PIL's decompression-bomb limit of "
                                         r"89,478,485 pixels .*huge\.png") as records:
        dataset = load_dataset("folder", folder, image_size=16, channels=1)
    assert [path.name for path in dataset.files] == ["small.png"]
    assert not [r for r in records if issubclass(r.category, Image.DecompressionBombWarning)], "only our warning"
    (folder / "small.png").unlink()
    with pytest.raises(DataError, match=r"none of the 1 image files .*huge\.png: too large"):
        load_dataset("folder", folder, image_size=16, channels=1)


def test_image_that_fails_to_decode_is_replaced_by_the_next(tmp_path):
    folder = tmp_path / "images"
    for index in range(3):  # noise, so that half a file still holds the whole header
        save_jpeg(folder / f"{index}.jpg", Image.effect_noise((64, 64), 20 + 20 * index))
    whole = (folder / "1.jpg").read_bytes()
    (folder / "1.jpg").write_bytes(whole[: len(whole) // 2])  # passes the header check, fails to decode
    dataset = load_dataset("folder", folder, image_size=8, channels=3)
    assert len(dataset) == 3
    with pytest.warns(UserWarning, match="1.jpg") as records:
        replacement = dataset[1][0]
        batch = next(EndlessLoader(dataset, batch_size=3))  # the whole epoch, including the broken file
    assert len(records) == 1  # one warning, though the file failed twice
    assert torch.equal(replacement, dataset[2][0])
    assert_images(batch, (3, 3, 8, 8))


@pytest.mark.parametrize("case, expected", [("missing", "does not exist"), ("empty", "is empty"),
                                            ("text only", "no images")])
def test_bad_folders_give_one_clear_error(tmp_path, case, expected):
    folder = tmp_path / case
    if case != "missing":
        folder.mkdir()
    if case == "text only":
        (folder / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as error:
        load_dataset("folder", folder, image_size=16, channels=3)
    assert expected in str(error.value) and str(folder) in str(error.value) and ".png" in str(error.value)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(DataError, match="mnist-5k"):
        load_dataset("imagenet", image_size=64, channels=3)
    with pytest.raises(DataError, match="channels"):
        load_dataset("synthetic", image_size=64, channels=2)
    with pytest.raises(DataError, match="image_size"):
        load_dataset("synthetic", image_size=0, channels=3)
    with pytest.raises(DataError, match="batch"):
        EndlessLoader(load_dataset("synthetic", image_size=8, channels=1, size=10), batch_size=6, world_size=2)


def test_real_celeba_subset(data_root):
    celeba = load_dataset("celeba", data_root, image_size=64, channels=3)
    assert len(celeba) == 10_000
    assert celeba.files[0].name == "000001.jpg"
    assert_images(next(EndlessLoader(celeba, batch_size=8)), (8, 3, 64, 64))


@pytest.mark.parametrize("layout", ["celeba/img_align_celeba", "img_align_celeba", "direct"])
def test_full_size_celeba_layouts_are_centre_cropped(tmp_path, layout):
    folder = tmp_path if layout == "direct" else tmp_path / layout
    for index in range(4):
        save_jpeg(folder / f"{index + 1:06d}.jpg", celeba_like(index))
    celeba = load_dataset("celeba", tmp_path, image_size=64, channels=3)
    images = torch.stack([celeba[i][0] for i in range(4)])
    assert_images(images, (4, 3, 64, 64))
    red = images[:, 0]
    assert red.max() < -0.5  # the red bands lay outside the central 178x178 square (JPEG bleeds a little)


def test_missing_celeba_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset("celeba", tmp_path, image_size=64, channels=3)
    assert "img_align_celeba" in str(error.value) and "mmlab.ie.cuhk.edu.hk" in str(error.value)


def test_synthetic_is_deterministic_per_seed_and_index():
    first = load_dataset("synthetic", image_size=24, channels=3, size=16, seed=1)
    assert_images(first.images, (16, 3, 24, 24))
    assert torch.equal(first.images, load_dataset("synthetic", image_size=24, channels=3, size=16, seed=1).images)
    assert torch.equal(first.images[:4], load_dataset("synthetic", image_size=24, channels=3, size=4, seed=1).images)
    assert not torch.equal(first.images, load_dataset("synthetic", image_size=24, channels=3, size=16).images)
    assert first.images.std(dim=0).mean() > 0.1  # images differ from each other
    assert load_dataset("synthetic", image_size=8, channels=1, size=3).images.shape == (3, 1, 8, 8)


def uninterrupted(dataset, steps, **kwargs):
    loader = EndlessLoader(dataset, **kwargs)
    return [next(loader) for _ in range(steps)]


@pytest.mark.parametrize("stop_at", [2, 5])  # 5 = the last batch of epoch 0 (drop_last leaves 2 images over)
def test_loader_resumes_exactly(stop_at):
    dataset = load_dataset("synthetic", image_size=8, channels=1, size=22)
    expected = uninterrupted(dataset, 9, batch_size=4, seed=3)
    loader = EndlessLoader(dataset, batch_size=4, seed=3)
    for _ in range(stop_at):
        next(loader)
    state = loader.state_dict()
    resumed = EndlessLoader(dataset, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip([next(resumed) for _ in range(9 - stop_at)], expected[stop_at:]))


def test_loader_epochs_are_seeded_permutations_without_the_remainder():
    dataset = load_dataset("synthetic", image_size=8, channels=1, size=10)
    loader = EndlessLoader(dataset, batch_size=3, seed=5)
    batches = [next(loader) for _ in range(6)]
    assert loader.state_dict() == {"epoch": 1, "position": 9, "seed": 5}
    for epoch in range(2):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch))[:9]
        assert torch.equal(torch.cat(batches[3 * epoch:3 * epoch + 3]), dataset.images[order])


def test_ranks_split_each_global_batch():
    dataset = load_dataset("synthetic", image_size=8, channels=1, size=50)
    single = uninterrupted(dataset, 6, batch_size=8)
    rank0, rank1 = (uninterrupted(dataset, 3, batch_size=4, rank=r, world_size=2) for r in (0, 1))
    for step in range(3):
        assert torch.equal(torch.cat([rank0[step], rank1[step]]), single[step])  # the global batch, in order
    # Disjoint: no image appears on both ranks within an epoch (synthetic images are all distinct).
    flat0, flat1 = (torch.cat(r).flatten(1) for r in (rank0, rank1))
    assert not (flat0[:, None] == flat1[None]).all(-1).any()


def test_file_dataset_loader_matches_direct_indexing_and_resumes_with_workers(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(12):
        Image.new("L", (10, 10), 20 * index).save(folder / f"{index:02d}.png")
    dataset = load_dataset("folder", folder, image_size=8, channels=1)
    expected = uninterrupted(dataset, 5, batch_size=5, seed=1)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))[:10]
    assert torch.equal(torch.cat(expected[:2]), torch.stack([dataset[i][0] for i in order.tolist()]))
    loader = EndlessLoader(dataset, batch_size=5, seed=1, num_workers=2)
    next(loader)
    resumed = EndlessLoader(dataset, batch_size=5, seed=1, num_workers=2)
    resumed.load_state_dict(loader.state_dict())
    assert all(torch.equal(next(resumed), batch) for batch in expected[1:])


def test_loader_moves_batches_to_the_device():
    dataset = load_dataset("synthetic", image_size=8, channels=3, size=8)
    assert next(EndlessLoader(dataset, batch_size=4, device="meta")).device.type == "meta"


def test_a_folder_of_class_subfolders_is_labelled_as_imagefolder_labels_it(tmp_path):
    folder = tmp_path / "images"
    for name, shade in (("cats", 0), ("dogs", 255)):
        (folder / name / "more").mkdir(parents=True)
        for index in range(3):
            Image.new("L", (8, 8), shade).save(folder / name / ("more" if index == 2 else ".") / f"{index}.png")
    dataset = load_dataset("folder", folder, image_size=8, channels=1)
    assert dataset.classes == ["cats", "dogs"]
    assert sorted(dataset[i][1] for i in range(len(dataset))) == [0, 0, 0, 1, 1, 1]
    assert all((dataset[i][0].mean() > 0) == (dataset[i][1] == 1) for i in range(len(dataset))), "labels follow files"
    images, labels = next(EndlessLoader(dataset, batch_size=6, labels=True))
    assert torch.equal((images.mean(dim=(1, 2, 3)) > 0).long(), labels)
    Image.new("L", (8, 8)).save(folder / "loose.png")  # an image beside the class folders: no labels at all
    assert load_dataset("folder", folder, image_size=8, channels=1).classes == []


def test_mnist_batches_carry_their_labels():
    dataset = load_dataset("mnist-5k", image_size=28, channels=1)
    assert dataset.classes == [str(digit) for digit in range(10)]
    loader = EndlessLoader(dataset, batch_size=16, seed=3, labels=True)
    images, labels = next(loader)
    expected = EndlessLoader(dataset, batch_size=16, seed=3)
    assert torch.equal(images, next(expected)) and labels.dtype == torch.long
    indices = [int((dataset.images == image).flatten(1).all(1).nonzero()[0]) for image in images]
    assert torch.equal(labels, dataset.labels[indices])
