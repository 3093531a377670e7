"""Pictures of runs for the notebooks and the README: sample grids, comparison GIFs, curves and attention maps.

Everything is read back from what train.py writes into a run directory (config.json, metrics.csv,
fixed_z.pt, samples/step_*.png), so a picture can be made at any time: during training, after a
resume, or from a run another process is still writing.
"""
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

import data
from attention import attention_layers
from checkpoint import atomic_write_bytes, read_config
from config import ARMS
from evaluate import FID_LABELS
from models import class_rows, model_module, sample_inputs
from rundir import read_metrics
from utils import GRID_PADDING, to_unit_range

# One name and one colour per arm in every picture: the baseline left (blue), SAGAN right (red).
ARM_COLOURS = {"baseline": "tab:blue", "sagan": "tab:red"}
OTHER_COLOURS = ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray",
                 "black", "darkgoldenrod", "teal", "magenta")  # a study of up to 13 recipes without a repeat
ARM_TITLES = tuple(ARMS[arm].label for arm in ARM_COLOURS)
GRID_NAME = re.compile(r"step_(\d+)\.png")
DATASET_SIZES = {"mnist": 60_000, "mnist-5k": 5_000}  # training images; other datasets are counted
TRAINING_COLUMNS = ("step", "d_loss", "g_loss", "d_real", "d_fake", "img_per_s", "wall_time", "cpu_time")
D_MARGIN, MARGIN_WINDOW = "d_real - d_fake", 25  # D's smoothed margin: the sign of memorising a small dataset
WHITE, INK = (255, 255, 255), (20, 20, 20)

# ---------------------------------------------------------------------------------------------- grids


def sample_grids(run_dir: str | Path) -> dict[int, Path]:
    """The run's sample grids (samples/step_N.png) by step, in step order."""
    folder = Path(run_dir) / "samples"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: is {run_dir} a run directory written by train.py?")
    grids = {int(match.group(1)): path for path in folder.iterdir() if (match := GRID_NAME.fullmatch(path.name))}
    return dict(sorted(grids.items()))


def latest_grid(run_dir: str | Path) -> Path:
    """The run's most recent sample grid."""
    grids = sample_grids(run_dir)
    if not grids:
        raise FileNotFoundError(f"{run_dir}/samples holds no step_*.png grids yet: train for at least sample_every steps")
    return grids[max(grids)]


def real_grid(dataset: Dataset, n: int = 64, *, seed: int = 0) -> Image.Image:
    """n random images of a dataset as an 8-wide grid, laid out like train.py's sample grids."""
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    images = torch.stack([dataset[int(index)][0] for index in indices])
    return to_pil_image(make_grid(to_unit_range(images), nrow=8, padding=GRID_PADDING))


def open_image(path: str | Path) -> Image.Image:
    """An image file read fully into memory (the file is closed again)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def fixed_noise(run_dir: str | Path) -> torch.Tensor:
    """The 64 noise vectors behind the run's sample grids, (64, z_dim)."""
    return torch.load(Path(run_dir) / "fixed_z.pt", weights_only=True)


# ---------------------------------------------------------------------------------------------- captions


def caption_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own scalable font (Pillow >= 10.1 ships it), so no font file is needed."""
    return ImageFont.load_default(size=size)


def compose(tiles: Sequence[Image.Image], titles: Sequence[str], footer: str | None = None) -> Image.Image:
    """Tiles side by side on white, each under its title, with an optional footer line centred below."""
    tiles = [tile.convert("RGB") for tile in tiles]
    tile_width, tile_height = tiles[0].size
    tiles = [tile if tile.size == (tile_width, tile_height) else tile.resize((tile_width, tile_height)) for tile in tiles]
    font = caption_font(max(14, tile_width // 16))
    line = math.ceil(font.size * 1.3) if hasattr(font, "size") else 14
    margin = max(8, tile_width // 24)
    width = len(tiles) * tile_width + (len(tiles) + 1) * margin
    top = margin + line
    height = top + tile_height + margin + (line + margin // 2 if footer else 0)
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)

    def centred(text: str, centre_x: float, y: int) -> None:
        draw.text((centre_x - draw.textlength(text, font=font) / 2, y), text, fill=INK, font=font)

    for index, (tile, title) in enumerate(zip(tiles, titles, strict=True)):
        left = margin + index * (tile_width + margin)
        canvas.paste(tile, (left, top))
        centred(title, left + tile_width / 2, margin // 2)
    if footer:
        centred(footer, width / 2, top + tile_height + margin // 2)
    return canvas


def captioned(image: Image.Image, caption: str) -> Image.Image:
    """One image under a caption."""
    return compose([image], [caption])


# ---------------------------------------------------------------------------------------------- comparison GIF


def images_per_epoch(config: dict) -> int:
    """Images in one epoch of a run's dataset: known for MNIST, synthetic_size for 'synthetic', counted otherwise."""
    name = config["dataset"]
    if name in DATASET_SIZES:
        return DATASET_SIZES[name]
    if name == "synthetic":
        return config["synthetic_size"]
    channels = model_module(config["image_size"]).IMAGE_SHAPE[0]
    return len(data.load_dataset(name, config.get("data_root"), image_size=config["image_size"], channels=channels))


