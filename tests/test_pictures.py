"""pictures.py: grids, the comparison GIF (also after a resume), epochs, curves and attention maps."""
import csv
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import model_28
import model_64
import pictures
import study
import train
from attention import attention_layers
from train import TrainConfig

TINY = dict(dataset="synthetic", image_size=28, synthetic_size=64, conv_dim=16, batch_size=8, steps=6,
            sample_every=3, log_every=1, checkpoint_every=3, quiet=True, device="cpu")
GRID = 2 + 8 * 30  # an 8x8 grid of 28x28 images with 2-pixel padding


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Both arms of a tiny comparison trained to step 6, then resumed to step 9: grids at steps 3, 6 and 9."""
    threads = torch.get_num_threads()
    # One thread: tiny models gain nothing from more, and a busy machine makes extra threads very slow.
    config = TrainConfig(**TINY, threads=1, out=str(tmp_path_factory.mktemp("compare")))
    try:
        train.compare(config)
        return train.compare(dataclasses.replace(config, steps=9))
    finally:
        torch.set_num_threads(threads)


def fake_run(folder: Path, steps: list[int], batch_size: int = 8, seed: int = 0) -> Path:
    """A run directory holding only what the GIF reads: config.json and noise grids at `steps`."""
    (folder / "samples").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"dataset": "synthetic", "synthetic_size": 64, "batch_size": batch_size,
                                                         "image_size": 28}))
    rng = np.random.default_rng(seed)
    for step in steps:
        Image.fromarray(rng.integers(0, 256, (GRID, GRID, 3), dtype=np.uint8)).save(folder / "samples" / f"step_{step:06d}.png")
    return folder


def gif_frames(path: Path) -> tuple[list[np.ndarray], list[int], dict]:
    """RGB frames, per-frame durations (ms) and the header info of a GIF."""
    frames, durations = [], []
    with Image.open(path) as gif:
        info = dict(gif.info)
        for index in range(gif.n_frames):
            gif.seek(index)
            frames.append(np.asarray(gif.convert("RGB"), dtype=np.int16))
            durations.append(gif.info["duration"])
    return frames, durations, info


def pixel_errors(frame: np.ndarray, expected: Image.Image) -> np.ndarray:
    """Per pixel, the largest channel difference between a GIF frame and the picture it should show."""
    return np.abs(frame - np.asarray(expected, dtype=np.int16)).max(axis=2)


# Quantising a grey grid to the GIF's palette moves a pixel by a few levels; a wrong grid or caption by far more.
QUANTISATION_ERROR = 16


def test_epochs_and_their_captions():
    assert pictures.epochs(6, 8, 64) == 0.75
    assert pictures.epochs(1000, 64, 60_000) == pytest.approx(1.0667, abs=1e-4)
    assert pictures.epoch_caption(0.75) == "After 0.75 epochs"
    assert pictures.epoch_caption(0.004) == "After 0.004 epochs"
    assert pictures.epoch_caption(1.0) == "After 1 epoch"
    assert pictures.epoch_caption(3.54) == "After 3.5 epochs"
    assert pictures.epoch_caption(12.4) == "After 12 epochs"


def test_images_per_epoch_of_each_kind_of_dataset(tmp_path):
    assert pictures.images_per_epoch({"dataset": "mnist"}) == 60_000
    assert pictures.images_per_epoch({"dataset": "mnist-5k"}) == 5_000
    assert pictures.images_per_epoch({"dataset": "synthetic", "synthetic_size": 300}) == 300
    for index in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{index}.png")
    assert pictures.images_per_epoch({"dataset": "folder", "data_root": str(tmp_path), "image_size": 64}) == 3


def test_evenly_spaced_keeps_first_and_last():
    assert pictures.evenly_spaced(list(range(10)), 4) == [0, 3, 6, 9]
    assert pictures.evenly_spaced([5, 7], 4) == [5, 7]


def test_compose_puts_titles_over_tiles_side_by_side_and_a_footer_below():
    red, blue = Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 255))
    picture = np.asarray(pictures.compose([red, blue], ["left", "right"], "footer"))
    (red_rows, red_cols), (blue_rows, blue_cols) = (np.nonzero((picture == colour).all(axis=2))
                                                    for colour in ((255, 0, 0), (0, 0, 255)))
    assert (np.ptp(red_rows) + 1, np.ptp(red_cols) + 1, len(red_rows)) == (30, 40, 1200)
    assert (blue_rows.min(), np.ptp(blue_rows) + 1, len(blue_rows)) == (red_rows.min(), 30, 1200)
    assert blue_cols.min() > red_cols.max()
    ink = (picture < 100).all(axis=2)  # dark text pixels
    assert ink[:red_rows.min(), red_cols.min():red_cols.max()].any() and ink[:red_rows.min(), blue_cols.min():blue_cols.max()].any()
    assert ink[red_rows.max() + 1:].any()


def test_comparison_gif_after_a_resume(runs, tmp_path):
    without, with_ = runs["baseline"], runs["sagan"]
    assert list(pictures.sample_grids(with_)) == [3, 6, 9]  # steps 3 and 6 before the resume, 9 after
    assert pictures.latest_grid(with_).name == "step_000009.png"
    gif = pictures.comparison_gif(without, with_, tmp_path / "demo" / "comparison.gif")
    frames, durations, info = gif_frames(gif)
    assert len(frames) == 3 and info["loop"] == 0
    assert durations[-1] > durations[0], "the last frame lingers"
    for frame, step, caption in zip(frames, (3, 6, 9), ("After 0.38 epochs", "After 0.75 epochs", "After 1.1 epochs")):
        assert pictures.epoch_caption(pictures.epochs(step, TINY["batch_size"], TINY["synthetic_size"])) == caption
        expected = pictures.comparison_frame(without / "samples" / f"step_{step:06d}.png",
                                             with_ / "samples" / f"step_{step:06d}.png", caption)
        assert frame.shape[1] > 2 * GRID and frame.shape[0] > GRID
        assert pixel_errors(frame, expected).max() <= QUANTISATION_ERROR, f"frame of step {step}: both grids and the caption"
    wrong_caption = pictures.comparison_frame(without / "samples" / "step_000003.png", with_ / "samples" / "step_000003.png",
                                              "After 9 epochs")
    assert pixel_errors(frames[0], wrong_caption).max() > QUANTISATION_ERROR, "the comparison above tells captions apart"


def top_rows(run: Path, step: int, rows: int) -> Image.Image:
    """The top `rows` rows of a fake run's grid of `step`."""
    return pictures.open_image(run / "samples" / f"step_{step:06d}.png").crop((0, 0, GRID, 2 + rows * 30))


