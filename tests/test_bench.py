"""bench.py smoke tests: the commands run and report well-formed, positive numbers (never timing asserts)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_training_benchmark_prints_one_json_line_with_positive_numbers():
    lines = _run("--model", "28", "--steps", "2", "--warmup", "1", "--batch-size", "8", "--threads", "1",
                 "--sample-batch", "16", "--sample-reps", "1", "--json").strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    for key in ("train_img_per_s", "sample_img_per_s", "peak_rss_mb"):
        assert result[key] > 0, key
    assert (result["model"], result["batch_size"], result["threads"], result["attn"]) == (28, 8, 1, True)
    assert (result["channels_last"], result["reuse_fakes"]) == (True, True)  # TrainConfig's defaults on the CPU


@pytest.mark.slow
def test_experiment_flags_reach_the_training_config():
    result = json.loads(_run("--model", "28", "--steps", "1", "--warmup", "0", "--batch-size", "4", "--threads", "1",
                             "--sample-batch", "4", "--sample-reps", "1", "--no-channels-last", "--no-reuse-fakes", "--json"))
    assert (result["channels_last"], result["reuse_fakes"]) == (False, False)
    config = bench.training_state(bench.parse_args(["--vs-reference", "--model", "28", "--batch-size", "4",
                                                    "--no-reuse-fakes", "--no-channels-last"])).config
    assert (config.channels_last, config.reuse_fakes) == (False, False)


@pytest.mark.slow
def test_attention_table_has_both_paths_and_skips_what_would_not_fit():
    # --max-explicit-gb 1e-4 makes the explicit path at N=256 (3 maps of 256^2 floats = 0.8 MB) a skip.
    result = json.loads(_run("--attention", "--sizes", "64,256", "--batch-size", "1", "--channels", "16",
                             "--threads", "1", "--max-explicit-gb", "1e-4", "--json"))
    rows = {(row["n"], row["path"]): row for row in result["rows"]}
    assert set(rows) == {(64, "fused"), (64, "explicit"), (256, "fused"), (256, "explicit")}
    for key in ((64, "fused"), (64, "explicit"), (256, "fused")):
        assert rows[key]["time_s"] > 0 and rows[key]["peak_rss_mb"] > 0
    assert rows[(256, "explicit")]["skipped"].startswith("would need ")


def test_explicit_memory_estimate_is_three_fp32_maps():
    assert bench.explicit_peak_gb(16384, 16) == pytest.approx(3 * 16 * 16384**2 * 4 / 1e9)


def test_bad_sizes_and_missing_reference_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--attention", "--sizes", "100,300"])
    assert "perfect squares" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--reference"):
        bench.load_reference(tmp_path / "missing.py")


def test_flops_of_cpu_flash_attention_are_counted_as_two_matrix_products_each_way():
    batch, n, width = 2, 64, 16
    q, k, v = (torch.randn(batch, 1, n, width, requires_grad=True) for _ in range(3))
    products = 2 * 2 * batch * n * n * width  # q k^T and (softmax) v, 2 flops per multiply-add
    assert bench.counted_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))[0] == products
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    # backward: q k^T again, then d(softmax) = dout v^T, dv, dq and dk
    assert bench.counted_flops(lambda: out.sum().backward())[0] == 5 * products // 2


@pytest.mark.slow
def test_flops_report_counts_ours_and_the_reference():
    result = json.loads(_run("--flops", "--model", "28", "--batch-size", "4", "--threads", "1", "--json"))
    assert result["gflop_per_step"] > 0 and result["reference_gflop_per_step"] > 0
    assert result["gflop_by_op"]["_scaled_dot_product_flash_attention_for_cpu"] > 0
    assert result["ceiling_train_img_per_s"] == pytest.approx(4 * result["sgemm_gflop_per_s"] / result["gflop_per_step"], rel=0.05)