def epochs(step: int, batch_size: int, dataset_size: int) -> float:
    """Passes over the data after `step` generator updates of `batch_size` images."""
    return step * batch_size / dataset_size


def epoch_caption(epoch_count: float) -> str:
    """'After 0.25 epochs', 'After 1 epoch', 'After 3.5 epochs', 'After 12 epochs'."""
    if epoch_count >= 10:
        number = f"{epoch_count:.0f}"
    elif epoch_count >= 1:
        number = f"{epoch_count:.1f}".removesuffix(".0")
    else:
        number = f"{epoch_count:.2g}"
    return f"After {number} epoch{'' if number == '1' else 's'}"


def comparison_frame(grid_baseline: str | Path | Image.Image, grid_sagan: str | Path | Image.Image, caption: str) -> Image.Image:
    """The two arms' grids side by side under their names (the baseline left, SAGAN right), the caption below."""
    grids = [grid if isinstance(grid, Image.Image) else open_image(grid) for grid in (grid_baseline, grid_sagan)]
    return compose(grids, ARM_TITLES, caption)


def comparison_gif(run_baseline: str | Path, run_sagan: str | Path, path: str | Path, *, dataset_size: int | None = None,
                   max_frames: int = 50, min_frames: int = 20, max_megabytes: float = 4.5, colors: int = 128,
                   frame_ms: int = 250, last_frame_ms: int = 2500) -> Path:
    """A looping GIF of both runs' sample grids at every step both have, captioned with epochs.

    Frames are read from the grid files, so this works during training and after a resume. Beyond max_frames
    steps, evenly spaced steps are kept (always the first and last). When the file would exceed max_megabytes,
    frames are dropped down to min_frames (at least 2), then each frame shows only the top rows of the grids, and
    only at one row are there fewer frames than min_frames (a training run is watched as a sequence: more frames of
    fewer samples beat a few frames of all of them). dataset_size (images per epoch) defaults to the run's dataset
    size; pass it when the dataset is loaded already.
    """
    grids_baseline, grids_sagan = sample_grids(run_baseline), sample_grids(run_sagan)
    steps = sorted(grids_baseline.keys() & grids_sagan.keys())
    if not steps:
        raise FileNotFoundError(f"{run_baseline} and {run_sagan} have no sample grid of the same step: "
                                f"compare runs trained with the same sample_every (train.compare does)")
    config = _shared_config(run_baseline, run_sagan)
    epoch_size = dataset_size or images_per_epoch(config)
    tile = config["image_size"] + GRID_PADDING
    min_frames = max(2, min_frames)
    kept = evenly_spaced(steps, max_frames)
    rows = (open_image(grids_sagan[kept[0]]).height - GRID_PADDING) // tile
    rendered = {}  # (step, rows): the frame, quantised

    def frame(step: int) -> np.ndarray:
        if (step, rows) not in rendered:
            grids = (open_image(grid) for grid in (grids_baseline[step], grids_sagan[step]))
            top = [grid.crop((0, 0, grid.width, GRID_PADDING + rows * tile)) for grid in grids]
            picture = comparison_frame(*top, epoch_caption(epochs(step, config["batch_size"], epoch_size)))
            # Fewer colours than GIF's 256, picked per frame, compress far better and still look right.
            rendered[step, rows] = np.asarray(picture.quantize(colors, method=Image.Quantize.FASTOCTREE).convert("RGB"))
        return rendered[step, rows]

    budget = max_megabytes * 1e6
    while True:
        frames = [frame(step) for step in kept]
        # loop=0: repeat forever; the last frame lingers so the final samples can be looked at.
        durations = [frame_ms] * (len(frames) - 1) + [last_frame_ms]
        gif = iio.imwrite("<bytes>", frames, extension=".gif", duration=durations if len(frames) > 1 else last_frame_ms,
                          loop=0)  # tried in memory: only the GIF that fits is written, whole or not at all
        if len(gif) <= budget or (len(kept) <= 2 and rows == 1):
            atomic_write_bytes(gif, path)
            return Path(path)
        shrink = budget / len(gif)
        if len(kept) > min_frames:
            kept = evenly_spaced(kept, max(min_frames, int(len(kept) * shrink)))
        elif rows > 1:
            rows = max(1, int(rows * shrink))
        else:
            kept = evenly_spaced(kept, max(2, int(len(kept) * shrink)))


def _shared_config(run_baseline: str | Path, run_sagan: str | Path) -> dict:
    """The config of the SAGAN run, after checking that both runs saw the same data in the same batches."""
    baseline, sagan = read_config(run_baseline), read_config(run_sagan)
    for name in ("dataset", "batch_size", "image_size"):
        if baseline[name] != sagan[name]:
            raise ValueError(f"the runs differ in {name} ({run_baseline}: {baseline[name]!r}, {run_sagan}: "
                             f"{sagan[name]!r}): a side-by-side by epoch needs the same {name}")
    return sagan


