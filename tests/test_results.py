"""results.py end to end on real MNIST (a few seconds per run): every published file, and weights that reproduce the table."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate
from checkpoint import load_generator

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_results_publishes_every_file_and_its_weights_reproduce_the_table(tmp_path, data_root):
    n = 500
    made = _run("results.py", "mnist", "--minutes", "0.1", "--milestones", "0.1", "--seeds", "0", "--sample-every", "2",
                "--eval-minutes", "0.05", "--pause-every", "0.05", "--n", str(n), "--curve-n", "200", "--runs", "runs",
                "--data-root", str(data_root), "--threads", "1", "--jobs", "2", cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]

    demo, weights = tmp_path / "demo", tmp_path / "weights"
    for name in ("comparison_mnist.gif", "curves_mnist.png", "fid_mnist.png", "final_mnist.png", "attention_mnist.png",
                 "conditional_mnist.png", "results_mnist.md", "results_mnist.json"):
        assert (demo / name).stat().st_size > 0, name
    assert Image.open(demo / "conditional_mnist.png").height == 2 + 10 * 30  # a row per digit, labelled

    table = (demo / "results_mnist.md").read_text()
    for row in ("| SAGAN | 1 |", "| baseline (no attention) | 1 |", "| SAGAN, class-conditional | 1 |",
                "| real vs real (floor) |", "Regenerate: `python results.py mnist --minutes 0.1"):
        assert row in table, row

    # three runs on two jobs take turns: every run reached the first pause before any went on to the next
    records = [json.loads(path.read_text()) for path in (tmp_path / "runs" / "mnist").glob("*/*-seed0.json")]
    assert len(records) == 3 and all(list(record["legs"]) == ["0.05", "0.1"] for record in records)
    assert max(r["legs"]["0.05"]["started"] for r in records) < min(r["legs"]["0.1"]["started"] for r in records)

    results = json.loads((demo / "results_mnist.json").read_text())
    assert set(results["study"]["groups"]) == {"default/sagan", "default/baseline", "default+conditional/sagan"}
    for name, attn, classes in (("sagan_mnist.pt", True, 0), ("dcgan_mnist.pt", False, 0),
                                ("sagan_mnist_conditional.pt", True, 10)):
        published = torch.load(weights / name, weights_only=True)
        assert published["model_kwargs"]["attn"] is attn and published["model_file"] == "model_28.py"
        assert all(t.dtype == torch.float16 for t in published["G"].values() if t.is_floating_point())
        G, info = load_generator(weights / name)
        assert info["ema"] is False  # the default recipe keeps no EMA
        assert G.num_classes == classes
        score = published["score"]
        assert score["metric"] == "classifier_fid" and score["n"] == n and score["protocol"]["n_images"] == n
        assert f"`weights/{name}` | 0 | {published['step']} | classifier fid {score['value']:.2f}" in table
        # the score a file records is what evaluate.py gives for the file itself: its command for the conditional
        # file (the command is built alike for all three), the function that command calls for the others
        if name == "sagan_mnist_conditional.pt":
            scored = _run(*score["command"].split()[1:], "--json", "--data-root", str(data_root), cwd=tmp_path)
            assert scored.returncode == 0, scored.stderr[-3000:]
            rescored = json.loads(scored.stdout)
        else:
            rescored = evaluate.evaluate(weights / name, n, data_root=data_root)
        assert round(rescored["classifier_fid"], 2) == score["value"]
