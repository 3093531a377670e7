"""results.py end to end on real MNIST (two steps per arm): every published file, and weights that reproduce the table."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from checkpoint import load_generator

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_results_publishes_every_file_and_its_weights_reproduce_the_table(tmp_path, data_root):
    n = 500
    made = _run("results.py", "mnist", "--steps", "2", "--checkpoint-every", "1", "--n", str(n), "--curve-n", "200",
                "--runs", "runs", "--data-root", str(data_root), "--threads", "2", cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]

    demo, weights = tmp_path / "demo", tmp_path / "weights"
    for name in ("comparison_mnist.gif", "curves_mnist.png", "fid_mnist.png", "final_mnist.png",
                 "attention_mnist.png", "results_mnist.md", "results_mnist.json"):
        assert (demo / name).stat().st_size > 0, name
    assert Image.open(demo / "comparison_mnist.gif").n_frames == 1  # sample_every (100) > steps: the final grid only

    for arm in ("with_attention", "without_attention"):
        curve = list(csv.DictReader(open(tmp_path / "runs" / "mnist" / arm / "fid_curve.csv")))
        assert [int(row["step"]) for row in curve] == [1, 2]

    table = (demo / "results_mnist.md").read_text()
    assert "| SAGAN (attention) | 2 |" in table and "| DCGAN baseline (no attention) | 2 |" in table
    assert "real vs real (floor)" in table and "Regenerate: `python results.py mnist --steps 2" in table

    scores = json.loads((demo / "results_mnist.json").read_text())["arms"]
    for arm, prefix, attn in (("with_attention", "sagan", True), ("without_attention", "dcgan", False)):
        published = torch.load(weights / f"{prefix}_mnist.pt")
        assert published["model_kwargs"]["attn"] is attn and published["model_file"] == "model_28.py"
        assert all(t.dtype == torch.float16 for t in published["G"].values() if t.is_floating_point())
        G, _ = load_generator(weights / f"{prefix}_mnist.pt")
        assert G(torch.randn(2, G.z_dim)).shape == (2, 1, 28, 28)

        scored = _run("evaluate.py", str(weights / f"{prefix}_mnist.pt"), "--n", str(n), "--json",
                      "--data-root", str(data_root), cwd=tmp_path)
        assert scored.returncode == 0, scored.stderr[-3000:]
        # the fp16 file and the fp32 checkpoint behind the table differ only by rounding
        assert json.loads(scored.stdout)["classifier"]["fid"] == pytest.approx(scores[arm]["classifier"]["fid"], rel=0.02)
