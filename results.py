"""Regenerate the published results: train both arms, score them, and write demo/ and weights/.

    python results.py mnist --steps 5000      # what `make results` runs, then the same for celeba
    python results.py celeba --steps 3000 --runs runs/results

Training resumes whatever the runs folder already holds, so an interrupted call continues. Then:
FID against steps from the checkpoints (every checkpoint_every steps), the final scores of both arms
and the real-vs-real floor under one protocol, the comparison GIF, curves, attention maps, final grids,
a results table (demo/results_<dataset>.md) and half-precision generators in weights/.
"""
import argparse
import csv
import json
import platform
import sys
from datetime import date
from pathlib import Path

import torch

import evaluate
import pictures
from checkpoint import generator_kwargs, load_checkpoint, load_generator, model_module
from train import TrainConfig, compare

ARMS = {"without_attention": "DCGAN baseline (no attention)", "with_attention": "SAGAN (attention)"}
# demo/ file names follow the notebooks' (comparison_celebA.gif, curves_celebA.png, ...); weights/ use the dataset name.
DEMO_TAGS = {"mnist": "mnist", "celeba": "celebA"}


def fid_against_steps(run_dir: Path, dataset: str, n: int, data_root: str | None) -> Path:
    """Score every kept checkpoint (checkpoints/step_*.pt) of a run; writes and returns <run>/fid_curve.csv."""
    path = run_dir / "fid_curve.csv"
    done = {int(row["step"]): row for row in csv.DictReader(open(path))} if path.exists() else {}
    rows = []
    for checkpoint in sorted((run_dir / "checkpoints").glob("step_*.pt")):
        step = int(checkpoint.stem.split("_")[1])
        if step not in done:
            scores = evaluate.evaluate_checkpoint(checkpoint, n, data_root=data_root)
            done[step] = {"step": step, **{f"{metric}_fid": round(values["fid"], 4) for metric, values in scores.items()
                                         if metric != "protocol"}}
        rows.append(done[step])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_fid_curves(curves: dict[str, Path], path: Path) -> None:
    """FID against steps, one line per arm and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for label, csv_path in curves.items():
        rows = list(csv.DictReader(open(csv_path)))
        for column in (c for c in rows[0] if c.endswith("_fid")):
            axis.plot([int(r["step"]) for r in rows], [float(r[column]) for r in rows], marker="o",
                      label=f"{ARMS[label]} ({column.replace('_', ' ')})")
    axis.set(xlabel="step", ylabel="FID (lower is better)", title="FID against training steps")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def publish_generator(run_dir: Path, path: Path) -> Path:
    """A run's final generator in half precision: {'G', 'model_kwargs', 'model_file', ...}; checkpoint.load_generator reads it."""
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


def results_table(dataset: str, scores: dict, floor: dict, runs: dict[str, Path], n: int, command: str) -> str:
    """The markdown results table with its protocol, steps, wall time, machine and seeds."""
    lines = [f"| {dataset} | steps | wall time | " + " | ".join(_metric_headers(floor)) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in _metric_headers(floor)) + " |"]
    for arm, run_dir in runs.items():
        rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
        wall = training_wall_time(rows) / 60
        lines.append(f"| {ARMS[arm]} | {rows[-1]['step']} | {wall:.0f} min | " + " | ".join(_metric_values(scores[arm])) + " |")
    lines.append("| real vs real (floor) | | | " + " | ".join(_metric_values(floor)) + " |")
    config = json.loads((runs["with_attention"] / "config.json").read_text())
    protocol = scores["with_attention"]["protocol"]
    lines += ["", f"Protocol: {n} generated images per arm (seed {protocol['seed']}, EMA: {protocol['ema']}), "
              f"against {json.dumps({k: v for k, v in protocol.items() if k.startswith('reference')})}; "
              f"features: {', '.join(v['name'] for v in protocol['feature_extractors'].values())}. "
              f"Floor: {floor['protocol']['images']}.",
              f"Training: seed {config['seed']}, batch {config['batch_size']}, loss {config['loss']}, "
              f"G lr {config['g_lr']}, D lr {config['d_lr']}, betas ({config['beta1']}, {config['beta2']}), "
              f"threads {config['threads'] or 'default'}, device {config['device']}. "
              f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {date.today()}.",
              f"Regenerate: `{command}`."]
    return "\n".join(lines) + "\n"


