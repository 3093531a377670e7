"""Time to quality: train variants x arms x seeds for a budget, score FID along the way, summarise over seeds.

    python study.py --variants default --arms sagan baseline --seeds 0 1 2 --minutes 30 --threads 2 --jobs 1
    python study.py --variants original reuse-fakes lr-2e-4 --seeds 0 1 2 --minutes 10 --threads 1 --jobs 2
    python study.py --summarise runs/study        # tables and plots of whatever the folder holds

Each run is a real `train.py` run (a subprocess with --threads threads; --jobs of them side by side) on MNIST,
stopped after --minutes of training (evaluation not counted) or --steps. During training it scores classifier
FID on --eval-n samples every --eval-minutes, of G and, where the run keeps one, of its EMA (a paired
comparison: the EMA never changes training). At each --milestones minute, the run pauses (it resumes bitwise)
and its checkpoint is scored with evaluate.py on --final-n samples. An interrupted study resumes every run.

The summary (out/summary.md, summary.json, fid_vs_minutes.png, fid_vs_images.png) gives, per variant and arm,
the median, min and max over seeds at each evaluation, against minutes of training and against images seen,
with the machine, the threads and how much of its CPU each run got.
"""
import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent
ARMS = {"sagan": [], "baseline": ["--no-attn"]}
# A variant is 'default' (TrainConfig's defaults) or changes of it joined by '+', each a list of train.py flags:
# 'original+lr-2e-4' is the original recipe with equal learning rates, 'reuse-fakes+betas-0.5' two changes at once.
CHANGES = {
    "original": ["--preset", "original"],
    "reuse-fakes": ["--reuse-fakes"],
    "lr-2e-4": ["--g-lr", "2e-4", "--d-lr", "2e-4"],
    "lr-4e-4": ["--g-lr", "4e-4", "--d-lr", "4e-4"],
    "betas-0.5": ["--beta1", "0.5", "--beta2", "0.999"],
    "lr-decay": ["--lr-decay", "0.5"],
    "d-attn-7": ["--d-attn-sizes", "7"],
    "paper": ["--attn-variant", "paper"],
    "diffaugment": ["--augment", "translation,cutout"],
    "r1": ["--r1-weight", "0.1"],
    "d-steps-2": ["--d-steps", "2"],
    "batch-128": ["--batch-size", "128"],
    "conditional": ["--conditional"],
}


def variant_flags(variant: str) -> list[str]:
    """The train.py flags of a variant name ('default', or changes joined by '+'); a clear error for unknown ones."""
    if variant == "default":
        return []
    changes = variant.split("+")
    unknown = [change for change in changes if change not in CHANGES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown change {', '.join(map(repr, unknown))} in variant {variant!r}; "
                                         f"a variant is 'default' or changes joined by '+': {', '.join(CHANGES)}")
    if "original" in changes[1:]:
        raise argparse.ArgumentTypeError(f"'original' must come first in {variant!r}: it sets the defaults the other "
                                         "changes apply to")
    return [flag for change in changes for flag in CHANGES[change]]


def variant_name(variant: str) -> str:
    """argparse type: a variant name, checked."""
    variant_flags(variant)
    return variant


@dataclass
class Run:
    variant: str
    arm: str
    seed: int
    out: Path

    @property
    def folder(self) -> Path:
        return self.out / self.variant / f"{self.arm}-seed{self.seed}"


def train_command(run: Run, minutes: float, args: argparse.Namespace) -> list[str]:
    """The train.py command that trains (or resumes) `run` up to `minutes` of training."""
    budget = ["--minutes", str(minutes), "--clock", args.clock, "--steps", str(args.steps), "--threads", str(args.threads), "--quiet",
              "--eval-minutes", str(args.eval_minutes), "--eval-n", str(args.eval_n)]
    if (run.folder / "checkpoints" / "latest.pt").exists():
        return [sys.executable, str(ROOT / "train.py"), "--resume", str(run.folder), *budget]
    ema = ["--ema-decay", str(args.ema[0]), "--ema-start", str(int(args.ema[1])), "--ema-rampup", str(args.ema_rampup)] \
        if args.ema else []
    flags = [*variant_flags(run.variant), *ARMS[run.arm], *ema, *args.train_args]
    data_root = ["--data-root", args.data_root] if args.data_root else []
    return [sys.executable, str(ROOT / "train.py"), "--dataset", "mnist", *data_root, "--seed", str(run.seed),
            "--eval-every", "0", "--out", str(run.folder), *flags, *budget]


