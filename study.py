"""Experiments: recipes x arms x seeds, each trained for a budget, scored along the way and at milestones, and
summarised over seeds (median and range).

    python study.py --recipes default stage-1 --arms sagan baseline --seeds 0 1 2 --minutes 30 --jobs 2
    python study.py --dataset celeba --arms baseline sagan --seeds 0 --steps 5000 --eval-every 250 --jobs 2
    python study.py --summarise runs/study        # tables and plots of whatever the folder holds
    python study.py --summarise runs/precision/fp32 runs/precision/bf16-sim --steps 1000 --out runs/precision

A recipe is config.py's: 'default', 'original', or changes joined by '+' ('stage-1+betas-0.5'). Each run is a
real training run (train.train on a TrainConfig) in a fresh process with --threads threads, --jobs of them side by
side, stopped after --minutes of training by the run's clock (evaluation not counted; 'cpu', each run's own CPU
time, is fair to runs that share a machine) or after --steps. Along the way it scores FID (MNIST: the classifier's,
CelebA: Inception's) on --eval-n samples every --eval-minutes or --eval-every steps, of G and of its EMA where the
run keeps one. At each --milestones point (minutes or steps, as the budget) the run's checkpoint is scored on
--final-n samples. An interrupted study resumes every run bitwise where its last checkpoint left off.

Layout: <out>/<recipe>/<arm>-seed<k>/ (a run directory), <arm>-seed<k>.json (its legs and milestone scores) and
<arm>-seed<k>.log. The summary (summary.md, summary.json, fid_vs_minutes.png, fid_vs_images.png) gives per recipe
and arm the median, min and max over seeds at each evaluation, with the machine, precision and CPU share.
"""
import argparse
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing import connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch

from checkpoint import checkpoint_files, load_checkpoint, read_config
from config import (ARMS, RECIPES, WHOLE_RECIPES, ConfigError, TrainConfig, add_flags, canonical_recipe, check_resumable,
                    field_overrides, resumed_config)
from evaluate import headline_fid
from utils import honour_ctrl_c

ROOT = Path(__file__).resolve().parent
SCORES = ("fid", "ema_fid", "accuracy", "ema_accuracy")  # what an evaluation scores: the trained G, then its EMA


@dataclass(frozen=True)
class Run:
    """One training run of a study: a recipe, an arm and a seed."""

    recipe: str
    arm: str
    seed: int
    out: Path

    def __post_init__(self):
        # 'default+conditional' trains, and resumes, in conditional/
        object.__setattr__(self, "recipe", canonical_recipe(self.recipe))

    @property
    def folder(self) -> Path:
        return Path(self.out) / self.recipe / f"{self.arm}-seed{self.seed}"

    @property
    def record_path(self) -> Path:
        return record_path(self.folder)

    @property
    def log_path(self) -> Path:
        return self.folder.parent / f"{self.folder.name}.log"