def training_wall_time(rows: list[dict]) -> float:
    """Seconds of training up to the last metrics row. Runs logged before wall_time was carried in the
    checkpoint restarted it at each resume, so each stretch's last value is summed."""
    times = [float(row["wall_time"]) for row in rows]
    return sum(before for before, after in zip(times, times[1:]) if after < before) + times[-1]


def _metric_headers(result: dict) -> list[str]:
    headers = []
    if "classifier" in result:
        headers += ["classifier FID", "classifier score", "classes covered"]
    if "inception" in result:
        headers += ["Inception FID"]
    return headers


def _metric_values(result: dict) -> list[str]:
    values = []
    if "classifier" in result:
        c = result["classifier"]
        values += [f"{c['fid']:.2f}", f"{c['score']:.2f}", f"{c['classes_covered']}/10"]
    if "inception" in result:
        values += [f"{result['inception']['fid']:.2f}"]
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["mnist", "celeba"])
    parser.add_argument("--steps", type=int, required=True, help="generator updates per arm")
    parser.add_argument("--runs", default="runs/results", help="where the two arms' run directories live")
    parser.add_argument("--demo", default="demo", help="where pictures and tables go")
    parser.add_argument("--weights", default="weights", help="where the published generators go")
    parser.add_argument("--n", type=int, default=10000, help="generated images per final score")
    parser.add_argument("--curve-n", type=int, default=2000, help="generated images per point of the FID curve")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--data-root", help="default: $SAGAN_DATA, else ./data")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for training (0: torch's default)")
    parser.add_argument("--eval-threads", type=int, default=0, help="torch threads for scoring (0: as --threads)")
    args = parser.parse_args(argv)
    command = " ".join(["python results.py", *(sys.argv[1:] if argv is None else argv)])

    root, demo = Path(args.runs) / args.dataset, Path(args.demo)
    demo.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(dataset=args.dataset, steps=args.steps, checkpoint_every=args.checkpoint_every,
                         data_root=args.data_root, threads=args.threads, out=str(root))
    runs = compare(config)
    if args.eval_threads:
        torch.set_num_threads(args.eval_threads)

    tag = DEMO_TAGS[args.dataset]
    curves = {arm: fid_against_steps(run, args.dataset, args.curve_n, args.data_root) for arm, run in runs.items()}
    plot_fid_curves(curves, demo / f"fid_{tag}.png")
    scores = {arm: evaluate.evaluate_checkpoint(run, args.n, data_root=args.data_root) for arm, run in runs.items()}
    floor = evaluate.real_floor(args.dataset, args.n, data_root=args.data_root)
    (demo / f"results_{tag}.json").write_text(json.dumps({"arms": scores, "floor": floor}, indent=2) + "\n")
    table = results_table(args.dataset, scores, floor, runs, args.n, command)
    (demo / f"results_{tag}.md").write_text(table)

    pictures.comparison_gif(runs["without_attention"], runs["with_attention"], demo / f"comparison_{tag}.gif")
    pictures.plot_curves({ARMS[arm]: run for arm, run in runs.items()}, demo / f"curves_{tag}.png")
    final = [pictures.latest_grid(run) for run in runs.values()]
    pictures.comparison_frame(*final, f"After {args.steps} steps").save(demo / f"final_{tag}.png")
    G, _ = load_generator(runs["with_attention"])
    pictures.plot_attention(G, path=demo / f"attention_{tag}.png")
    for arm, prefix in (("with_attention", "sagan"), ("without_attention", "dcgan")):
        publish_generator(runs[arm], Path(args.weights) / f"{prefix}_{args.dataset}.pt")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
