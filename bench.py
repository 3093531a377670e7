"""Benchmarks: training and sampling throughput, the attention block's time and memory, the work (FLOPs) of a
step, and speed ratios against the training step of the original project
(https://github.com/franknb/Self-attention-DCGAN), restated in ../shared/bench/seedref.py.

    python bench.py --model 64 --steps 5 --threads 2 --json     # training and sampling img/s, peak RSS
    python bench.py --attention --threads 2                     # N, fused/explicit time and peak memory
    python bench.py --vs-reference --threads 2 --rounds 3       # seedref and ours alternately, median ratios
    python bench.py --flops --model 64 --threads 2              # GFLOP of a step and a sample, ours and seedref's

Training is the project's own step (state.build_state + train.train_step, TrainConfig's defaults but batch 64, the
original's, so that ratios against seedref compare equal work; synthetic data); sampling is G.sample.
--[no-]channels-last, --compile, --precision, --[no-]reuse-fakes and --no-spectral-norm set the matching TrainConfig
field. Every measurement that reports memory or is compared with another runs in a
fresh process of its own (peak RSS is per process), with OpenMP and MKL pinned to --threads.
"""
import argparse
import contextlib
import importlib.util
import io
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_REFERENCE = HERE.parent / "shared" / "bench" / "seedref.py"
DEFAULT_STEPS = {28: 20, 64: 5}  # about 10 s of the original's step at 2 threads
ATTENTION_SIZES = (1024, 4096, 16384)
# The explicit path's forward+backward holds about three N x N maps at once (scores, softmax, their gradient).
EXPLICIT_MAPS_AT_PEAK = 3


class BenchError(RuntimeError):
    """A measurement failed or printed no result."""


# ---------------------------------------------------------------------------------------------- helpers

def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn, reps: int) -> list[float]:
    """Wall-clock seconds of each of `reps` calls of fn."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def thread_env(threads: int) -> dict:
    """OpenMP and MKL pinned to `threads` (0: left as they are)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}


def in_fresh_process(fn, *args):
    """fn(*args) in a new Python process (spawned, so nothing of this one's memory or threads carries over)."""
    previous = dict(os.environ)
    os.environ.update(thread_env(args[0].threads))  # read by the child's OpenMP when it starts
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        os.environ.clear()
        os.environ.update(previous)


def machine(threads: int) -> dict:
    """The CPU, its bf16-relevant features and what precision 'auto' picks on it, threads and versions."""
    from utils import cpu_features, cpu_name, resolved_precision

    return {"cpu": cpu_name(), **cpu_features(), "auto_precision": resolved_precision("auto", torch.device("cpu")),
            "nproc": os.cpu_count(), "threads": threads or torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# ---------------------------------------------------------------------------------------------- ours

def training_state(args: argparse.Namespace):
    """state.build_state for the benchmark's settings on the synthetic set, on the CPU."""
    import data
    import state
    from config import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch_size or 64
    experiments = {"reuse_fakes": args.reuse_fakes} if args.reuse_fakes is not None else {}
    config = TrainConfig(
        dataset="synthetic", image_size=args.model, batch_size=batch, attn=args.attn, device="cpu", quiet=True,
        synthetic_size=2 * batch, channels_last=args.channels_last, compile=args.compile, precision=args.precision,
        spectral_norm=args.spectral_norm, threads=args.threads, **experiments)
    dataset = data.load_dataset("synthetic", image_size=config.image_size, channels=config.channels,
                                size=config.synthetic_size, seed=config.seed)
    return state.build_state(config, dataset, torch.device("cpu"))


def measure_training(args: argparse.Namespace) -> dict:
    """Images per second of train.train_step and of G.sample, as train.py runs them."""
    import train
    from models import sample_inputs

    state = training_state(args)
    batch = state.config.batch_size
    warmup_s = sum(timed(lambda: train.train_step(state), args.warmup))
    steps = args.steps or DEFAULT_STEPS[args.model]
    step_times = timed(lambda: train.train_step(state), steps)
    inputs = sample_inputs(state.G, args.sample_batch)
    state.G.sample(*inputs)  # warm-up
    sample_times = timed(lambda: state.G.sample(*inputs), args.sample_reps)
    result = {
        "machine": machine(args.threads), "model": args.model, "attn": args.attn, "batch_size": batch, "steps": steps,
        "threads": torch.get_num_threads(), "channels_last": state.memory_format == torch.channels_last,
        "compile": args.compile, "precision": state.precision,
        "spectral_norm": args.spectral_norm, "reuse_fakes": state.config.reuse_fakes,
        "train_img_per_s": round(batch * steps / sum(step_times), 2), "step_s_median": round(statistics.median(step_times), 4),
        "warmup_s": round(warmup_s, 2), "sample_img_per_s": round(args.sample_batch / statistics.median(sample_times), 2),
        "sample_batch": args.sample_batch, "peak_rss_mb": round(peak_rss_mb(), 1), "torch": torch.__version__,
    }
    if args.profile:
        result["profile"] = profile_steps(state, args.profile)
    return result


def profile_steps(state, steps: int, top: int = 15) -> list[dict]:
    """The ops that cost most (self CPU time) over `steps` training steps."""
    from torch.profiler import ProfilerActivity, profile

    import train

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train.train_step(state)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 1),
             "share": round(e.self_cpu_time_total / total, 3), "calls_per_step": e.count // steps} for e in events[:top]]