@dataclass
class Plan:
    """What every run of a study trains on and for how long, and how it is scored."""

    dataset: str = "mnist"
    data_root: str | None = None
    unit: str = "minutes"  # what budget, milestones and the evaluation period count: "minutes" or "steps"
    budget: float = 10.0
    milestones: tuple[float, ...] = ()
    eval_period: float = 1.0  # minutes or steps between evaluations along the way
    eval_n: int = 2000
    final_n: int = 10000
    clock: str = "cpu"
    threads: int = 1
    overrides: dict = field(default_factory=dict)  # TrainConfig fields set in every run, whatever its recipe
    pause_every: float = 0.0  # also pause every N units, so that runs waiting for a job take turns

    def legs(self) -> list[float]:
        """Where training pauses: each milestone, every pause_every, then the end of the budget."""
        pauses = range(1, math.ceil(self.budget / self.pause_every)) if self.pause_every > 0 else ()
        return sorted({*self.milestones, *(k * self.pause_every for k in pauses), self.budget})

    def run_settings(self) -> dict:
        """The TrainConfig fields every run of the plan sets: the whole budget (a leg only pauses before its end, so
        schedules over the budget such as --lr-decay run as in one go), evaluation, threads and data."""
        by_time = self.unit == "minutes"
        return dict(minutes=self.budget if by_time else 0.0, steps=1_000_000 if by_time else int(self.budget),
                    clock=self.clock, eval_minutes=self.eval_period if by_time else 0.0,
                    eval_every=0 if by_time else int(self.eval_period), eval_n=self.eval_n, threads=self.threads,
                    data_root=self.data_root, quiet=True)

    def finished(self, record: dict, leg: float) -> bool:
        """Whether a run's record has the leg trained, and scored where the leg is a milestone."""
        key = f"{leg:g}"
        return key in record["legs"] and (leg not in self.milestones or key in record["milestones"])

    def pause(self, leg: float) -> dict:
        """train()'s keywords that stop a run at the end of a leg."""
        return {"pause_minutes": leg} if self.unit == "minutes" else {"pause_step": int(leg)}

    def config(self, run: Run) -> TrainConfig:
        """A run's config: a new run from the recipe, or the run's config.json with the plan's budget, refused if the
        folder's run did not train as its recipe's name means now (a default that changed since, say)."""
        settings = self.run_settings() | {"out": str(run.folder)}
        recipe = TrainConfig.from_recipe(run.recipe, **{"dataset": self.dataset, "seed": run.seed,
                                                        "attn": ARMS[run.arm].attn, **self.overrides, **settings})
        if not checkpoint_files(run.folder):
            return recipe
        saved = read_config(run.folder)
        try:
            check_resumable(saved, recipe)
        except ConfigError as error:
            raise ConfigError(f"{run.folder} did not train as recipe {run.recipe!r} means today, so it cannot continue "
                              f"or be published under that name; move it to the folder of the recipe it trained with "
                              f"(runs trained with the default before the recipe study's stage 2 are 'stage-1').\n"
                              f"{error}") from None
        return resumed_config(saved, **settings)


# ---------------------------------------------------------------------------------------------- running