def evenly_spaced(items: Sequence, count: int) -> list:
    """At most `count` items spread evenly over `items`, keeping the first and the last."""
    if len(items) <= count:
        return list(items)
    return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, count).round().astype(int).tolist()))]


# ---------------------------------------------------------------------------------------------- curves


def plot_curves(runs: Mapping[str, str | Path] | Sequence[str | Path], path: str | Path | None = None) -> Figure:
    """Losses, mean D outputs, D's margin and attention gammas against step, one line per run (FID: plot_fid).

    runs: {arm or label: run_dir} (train.compare's result works as is: its arms get their names and colours) or run
    directories, labelled by folder name.
    """
    labelled = dict(runs) if isinstance(runs, Mapping) else {Path(run).name: run for run in runs}
    metrics = {key: read_metrics(run) for key, run in labelled.items()}
    for run_metrics in metrics.values():
        if {"d_real", "d_fake"} <= run_metrics.keys():
            run_metrics[D_MARGIN] = running_mean(run_metrics["d_real"] - run_metrics["d_fake"], MARGIN_WINDOW)
    panels = _curve_panels(metrics.values())
    columns = min(len(panels), 3)
    figure = Figure(figsize=(5 * columns, 3.6 * math.ceil(len(panels) / columns)), layout="constrained")
    axes = figure.subplots(math.ceil(len(panels) / columns), columns, squeeze=False).flatten()
    for axis, (title, names) in zip(axes, panels):
        for index, (key, run_metrics) in enumerate(metrics.items()):
            label, colour = run_style(key, index)
            for style, name in zip(("-", "--", ":", "-."), names):
                if name in run_metrics and np.isfinite(run_metrics[name]).any():
                    known = np.isfinite(run_metrics[name])
                    axis.plot(run_metrics["step"][known], run_metrics[name][known], style, color=colour,
                              marker="o" if known.sum() < 20 else None, label=f"{label}: {name}")
        axis.set(title=title, xlabel="step")
        axis.legend(fontsize="small")
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    return figure


def margin_by_window(run_dir: str | Path, every: int) -> list[dict[str, float]]:
    """For each `every` steps of a run: the last step, D's mean margin (d_real - d_fake) over those steps, and the
    evaluation columns logged at that step (what the README's curve tables quote)."""
    metrics = read_metrics(run_dir)
    steps, margin = metrics["step"], metrics["d_real"] - metrics["d_fake"]
    rows = []
    for end in range(every, int(steps.max()) + 1, every):
        window, at_end = (steps > end - every) & (steps <= end), steps == end
        logged = {name: metrics[name][at_end] for name in evaluation_columns(metrics)}
        rows.append({"step": end, D_MARGIN: float(np.nanmean(margin[window]))}
                    | {name: float(values[np.isfinite(values)][-1]) for name, values in logged.items()
                       if np.isfinite(values).any()})
    return rows


