"""results.py end to end on real MNIST (a few seconds per run): every published file, and weights that reproduce the table."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate
import results
import study
from checkpoint import load_generator
from utils import cpu_features, cpu_name

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_results_publishes_the_pair_then_every_file_and_its_weights_reproduce_the_table(tmp_path, data_root):
    n = 500
    settings = ["--minutes", "0.1", "--milestones", "0.1", "--seeds", "0", "--sample-every", "2", "--eval-minutes", "0.05",
                "--pause-every", "0.05", "--n", str(n), "--curve-n", "200", "--runs", "runs", "--data-root", str(data_root),
                "--threads", "1"]
    demo, weights = tmp_path / "demo", tmp_path / "weights"
    # first the pair alone, one job: the two runs take turns, each reaching the first pause before either goes on
    pair = _run("results.py", "mnist", *settings, "--jobs", "1", "--models", "baseline", "sagan", cwd=tmp_path)
    assert pair.returncode == 0, pair.stderr[-3000:]
    records = [json.loads(path.read_text()) for path in (tmp_path / "runs" / "mnist").glob("*/*-seed0.json")]
    assert len(records) == 2 and all(list(record["legs"]) == ["0.05", "0.1"] for record in records)
    assert max(r["legs"]["0.05"]["started"] for r in records) < min(r["legs"]["0.1"]["started"] for r in records)
    assert not any((folder / name).exists() for folder, name in ((weights, "sagan_mnist_conditional.pt"),
                   (demo, "conditional_mnist.png"), (demo, "accuracy_mnist_steps.png"), (demo, "accuracy_mnist_minutes.png")))
    assert "class-conditional" not in (demo / "results_mnist.md").read_text()
    trained = {path: path.stat().st_mtime for path in (tmp_path / "runs" / "mnist").glob("default/*/checkpoints/latest.pt")}
    assert len(trained) == 2
    # then every model: only the conditional SAGAN trains, the pair's runs are done and are published again
    made = _run("results.py", "mnist", *settings, "--jobs", "2", cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    assert {path: path.stat().st_mtime for path in trained} == trained, "the pair did not train again"

    for name in ("comparison_mnist.gif", "curves_mnist.png", "fid_mnist.png", "final_mnist.png", "attention_mnist.png",
                 "conditional_mnist.png", "accuracy_mnist_steps.png", "accuracy_mnist_minutes.png", "results_mnist.md",
                 "results_mnist.json"):
        assert (demo / name).stat().st_size > 0, name
    assert Image.open(demo / "conditional_mnist.png").height == 2 + 10 * 30  # a row per digit, labelled

    table = (demo / "results_mnist.md").read_text()
    for row in ("| SAGAN | 1 |", "| baseline (no attention) | 1 |", "| SAGAN, class-conditional | 1 |",
                "| real vs real (floor) |", "| SAGAN, class-conditional | EMA's class read back |",
                "Regenerate: `python results.py mnist --minutes 0.1", "CPU time on 1 thread(s)",
                f"Trained on {cpu_name()} ({study.native_bf16(cpu_features())}). Published on {cpu_name()} ("):
        assert row in table, row


    results = json.loads((demo / "results_mnist.json").read_text())
    assert set(results["study"]["groups"]) == {"default/sagan", "default/baseline", "conditional/sagan"}
    for name, attn, classes in (("sagan_mnist.pt", True, 0), ("dcgan_mnist.pt", False, 0),
                                ("sagan_mnist_conditional.pt", True, 10)):
        published = torch.load(weights / name, weights_only=True)
        assert published["model_kwargs"]["attn"] is attn and published["model_file"] == "model_28.py"
        assert all(t.dtype == torch.float16 for t in published["G"].values() if t.is_floating_point())
        G, info = load_generator(weights / name)
        assert info["ema"] is True  # the default recipe keeps an EMA of G, and samples come from it
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

    # the conditional SAGAN alone, beside another conditioning that study.py trained into the same folder: its own
    # table and FID plot, the pair's table left as it is
    pair_table = (demo / "results_mnist.md").stat().st_mtime
    other = _run("study.py", "--recipes", "conditional+per-class", "--seeds", "0", "--minutes", "0.1", "--milestones", "0.1",
                 "--eval-minutes", "0.05", "--eval-n", "200", "--final-n", str(n), "--threads", "1", "--jobs", "1",
                 "--data-root", str(data_root), "--out", "runs/mnist", cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-3000:]
    alone = _run("results.py", "mnist", *settings, "--jobs", "1", "--models", "conditional", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert (demo / "results_mnist.md").stat().st_mtime == pair_table
    assert (demo / "fid_mnist_conditional.png").stat().st_size > 0
    table = (demo / "results_mnist_conditional.md").read_text()
    assert "| SAGAN, class-conditional | 1 |" in table and "| SAGAN, conditional+per-class | 1 |" in table
    assert "| SAGAN | 1 |" not in table and "dcgan_mnist.pt" not in table


def test_the_machine_line_names_where_the_published_groups_trained_apart_from_where_they_were_published():
    machine = {"cpu": "AMD EPYC", "cores": 2, "amx": False, "avx512_bf16": False, "torch": "2.14", "date": "2026-12-02",
               "commit": "abc1234"}
    summary = {"machine": machine, "groups": {
        "default/baseline": {"trained_on": ["AMD EPYC (AMX or AVX512-BF16)"], "threads": [1]},
        "default/sagan": {"trained_on": ["AMD EPYC (AMX or AVX512-BF16)", "Intel Xeon (AMX or AVX512-BF16)"],
                          "threads": [1, 2]},
        "diffaugment/sagan": {"trained_on": ["cuda (host CPU Intel Xeon)"], "threads": [0]}}}  # not published here
    assert results.machine_line(summary, ["default/baseline", "default/sagan"]) == (
        "Trained on AMD EPYC (AMX or AVX512-BF16) and Intel Xeon (AMX or AVX512-BF16). Published on AMD EPYC (2 cores, "
        "AVX2 only, no native bf16), torch 2.14, 2026-12-02, commit abc1234.")
    assert results.thread_counts(summary, ["default/baseline", "default/sagan"], " or ") == "1 or 2"
    assert results.thread_counts(summary, ["diffaugment/sagan"]) == "torch's default"
    assert results.spoken_list(["a", "b", "c"]) == "a, b and c" and results.spoken_list(["a"]) == "a"


def _milestone(fid: float, ema_fid: float | None) -> dict:
    return {"fid": fid, "ema_fid": ema_fid, "step": 100}


def test_the_median_seed_is_chosen_by_the_fid_of_the_generator_a_file_publishes():
    runs = [{"config": {"seed": seed}, "record": {"milestones": {"30": _milestone(fid, ema)}}}
            for seed, fid, ema in ((0, 10.0, 90.0), (1, 20.0, 50.0), (2, 30.0, 10.0))]
    assert results.median_seed(runs, "30") == 1  # EMA FIDs 90, 50, 10
    runs[1]["record"]["milestones"]["30"]["ema_fid"] = 95.0
    assert results.median_seed(runs, "30") == 0  # EMA FIDs 90, 95, 10 (the trained G's 10, 20, 30 would pick seed 1)
    for run in runs:
        run["record"]["milestones"]["30"]["ema_fid"] = None
    assert results.median_seed(runs, "30") == 1  # no EMA kept: the trained G's 10, 20, 30


def test_the_results_table_shows_the_ema_beside_the_trained_g_where_runs_kept_one():
    def group(fid: float, ema_fid: float | None, accuracy: float | None, ema_accuracy: float | None) -> dict:
        one = lambda value: study.spread([value])
        return {"seeds": [0], "precision": ["fp32"], "threads": [1],
                "milestones": {"30": {"fid": one(fid), "ema_fid": one(ema_fid), "step": one(100), "accuracy": one(accuracy),
                                      "ema_accuracy": one(ema_accuracy), "cpu_time": one(5400.0), "wall_time": one(9000.0)}}}

    floor = {"classifier_fid": 3.7, "protocol": {"dataset": "mnist"}}
    summary = {"groups": {"default/sagan": group(40.0, 20.0, None, None),
                          "conditional/sagan": group(30.0, 15.0, 0.9, 0.99)}}
    labels = {"default/sagan": "SAGAN", "conditional/sagan": "SAGAN, class-conditional"}
    lines = results.results_table(summary, labels, floor, ["30"], "minutes", with_accuracy=True)
    assert lines[0] == ("| model | seeds | steps at 30 min | precision | classifier FID at 30 min | classifier FID, EMA at "
                        "30 min | requested digit read back |")
    assert lines[2] == "| SAGAN | 1 | 100 (100-100) | fp32 | 40.0 (40.0-40.0) | 20.0 (20.0-20.0) | - |"
    assert lines[3].endswith("| 15.0 (15.0-15.0) | 99.0% (99.0%-99.0%) |")  # the accuracy of the EMA, as published
    assert lines[4] == "| real vs real (floor) |  |  |  | 3.70 | 3.70 |  |"
    summary["groups"]["default/sagan"]["milestones"]["30"]["ema_fid"] = {}
    summary["groups"]["default/sagan"]["precision"] = ["bf16", "fp32"]  # resumed in another precision
    summary["groups"]["default/sagan"]["threads"] = [1, 2]  # and with other threads
    timed = results.results_table(summary, {"default/sagan": "SAGAN"}, floor, ["30"], "steps", False, with_time=True)
    assert timed[0] == ("| model | seeds | steps at step 30 | CPU time | wall time | precision | threads | classifier FID at "
                        "step 30 |")
    assert timed[2] == "| SAGAN | 1 | 100 (100-100) | 1.5 h | 2.5 h | bf16/fp32 | 1/2 | 40.0 (40.0-40.0) |"
    assert timed[3] == "| real vs real (floor) |  |  |  |  |  |  | 3.70 |"
