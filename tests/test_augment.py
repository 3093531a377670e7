"""DiffAugment: each op does what it says on known images, is differentiable, and is reproducible from its generator."""
import pytest
import torch

import augment


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_translation_moves_every_image_by_whole_pixels_within_the_ratio_and_fills_with_zeros():
    x = torch.rand(64, 3, 16, 16) + 1  # no zeros of its own, so zeros in the output are the fill
    out = augment.translation(x, _generator())
    shift = int(16 * augment.TRANSLATION_RATIO + 0.5)
    seen = set()
    for image, moved in zip(x, out):
        matches = [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)
                   if torch.equal(moved, _shifted(image, dy, dx))]
        assert len(matches) == 1, "each output is the input shifted by one integer offset, zero-filled"
        seen.add(matches[0])
    assert len(seen) > 10, "offsets are drawn per image"


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """image moved down by dy and right by dx, zeros where nothing moved in (written independently of augment.py)."""
    out = torch.zeros_like(image)
    height, width = image.shape[1:]
    for row in range(height):
        for col in range(width):
            if 0 <= row - dy < height and 0 <= col - dx < width:
                out[:, row, col] = image[:, row - dy, col - dx]
    return out


def test_cutout_zeroes_one_square_of_half_the_side_clipped_at_the_border():
    x = torch.ones(200, 2, 12, 12)
    out = augment.cutout(x, _generator())
    size = int(12 * augment.CUTOUT_RATIO + 0.5)
    for image in out:
        assert torch.equal(image[0], image[1]), "the same square in every channel"
        zeros = (image[0] == 0).nonzero()
        rows, cols = zeros[:, 0], zeros[:, 1]
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert len(zeros) == height * width, "one filled rectangle"
        assert height <= size and width <= size
        assert (height == size or rows.min() == 0 or rows.max() == 11) and (width == size or cols.min() == 0 or cols.max() == 11)
    assert (out == 0).float().mean() > 0.15


def test_color_shifts_brightness_and_scales_saturation_and_contrast_per_image():
    x = torch.rand(8, 3, 8, 8) * 2 - 1
    out = augment.color(x, _generator())
    assert out.shape == x.shape and not torch.equal(out, x)
    means = (out - x).mean(dim=(1, 2, 3))
    assert means.std() > 0, "drawn per image"


@pytest.mark.parametrize("policy", ["translation", "cutout", "color", "color,translation,cutout"])
def test_gradients_reach_the_images_and_a_seed_repeats_the_draw(policy):
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    out = augment.diff_augment(x, policy, _generator(3))
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(augment.diff_augment(x, policy, _generator(3)), out)
    assert not torch.equal(augment.diff_augment(x, policy, _generator(4)), out)


def test_policy_parsing():
    assert augment.parse_policy("") == [] and augment.parse_policy("translation, cutout") == ["translation", "cutout"]
    with pytest.raises(ValueError, match="unknown augmentation flip"):
        augment.parse_policy("translation,flip")
    x = torch.randn(2, 1, 8, 8)
    assert augment.diff_augment(x, "", _generator()) is x


def test_channels_last_input_gives_the_same_result():
    x = torch.randn(4, 3, 16, 16)
    expected = augment.diff_augment(x, "translation,cutout", _generator(1))
    got = augment.diff_augment(x.contiguous(memory_format=torch.channels_last), "translation,cutout", _generator(1))
    assert torch.equal(got, expected)