def measure_attention_point(args: argparse.Namespace, n: int, path: str) -> dict:
    """Forward+backward time and peak memory of one SelfAttention block at one N on one path."""
    from attention import SelfAttention

    if args.threads:
        torch.set_num_threads(args.threads)
    side, batch = math.isqrt(n), args.batch_size or 16
    torch.manual_seed(0)
    layer = SelfAttention(args.channels)
    with torch.no_grad():
        layer.gamma.fill_(0.5)
    x = torch.randn(batch, args.channels, side, side, requires_grad=True)
    upstream = torch.randn_like(x)

    def forward_backward():
        out = layer(x, return_attention=True)[0] if path == "explicit" else layer(x)
        (out * upstream).sum().backward()
        x.grad = None
        layer.zero_grad(set_to_none=True)

    baseline_mb = current_rss_mb()
    if n <= 4096:
        forward_backward()  # warm-up; the peak is the same
    times = timed(forward_backward, 3 if n <= 1024 else 1)
    peak = peak_rss_mb()
    return {"n": n, "path": path, "batch": batch, "channels": args.channels, "threads": torch.get_num_threads(),
            "time_s": round(statistics.median(times), 4), "peak_rss_mb": round(peak, 1),
            "attention_mb": round(peak - baseline_mb, 1)}


def explicit_peak_gb(n: int, batch: int) -> float:
    """What the explicit path's forward+backward needs for its N x N maps alone (fp32)."""
    return EXPLICIT_MAPS_AT_PEAK * batch * n * n * 4 / 1e9


def attention_table(args: argparse.Namespace) -> dict:
    """The block at each N on the default (fused) and explicit paths, each point in its own process."""
    rows = []
    for n in args.sizes:
        for path in ("fused", "explicit"):
            need = explicit_peak_gb(n, args.batch_size or 16)
            if path == "explicit" and need > args.max_explicit_gb:
                rows.append({"n": n, "path": path, "skipped": f"would need {need:.3g} GB"})
            else:
                rows.append(in_fresh_process(measure_attention_point, args, n, path))
    return {"machine": machine(args.threads), "rows": rows}


# ---------------------------------------------------------------------------------------------- FLOPs

def count_cpu_flash_attention_flops() -> None:
    """Teach torch's FlopCounterMode the CPU flash-attention kernels (it knows only the CUDA ones)."""
    from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in torch.utils.flop_counter.flop_registry:
        return

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)


def counted_flops(fn) -> tuple[int, dict[str, int]]:
    """Floating-point operations of fn() (matrix products, convolutions, attention), total and by op."""
    from torch.utils.flop_counter import FlopCounterMode

    count_cpu_flash_attention_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), dict(sorted(by_op.items(), key=lambda item: -item[1]))