def test_gif_keeps_first_and_last_frames_within_its_limits(tmp_path):
    steps = [100, 200, 300, 400, 500]
    without, with_ = fake_run(tmp_path / "a", steps, seed=0), fake_run(tmp_path / "b", steps, seed=1)
    path = tmp_path / "c.gif"
    assert len(gif_frames(pictures.comparison_gif(without, with_, path, max_frames=3))[0]) == 3
    frames, _, _ = gif_frames(pictures.comparison_gif(without, with_, path, max_megabytes=0.001))
    # noise does not compress: nothing fits, and what is left is the first and the last step, one row of each grid
    assert len(frames) == 2
    first, last = (pictures.comparison_frame(top_rows(without, step, 1), top_rows(with_, step, 1), caption)
                   for step, caption in ((100, "After 12 epochs"), (500, "After 62 epochs")))
    # Colour noise loses much to a 128-colour palette, so each frame is only compared with the other candidate.
    assert pixel_errors(frames[0], first).mean() < pixel_errors(frames[0], last).mean()
    assert pixel_errors(frames[1], last).mean() < pixel_errors(frames[1], first).mean()
    two = gif_frames(pictures.comparison_gif(fake_run(tmp_path / "c", [100, 200]), fake_run(tmp_path / "d", [100, 200], seed=1),
                                             path, max_megabytes=0.001, min_frames=0))[0]
    assert len(two) == 2 and two[0].shape == frames[0].shape, "two steps: fewer rows too, and never fewer than 2 frames"