def run_process(command: list[str], threads: int, log: Path) -> dict:
    """Run a command with `threads` torch threads; its wall and CPU seconds (its own, not the machine's)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = datetime.now(timezone.utc)
    with open(log, "a") as output:
        output.write(f"$ {' '.join(command)}\n")
        output.flush()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = (datetime.now(timezone.utc) - started).total_seconds()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed with exit code {process.returncode}; see {log}")
    return {"started": started.isoformat(timespec="seconds"), "wall_s": round(wall, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


def score(run: Run, n: int, ema: bool, args: argparse.Namespace) -> dict:
    """Classifier FID (and, for a conditional run, the requested-digit accuracy) of the run's latest checkpoint
    on n samples, via evaluate.py."""
    command = [sys.executable, str(ROOT / "evaluate.py"), str(run.folder), "--n", str(n), "--json",
               "--threads", str(args.threads), *([] if ema else ["--no-ema"])]
    if args.data_root:
        command += ["--data-root", args.data_root]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"scoring {run.folder} failed: {result.stderr[-2000:]}")
    scores = json.loads(result.stdout)
    return {"fid": scores["classifier_fid"], "accuracy": scores.get("requested_accuracy")}


def execute(run: Run, args: argparse.Namespace) -> None:
    """Train the run leg by leg (one leg per milestone), scoring each milestone on final_n samples."""
    run.folder.parent.mkdir(parents=True, exist_ok=True)
    record_path = run.folder.parent / f"{run.folder.name}.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"legs": {}, "milestones": {}}
    for minutes in sorted(set(args.milestones) | {args.minutes}):
        key = f"{minutes:g}"
        if key not in record["legs"]:
            record["legs"][key] = run_process(train_command(run, minutes, args), args.threads,
                                              run.folder.parent / f"{run.folder.name}.log")
            record_path.write_text(json.dumps(record, indent=2))
        if minutes in args.milestones and key not in record["milestones"]:
            latest = load_checkpoint(run.folder)
            raw = score(run, args.final_n, False, args)
            ema = score(run, args.final_n, True, args) if latest["G_ema"] is not None else {"fid": None, "accuracy": None}
            record["milestones"][key] = {
                "step": latest["step"], "wall_time": round(latest["wall_time"], 1), "cpu_time": round(latest["cpu_time"], 1),
                "fid": raw["fid"], "ema_fid": ema["fid"], "accuracy": raw["accuracy"], "ema_accuracy": ema["accuracy"],
                "n": args.final_n,
            }
            record_path.write_text(json.dumps(record, indent=2))
    print(f"done: {run.folder}", flush=True)


# ---------------------------------------------------------------------------------------------- summary

def read_run(folder: Path) -> dict:
    """A study run's evaluation rows (minutes, images, FIDs), its record and config."""
    config = json.loads((folder / "config.json").read_text())
    with open(folder / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("classifier_fid")]
    clock = f"{config['clock']}_time"
    evaluations = [{"minutes": float(row[clock]) / 60, "images": int(row["step"]) * config["batch_size"],
                    "step": int(row["step"]), "fid": float(row["classifier_fid"]),
                    "ema_fid": float(row["ema_classifier_fid"]) if row.get("ema_classifier_fid") else None}
                   for row in rows]
    record_path = folder.parent / f"{folder.name}.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"legs": {}, "milestones": {}}
    return {"config": config, "evaluations": evaluations, "record": record}