def sgemm_gflops(size: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of a large, well-shaped fp32 matrix product here: the yardstick for every kernel of a step."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    return 2 * size**3 / min(timed(lambda: a @ b, reps)) / 1e9


def measure_flops(args: argparse.Namespace) -> dict:
    """The work of one training step and of sampling, ours and seedref's, and the speed each would have if
    every operation ran at sgemm's rate: an upper bound that no kernel choice can beat."""
    import train

    state = training_state(args)
    train.train_step(state)  # the first step allocates Adam's state
    total, by_op = counted_flops(lambda: train.train_step(state))
    batch = state.config.batch_size
    sample_total, _ = counted_flops(lambda: state.G.sample(state.sample_z(batch)))
    reference = load_reference(Path(args.reference))
    torch.manual_seed(0)
    reference_G = reference.models(args.model, args.attn)[0].eval()
    with torch.no_grad():
        reference_sample_total, _ = counted_flops(lambda: reference_G(torch.randn(batch, 100, 1, 1)))
    argv = ["seedref.py", str(args.model), "attn" if args.attn else "noattn", "1", str(batch)]
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(io.StringIO()):
        reference_total = counted_flops(reference.main)[0] // 3  # its main() runs 2 warm-up steps and 1 timed one
    rate = sgemm_gflops()
    return {
        "model": args.model, "attn": args.attn, "batch_size": batch, "threads": torch.get_num_threads(),
        "channels_last": state.memory_format == torch.channels_last, "reuse_fakes": state.config.reuse_fakes,
        "gflop_per_step": round(total / 1e9, 1), "gflop_by_op": {op: round(n / 1e9, 1) for op, n in by_op.items()},
        "reference_gflop_per_step": round(reference_total / 1e9, 1), "sgemm_gflop_per_s": round(rate, 1),
        "ceiling_train_img_per_s": round(batch * rate * 1e9 / total, 2),
        "reference_ceiling_train_img_per_s": round(batch * rate * 1e9 / reference_total, 2),
        "sample_gflop_per_img": round(sample_total / batch / 1e9, 3),
        "reference_sample_gflop_per_img": round(reference_sample_total / batch / 1e9, 3),
        "ceiling_sample_img_per_s": round(batch * rate * 1e9 / sample_total, 1),
        "reference_ceiling_sample_img_per_s": round(batch * rate * 1e9 / reference_sample_total, 1),
    }


# ---------------------------------------------------------------------------------------------- the original's step

def load_reference(path: Path):
    """seedref.py as a module, imported from its file."""
    if not path.is_file():
        raise FileNotFoundError(f"reference step not found at {path}; pass --reference PATH to seedref.py")
    spec = importlib.util.spec_from_file_location("seedref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_training(args: argparse.Namespace, model: int, attn: bool) -> float:
    """seedref's images per second for one configuration, as its own script prints it."""
    argv = [sys.executable, str(args.reference), str(model), "attn" if attn else "noattn",
            str(args.steps or DEFAULT_STEPS[model]), str(args.batch_size or 64)]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **thread_env(args.threads)}, cwd=HERE)
    lines = [line for line in done.stdout.splitlines() if line.startswith("img/s")]
    if done.returncode != 0 or not lines:
        raise BenchError(f"{' '.join(argv)} failed (exit code {done.returncode}) or printed no 'img/s':\n{done.stderr[-2000:]}")
    return float(lines[-1].split()[1])