def test_gif_over_its_size_shows_fewer_rows_before_fewer_than_min_frames(tmp_path):
    steps = list(range(100, 3100, 100))
    without, with_ = fake_run(tmp_path / "a", steps, seed=0), fake_run(tmp_path / "b", steps, seed=1)
    full = gif_frames(pictures.comparison_gif(without, with_, tmp_path / "full.gif", max_megabytes=100))[0]
    assert len(full) == 30
    # Noise does not compress: 30 full frames are about 3.9 MB, 20 of them 2.6 MB: 1 MB fits 20 frames of 2-3 rows.
    frames, _, _ = gif_frames(pictures.comparison_gif(without, with_, tmp_path / "c.gif", max_megabytes=1))
    assert len(frames) == 20, "frames are dropped down to min_frames, not below"
    rows, rest = divmod(8 * 30 - (full[0].shape[0] - frames[0].shape[0]), 30)
    assert frames[0].shape[1] == full[0].shape[1] and rest == 0 and 1 < rows < 8, "fewer whole rows of each grid"
    first = pictures.comparison_frame(top_rows(without, 100, rows), top_rows(with_, 100, rows), "After 12 epochs")
    assert pixel_errors(frames[0], first).mean() < 20, "the top rows of each grid"
    few = gif_frames(pictures.comparison_gif(without, with_, tmp_path / "d.gif", max_megabytes=0.2))[0]
    assert 2 <= len(few) < 20 and few[0].shape[0] == full[0].shape[0] - 7 * 30, "one row, then fewer frames"
    assert sorted(path.name for path in tmp_path.glob("*.gif*")) == ["c.gif", "d.gif", "full.gif"], "tries left behind"


def test_gif_refuses_grids_of_other_image_sizes(tmp_path):
    small = fake_run(tmp_path / "b", [100], seed=1)
    (small / "config.json").write_text(json.dumps(json.loads((small / "config.json").read_text()) | {"image_size": 64}))
    with pytest.raises(ValueError, match="image_size"):
        pictures.comparison_gif(fake_run(tmp_path / "a", [100]), small, tmp_path / "c.gif")


def test_gif_of_runs_with_a_single_common_grid(tmp_path):
    """A short run saves only its final grid: one frame, still a valid looping GIF."""
    without, with_ = fake_run(tmp_path / "a", [4], seed=0), fake_run(tmp_path / "b", [4], seed=1)
    frames, _, _ = gif_frames(pictures.comparison_gif(without, with_, tmp_path / "c.gif"))
    assert len(frames) == 1