def spread(values: list[float]) -> dict:
    """Median, min, max and count of the values that exist."""
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise_group(runs: list[dict], eval_minutes: float) -> dict:
    """Per evaluation tick k (the first evaluation after k * eval_minutes of training; the last one is the end of
    the budget), the spread over seeds of FID, EMA FID, minutes and images; and each milestone's spread."""
    ticks = {}
    for run in runs:
        for evaluation in run["evaluations"]:
            tick = int(evaluation["minutes"] // eval_minutes)
            ticks.setdefault(tick, {})[id(run)] = evaluation  # the last evaluation of a tick wins: the end
    table = []
    for tick in sorted(ticks):
        points = list(ticks[tick].values())
        if len(points) < len(runs):
            continue  # not every seed reached it
        table.append({key: spread([p[key] for p in points]) for key in ("minutes", "images", "step", "fid", "ema_fid")})
    milestones = {}
    for key in sorted({k for run in runs for k in run["record"]["milestones"]}, key=float):
        points = [run["record"]["milestones"].get(key) for run in runs]
        if all(points):
            milestones[key] = {name: spread([p.get(name) for p in points])
                               for name in ("fid", "ema_fid", "accuracy", "ema_accuracy", "step")}
    legs = [leg for run in runs for leg in run["record"]["legs"].values()]
    cpu_share = spread([leg["cpu_s"] / leg["wall_s"] for leg in legs if leg["wall_s"] > 0])
    throughput = spread([run["evaluations"][-1]["images"] / (60 * run["evaluations"][-1]["minutes"])
                         for run in runs if run["evaluations"]])
    return {"seeds": sorted(run["config"]["seed"] for run in runs), "curve": table, "milestones": milestones,
            "cpu_share": cpu_share, "img_per_s": throughput, "threads": runs[0]["config"]["threads"],
            "clock": runs[0]["config"]["clock"]}


def summarise(out: Path, eval_minutes: float) -> dict:
    groups = {}
    for folder in sorted(out.glob("*/*-seed*")):
        if folder.is_dir() and (folder / "metrics.csv").exists():
            variant, arm = folder.parent.name, folder.name.rsplit("-seed", 1)[0]
            groups.setdefault(f"{variant}/{arm}", []).append(read_run(folder))
    summary = {"machine": machine(), "eval_minutes": eval_minutes,
               "groups": {name: summarise_group(runs, eval_minutes) for name, runs in groups.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    plot(summary, out)
    return summary


def _fmt(cell: dict) -> str:
    if not cell:
        return "-"
    return f"{cell['median']:.1f} ({cell['min']:.1f}-{cell['max']:.1f})"


def markdown(summary: dict) -> str:
    """One row per variant/arm: FID (median, min-max over seeds) at a few points of the budget."""
    lines = [f"Machine: {summary['machine']['cpu']}, {summary['machine']['cores']} cores, torch "
             f"{summary['machine']['torch']}, {summary['machine']['date']} (commit {summary['machine']['commit']}).", ""]
    lines += ["Minutes are minutes of training by each run's clock (wall: elapsed; cpu: the run's own CPU time), "
              "evaluation not counted. CPU share: the run process's CPU time over its elapsed time. "
              "FID cells: median (min-max) over the seeds, classifier FID on the evaluation's samples.", ""]
    lines += ["| variant / arm | seeds | threads | clock | CPU share | img/s | steps at end | FID at end | EMA FID at end | "
              "FID at half | EMA FID at half | milestones (FID / EMA FID) |",
              "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, group in summary["groups"].items():
        curve = group["curve"]
        if not curve:
            continue
        end, half = curve[-1], curve[len(curve) // 2 - 1] if len(curve) > 1 else curve[-1]
        milestones = "; ".join(f"{minutes} min: {_fmt(m['fid'])} / {_fmt(m['ema_fid'])}"
                               for minutes, m in group["milestones"].items())
        lines.append(f"| {name} | {','.join(map(str, group['seeds']))} | {group['threads']} | {group['clock']} | "
                     f"{group['cpu_share'].get('median', 0):.2f} | {group['img_per_s'].get('median', 0):.0f} | "
                     f"{end['step']['median']:.0f} | {_fmt(end['fid'])} | {_fmt(end['ema_fid'])} | "
                     f"{_fmt(half['fid'])} @ {half['minutes']['median']:.1f} min | {_fmt(half['ema_fid'])} | "
                     f"{milestones or '-'} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> None:
    """FID against minutes and against images seen: median line, min-max band, log scale."""
    from matplotlib.figure import Figure

    for axis_key, label, path in (("minutes", "minutes of training", "fid_vs_minutes.png"),
                                  ("images", "images seen", "fid_vs_images.png")):
        panels = [(fid_key, title) for fid_key, title in (("fid", "G"), ("ema_fid", "EMA of G"))
                  if any(p[fid_key] for group in summary["groups"].values() for p in group["curve"])]
        figure = Figure(figsize=(5.5 * len(panels), 4.5), layout="constrained")
        axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]  # no EMA panel where no run kept one
        for axis, (fid_key, title) in zip(axes, panels):
            for colour, (name, group) in enumerate(summary["groups"].items()):
                points = [p for p in group["curve"] if p[fid_key]]
                if not points:
                    continue
                x = [p[axis_key]["median"] for p in points]
                axis.plot(x, [p[fid_key]["median"] for p in points], color=f"C{colour % 10}",
                          linestyle="-" if colour < 10 else "--", label=name)
                axis.fill_between(x, [p[fid_key]["min"] for p in points], [p[fid_key]["max"] for p in points],
                                  color=f"C{colour % 10}", alpha=0.15)
            axis.set(xlabel=label, ylabel="classifier FID (median, min-max over seeds)", yscale="log", title=title)
        axes[-1].legend(fontsize="x-small", ncol=2)
        figure.savefig(out / path, dpi=100)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": commit or "unknown"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["default"], type=variant_name, metavar="VARIANT",
                        help=f"what to train: 'default' or changes of it joined by '+' ({', '.join(CHANGES)})")
    parser.add_argument("--arms", nargs="+", default=["sagan"], choices=ARMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per run (evaluation not counted)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="what the minutes count: each run's own CPU time (default; other load does not eat into "
                             "it) or elapsed time")
    parser.add_argument("--steps", type=int, default=1_000_000, help="step budget per run (whichever comes first)")
    parser.add_argument("--eval-minutes", type=float, default=1.0, help="score FID every N minutes of training")
    parser.add_argument("--eval-n", type=int, default=2000, help="samples per FID along the way")
    parser.add_argument("--milestones", nargs="*", type=float, default=[], help="minutes at which to score on --final-n")
    parser.add_argument("--final-n", type=int, default=10000, help="samples per milestone FID")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side")
    parser.add_argument("--ema", nargs=2, type=float, metavar=("DECAY", "START"),
                        help="keep an EMA of G with this decay from this step in every run, whatever the variant "
                             "(it never changes training, so G and its EMA are a paired comparison)")
    parser.add_argument("--ema-rampup", type=float, default=0.0,
                        help="with --ema: cap the EMA's half-life at this fraction of the steps so far (stylegan2-ada: 0.05)")
    parser.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="more train.py flags for every run")
    parser.add_argument("--data-root", help="default: $SAGAN_DATA, else ./data")
    parser.add_argument("--out", default="runs/study", help="the study folder: out/<variant>/<arm>-seed<k>")
    parser.add_argument("--summarise", metavar="FOLDER", help="only summarise this study folder")
    args = parser.parse_args(argv)
    # train.py and evaluate.py run in the repository, so paths given relative to the caller's folder go absolute
    args.out = str(Path(args.out).resolve())
    args.data_root = args.data_root and str(Path(args.data_root).resolve())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarise:
        print(markdown(summarise(Path(args.summarise), args.eval_minutes)))
        return 0
    out = Path(args.out)
    runs = [Run(variant, arm, seed, out) for variant in args.variants for seed in args.seeds for arm in args.arms]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(execute, run, args) for run in runs]:
            future.result()
    print(markdown(summarise(out, args.eval_minutes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