def evaluation_columns(names: Iterable[str]) -> list[str]:
    """The columns of metrics.csv (or derived from it) that an evaluation wrote: neither training nor gammas."""
    return [name for name in names if name not in (*TRAINING_COLUMNS, D_MARGIN) and not name.startswith("gamma_")]


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of each value and the window - 1 before it (fewer at the start), NaN where all of them are NaN."""
    known = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(known, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(known)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    count = counts[ends] - counts[starts]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (sums[ends] - sums[starts]) / count, math.nan)


def run_style(key: str, index: int) -> tuple[str, str]:
    """(label, colour) of a run in a plot: an arm's name and colour, or the key itself and the index's colour."""
    if key in ARMS:
        return ARMS[key].label, ARM_COLOURS[key]
    return key.replace("_", " "), OTHER_COLOURS[index % len(OTHER_COLOURS)]


def group_label(name: str) -> str:
    """A reader's name for a study group '<recipe>/<arm>' among several recipes: the arm's name and the recipe
    ('SAGAN, conditional+per-class')."""
    recipe, arm = name.split("/")
    return f"{ARMS[arm].label}, {recipe}"


def group_style(name: str, recipes: list[str], labels: dict[str, str] | None = None) -> tuple[str, str, str]:
    """(label, colour, line style) of a study group '<recipe>/<arm>': the first recipe's arms in the arms' own colours,
    every other recipe in a colour of its own; named by the arm alone where there is one recipe, by arm and recipe
    where there are more (or as `labels` names the group); SAGAN solid, the baseline dashed."""
    recipe, arm = name.split("/")
    style = "-" if arm == "sagan" else "--"
    label = (labels or {}).get(name, ARMS[arm].label if len(recipes) == 1 else group_label(name))
    if recipe == recipes[0]:
        return label, ARM_COLOURS[arm], style
    return label, OTHER_COLOURS[(recipes.index(recipe) - 1) % len(OTHER_COLOURS)], style


def plot_fid(summary: dict, axis_key: str = "minutes", path: str | Path | None = None, metric: str = "fid",
             labels: dict[str, str] | None = None) -> Figure:
    """FID (or, with metric='accuracy', the requested-class accuracy) of a study's groups (study.summarise) against
    minutes of training, images seen or steps: the median over seeds as a line, their range as a band (FID on a log
    scale); a panel for the trained G and one for its EMA where runs kept one. `labels` names groups for a reader."""
    axis_labels = {"minutes": "minutes of training", "images": "images seen", "step": "step"}
    groups = summary["groups"]
    recipes = list(dict.fromkeys(name.split("/")[0] for name in groups))
    recipes.sort(key=lambda recipe: recipe != "default")  # the default, where there, is the one in the arms' colours
    name = FID_LABELS.get(summary.get("metric"), "FID")
    ylabel = (f"{name} (median, min-max over seeds; lower is better)" if metric == "fid" else
              "requested class read back (median, min-max over seeds)")
    panels = [(key, title) for key, title in ((metric, "trained G"), (f"ema_{metric}", "EMA of G"))
              if any(point.get(key) for group in groups.values() for point in group["curve"])]
    if not panels:
        raise ValueError(f"no {ylabel.split(' (')[0]} was logged by these runs yet: train with --eval-every or "
                         f"--eval-minutes (study.py and results.py do)")
    rows = -(-len(groups) // 3)  # legend rows, below the panels
    figure = Figure(figsize=(max(5.5 * len(panels), 9), 4.5 + 0.25 * rows), layout="constrained")
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for axis, (fid_key, title) in zip(axes, panels):
        for group_name, group in groups.items():
            points = [p for p in group["curve"] if p.get(fid_key)]
            if not points:
                continue
            label, colour, style = group_style(group_name, recipes, labels)
            seeds = len(group["seeds"])
            x = [p[axis_key]["median"] for p in points]
            axis.plot(x, [p[fid_key]["median"] for p in points], style, color=colour,
                      label=f"{label} ({seeds} seed{'s' if seeds > 1 else ''})")
            axis.fill_between(x, [p[fid_key]["min"] for p in points], [p[fid_key]["max"] for p in points],
                              color=colour, alpha=0.15)
        axis.set(xlabel=axis_labels[axis_key], ylabel=ylabel, yscale="log" if metric == "fid" else "linear", title=title)
    handles, names = axes[0].get_legend_handles_labels()  # the panels share their groups: one legend, off the curves
    figure.legend(handles, names, loc="outside lower center", ncols=min(3, len(names)) or 1, fontsize="small")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    return figure


def _curve_panels(all_metrics) -> list[tuple[str, list[str]]]:
    """(title, columns) of each panel that has data in at least one run."""
    names = list(dict.fromkeys(name for run_metrics in all_metrics for name in run_metrics))
    gammas = [name for name in names if name.startswith("gamma_")]
    panels = [("Losses", ["d_loss", "g_loss"]), ("Mean D output (logits)", ["d_real", "d_fake"]),
              (f"D's margin, real - fake (mean of {MARGIN_WINDOW} rows)", [D_MARGIN]),
              ("Attention gamma (0 = attention off)", gammas)]
    return [(title, columns) for title, columns in panels
            if any(np.isfinite(m[c]).any() for m in all_metrics for c in columns if c in m)]


# ---------------------------------------------------------------------------------------------- attention maps


@dataclass
class LayerAttention:
    """One attention layer's map for one image: weights[q, k] from each query pixel to each key pixel."""

    weights: torch.Tensor  # (N, Nk), rows sum to 1
    query_grid: tuple[int, int]  # the layer's feature map (H', W'), N = H' * W'
    key_grid: tuple[int, int]  # (H', W'), or (H'/2, W'/2) for the 'paper' variant's pooled keys

    def for_pixel(self, row: int, col: int, image_size: tuple[int, int]) -> torch.Tensor:
        """Where image pixel (row, col) attends at this layer: the weights of its query, spread over the image."""
        height, width = image_size
        query = (row * self.query_grid[0] // height) * self.query_grid[1] + col * self.query_grid[1] // width
        weights = self.weights[query].view(1, 1, *self.key_grid)
        return F.interpolate(weights, size=image_size, mode="nearest")[0, 0]


def attention_maps(G: nn.Module, z: torch.Tensor | None = None, *, label: int = 0,
                   seed: int = 0) -> tuple[torch.Tensor, list[LayerAttention]]:
    """G's image for one noise vector (C, H, W) in [-1, 1], and each attention layer's map for it, in forward order.

    z: (1, z_dim) or (z_dim,); default: seeded normal noise. label: the class a conditional G draws.
    """
    layers = attention_layers(G)
    if not layers:
        raise ValueError("this generator has no attention layers (it is the no-attention baseline); "
                         "load the SAGAN run (<out>/sagan)")
    if z is None:
        z, _ = sample_inputs(G, 1, seed)
    z = z.reshape(-1, G.z_dim)[:1]
    maps = []

    def record(layer: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        features = inputs[0]
        # .forward rather than the module call: the call would run this hook again.
        _, weights = layer.forward(features, return_attention=True)
        grid = tuple(features.shape[2:])
        keys = (grid[0] // 2, grid[1] // 2) if layer.variant == "paper" else grid
        maps.append(LayerAttention(weights[0].float().cpu(), grid, keys))

    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        image = G.sample(z.cpu(), torch.tensor([label]) if G.num_classes else None)[0]  # as in the sample grids
    finally:
        for handle in handles:
            handle.remove()
    return image, maps


def default_queries(height: int, width: int) -> list[tuple[int, int]]:
    """Three query pixels (row, col) spread over the image."""
    return [(round(height * fy), round(width * fx)) for fy, fx in ((0.3, 0.3), (0.5, 0.5), (0.7, 0.65))]


def attention_figure(image: torch.Tensor, maps: Sequence[LayerAttention],
                     queries: Sequence[tuple[int, int]] | None = None) -> Figure:
    """One row per query pixel: the image with the query marked, then where it attends at each layer, with a colour
    scale per panel (the attention weight each image pixel's key gets; a uniform map is 1/keys everywhere)."""
    height, width = image.shape[1:]
    queries = list(queries or default_queries(height, width))
    for row, col in queries:
        if not (0 <= row < height and 0 <= col < width):
            raise ValueError(f"query pixel (row={row}, col={col}) is outside the {height}x{width} image")
    picture = to_unit_range(image).permute(1, 2, 0).squeeze(-1).numpy()
    gray = {"cmap": "gray", "vmin": 0, "vmax": 1} if picture.ndim == 2 else {}
    figure = Figure(figsize=(3.0 * (1 + len(maps)), 2.6 * len(queries)), layout="constrained")
    axes = figure.subplots(len(queries), 1 + len(maps), squeeze=False)
    for index, (row, col) in enumerate(queries):
        axes[index, 0].imshow(picture, **gray)
        axes[index, 0].set_title(f"query (row {row}, col {col})", fontsize="small")
        for layer, (axis, layer_map) in enumerate(zip(axes[index, 1:], maps)):
            axis.imshow(picture, **gray)
            heat = axis.imshow(layer_map.for_pixel(row, col, (height, width)).numpy(), cmap="inferno", alpha=0.65)
            scale = figure.colorbar(heat, ax=axis, fraction=0.046, pad=0.02)
            scale.set_label("attention weight", fontsize="x-small")
            scale.ax.tick_params(labelsize="x-small")
            (q_h, q_w), (k_h, k_w) = layer_map.query_grid, layer_map.key_grid
            axis.set_title(f"layer {layer}: {q_h}x{q_w} queries, {k_h}x{k_w} keys", fontsize="small")
        for axis in axes[index]:
            axis.plot(col, row, marker="o", markersize=7, markerfacecolor="cyan", markeredgecolor="black")
            axis.set_axis_off()
    return figure


OVERLAP_QUERIES = 256  # pairs of queries compared for the overlap: enough for a mean, cheap at 32x32 maps


def attention_statistics(maps: Sequence[LayerAttention]) -> list[dict[str, float]]:
    """How much each layer's attention depends on the query, over all its query positions:

    entropy: the mean entropy of a query's map over the keys, as a share of the uniform map's (1: attends everywhere
        alike; 0: one key);
    overlap: the mean, over pairs of different queries, of the mass their maps share (sum of the minimum; 1: the
        same map whatever the query); over at most OVERLAP_QUERIES evenly spaced queries;
    top_key_share: the share of queries whose strongest key is the most common strongest key (1: every query looks
        at one place).
    """
    statistics = []
    for layer_map in maps:
        weights = layer_map.weights.double()
        queries, keys = weights.shape
        entropy = -(weights * weights.clamp_min(1e-30).log()).sum(dim=1) / math.log(keys)
        spaced = weights[torch.linspace(0, queries - 1, min(queries, OVERLAP_QUERIES)).round().long()]
        shared = torch.stack([torch.minimum(row, spaced).sum(dim=1) for row in spaced])  # one row at a time: Q x K memory
        overlap = (shared.sum() - shared.diagonal().sum()) / (len(spaced) * (len(spaced) - 1))
        top = weights.argmax(dim=1)
        statistics.append({"queries": queries, "keys": keys, "entropy": entropy.mean().item(), "overlap": overlap.item(),
                           "top_key_share": top.bincount().max().item() / queries})
    return statistics


def attention_report(G: nn.Module, n: int = 8, seed: int = 0) -> list[dict[str, float]]:
    """attention_statistics of each attention layer of G averaged over n samples (seeded noise), with how peaked its
    softmax inputs are: the mean over query rows of (largest score - median score). A gap of 10 gives the top key
    e^10, about 22,000 times the median key's weight: a saturated softmax, which looks the same for every query."""
    layers = attention_layers(G)
    gaps = {index: [] for index in range(len(layers))}

    def record(index):
        def hook(layer, inputs, output):
            q, k, _ = layer._project(inputs[0])
            scores = torch.bmm(q, k.transpose(1, 2)).float() * layer.scale  # what the softmax gets
            gaps[index].append((scores.max(dim=-1).values - scores.median(dim=-1).values).mean().item())
        return hook

    z, labels = sample_inputs(G, n, seed)
    per_sample = []
    for i in range(n):
        handles = [layer.register_forward_hook(record(index)) for index, layer in enumerate(layers)]
        try:
            _, maps = attention_maps(G, z[i:i + 1], label=0 if labels is None else int(labels[i]))
        finally:
            for handle in handles:
                handle.remove()
        per_sample.append(attention_statistics(maps))
    report = []
    for index, layer in enumerate(layers):
        stats = [sample[index] for sample in per_sample]
        report.append({"layer": index, "queries": stats[0]["queries"], "keys": stats[0]["keys"],
                       **{key: float(np.mean([s[key] for s in stats])) for key in ("entropy", "overlap", "top_key_share")},
                       "score_gap": float(np.mean(gaps[index])), "gamma": layer.gamma.item()})
    return report


def plot_attention(G: nn.Module, queries: Sequence[tuple[int, int]] | None = None, *, z: torch.Tensor | None = None,
                   seed: int = 0, path: str | Path | None = None) -> Figure:
    """Where a few query pixels (row, col) of a generated image attend, at every attention layer of G."""
    image, maps = attention_maps(G, z, seed=seed)
    figure = attention_figure(image, maps, queries)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    return figure


def attention_picker(G: nn.Module, *, z: torch.Tensor | None = None, seed: int = 0):
    """Sliders choosing the query pixel, redrawing where it attends; where ipywidgets is missing, a static picture."""
    try:
        import ipywidgets as widgets
    except ImportError:
        return figure_image(plot_attention(G, z=z, seed=seed))
    image, maps = attention_maps(G, z, seed=seed)
    height, width = image.shape[1:]
    row = widgets.IntSlider(value=height // 2, min=0, max=height - 1, description="row")
    col = widgets.IntSlider(value=width // 2, min=0, max=width - 1, description="col")
    figure = widgets.interactive_output(lambda row, col: show(attention_figure(image, maps, [(row, col)])),
                                        {"row": row, "col": col})
    return widgets.VBox([widgets.HBox([row, col]), figure])


# ---------------------------------------------------------------------------------------------- conditional generators


def class_grid(G: nn.Module, classes: Sequence[int] | None = None, per_class: int = 8, *, seed: int = 0,
               names: Sequence[str] | None = None) -> Image.Image:
    """A conditional G's samples, one row per class (default: all of them) labelled with the class it asks for, and
    the same noise down each column, so a column shows one 'style' drawn as every class."""
    if not G.num_classes:
        raise ValueError("this generator is unconditional: it cannot be asked for a class (train with --conditional)")
    classes = list(range(G.num_classes) if classes is None else classes)
    names = list(names or map(str, range(G.num_classes)))
    z, labels = class_rows(sample_inputs(G, per_class, seed)[0], classes)
    grid = to_pil_image(make_grid(to_unit_range(G.sample(z, labels)), nrow=per_class, padding=GRID_PADDING))
    return label_rows(grid, [f"asked: {names[c]}" for c in classes])


def label_rows(grid: Image.Image, labels: Sequence[str]) -> Image.Image:
    """A grid with a label left of each of its equal-height rows."""
    row_height = grid.height / len(labels)
    font = caption_font(max(11, int(row_height * 0.4)))
    draw = ImageDraw.Draw(grid)
    margin = int(max(draw.textlength(label, font=font) for label in labels)) + 12
    canvas = Image.new("RGB", (grid.width + margin, grid.height), WHITE)
    canvas.paste(grid.convert("RGB"), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for index, label in enumerate(labels):
        draw.text((6, index * row_height + row_height / 2), label, fill=INK, font=font, anchor="lm")
    return canvas


def class_picker(G: nn.Module, names: Sequence[str] | None = None, per_class: int = 16):
    """Buttons choosing a class and a 'new samples' button, drawing that class; where ipywidgets is missing, a
    static grid of every class."""
    try:
        import ipywidgets as widgets
    except ImportError:
        return class_grid(G, per_class=8, names=names)
    names = list(names or map(str, range(G.num_classes)))
    choice = widgets.ToggleButtons(options=[(name, index) for index, name in enumerate(names)], description="draw")
    seed = widgets.IntText(value=0, layout={"display": "none"})
    again = widgets.Button(description="new samples")
    again.on_click(lambda _: setattr(seed, "value", seed.value + 1))
    picture = widgets.interactive_output(lambda label, seed: show(class_grid(G, [label], per_class, seed=seed, names=names)),
                                         {"label": choice, "seed": seed})
    return widgets.VBox([choice, again, picture])


# ---------------------------------------------------------------------------------------------- notebook display


def figure_image(figure: Figure) -> Image.Image:
    """A matplotlib figure rendered to a PIL image, which notebooks show whatever matplotlib backend is set up."""
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    png.seek(0)
    return Image.open(png)


def show(picture: Image.Image | Figure | str | Path) -> None:
    """Show a PIL image, a matplotlib figure or an image file (an animated GIF plays) in the notebook."""
    from IPython.display import Image as FileImage, display

    if isinstance(picture, Figure):
        picture = figure_image(picture)
    display(picture if isinstance(picture, Image.Image) else FileImage(filename=str(picture)))


def live_grids() -> Callable[[int, Path], None]:
    """An on_sample callback for train()/compare(): each run's latest grid, shown once and updated in place."""
    from IPython.display import display

    handles = {}

    def on_sample(step: int, grid: Path) -> None:
        run_dir = Path(grid).parent.parent
        picture = captioned(open_image(grid), f"{run_dir.name.replace('_', ' ')}, step {step}")
        if handles.get(run_dir) is not None:  # display() returns no handle outside IPython
            handles[run_dir].update(picture)
        else:
            handles[run_dir] = display(picture, display_id=True)

    return on_sample


# ---------------------------------------------------------------------------------------------- architecture diagrams


def layer_shapes(model: nn.Module, *inputs: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(description, output shape without the batch) of each block of model.net, from a real forward pass: a
    convolution with the normalisation and activation after it is one block, an attention layer another."""
    blocks, shapes = [], {}
    hooks = [layer.register_forward_hook(lambda module, args, output, index=index: shapes.__setitem__(index, output.shape[1:]))
             for index, layer in enumerate(model.net)]
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    for index, layer in enumerate(model.net):
        name = type(layer).__name__.removeprefix("Parametrized")  # spectral norm's parametrisation renames the class
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            kernel, stride = layer.kernel_size[0], layer.stride[0]
            normed = " (spectral norm)" if type(layer).__name__.startswith("Parametrized") else ""
            blocks.append([f"{name}{normed} {kernel}x{kernel}, stride {stride}", tuple(shapes[index])])
        elif attention_layers(layer):
            blocks.append([f"self-attention ({layer.variant})", tuple(shapes[index])])
        elif blocks:  # BatchNorm, ReLU, LeakyReLU, Tanh: folded into the block before
            blocks[-1][0] += f" + {name.replace('ConditionalBatchNorm2d', 'class BatchNorm')}"
    return [(text, shape) for text, shape in blocks]


def _shape_text(shape: Sequence[int]) -> str:
    return " x ".join(map(str, shape))


def model_diagram(G: nn.Module, D: nn.Module) -> Figure:
    """G and D layer by layer with the shape of every block's output (batch left out), attention highlighted."""
    z = torch.zeros(2, G.z_dim)
    image = torch.zeros(2, *G.image_shape)
    columns = [("Generator", f"z: {G.z_dim}", layer_shapes(G, z)),
               ("Discriminator", f"image: {_shape_text(G.image_shape)}", layer_shapes(D, image))]
    rows = max(len(blocks) for _, _, blocks in columns) + 1
    figure = Figure(figsize=(11, 0.75 * rows + 1.2), layout="constrained")
    axes = figure.subplots(1, 2)
    for axis, (title, start, blocks) in zip(axes, columns):
        axis.set(xlim=(0, 1), ylim=(-rows, 1), title=title)
        axis.set_axis_off()
        entries = [(start, None)] + blocks
        for row, (text, shape) in enumerate(entries):
            attention = text.startswith("self-attention")
            axis.text(0.5, -row, text if shape is None else f"{text}\n-> {_shape_text(shape)}", ha="center", va="center",
                      fontsize=9, bbox=dict(boxstyle="round,pad=0.4", facecolor="#ffd8b0" if attention else "#e8eef7",
                                            edgecolor="#c05000" if attention else "#50607a"))
            if row:
                axis.annotate("", xy=(0.5, -row + 0.3), xytext=(0.5, -row + 0.7),
                              arrowprops=dict(arrowstyle="->", color="#50607a"))
        axis.text(0.5, -len(entries) + 0.35, "logit per image" if title == "Discriminator" else "image in [-1, 1]",
                  ha="center", va="center", fontsize=9, style="italic")
    figure.suptitle(f"The {G.image_shape[1]}x{G.image_shape[2]} SAGAN (the baseline: the same without the orange "
                    f"blocks); shapes per image", fontsize=11)
    return figure


def attention_diagram(layer: nn.Module, height: int, width: int) -> Figure:
    """The self-attention block on a (C, height, width) feature map, step by step with the shape of each tensor
    (batch left out): the 1x1 query, key and value convolutions, the N x N map, the values it weights, gamma and
    the residual. Shapes are the layer's own (its channel widths and variant)."""
    channels = layer.query.in_channels
    n, qk, v = height * width, layer.query.out_channels, layer.value.out_channels
    keys = n // 4 if layer.variant == "paper" else n
    pooled = ", 2x2 max-pooled" if layer.variant == "paper" else ""
    boxes = {  # name: (x, y, text)
        "x": (0.5, 6, f"x: feature map\n{channels} x {height} x {width}  (N = {n} positions)"),
        "q": (0.15, 4.6, f"query = 1x1 conv(x)\n{n} x {qk}"),
        "k": (0.5, 4.6, f"key = 1x1 conv(x){pooled}\n{keys} x {qk}"),
        "v": (0.85, 4.6, f"value = 1x1 conv(x){pooled}\n{keys} x {v}"),
        "s": (0.32, 3.3, f"scores = query . keyᵀ\n{n} x {keys}"),
        "a": (0.32, 2.1, f"attention map = softmax over keys\n{n} x {keys}  (each row sums to 1)"),
        "o": (0.6, 0.9, f"o = map . value{', then 1x1 conv back to C' if layer.variant == 'paper' else ''}\n"
                        f"{n} x {channels} -> {channels} x {height} x {width}"),
        "y": (0.6, -0.3, f"y = x + gamma . o   (gamma learned, starts at 0)\n{channels} x {height} x {width}"),
    }
    arrows = [("x", "q"), ("x", "k"), ("x", "v"), ("q", "s"), ("k", "s"), ("s", "a"), ("a", "o"), ("v", "o"), ("o", "y")]
    figure = Figure(figsize=(10, 6.2), layout="constrained")
    axis = figure.subplots()
    axis.set(xlim=(0, 1), ylim=(-1, 6.6))
    axis.set_axis_off()
    for name, (x, y, text) in boxes.items():
        highlight = name in ("a", "y")
        axis.text(x, y, text, ha="center", va="center", fontsize=9,
                  bbox=dict(boxstyle="round,pad=0.45", facecolor="#ffd8b0" if highlight else "#e8eef7",
                            edgecolor="#c05000" if highlight else "#50607a"))
    for start, end in arrows:
        (x0, y0, _), (x1, y1, _) = boxes[start], boxes[end]
        axis.annotate("", xy=(x1, y1 + 0.4), xytext=(x0, y0 - 0.4), arrowprops=dict(arrowstyle="->", color="#50607a"))
    axis.annotate("", xy=(0.97, -0.3), xytext=(0.97, 6), arrowprops=dict(arrowstyle="->", color="#c05000",
                                                                         connectionstyle="arc3,rad=0"))
    axis.text(0.985, 2.9, "residual", rotation=90, va="center", fontsize=9, color="#c05000")
    figure.suptitle(f"Self-attention ('{layer.variant}' variant) on a {channels} x {height} x {width} feature map",
                    fontsize=11)
    return figure


def draw_diagrams(folder: str | Path = "demo") -> list[Path]:
    """demo/SA_structure.png (the attention block of the 28x28 generator) and demo/model_structure.png (the 28x28 G
    and D), drawn from the model files as they are."""
    import model_28

    G, D = model_28.Generator(), model_28.Discriminator()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layer = attention_layers(G)[0]
    size = G.attn_sizes[0]
    paths = [folder / "SA_structure.png", folder / "model_structure.png"]
    attention_diagram(layer, size, size).savefig(paths[0], dpi=110)
    model_diagram(G, D).savefig(paths[1], dpi=110)
    return paths


if __name__ == "__main__":
    import argparse

    from checkpoint import load_generator

    parser = argparse.ArgumentParser(description="diagrams: draw the README's figures from the model files (the "
                                                 "self-attention block, the 28x28 model). attention: how much a "
                                                 "generator's attention maps depend on the query. curves: D's margin "
                                                 "and the evaluations of run directories, every --every steps.")
    parser.add_argument("command", choices=["diagrams", "attention", "curves"])
    parser.add_argument("generators", nargs="*", help="attention: run directories, checkpoints or weights files "
                                                       "(several: each, then the median of each statistic); "
                                                       "curves: run directories")
    parser.add_argument("--out", default="demo", help="diagrams: folder for SA_structure.png and model_structure.png")
    parser.add_argument("--n", type=int, default=8, help="attention: samples averaged over")
    parser.add_argument("--every", type=int, default=500, help="curves: steps per row")
    args = parser.parse_args()
    if args.command == "diagrams":
        for path in draw_diagrams(args.out):
            print(path)
    elif not args.generators:
        parser.error(f"{args.command} needs at least one run directory (attention: or a checkpoint or weights file)")
    elif args.command == "curves":
        for run in args.generators:
            print(f"{run}, every {args.every} steps:")
            for row in margin_by_window(run, args.every):
                print("  " + ", ".join(f"{key} {value:g}" if key == "step" else f"{key} {value:.2f}"
                                       for key, value in row.items()))
    else:
        def line(row: dict) -> str:
            return (f"  layer {row['layer']}: {row['queries']} queries x {row['keys']} keys, entropy {row['entropy']:.2f} "
                    f"of uniform, overlap between queries {row['overlap']:.2f}, top key shared by "
                    f"{row['top_key_share']:.0%}, score gap (max - median) {row['score_gap']:.1f}, gamma {row['gamma']:+.3f}")

        reports = []
        for generator in args.generators:
            G, info = load_generator(generator)
            reports.append(attention_report(G, args.n))
            print(f"{generator} (step {info['step']}), {args.n} samples:")
            print("\n".join(line(row) for row in reports[-1]))
        if len(reports) > 1:
            print(f"median of the {len(reports)} generators:")
            for rows in zip(*reports):
                print(line(rows[0] | {key: float(np.median([row[key] for row in rows]))
                                      for key in rows[0] if key not in ("layer", "queries", "keys")}))