def test_gif_refuses_runs_that_cannot_be_compared(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sample grid of the same step"):
        pictures.comparison_gif(fake_run(tmp_path / "a", [100]), fake_run(tmp_path / "b", [200]), tmp_path / "c.gif")
    with pytest.raises(ValueError, match="batch_size"):
        pictures.comparison_gif(fake_run(tmp_path / "c", [100]), fake_run(tmp_path / "d", [100], batch_size=16), tmp_path / "c.gif")
    with pytest.raises(FileNotFoundError, match="run directory"):
        pictures.sample_grids(tmp_path / "nowhere")


def test_real_grid_is_laid_out_like_the_sample_grids():
    dataset = data.load_dataset("synthetic", image_size=28, channels=1, size=70)
    grid = pictures.real_grid(dataset)
    assert grid.size == (GRID, GRID)
    assert pictures.real_grid(dataset, seed=1).tobytes() != grid.tobytes()


def write_metrics(run_dir: Path, rows: list[dict]) -> Path:
    run_dir.mkdir()
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return run_dir


def test_curves_compare_runs_and_fid_along_the_way_is_drawn_by_plot_fid_alone(tmp_path):
    common = dict(d_loss=1.5, g_loss=0.5, d_real=0.2, d_fake=-0.2, img_per_s=100, wall_time=1, cpu_time=1)
    baseline = write_metrics(tmp_path / "baseline", [{"step": s, **common, "classifier_fid": fid}
                                                     for s, fid in ((10, ""), (20, 50.0), (30, ""))])
    sagan = write_metrics(tmp_path / "sagan",
                          [{"step": s, **common, "gamma_G0": 0.01 * s, "gamma_D0": -0.01 * s, "classifier_fid": fid}
                           for s, fid in ((10, ""), (20, 42.0), (30, ""))])
    figure = pictures.plot_curves({"baseline": baseline, "sagan": sagan}, tmp_path / "curves.png")
    panels = {axis.get_title(): axis for axis in figure.axes if axis.get_visible()}
    margin = f"D's margin, real - fake (mean of {pictures.MARGIN_WINDOW} rows)"
    assert list(panels) == ["Losses", "Mean D output (logits)", margin, "Attention gamma (0 = attention off)"]
    assert len(panels["Losses"].lines) == 4  # d_loss and g_loss of both runs
    np.testing.assert_allclose([line.get_ydata() for line in panels[margin].lines], [[0.4, 0.4, 0.4]] * 2)
    assert [line.get_label() for line in panels["Attention gamma (0 = attention off)"].lines] == \
        ["SAGAN: gamma_G0", "SAGAN: gamma_D0"]
    colours = {line.get_label(): line.get_color() for line in panels["Losses"].lines}
    assert colours["SAGAN: d_loss"] == pictures.ARM_COLOURS["sagan"]
    assert colours["baseline (no attention): g_loss"] == pictures.ARM_COLOURS["baseline"]
    with Image.open(tmp_path / "curves.png") as image:
        image.verify()
    # the FID a pair logged along the way: the one plotter, from the same metrics.csv, as for a study
    for arm, run in (("baseline", baseline), ("sagan", sagan)):
        (run / "config.json").write_text(json.dumps({"dataset": "mnist", "clock": "wall", "batch_size": 64,
                                                     "seed": 0, "threads": 1, "attn": arm == "sagan"}))
    summary = study.summarise_runs({"default/baseline": [baseline], "default/sagan": [sagan]}, unit="step")
    lines = {line.get_label(): line for line in pictures.plot_fid(summary, "step").axes[0].get_lines()}
    assert {label: (list(line.get_xdata()), list(line.get_ydata())) for label, line in lines.items()} == {
        "baseline (no attention) (1 seed)": ([20], [50.0]), "SAGAN (1 seed)": ([20], [42.0])}
    renamed = baseline.rename(tmp_path / "my_run")
    labels = [line.get_label() for line in pictures.plot_curves([renamed]).axes[0].lines]
    assert labels == ["my run: d_loss", "my run: g_loss"]  # labelled by folder name


def test_margin_by_window_averages_d_real_minus_d_fake_per_window_and_reads_evaluations_at_its_end(tmp_path):
    rows = [{"step": step, "d_real": step / 10, "d_fake": -1.0, "gamma_G0": 0.1,
             "inception_fid": 50.0 if step == 20 else ""} for step in (5, 10, 15, 20, 25)]
    table = pictures.margin_by_window(write_metrics(tmp_path / "run", rows), every=10)
    assert table == [{"step": 10, "d_real - d_fake": pytest.approx(1.75)},
                     {"step": 20, "d_real - d_fake": pytest.approx(2.75), "inception_fid": 50.0}]


def test_running_mean_averages_the_window_before_each_value_and_skips_gaps():
    values = np.array([1.0, 3.0, math.nan, 5.0, 7.0])
    np.testing.assert_allclose(pictures.running_mean(values, 2), [1.0, 2.0, 3.0, 5.0, 6.0])
    np.testing.assert_allclose(pictures.running_mean(values, 10), [1.0, 2.0, 2.0, 3.0, 4.0])
    assert np.isnan(pictures.running_mean(np.array([math.nan, 1.0]), 1)[0])


def test_attention_maps_record_each_layer_without_changing_the_image():
    G = model_64.Generator(conv_dim=16).eval()
    z = torch.randn(1, G.z_dim)
    image, maps = pictures.attention_maps(G, z)
    assert torch.allclose(image, G(z)[0], atol=1e-5)
    assert [(m.query_grid, m.key_grid) for m in maps] == [((16, 16), (16, 16)), ((32, 32), (32, 32))]
    for layer_map in maps:
        assert torch.allclose(layer_map.weights.sum(dim=1), torch.ones(len(layer_map.weights)), atol=1e-5)
    assert all(not layer._forward_hooks for layer in attention_layers(G)), "hooks are removed"


def test_a_query_that_matches_every_key_equally_attends_uniformly():
    G = model_28.Generator(conv_dim=16).eval()
    (layer,) = attention_layers(G)
    with torch.no_grad():
        layer.query.weight.zero_()
        layer.query.bias.zero_()
    _, (layer_map,) = pictures.attention_maps(G, seed=3)
    assert layer_map.weights.shape == (196, 196)
    assert torch.allclose(layer_map.weights, torch.full((196, 196), 1 / 196))


@pytest.mark.parametrize("variant, key_grid, cell", [("original", (14, 14), 2), ("paper", (7, 7), 4)])
def test_a_pixel_maps_to_its_query_and_its_row_spreads_over_the_image(variant, key_grid, cell):
    G = model_28.Generator(conv_dim=16, attn_variant=variant).eval()
    _, (layer_map,) = pictures.attention_maps(G)
    assert layer_map.key_grid == key_grid and layer_map.weights.shape == (196, key_grid[0] * key_grid[1])
    heat = layer_map.for_pixel(27, 0, (28, 28))  # bottom-left pixel: query row 13, column 0 of the 14x14 grid
    assert heat.shape == (28, 28)
    assert torch.equal(heat[::cell, ::cell].flatten(), layer_map.weights[13 * 14])


def test_attention_figure_has_a_row_per_query_and_refuses_bad_input(tmp_path):
    G = model_28.Generator(conv_dim=16).eval()
    figure = pictures.plot_attention(G, [(0, 0), (27, 27)], path=tmp_path / "attention.png")
    panels = [axis for axis in figure.axes if axis.get_label() != "<colorbar>"]
    scales = [axis for axis in figure.axes if axis.get_label() == "<colorbar>"]
    assert len(panels) == 2 * (1 + 1) and len(scales) == 2  # per query: the image, then one layer with its scale
    assert (tmp_path / "attention.png").is_file()
    with pytest.raises(ValueError, match="outside the 28x28 image"):
        pictures.plot_attention(G, [(28, 0)])
    with pytest.raises(ValueError, match="no attention layers"):
        pictures.attention_maps(model_28.Generator(attn=False, conv_dim=16))


def test_attention_picker_offers_every_pixel():
    widget = pictures.attention_picker(model_28.Generator(conv_dim=16).eval())
    row, col = widget.children[0].children
    assert (row.max, col.max) == (27, 27)


def test_class_grid_draws_one_row_per_class_with_the_same_noise_down_each_column():
    torch.manual_seed(0)
    G = model_28.Generator(num_classes=10, conv_dim=16, conditioning="per-class")
    with torch.no_grad():  # make each class distinct: its own bias on the first conditional BatchNorm
        G.net[1].bias.weight.copy_(torch.arange(10.0)[:, None].expand(10, G.net[1].bias.weight.shape[1]))
    grid = pictures.class_grid(G, per_class=4)
    width = 4 * 30 + 2  # the samples, right of the row labels
    assert grid.height == 10 * 30 + 2 and grid.width > width
    rows = pictures.class_grid(G, [3, 7], per_class=4)
    assert rows.height == 2 * 30 + 2
    pixels = np.asarray(grid.convert("L"))
    samples, labels = pixels[:, -width:], pixels[:, :-width]
    assert np.array_equal(np.asarray(rows.convert("L"))[:32, -width:], samples[3 * 30:3 * 30 + 32]), "row 3 is class 3"
    assert not np.array_equal(samples[:32], samples[30:62]), "classes differ"
    assert all((labels[30 * r + 2:30 * r + 30] < 100).any() for r in range(10)), "every row has its label"
    with pytest.raises(ValueError, match="unconditional"):
        pictures.class_grid(model_28.Generator(conv_dim=16))


def test_class_picker_offers_every_class():
    widget = pictures.class_picker(model_28.Generator(num_classes=10, conv_dim=16))
    choice = widget.children[0]
    assert [value for _, value in choice.options] == list(range(10))


def test_attention_statistics_tell_query_dependent_maps_from_one_map_for_every_query():
    keys = 16
    same = pictures.LayerAttention(torch.full((4, keys), 1 / keys), (2, 2), (4, 4))  # every query: uniform
    one_hot = torch.zeros(4, keys)
    one_hot[torch.arange(4), torch.tensor([0, 5, 10, 15])] = 1  # each query its own key
    own = pictures.LayerAttention(one_hot, (2, 2), (4, 4))
    fixed = torch.zeros(4, keys)
    fixed[:, 3] = 1  # every query the same key
    corner = pictures.LayerAttention(fixed, (2, 2), (4, 4))
    uniform, distinct, stuck = pictures.attention_statistics([same, own, corner])
    assert uniform["entropy"] == pytest.approx(1.0) and uniform["overlap"] == pytest.approx(1.0)
    assert distinct["entropy"] == pytest.approx(0.0) and distinct["overlap"] == pytest.approx(0.0)
    assert distinct["top_key_share"] == 0.25
    assert stuck["entropy"] == pytest.approx(0.0) and stuck["overlap"] == pytest.approx(1.0) and stuck["top_key_share"] == 1


def test_diagrams_are_drawn_from_the_models_real_shapes(tmp_path):
    G, D = model_28.Generator(conv_dim=16), model_28.Discriminator(conv_dim=16)
    blocks = pictures.layer_shapes(G, torch.zeros(2, G.z_dim))
    assert [shape for _, shape in blocks] == [(128, 3, 3), (64, 7, 7), (32, 14, 14), (32, 14, 14), (1, 28, 28)]
    assert blocks[0][0] == "ConvTranspose2d (spectral norm) 3x3, stride 1 + BatchNorm2d + ReLU"
    assert blocks[3][0] == "self-attention (original)" and blocks[4][0].endswith("+ Tanh")
    assert [shape for _, shape in pictures.layer_shapes(D, torch.zeros(2, 1, 28, 28))][-2:] == [(64, 3, 3), (1, 1, 1)]
    big = model_64.Generator(conv_dim=8)
    assert [shape for text, shape in pictures.layer_shapes(big, torch.zeros(2, 100)) if text.startswith("self")] == \
        [(16, 16, 16), (8, 32, 32)]
    paths = pictures.draw_diagrams(tmp_path)
    assert [path.name for path in paths] == ["SA_structure.png", "model_structure.png"]
    for path in paths:
        assert_image = Image.open(path)
        assert assert_image.width > 800


def test_attention_report_averages_the_statistics_over_samples_and_measures_the_score_gap():
    torch.manual_seed(0)
    G = model_64.Generator(conv_dim=8).eval()
    report = pictures.attention_report(G, n=2)
    assert [(row["layer"], row["queries"], row["keys"]) for row in report] == [(0, 256, 256), (1, 1024, 1024)]
    for row in report:
        assert 0 <= row["entropy"] <= 1 and 0 <= row["overlap"] <= 1 and 0 < row["top_key_share"] <= 1
        assert row["score_gap"] > 0 and row["gamma"] == 0.0
    with torch.no_grad():  # sharper scores: a larger gap and lower entropy
        for layer in attention_layers(G):
            layer.query.weight.mul_(20)
    sharper = pictures.attention_report(G, n=2)
    assert all(s["score_gap"] > r["score_gap"] and s["entropy"] < r["entropy"] for s, r in zip(sharper, report))


def test_attention_command_reports_each_generator_then_the_median():
    """`python pictures.py attention A B`: one report per generator, then each statistic's median (of two: the mean)."""
    root = Path(__file__).resolve().parent.parent
    generators = ["weights/sagan_mnist.pt", "weights/sagan_mnist_conditional.pt"]
    made = subprocess.run([sys.executable, "pictures.py", "attention", *generators, "--n", "1"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    lines = made.stdout.splitlines()
    assert [line.split(" (step")[0] for line in lines[0::2][:2]] == generators
    assert lines[4] == "median of the 2 generators:"
    entropy = [float(re.search(r"entropy ([0-9.]+)", line).group(1)) for line in (lines[1], lines[3], lines[5])]
    assert entropy[0] != entropy[1] and abs(entropy[2] - (entropy[0] + entropy[1]) / 2) <= 0.006