def reference_sampling(args: argparse.Namespace, model: int) -> float:
    """seedref's G forward in eval mode under no_grad (its spectral norm still runs a power iteration), img/s."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    G = load_reference(Path(args.reference)).models(model, True)[0].eval()
    z = torch.randn(args.sample_batch, 100, 1, 1)
    with torch.no_grad():
        G(z)
        times = timed(lambda: G(z), args.sample_reps)
    return args.sample_batch / statistics.median(times)


def vs_reference(args: argparse.Namespace) -> dict:
    """seedref and the project alternately, each measurement in a process of its own, `rounds` times; medians and ratios."""
    from config import ARMS

    runs: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        for model, arm in ((64, "sagan"), (64, "baseline"), (28, "sagan")):
            attn = ARMS[arm].attn
            runs.setdefault(f"reference_train_{model}_{arm}", []).append(reference_training(args, model, attn))
            ours = in_fresh_process(measure_training, argparse.Namespace(**{**vars(args), "model": model, "attn": attn}))
            runs.setdefault(f"ours_train_{model}_{arm}", []).append(ours["train_img_per_s"])
            if attn:
                runs.setdefault(f"ours_sample_{model}", []).append(ours["sample_img_per_s"])
                runs.setdefault(f"reference_sample_{model}", []).append(in_fresh_process(reference_sampling, args, model))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    ratios = {"train_64_sagan": ("ours_train_64_sagan", "reference_train_64_sagan"),
              "train_28_sagan": ("ours_train_28_sagan", "reference_train_28_sagan"),
              "attn_cost_64": ("ours_train_64_baseline", "ours_train_64_sagan"),
              "reference_attn_cost_64": ("reference_train_64_baseline", "reference_train_64_sagan"),
              "sample_64": ("ours_sample_64", "reference_sample_64"), "sample_28": ("ours_sample_28", "reference_sample_28")}
    return {"machine": machine(args.threads), "rounds": args.rounds, "batch_size": args.batch_size or 64,
            "ours": {"reuse_fakes": ours["reuse_fakes"], "channels_last": ours["channels_last"]},  # as measured
            "runs": {name: [round(v, 2) for v in values] for name, values in runs.items()},
            "medians": {name: round(value, 2) for name, value in medians.items()},
            "ratios": {name: round(medians[top] / medians[bottom], 2) for name, (top, bottom) in ratios.items()}}


# ---------------------------------------------------------------------------------------------- CLI

def print_table(rows: list[list], header: list[str]) -> None:
    """A markdown table."""
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def report(args: argparse.Namespace, result) -> None:
    """The result as one JSON line (--json) or as readable tables."""
    if args.json:
        print(json.dumps(result))
    elif args.attention:
        by_key = {(row["n"], row["path"]): row for row in result["rows"]}
        print(f"SelfAttention({args.channels}) forward+backward, batch {args.batch_size or 16}; memory = peak RSS above "
              f"the RSS before the first forward")
        print_table([[n, by_key[(n, "fused")]["time_s"], by_key[(n, "fused")]["attention_mb"],
                      by_key[(n, "explicit")].get("time_s", "-"),
                      by_key[(n, "explicit")].get("attention_mb", by_key[(n, "explicit")].get("skipped"))]
                     for n in args.sizes], ["N", "fused s", "fused MB", "explicit s", "explicit MB"])
    elif args.vs_reference:
        print(f"medians of {result['rounds']} alternating rounds, batch {result['batch_size']}, {result['machine']['threads']} "
              f"threads, ours with {result['ours']} (img/s)")
        print_table([[name, value] for name, value in result["medians"].items()], ["measurement", "img/s"])
        print()
        print_table([[name, value] for name, value in result["ratios"].items()], ["ratio", "value"])
    else:
        for key, value in result.items():
            if key != "profile":
                print(f"{key}: {value}")
        for row in result.get("profile", []):
            print(f"  {row['self_ms_per_step']:9.1f} ms/step  {row['share']:6.1%}  {row['calls_per_step']:4d}x  {row['op']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--attention", action="store_true", help="the attention block's time and memory table")
    mode.add_argument("--vs-reference", action="store_true", help="ratios against seedref, alternating rounds")
    mode.add_argument("--flops", action="store_true", help="FLOPs of one step, ours and seedref's, against sgemm's rate")
    parser.add_argument("--model", type=int, choices=(28, 64), default=64, help="28x28 or 64x64 model (default 64)")
    parser.add_argument("--no-attn", dest="attn", action="store_false", help="the no-attention baseline")
    parser.add_argument("--steps", type=int, default=0, help=f"timed steps (default {DEFAULT_STEPS})")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the compile cost with --compile)")
    parser.add_argument("--batch-size", type=int, default=0, help="training batch (64); attention batch (16)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--sample-batch", type=int, default=256, help="sampling batch")
    parser.add_argument("--sample-reps", type=int, default=3, help="timed sampling batches")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="experiment: memory format (default: TrainConfig's, channels_last on the CPU)")
    parser.add_argument("--compile", action="store_true", help="experiment: torch.compile G and D")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "bf16-sim"), help="experiment: autocast dtype (bf16-sim: bf16 numbers, fp32 kernels)")
    parser.add_argument("--reuse-fakes", action=argparse.BooleanOptionalAction, default=None,
                        help="experiment: one G forward per step, or two (default: TrainConfig's, one)")
    parser.add_argument("--no-spectral-norm", dest="spectral_norm", action="store_false",
                        help="experiment: no spectral norm (the most any spectral-norm speed-up could give)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS", help="also profile STEPS steps: top ops")
    parser.add_argument("--sizes", default=",".join(map(str, ATTENTION_SIZES)), help="attention N values (squares)")
    parser.add_argument("--channels", type=int, default=64, help="attention block channels")
    parser.add_argument("--max-explicit-gb", type=float, default=12.0, help="skip explicit points needing more")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds for --vs-reference")
    parser.add_argument("--reference", default=str(DEFAULT_REFERENCE), help="path to seedref.py")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    args.sizes = [int(size) for size in args.sizes.split(",")]
    bad = [n for n in args.sizes if n < 1 or math.isqrt(n) ** 2 != n]
    if bad:
        parser.error(f"--sizes must be perfect squares (N = H*W of a square map), got {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    measure = attention_table if args.attention else vs_reference if args.vs_reference else \
        measure_flops if args.flops else measure_training
    try:
        report(args, measure(args))
    except (BenchError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
