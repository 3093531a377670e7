"""A run directory: everything train.py writes, and reads back to resume.

    config.json              the run's TrainConfig
    fixed_z.pt               the 64 noise vectors behind the sample grids
    metrics.csv              a row every log_every steps: losses, D's logits, gammas, img/s, times, evaluations
    sessions.jsonl           a line per start or resume: the step, machine, device, threads and precision it ran with
    samples/step_N.png       sample grids of the fixed noise
    checkpoints/latest.pt    the whole training state (TrainState.save); step_N.pt copies every checkpoint_every steps
    events.out.tfevents.*    TensorBoard (when it is installed)

Every file is written through a temporary file and a rename, so a crash leaves the previous version whole.
"""
import csv
import dataclasses
import io
import json
import math
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from checkpoint import atomic_save, atomic_write_text, checkpoint_files
from config import TrainConfig, arm_of
from distributed import Job, shared_choice
from models import class_rows, noise
from state import TrainState
from utils import GRID_PADDING, cpu_features, cpu_name, to_unit_range

GRID_CLASSES = 16  # a conditional run's sample grid shows the first 16 classes, one row each


def new_run_dir(dataset: str, what: str) -> Path:
    """A fresh timestamped folder under runs/ for a run (or comparison) of `what` on `dataset`."""
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{dataset}-{what}"


def run_dir_for(config: TrainConfig, job: Job) -> Path:
    """config.out, or a new_run_dir, the same in every process."""
    if config.out:
        return Path(config.out)
    return Path(shared_choice(str(new_run_dir(config.dataset, arm_of(config))), job))


def open_run(state: TrainState, run_dir: Path, resume: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Restore a resumed run (every process) and write config.json and fixed_z.pt (rank 0); returns the inputs
    of the sample grids (rank 0): the 64 fixed noise vectors, or in a conditional run the first 8 of them
    repeated for each class (up to GRID_CLASSES), one row per class."""
    config, is_main = state.config, state.job.is_main
    if is_main:
        for stale in [*run_dir.glob(".*.tmp"), *run_dir.glob("checkpoints/.*.tmp"), *run_dir.glob("samples/.*.tmp.png")]:
            stale.unlink()  # left by a process killed while writing; the file it was replacing is intact
    if resume and not checkpoint_files(run_dir):
        warnings.warn(f"{run_dir} has no checkpoint yet (it stopped before its first one): starting it from step 0")
        resume = False
    if resume:
        state.restore(run_dir)
    if not is_main:
        return None
    fixed_z = noise(64, config.z_dim, config.seed)
    atomic_save(fixed_z, run_dir / "fixed_z.pt")
    atomic_write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n", run_dir / "config.json")
    if not config.conditional:
        return fixed_z, None
    return class_rows(fixed_z[:8], range(min(config.num_classes, GRID_CLASSES)))


def record_session(state: TrainState, run_dir: Path) -> None:
    """Append what this start or resume of the run runs on, so a run trained over several sessions (and machines)
    says which precision and CPU each part had."""
    line = {"started": datetime.now().astimezone().isoformat(timespec="seconds"), "step": state.step,
            "device": str(state.device), "precision": state.precision, "threads": torch.get_num_threads(),
            "world_size": state.job.world_size, "cpu": cpu_name(), **cpu_features(), "torch": torch.__version__}
    with open(run_dir / "sessions.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def read_sessions(run_dir: Path) -> list[dict]:
    """The lines of sessions.jsonl (none for runs that predate it); a line cut short by a crash is skipped."""
    path = Path(run_dir) / "sessions.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    sessions = []
    for line in lines:
        try:
            sessions.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return sessions


# ---------------------------------------------------------------------------------------------- metrics and grids

def read_metrics(run_dir: str | Path) -> dict[str, np.ndarray]:
    """metrics.csv as one float array per column (every column is numeric); NaN where a row left a cell empty or
    unreadable. A file with its header only gives empty arrays."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory written by train.py?")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        names = reader.fieldnames or []
    return {name: np.array([_number(row.get(name)) for row in rows]) for name in names}


def _number(cell: str | None) -> float:
    """A metrics.csv cell as a float; NaN where it is empty, or cut short by a crash or a run still writing it."""
    try:
        return float(cell) if cell else math.nan
    except ValueError:
        return math.nan


def last_logged_step(run_dir: Path) -> int:
    """The step of the last row of a run's metrics.csv (0 before its first row), read while the run may be writing."""
    if not (run_dir / "metrics.csv").is_file():
        return 0
    steps = read_metrics(run_dir).get("step", np.array([]))
    steps = steps[np.isfinite(steps)]
    return int(steps[-1]) if len(steps) else 0


class RunLog:
    """metrics.csv, sample grids and (when installed) TensorBoard events of one run directory."""

    def __init__(self, run_dir: Path, columns: list[str], resume_step: int):
        self.run_dir, self.columns = run_dir, columns
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.csv_path = run_dir / "metrics.csv"
        self._trim_after(resume_step)
        new = not self.csv_path.exists()
        self._file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._file, columns)
        if new:
            self._csv.writeheader()
        self._tensorboard = _tensorboard_writer(run_dir)

    def _trim_after(self, step: int) -> None:
        """Drop rows logged after the checkpoint a resumed run restarts from (they will be logged again), and a
        last row cut short by a crash; rewritten atomically, so a crash now loses nothing."""
        if not self.csv_path.exists():
            return
        with open(self.csv_path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if None not in row.values() and row["step"].isdigit()]
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(row for row in rows if int(row["step"]) <= step)
        atomic_write_text(text.getvalue(), self.csv_path)

    def metrics(self, row: dict[str, float]) -> None:
        self._csv.writerow(row)
        self._file.flush()
        if self._tensorboard:
            for name, value in row.items():
                if name != "step" and value != "":
                    self._tensorboard.add_scalar(name, value, row["step"])

    def grid(self, images: torch.Tensor, step: int) -> Path:
        path = self.run_dir / "samples" / f"step_{step:06d}.png"
        tmp = path.with_name(f".{path.name}.tmp.png")
        save_image(to_unit_range(images), tmp, nrow=8, padding=GRID_PADDING)
        tmp.replace(path)
        if self._tensorboard:
            self._tensorboard.add_images("samples", to_unit_range(images), step)
        return path

    def close(self) -> None:
        self._file.close()
        if self._tensorboard:
            self._tensorboard.close()


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir))