def execute(run: Run, plan: Plan, until: float) -> None:
    """Train the run leg by leg up to `until` (one of the plan's legs), scoring each milestone on final_n samples; in
    a process of its own, with everything it prints going to the run's log."""
    import evaluate
    import train

    honour_ctrl_c()  # a study started as a background job hands its processes SIGINT ignored
    run.folder.parent.mkdir(parents=True, exist_ok=True)
    with open(run.log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    torch.set_num_threads(plan.threads)
    record = read_record(run.record_path)
    for leg in (leg for leg in plan.legs() if leg <= until):
        key = f"{leg:g}"
        if key not in record["legs"]:
            config = plan.config(run)
            print(f"{datetime.now():%Y-%m-%d %H:%M:%S} {run.recipe}/{run.arm}-seed{run.seed}: training to {key} {plan.unit}",
                  flush=True)
            started, wall, cpu = datetime.now(timezone.utc), time.perf_counter(), time.process_time()
            train.train(config, resume=(run.folder / "config.json").exists(), **plan.pause(leg))
            record["legs"][key] = {"started": started.isoformat(timespec="seconds"),
                                   "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}
            run.record_path.write_text(json.dumps(record, indent=2))
        if leg in plan.milestones and key not in record["milestones"]:
            latest = load_checkpoint(run.folder)
            scores = {"raw": evaluate.evaluate(run.folder, plan.final_n, ema=False, data_root=plan.data_root)}
            if latest["G_ema"] is not None:
                scores["ema"] = evaluate.evaluate(run.folder, plan.final_n, ema=True, data_root=plan.data_root)
            metric = headline_fid(latest["config"]["dataset"])
            record["milestones"][key] = {
                "step": latest["step"], "wall_time": round(latest["wall_time"], 1), "cpu_time": round(latest["cpu_time"], 1),
                "fid": scores["raw"][metric], "ema_fid": scores["ema"][metric] if "ema" in scores else None,
                "accuracy": scores["raw"].get("requested_accuracy"),
                "ema_accuracy": scores["ema"].get("requested_accuracy") if "ema" in scores else None,
                "n": plan.final_n, "protocol": scores["raw"]["protocol"],
            }
            run.record_path.write_text(json.dumps(record, indent=2))
    print(f"done: {run.folder} to {until:g} {plan.unit}", flush=True)


def run_all(runs: list[Run], plan: Plan, jobs: int) -> None:
    """Every run, `jobs` at a time, each leg in a fresh process whose OpenMP uses plan.threads threads. Legs go in
    rounds (every run to the first pause, then every run to the next), so that runs waiting for a job and a study
    stopped part way have advanced together. Legs a run's record has done start no process.

    Ctrl-C (to the process group, as a terminal sends it) stops the study: the running runs checkpoint at their next
    step boundary, runs waiting for a job do not start, and KeyboardInterrupt says how to resume."""
    for run in runs:  # before any work: a folder that trained as another recipe stops the study here, named
        plan.config(run)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(plan.threads)  # read when a process starts
    context = multiprocessing.get_context("spawn")
    # a process per run and leg, started when a job is free: no idle pool worker that Ctrl-C could kill (a process
    # pool then counts itself broken and terminates the runs that are saving their checkpoints)
    running: dict[BaseProcess, Run] = {}
    try:
        for leg in plan.legs():
            waiting = [run for run in runs if not plan.finished(read_record(run.record_path), leg)]
            while waiting or running:
                while waiting and len(running) < jobs:
                    run = waiting.pop(0)
                    process = context.Process(target=execute, args=(run, plan, leg), name=run.folder.name)
                    process.start()
                    running[process] = run
                ended = connection.wait([process.sentinel for process in running])
                for process in [process for process in running if process.sentinel in ended]:
                    run = running.pop(process)
                    process.join()
                    if process.exitcode != 0:
                        raise RuntimeError(f"{run.folder} failed ({last_line(run.log_path)}); see {run.log_path}")
                    print(f"done: {run.folder} to {leg:g} {plan.unit}", flush=True)
    except KeyboardInterrupt:  # the running runs got it too: they checkpoint, and `finally` waits for them
        raise KeyboardInterrupt("Stopped: every run that was training saved a checkpoint at its last step; "
                                "the same command resumes the study where they left off.") from None
    finally:
        for process in running:  # after Ctrl-C, or a run's failure (the others then finish their leg)
            process.join()


def last_line(path: Path) -> str:
    """The last non-empty line of a text file (a failed run's log ends with its exception), or 'no log'."""
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1] if lines else "no log"


# ---------------------------------------------------------------------------------------------- summary

def record_path(folder: Path) -> Path:
    """Where a run's record lives: <folder>.json beside its folder."""
    return folder.parent / f"{folder.name}.json"


def read_record(path: Path) -> dict:
    """A run's record (<folder>.json beside its folder): its trained legs and scored milestones."""
    return json.loads(path.read_text()) if path.exists() else {"legs": {}, "milestones": {}}


def read_run(folder: Path) -> dict:
    """A run's evaluations along the way (minutes, images, step, FIDs) from its metrics.csv, its record (none outside
    a study), config and sessions."""
    from rundir import read_metrics, read_sessions

    config = read_config(folder)
    metric = headline_fid(config["dataset"])
    columns = read_metrics(folder)
    clock = f"{config['clock']}_time"

    def value(name: str, row: int) -> float | None:
        return float(columns[name][row]) if name in columns and math.isfinite(columns[name][row]) else None

    evaluations = []
    for row in range(len(columns.get("step", []))):
        step, seconds, fid = value("step", row), value(clock, row), value(metric, row)
        if None in (step, seconds, fid):  # not an evaluation, or a row cut short
            continue
        evaluations.append({"minutes": seconds / 60, "images": int(step) * config["batch_size"], "step": int(step),
                            "fid": fid, "ema_fid": value(f"ema_{metric}", row), "accuracy": value("requested_accuracy", row),
                            "ema_accuracy": value("ema_requested_accuracy", row)})
    record = read_record(record_path(folder))
    return {"config": config, "evaluations": evaluations, "record": record, "sessions": read_sessions(folder)}


def spread(values: list[float]) -> dict:
    """Median, min, max and count of the values that exist."""
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise_group(runs: list[dict], period: float, unit: str = "minutes") -> dict:
    """Per evaluation tick k (the first evaluation after k periods of training; the last one is the end of the
    budget), the spread over seeds of FID, EMA FID, minutes, images and steps; and each milestone's spread."""
    axis = "minutes" if unit == "minutes" else "step"
    ticks = {}
    for index, run in enumerate(runs):
        for evaluation in run["evaluations"]:
            ticks.setdefault(int(evaluation[axis] // period), {})[index] = evaluation  # the tick's last one: its end
    table = []
    for tick in sorted(ticks):
        points = list(ticks[tick].values())
        if len(points) < len(runs):
            continue  # not every seed reached it
        table.append({key: spread([p.get(key) for p in points])
                      for key in ("minutes", "images", "step", *SCORES)})
    milestones = {}
    for key in sorted({k for run in runs for k in run["record"]["milestones"]}, key=float):
        points = [run["record"]["milestones"].get(key) for run in runs]
        if all(points):
            milestones[key] = {name: spread([p.get(name) for p in points])
                               for name in (*SCORES, "step", "wall_time", "cpu_time")}
    legs = [leg for run in runs for leg in run["record"]["legs"].values()]
    cpu_share = spread([leg["cpu_s"] / leg["wall_s"] for leg in legs if leg["wall_s"] > 0])
    throughput = spread([run["evaluations"][-1]["images"] / (60 * run["evaluations"][-1]["minutes"])
                         for run in runs if run["evaluations"] and run["evaluations"][-1]["minutes"] > 0])
    sessions = [session for run in runs for session in run.get("sessions", [])]
    precisions = sorted({session["precision"] for session in sessions})
    by_step = [[{key: e.get(key) for key in ("step", *SCORES)} for e in run["evaluations"]] for run in runs]
    return {"seeds": sorted(run["config"]["seed"] for run in runs), "curve": table, "milestones": milestones,
            "by_step": by_step,
            "cpu_share": cpu_share, "img_per_s": throughput,
            "threads": sorted({count for run in runs for count in run_threads(run)}),
            "trained_on": sorted({training_machine(session) for session in sessions}
                                 | ({"an unrecorded machine"} if any(not run.get("sessions") for run in runs) else set())),
            "clock": runs[0]["config"]["clock"], "precision": precisions or ["fp32"]}


def run_threads(run: dict) -> set[int]:
    """The torch threads a run trained with (its sessions'; for runs from before sessions.jsonl, its config's)."""
    return {session["threads"] for session in run.get("sessions", [])} or {run["config"]["threads"]}


def training_machine(session: dict) -> str:
    """Where a training session (a line of sessions.jsonl) ran: the device, and for a CPU its name and whether it
    runs bf16 natively."""
    if session["device"] != "cpu":
        return f"{session['device']} (host CPU {session['cpu']})"
    return f"{session['cpu']} ({native_bf16(session)})"


def native_bf16(features: dict) -> str:
    """What a CPU record (machine() or a session) says of bf16 on that CPU."""
    return "AMX or AVX512-BF16" if features.get("amx") or features.get("avx512_bf16") else "AVX2 only, no native bf16"


def study_groups(out: Path) -> dict[str, list[Path]]:
    """The run folders of a study, by '<recipe>/<arm>'."""
    groups = {}
    for folder in sorted(Path(out).glob("*/*-seed*")):
        if folder.is_dir() and (folder / "metrics.csv").exists():
            groups.setdefault(f"{folder.parent.name}/{folder.name.rsplit('-seed', 1)[0]}", []).append(folder)
    return groups


def summarise_runs(groups: dict[str, list[Path]], period: float = 1.0, unit: str = "minutes") -> dict:
    """The summary pictures.plot_fid draws of run folders grouped by '<recipe>/<arm>' (a study's, or any train.py
    runs: a notebook's pair is two groups of one run): per group, the spread over its runs at each evaluation tick."""
    first = read_config(next(iter(groups.values()))[0]) if groups else {"dataset": "mnist"}
    return {"machine": machine(), "unit": unit, "period": period, "metric": headline_fid(first["dataset"]),
            "groups": {name: summarise_group([read_run(folder) for folder in folders], period, unit)
                       for name, folders in groups.items()}}


def merged_groups(folders: list[Path]) -> dict[str, list[Path]]:
    """The groups of one study folder, or of several with each recipe named after its folder ('bf16-sim: default/sagan'),
    so that studies trained apart (in another precision, on another machine) are summarised side by side."""
    if len(folders) == 1:
        return study_groups(folders[0])
    names = [Path(folder).name for folder in folders]
    if len(set(names)) < len(names):
        raise ValueError(f"study folders summarised together need different names (they name the groups): {names}")
    return {f"{Path(folder).name}: {name}": runs for folder in folders for name, runs in study_groups(folder).items()}


def summarise(out: Path, period: float = 1.0, unit: str = "minutes", folders: list[Path] | None = None) -> dict:
    """summary.json, summary.md and the FID plots of a study folder (or of `folders` side by side, written to `out`);
    returns the summary."""
    import pictures

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise_runs(merged_groups(folders or [out]), period, unit)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    if not any(group["curve"] for group in summary["groups"].values()):
        return summary  # nothing scored yet: no plots
    for axis, name in (("minutes", "fid_vs_minutes.png"), ("images", "fid_vs_images.png")):
        pictures.plot_fid(summary, axis, out / name)
    conditional = {**summary, "groups": accuracy_groups(summary)}
    if conditional["groups"]:
        for axis, name in (("step", "accuracy_vs_steps.png"), ("minutes", "accuracy_vs_minutes.png")):
            pictures.plot_fid(conditional, axis, out / name, metric="accuracy")
    return summary


def at_step(group: dict, step: int, score: str = "fid") -> dict:
    """The spread over seeds of each run's `score` (one of SCORES) at its last evaluation at or before `step`: a
    comparison at equal images seen, which a budget of minutes does not give when groups ran at different speeds (or
    under more load)."""
    values = []
    for evaluations in group.get("by_step", []):
        before = [evaluation[score] for evaluation in evaluations if evaluation["step"] <= step]
        values.append(before[-1] if before else None)
    return spread(values) if values and None not in values else {}


def equal_step(groups: list[dict]) -> int:
    """The step of the earliest last evaluation among these groups' runs (runs not evaluated yet aside; 0 if none
    was): the last step at which every run can be compared."""
    ends = [evaluations[-1]["step"] for group in groups for evaluations in group.get("by_step", []) if evaluations]
    return min(ends, default=0)


def accuracy_groups(summary: dict) -> dict[str, dict]:
    """The groups of a summary that logged the requested class read back: class-conditional runs."""
    return {name: group for name, group in summary["groups"].items() if any(point["accuracy"] for point in group["curve"])}


def accuracy_table(summary: dict, labels: dict[str, str] | None = None) -> list[str]:
    """The requested class read back, and FID, of the class-conditional groups at equal steps: 250, 500, 1000, ...
    and the last step every run of each group reached (blank past a group's); of the EMA where runs kept one (the G a
    weights file publishes), else of the trained G. A sentence saying so, then the table; empty when no group
    logged it."""
    groups = accuracy_groups(summary)
    reach = {name: equal_step([group]) for name, group in groups.items()}
    if not any(reach.values()):
        return []
    last = max(reach.values())
    steps = sorted({250 * 2 ** k for k in range(20) if 250 * 2 ** k < last} | {end for end in reach.values() if end})
    lines = ["Class-conditional runs at equal steps (each run's last evaluation at or before the step, on the "
             "evaluation's samples; blank past the last step every run of the group reached): the share of samples "
             "read back as the class asked for, and FID.", "",
             "| model | score | " + " | ".join(f"step {step}" for step in steps) + " |",
             "| --- | --- |" + " ---: |" * len(steps)]
    for name, group in groups.items():
        ema = any(point["ema_accuracy"] for point in group["curve"])
        prefix, kept = ("ema_", "EMA's ") if ema else ("", "")
        label = (labels or {}).get(name, name)
        for score, percent, first_cells in (("accuracy", True, f"{label} | {kept}class read back"),
                                            ("fid", False, f"| {kept}FID")):  # the FID row's model cell is empty
            cells = [cell(at_step(group, step, prefix + score), 1, percent) if step <= reach[name] else ""
                     for step in steps]
            lines.append(f"| {first_cells} | " + " | ".join(cells) + " |")
    return lines


def cell(spread_: dict, digits: int = 1, percent: bool = False) -> str:
    """'median (min-max)' of a spread, or '-'."""
    if not spread_:
        return "-"
    shown = (lambda v: f"{100 * v:.{digits}f}%") if percent else (lambda v: f"{v:.{digits}f}")
    return f"{shown(spread_['median'])} ({shown(spread_['min'])}-{shown(spread_['max'])})"


def markdown(summary: dict) -> str:
    """One row per recipe and arm: FID (median, min-max over seeds) at the end, half way and at the milestones."""
    machine_ = summary["machine"]
    same_step = equal_step([group for group in summary["groups"].values() if group["curve"]])  # the groups shown
    lines = [f"Machine: {machine_['cpu']}, {machine_['cores']} cores, torch {machine_['torch']}, {machine_['date']} "
             f"(commit {machine_['commit']}).", "",
             "Minutes are minutes of training by each run's clock (wall: elapsed; cpu: the run's own CPU time), "
             "evaluation not counted. CPU share: the run process's CPU time over its elapsed time. "
             "FID cells: median (min-max) over the seeds, on the evaluation's samples; 'at step N': each run's last "
             "evaluation at or before step N, the last step every run reached (equal images seen).", "",
             "| recipe / arm | seeds | threads | clock | precision | CPU share | img/s | steps at end | FID at end | "
             f"EMA FID at end | FID at step {same_step} | FID at half | EMA FID at half | milestones (FID / EMA FID) |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, group in summary["groups"].items():
        curve = group["curve"]
        if not curve:
            continue
        end, half = curve[-1], curve[len(curve) // 2 - 1] if len(curve) > 1 else curve[-1]
        milestones = "; ".join(f"{key}: {cell(m['fid'])} / {cell(m['ema_fid'])}" for key, m in group["milestones"].items())
        lines.append(f"| {name} | {','.join(map(str, group['seeds']))} | {'/'.join(map(str, group['threads']))} | {group['clock']} | "
                     f"{'/'.join(group.get('precision', ['fp32']))} | {group['cpu_share'].get('median', 0):.2f} | "
                     f"{group['img_per_s'].get('median', 0):.0f} | {end['step']['median']:.0f} | {cell(end['fid'])} | "
                     f"{cell(end['ema_fid'])} | {cell(at_step(group, same_step))} | "
                     f"{cell(half['fid'])} @ {half['minutes']['median']:.1f} min | "
                     f"{cell(half['ema_fid'])} | {milestones or '-'} |")
    lines += ["", *accuracy] if (accuracy := accuracy_table(summary)) else []
    return "\n".join(lines) + "\n"


def machine() -> dict:
    from utils import cpu_features, cpu_name

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"cpu": cpu_name(), **cpu_features(), "cores": os.cpu_count(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": commit or "unknown"}


# ---------------------------------------------------------------------------------------------- CLI

def recipe_name(recipe: str) -> str:
    """argparse type: a recipe name, checked, in its one spelling (canonical_recipe)."""
    try:
        return canonical_recipe(recipe)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def train_overrides(flags: list[str]) -> dict:
    """TrainConfig fields from train.py flags (`--sample-every 50`), for every run of the study."""
    parser = argparse.ArgumentParser(prog="study.py --train-args", add_help=False)
    add_flags(parser)
    return field_overrides(parser.parse_args(flags))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["default"], type=recipe_name, metavar="RECIPE",
                        help=f"what to train: 'default', 'original' or changes joined by '+' ({', '.join(name for name in RECIPES if name not in WHOLE_RECIPES)})")
    parser.add_argument("--arms", nargs="+", default=["sagan"], choices=ARMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--dataset", default="mnist", help="what every run trains on (mnist, celeba, ...)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="training budget per run in minutes (evaluation not counted); "
                                                      "default 10")
    budget.add_argument("--steps", type=int, help="training budget per run in steps, instead of minutes")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="what the minutes count: each run's own CPU time (default; other load does not eat into "
                             "it) or elapsed time")
    parser.add_argument("--eval-minutes", type=float, default=1.0, help="score FID every N minutes of training")
    parser.add_argument("--eval-every", type=int, default=500, help="with --steps: score FID every N steps")
    parser.add_argument("--eval-n", type=int, default=2000, help="samples per FID along the way")
    parser.add_argument("--milestones", nargs="*", type=float, default=[],
                        help="points (minutes, or steps with --steps) at which to score on --final-n")
    parser.add_argument("--final-n", type=int, default=10000, help="samples per milestone FID")
    parser.add_argument("--pause-every", type=float, default=0.0,
                        help="also pause every N minutes (or steps), so that runs waiting for a job take turns")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side")
    parser.add_argument("--ema", nargs=2, type=float, metavar=("DECAY", "START"),
                        help="keep an EMA of G with this decay from this step in every run, whatever the recipe "
                             "(it never changes training, so G and its EMA are a paired comparison)")
    parser.add_argument("--ema-rampup", type=float,
                        help="with --ema: cap the EMA's half-life at this fraction of the images so far (stylegan2-ada: "
                             "0.05; default: the recipe's)")
    parser.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                        help="train.py flags for every run (must come last), e.g. --train-args --sample-every 50")
    parser.add_argument("--data-root", help="default: $SAGAN_DATA, else ./data")
    parser.add_argument("--out", help="the study folder: out/<recipe>/<arm>-seed<k> (default runs/study); with several "
                                      "--summarise folders, where their joint summary goes")
    parser.add_argument("--summarise", nargs="+", metavar="FOLDER",
                        help="only summarise this study folder, or several side by side into --out (each group named "
                             "after its folder; with --steps, against steps)")
    args = parser.parse_args(argv)
    overrides = train_overrides(args.train_args)
    if args.ema:
        overrides |= dict(ema_decay=args.ema[0], ema_start=int(args.ema[1]))
    if args.ema_rampup is not None:
        overrides["ema_rampup"] = args.ema_rampup
    by_steps = args.steps is not None
    plan = Plan(dataset=args.dataset, data_root=args.data_root and str(Path(args.data_root).resolve()),
                unit="steps" if by_steps else "minutes", budget=args.steps if by_steps else (args.minutes or 10.0),
                milestones=tuple(args.milestones), eval_period=args.eval_every if by_steps else args.eval_minutes,
                eval_n=args.eval_n, final_n=args.final_n, clock=args.clock, threads=args.threads, overrides=overrides,
                pause_every=args.pause_every)
    if args.summarise and len(args.summarise) > 1 and not args.out:
        parser.error("--summarise with several folders needs --out, the folder their joint summary and plots go to")
    args.out = Path(args.out or "runs/study").resolve()
    return args, plan


def main(argv: list[str] | None = None) -> int:
    args, plan = parse_args(argv)
    if args.summarise:
        folders = [Path(folder) for folder in args.summarise]
        out = folders[0] if len(folders) == 1 else args.out
        print(markdown(summarise(out, plan.eval_period, plan.unit, folders)))
        return 0
    runs = list(dict.fromkeys(Run(recipe, arm, seed, args.out)  # 'ema' and 'default+ema' are one run
                              for recipe in args.recipes for seed in args.seeds for arm in args.arms))
    try:
        run_all(runs, plan, args.jobs)
    except KeyboardInterrupt as interrupt:
        print(str(interrupt) or "Interrupted: the same command resumes the study.", file=sys.stderr)
        return 130
    print(markdown(summarise(args.out, plan.eval_period, plan.unit)))
    return 0


if __name__ == "__main__":
    honour_ctrl_c()
    sys.exit(main())
