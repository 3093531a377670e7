"""DDP under torchrun on the CPU (gloo): real processes, synced weights, rank-0-only outputs, resume across world sizes."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
TINY_FLAGS = ["--dataset", "synthetic", "--image-size", "28", "--synthetic-size", "64", "--conv-dim", "16",
              "--batch-size", "4", "--sample-every", "2", "--log-every", "1", "--checkpoint-every", "2", "--quiet"]

pytestmark = pytest.mark.slow

def _torchrun(nproc: int, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, f"--nproc_per_node={nproc}", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_only_rank_0_writes_the_run_directory(tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "ranks.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import train
rank = int(os.environ["RANK"])
# Rank 1 is pointed at a folder of its own: had it written anything, that folder would exist.
out = {str(out)!r} if rank == 0 else {str(out)!r} + "_rank1"
config = train.TrainConfig(dataset="synthetic", image_size=28, synthetic_size=64, conv_dim=16, batch_size=4, steps=4,
                           sample_every=2, log_every=1, checkpoint_every=2, quiet=True, ema_decay=0.5, ema_rampup=0.0, device="cpu", out=out)
train.train(config)
""")
    result = _torchrun(2, str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoints" / "latest.pt").is_file() and (out / "samples" / "step_000004.png").is_file()
    assert load_checkpoint(out)["step"] == 4
    assert not Path(str(out) + "_rank1").exists(), "rank 1 wrote files"


@pytest.mark.parametrize("reuse_fakes", [False, True], ids=["fresh-fakes", "reused-fakes"])
def test_ranks_end_with_identical_weights(tmp_path, reuse_fakes):
    script = tmp_path / "weights.py"
    script.write_text(f"""
import os, sys, torch
sys.path.insert(0, {str(ROOT)!r})
import train
rank = int(os.environ["RANK"])
config = train.TrainConfig(dataset="synthetic", image_size=28, synthetic_size=64, conv_dim=16, batch_size=4, steps=3,
                           log_every=1, quiet=True, device="cpu", reuse_fakes={reuse_fakes}, out={str(tmp_path / "run")!r})
job, device = train.distributed.join("cpu")
dataset = train.data.load_dataset("synthetic", image_size=28, channels=1, size=64)
import state as state_module
state = state_module.build_state(config, dataset, device, job)
for _ in range(config.steps):
    train.train_step(state)
torch.save({{"G": state.G.state_dict(), "D": state.D.state_dict(), "z": state.sample_z(4)}}, {str(tmp_path)!r} + f"/rank{{rank}}.pt")
""")
    result = _torchrun(2, str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, tensor in rank0["D"].items():  # weights and spectral-norm vectors
        assert torch.equal(tensor, rank1["D"][name]), f"D.{name} differs between ranks"
    for name, tensor in rank0["G"].items():
        if "running" not in name and "num_batches" not in name:  # BatchNorm statistics are per process without --sync-bn
            assert torch.equal(tensor, rank1["G"][name]), f"G.{name} differs between ranks"
    assert not torch.equal(rank0["z"], rank1["z"]), "both ranks drew the same noise"


def test_resume_across_world_sizes(tmp_path):
    two = tmp_path / "two_then_one"
    result = _torchrun(2, str(ROOT / "train.py"), *TINY_FLAGS, "--steps", "2", "--out", str(two))
    assert result.returncode == 0, result.stderr[-3000:]
    first = load_checkpoint(two)
    assert first["step"] == 2 and first["loader"]["position"] == 2 * 2 * 4  # two steps of a global batch of 8
    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(two), "--steps", "4"],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(two)["step"] == 4

    one = tmp_path / "one_then_two"
    shutil.copytree(two, one)
    result = _torchrun(2, str(ROOT / "train.py"), "--resume", str(one), "--steps", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    final = load_checkpoint(one)
    assert final["step"] == 6 and "step,d_loss" in (one / "metrics.csv").read_text()
    steps = [int(line.split(",")[0]) for line in (one / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]
