"""Checkpoints: damaged files fall back to intact copies, pickled payloads are refused unread, old files still load."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import train
from checkpoint import (DamagedCheckpoint, UnsafeCheckpoint, atomic_write_text, checkpoint_files, load_checkpoint,
                        load_generator, read_file)

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(dataset="synthetic", image_size=28, synthetic_size=64, conv_dim=16, batch_size=8, steps=4, sample_every=2,
            log_every=1, checkpoint_every=2, quiet=True, device="cpu")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A finished 4-step run with checkpoints/latest.pt (step 4), step_000002.pt and step_000004.pt."""
    return train.train(train.TrainConfig(**TINY, out=str(tmp_path / "run")))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _script(*args: str, cwd: Path, code: Path = ROOT) -> subprocess.CompletedProcess:
    """Runs one of the project's scripts (args[0]) from `code`: this checkout, or an older commit's files."""
    return subprocess.run([sys.executable, str(code / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_checkpoint_files_are_newest_first(run_dir):
    assert [path.name for path in checkpoint_files(run_dir)] == ["latest.pt", "step_000004.pt", "step_000002.pt"]


def test_a_truncated_latest_falls_back_to_the_newest_intact_copy_naming_both(run_dir):
    folder = run_dir / "checkpoints"
    _truncate(folder / "latest.pt")
    _truncate(folder / "step_000004.pt")
    with pytest.warns(UserWarning, match=r"latest\.pt is damaged or incomplete .*; using .*step_000002\.pt \(step 2\)"):
        assert load_checkpoint(run_dir)["step"] == 2
    with pytest.raises(DamagedCheckpoint, match="latest.pt is damaged"):
        load_checkpoint(folder / "latest.pt")  # a file asked for by name is never swapped for another


def test_the_cli_resumes_and_evaluates_from_the_intact_copy_without_a_traceback(run_dir):
    _truncate(run_dir / "checkpoints" / "latest.pt")
    resumed = _script("train.py", "--resume", str(run_dir), "--steps", "5", "--quiet", cwd=run_dir.parent)
    assert resumed.returncode == 0, resumed.stderr
    assert "latest.pt is damaged" in resumed.stderr and "step_000004.pt (step 4)" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert load_checkpoint(run_dir)["step"] == 5


def test_with_no_intact_checkpoint_the_cli_says_which_file_is_damaged_and_what_to_do(run_dir, capsys):
    for path in checkpoint_files(run_dir):
        _truncate(path)
    # each script's main as the script runs it, in this process: an exception escaping it would fail the test
    for main, argv in ((train.main, ["--resume", str(run_dir), "--steps", "6"]), (evaluate.main, [str(run_dir), "--n", "10"])):
        assert main(argv) == 2
        error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "latest.pt is damaged or incomplete" in error[0] and "new --out" in error[0]


def test_a_pickled_payload_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    weights = tmp_path / "downloaded.pt"
    torch.save({"G": {}, "model_kwargs": {}, "image_size": 28, "extra": Payload()}, weights)
    with pytest.raises(UnsafeCheckpoint, match="refused unread: it carries a pickled Python object"):
        load_generator(weights)
    result = _script("evaluate.py", str(weights), "--n", "10", cwd=tmp_path)
    assert result.returncode == 2 and "refused unread" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists(), "the payload ran"


def test_a_checkpoint_of_the_older_format_still_loads_and_resumes(run_dir):
    """Before checkpoints kept numpy's RNG state as a list, they pickled its ndarray."""
    path = run_dir / "checkpoints" / "latest.pt"
    checkpoint = read_file(path)
    checkpoint["rng"]["numpy"] = np.random.get_state()
    checkpoint["config"] = {k: v for k, v in checkpoint["config"].items() if k not in ("clock", "minutes")}
    del checkpoint["cpu_time"]
    torch.save(checkpoint, path)
    assert isinstance(load_checkpoint(run_dir)["rng"]["numpy"][1], np.ndarray)
    train.train(train.TrainConfig(**{**TINY, "steps": 5}, out=str(run_dir)), resume=True)
    assert load_checkpoint(run_dir)["step"] == 5


@pytest.mark.parametrize("name", ["sagan_mnist.pt", "dcgan_mnist.pt", "sagan_celeba.pt", "dcgan_celeba.pt"])
def test_the_published_weights_load_safely(name):
    G, info = load_generator(ROOT / "weights" / name)
    assert G(torch.randn(2, G.z_dim)).shape[0] == 2 and info["step"] > 0


def test_atomic_write_text_replaces_the_whole_file(tmp_path):
    path = tmp_path / "config.json"
    atomic_write_text("old", path)
    atomic_write_text("new", path)
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def _tensor_digests(checkpoint: dict) -> dict[str, str]:
    """sha256 (16 hex digits) of every tensor of the networks and optimizers in a checkpoint, by its path."""
    import hashlib

    digests = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            digests[prefix] = hashlib.sha256(raw).hexdigest()[:16] if value.numel() else "empty"
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{prefix}.{index}", item)

    for key in ("G", "D", "G_ema", "opt_G", "opt_D"):
        walk(key, checkpoint[key])
    return digests


def test_a_run_folder_written_by_an_earlier_version_resumes_bitwise(tmp_path):
    """tests/fixtures/run_0fed61e: 3 steps (EMA, reuse-fakes, DiffAugment, lazy R1, orthogonal init) written by commit
    0fed61e. Resumed to step 6, today's code must land exactly where that commit's code lands. The floats depend on
    the CPU's kernels (AVX2 and AVX-512 round differently), so the reference is made here, by that commit's train.py
    taken from git history."""
    import io
    import shutil
    import tarfile

    commit = "0fed61e"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "--", "*.py"],
                             capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {commit}, which wrote the fixture, is not in this checkout's git history (a shallow clone "
                    f"or an export): {archive.stderr.decode().strip()}")
    old_code = tmp_path / f"code_{commit}"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(old_code, filter="data")
    digests = {}
    for name, code in (("today", ROOT), (commit, old_code)):
        run_dir = tmp_path / f"run_{name}"
        shutil.copytree(ROOT / "tests" / "fixtures" / f"run_{commit}", run_dir)
        # fp32 as that commit's 'auto' was on every CPU (today's picks bf16 on CPUs that run it natively)
        resumed = _script("train.py", "--resume", str(run_dir), "--steps", "6", "--precision", "fp32", "--quiet",
                          cwd=tmp_path, code=code)
        assert resumed.returncode == 0, f"{name}: {resumed.stderr}"
        checkpoint = load_checkpoint(run_dir)
        assert checkpoint["step"] == 6
        digests[name] = _tensor_digests(checkpoint)
    assert digests["today"].keys() == digests[commit].keys()
    assert [name for name in digests[commit] if digests["today"][name] != digests[commit][name]] == []
