"""Benchmarks: training and sampling throughput, the attention block's time and memory, and the
speed ratios against the original project's training step (../shared/bench/seedref.py).

    python bench.py --model 64 --steps 5 --batch-size 64 --threads 2 --json   # one JSON line
    python bench.py --model 64 --no-attn --steps 5 --threads 2 --json         # the no-attention twin
    python bench.py --attention --threads 2                                   # N, fused/explicit time and peak memory
    python bench.py --vs-reference --threads 2 --rounds 3                     # seedref and ours alternately, median ratios
    python bench.py --flops --model 64 --threads 2                            # the step's work: GFLOP, and img/s at sgemm's rate

Training throughput is the project's own step, train.build_state + train.train_step with TrainConfig's
defaults, on the synthetic dataset; sampling is G.sample (eval mode, no_grad). Experiments
(--[no-]channels-last, --compile, --precision, --reuse-fakes, --no-spectral-norm) set the matching
TrainConfig field; --vs-reference passes --reuse-fakes and --[no-]channels-last on to its runs of ours. Peak
memory is the peak RSS of the process, so every measurement that reports one runs in a process of its own.
"""
import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from unittest import mock
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_REFERENCE = HERE.parent / "shared" / "bench" / "seedref.py"
DEFAULT_STEPS = {28: 20, 64: 5}  # about 10 s of the original's step at 2 threads
ATTENTION_SIZES = (1024, 4096, 16384)
# The explicit path's forward+backward holds about three N x N maps at once (scores, softmax, their gradient).
EXPLICIT_MAPS_AT_PEAK = 3

# Targets of the speed issue: (ratio name, comparison, bound).
TARGETS = {
    "train_64_attn": (">=", 2.5),
    "train_28_attn": (">=", 2.0),
    "attn_cost_64": ("<=", 1.6),
    "sample_64": (">=", 3.0),
    "sample_28": (">=", 3.0),
}


class BenchError(RuntimeError):
    """A child measurement failed or printed no result."""


# ---------------------------------------------------------------------------------------------- measurements

def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """This process's resident set size now, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def timed(fn, reps: int) -> list[float]:
    """Wall-clock seconds of each of `reps` calls of fn."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def training_state(args: argparse.Namespace):
    """train.build_state for the benchmark's settings on the synthetic set, on the CPU."""
    import data
    import train

    set_threads(args.threads)
    batch = args.batch_size or 64
    config = train.TrainConfig(
        dataset="synthetic", image_size=args.model, batch_size=batch, attn=args.attn, device="cpu", quiet=True,
        synthetic_size=2 * batch, channels_last=args.channels_last, compile=args.compile, precision=args.precision,
        spectral_norm=args.spectral_norm, reuse_fakes=args.reuse_fakes, threads=args.threads)
    dataset = data.load_dataset("synthetic", image_size=config.image_size, channels=config.channels,
                                size=config.synthetic_size, seed=config.seed)
    return train.build_state(config, dataset, torch.device("cpu"))


def measure_training(args: argparse.Namespace) -> dict:
    """Images per second of train.train_step and of G.sample, as train.py runs them."""
    import train

    state = training_state(args)
    config, batch = state.config, state.config.batch_size
    warmup_s = sum(timed(lambda: train.train_step(state), args.warmup))
    steps = args.steps or DEFAULT_STEPS[args.model]
    step_times = timed(lambda: train.train_step(state), steps)
    z = torch.randn(args.sample_batch, config.z_dim, generator=torch.Generator().manual_seed(0))
    state.G.sample(z)  # warm-up
    sample_times = timed(lambda: state.G.sample(z), args.sample_reps)
    result = {
        "model": args.model, "attn": args.attn, "batch_size": batch, "steps": steps, "threads": torch.get_num_threads(),
        "channels_last": state.memory_format == torch.channels_last, "compile": args.compile, "precision": args.precision,
        "spectral_norm": args.spectral_norm, "reuse_fakes": args.reuse_fakes,
        "train_img_per_s": round(batch * steps / sum(step_times), 2),
        "step_s_median": round(statistics.median(step_times), 4),
        "warmup_s": round(warmup_s, 2),
        "sample_img_per_s": round(args.sample_batch / statistics.median(sample_times), 2),
        "sample_batch": args.sample_batch,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch": torch.__version__,
    }
    if args.profile:
        result["profile"] = profile_steps(state, args.profile)
    return result


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


def reference_step_flops(reference, args: argparse.Namespace) -> int:
    """FLOPs of one of seedref's training steps: its main() runs 2 warm-up steps and 1 timed one."""
    argv = ["seedref.py", str(args.model), "attn" if args.attn else "noattn", "1", str(args.batch_size or 64)]

    def run_reference():
        with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(io.StringIO()):
            reference.main()

    return counted_flops(run_reference)[0] // 3


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
    reference_G, reference_z = reference_sampler(reference, args.model, args.attn, batch)
    with torch.no_grad():
        reference_sample_total, _ = counted_flops(lambda: reference_G(reference_z))
    reference_total = reference_step_flops(reference, args)
    rate = sgemm_gflops()
    return {
        "model": args.model, "attn": args.attn, "batch_size": batch, "threads": torch.get_num_threads(),
        "channels_last": state.memory_format == torch.channels_last, "reuse_fakes": args.reuse_fakes,
        "gflop_per_step": round(total / 1e9, 1), "gflop_by_op": {op: round(n / 1e9, 1) for op, n in by_op.items()},
        "reference_gflop_per_step": round(reference_total / 1e9, 1),
        "sgemm_gflop_per_s": round(rate, 1),
        "ceiling_train_img_per_s": round(batch * rate * 1e9 / total, 2),
        "reference_ceiling_train_img_per_s": round(batch * rate * 1e9 / reference_total, 2),
        "sample_gflop_per_img": round(sample_total / batch / 1e9, 3),
        "reference_sample_gflop_per_img": round(reference_sample_total / batch / 1e9, 3),
        "ceiling_sample_img_per_s": round(batch * rate * 1e9 / sample_total, 1),
        "reference_ceiling_sample_img_per_s": round(batch * rate * 1e9 / reference_sample_total, 1),
    }


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


def load_reference(path: Path):
    """seedref.py as a module, imported from its file."""
    if not path.is_file():
        raise FileNotFoundError(f"reference step not found at {path}; pass --reference PATH to seedref.py")
    spec = importlib.util.spec_from_file_location("seedref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_sampler(reference, model: int, attn: bool, batch: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """seedref's G in eval mode (its spectral norm still runs a power iteration) and a batch of its noise."""
    torch.manual_seed(0)
    G, _, _ = reference.models(model, attn)
    return G.eval(), torch.randn(batch, 100, 1, 1)


def measure_reference_sampling(args: argparse.Namespace) -> dict:
    """Images per second of the original's G forward in eval mode under no_grad (its spectral norm
    still runs a power iteration on every forward)."""
    set_threads(args.threads)
    G, z = reference_sampler(load_reference(Path(args.reference)), args.model, True, args.sample_batch)
    with torch.no_grad():
        G(z)
        times = timed(lambda: G(z), args.sample_reps)
    return {"model": args.model, "reference_sample_img_per_s": round(args.sample_batch / statistics.median(times), 2),
            "sample_batch": args.sample_batch, "threads": torch.get_num_threads()}


def explicit_peak_gb(n: int, batch: int) -> float:
    """What the explicit path's forward+backward needs for its N x N maps alone (fp32)."""
    return EXPLICIT_MAPS_AT_PEAK * batch * n * n * 4 / 1e9


def measure_attention_point(args: argparse.Namespace) -> dict:
    """Forward+backward time and peak memory of one SelfAttention block at one N on one path."""
    from attention import SelfAttention

    set_threads(args.threads)
    n, path = args.attention_point
    side = math.isqrt(n)
    batch = args.batch_size or 16
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


# ---------------------------------------------------------------------------------------------- children

def child_env(threads: int) -> dict:
    """The environment of a child measurement: OpenMP and MKL pinned to the same thread count."""
    env = dict(os.environ)
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


def run_child(argv: list[str], threads: int) -> str:
    """Run a measurement in a fresh process; its stdout."""
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env(threads), cwd=HERE)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed with exit code {done.returncode}:\n{done.stderr[-2000:]}")
    return done.stdout


def run_json_child(argv: list[str], threads: int) -> dict:
    lines = [line for line in run_child(argv, threads).splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"{' '.join(argv)} printed no JSON line")
    return json.loads(lines[-1])


def bench_argv(*extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *extra, "--json"]


def ours(model: int, attn: bool, args: argparse.Namespace) -> dict:
    steps = args.steps or DEFAULT_STEPS[model]
    argv = bench_argv("--model", str(model), "--steps", str(steps), "--batch-size", str(args.batch_size or 64),
                      "--threads", str(args.threads), *(() if attn else ("--no-attn",)), *experiment_flags(args))
    return run_json_child(argv, args.threads)


def experiment_flags(args: argparse.Namespace) -> list[str]:
    """The TrainConfig experiments that --vs-reference hands on to its runs of ours."""
    flags = ["--reuse-fakes"] if args.reuse_fakes else []
    if args.channels_last is not None:
        flags.append("--channels-last" if args.channels_last else "--no-channels-last")
    return flags


def reference_training(model: int, attn: bool, args: argparse.Namespace) -> float:
    """seedref's images per second for one configuration."""
    steps = args.steps or DEFAULT_STEPS[model]
    argv = [sys.executable, str(args.reference), str(model), "attn" if attn else "noattn", str(steps),
            str(args.batch_size or 64)]
    for line in run_child(argv, args.threads).splitlines():
        if line.startswith("img/s"):
            return float(line.split()[1])
    raise BenchError(f"{' '.join(argv)} printed no 'img/s' line")


def reference_sampling(model: int, args: argparse.Namespace) -> float:
    argv = bench_argv("--reference-sampling", "--model", str(model), "--threads", str(args.threads),
                      "--reference", str(args.reference), "--sample-batch", str(args.sample_batch))
    return run_json_child(argv, args.threads)["reference_sample_img_per_s"]


# ---------------------------------------------------------------------------------------------- reports

def vs_reference(args: argparse.Namespace) -> dict:
    """seedref and the project alternately, each in its own process, `rounds` times; medians and ratios."""
    runs: dict[str, list[float]] = {}

    def record(name: str, value: float):
        runs.setdefault(name, []).append(value)
        if not args.json:
            print(f"  {name:<24} {value:9.2f} img/s", file=sys.stderr, flush=True)

    for round_index in range(args.rounds):
        if not args.json:
            print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for model, attn in ((64, True), (64, False), (28, True)):
            arm = f"{model}_{'attn' if attn else 'noattn'}"
            record(f"reference_train_{arm}", reference_training(model, attn, args))
            result = ours(model, attn, args)
            record(f"ours_train_{arm}", result["train_img_per_s"])
            if attn:
                record(f"ours_sample_{model}", result["sample_img_per_s"])
                record(f"reference_sample_{model}", reference_sampling(model, args))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    ratios = {
        "train_64_attn": medians["ours_train_64_attn"] / medians["reference_train_64_attn"],
        "train_28_attn": medians["ours_train_28_attn"] / medians["reference_train_28_attn"],
        "attn_cost_64": medians["ours_train_64_noattn"] / medians["ours_train_64_attn"],
        "sample_64": medians["ours_sample_64"] / medians["reference_sample_64"],
        "sample_28": medians["ours_sample_28"] / medians["reference_sample_28"],
    }
    return {"machine": machine(args.threads), "rounds": args.rounds, "batch_size": args.batch_size or 64,
            "ours_flags": experiment_flags(args),
            "runs": runs, "medians": {k: round(v, 2) for k, v in medians.items()},
            "reference_attn_cost_64": round(medians["reference_train_64_noattn"] / medians["reference_train_64_attn"], 2),
            "ratios": {name: {"value": round(value, 2), "target": f"{TARGETS[name][0]} {TARGETS[name][1]}",
                              "met": meets(name, value)} for name, value in ratios.items()}}


def meets(name: str, value: float) -> bool:
    comparison, bound = TARGETS[name]
    return value >= bound if comparison == ">=" else value <= bound


def print_vs_reference(report: dict) -> None:
    m = report["medians"]
    settings = " ".join(report["ours_flags"]) or "TrainConfig defaults"
    print(f"medians over {report['rounds']} alternating rounds, batch {report['batch_size']}, "
          f"{report['machine']['threads']} threads, ours with {settings} (img/s)")
    print(f"| {'measurement':<26} | {'reference':>9} | {'ours':>9} |")
    print(f"| {'-' * 26} | {'-' * 9}:| {'-' * 9}:|")
    for name, label in (("train_64_attn", "train 64x64 SAGAN"), ("train_64_noattn", "train 64x64 no attention"),
                        ("train_28_attn", "train 28x28 SAGAN"), ("sample_64", "sample 64x64 (batch 256)"),
                        ("sample_28", "sample 28x28 (batch 256)")):
        kind, _, arm = name.partition("_")
        print(f"| {label:<26} | {m[f'reference_{kind}_{arm}']:9.2f} | {m[f'ours_{kind}_{arm}']:9.2f} |")
    print()
    print(f"| {'ratio':<44} | {'value':>6} | {'target':>7} | met |")
    print(f"| {'-' * 44} | {'-' * 6}:| {'-' * 7}:| --- |")
    labels = {"train_64_attn": "train 64x64 SAGAN, ours / reference", "train_28_attn": "train 28x28 SAGAN, ours / reference",
              "attn_cost_64": f"64x64 no-attn / SAGAN, ours (reference {report['reference_attn_cost_64']})",
              "sample_64": "sample 64x64, ours / reference", "sample_28": "sample 28x28, ours / reference"}
    for name, ratio in report["ratios"].items():
        print(f"| {labels[name]:<44} | {ratio['value']:6.2f} | {ratio['target']:>7} | {'yes' if ratio['met'] else 'NO':<3} |")


def attention_table(args: argparse.Namespace) -> list[dict]:
    """The block at each N on the default (fused) and explicit paths, each point in its own process."""
    batch = args.batch_size or 16
    rows = []
    for n in args.sizes:
        for path in ("fused", "explicit"):
            if path == "explicit" and explicit_peak_gb(n, batch) > args.max_explicit_gb:
                rows.append({"n": n, "path": path, "skipped": f"would need {explicit_peak_gb(n, batch):.3g} GB"})
                continue
            argv = bench_argv("--attention-point", str(n), path, "--batch-size", str(batch),
                              "--channels", str(args.channels), "--threads", str(args.threads))
            rows.append(run_json_child(argv, args.threads))
            if not args.json:
                print(f"  N={n} {path}: done", file=sys.stderr, flush=True)
    return rows


def print_attention_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"SelfAttention({args.channels}) forward+backward, batch {args.batch_size or 16}, {args.threads or torch.get_num_threads()} threads; "
          "memory = peak RSS above the RSS before the first forward")
    print(f"| {'N':>6} | {'fused s':>8} | {'fused MB':>9} | {'explicit s':>10} | {'explicit MB':>22} | {'explicit/fused MB':>17} |")
    print(f"| {'-' * 5}:| {'-' * 7}:| {'-' * 8}:| {'-' * 9}:| {'-' * 21}:| {'-' * 16}:|")
    by_key = {(row["n"], row["path"]): row for row in rows}
    for n in args.sizes:
        fused, explicit = by_key[(n, "fused")], by_key[(n, "explicit")]
        if "skipped" in explicit:
            explicit_s, explicit_mb, ratio = "-", f"skipped ({explicit['skipped']})", "-"
        else:
            explicit_s, explicit_mb = f"{explicit['time_s']:.3f}", f"{explicit['attention_mb']:.0f}"
            ratio = f"{explicit['attention_mb'] / max(fused['attention_mb'], 1e-9):.1f}x"
        print(f"| {n:>6} | {fused['time_s']:8.3f} | {fused['attention_mb']:9.0f} | {explicit_s:>10} | {explicit_mb:>22} | {ratio:>17} |")


def machine(threads: int) -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "threads": threads or torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# ---------------------------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--attention", action="store_true", help="the attention block's time and memory table")
    mode.add_argument("--vs-reference", action="store_true", help="ratios against seedref, alternating rounds")
    mode.add_argument("--flops", action="store_true", help="FLOPs of one step, ours and seedref's, against sgemm's rate")
    mode.add_argument("--reference-sampling", action="store_true", help="seedref's G forward at --sample-batch")
    mode.add_argument("--attention-point", nargs=2, metavar=("N", "PATH"), help=argparse.SUPPRESS)
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
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="experiment: autocast dtype")
    parser.add_argument("--reuse-fakes", action="store_true", help="experiment: one G forward per step (TrainConfig.reuse_fakes)")
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
    if args.attention_point:
        args.attention_point = (int(args.attention_point[0]), args.attention_point[1])
        args.sizes = [args.attention_point[0]]
    bad = [n for n in args.sizes if n < 1 or math.isqrt(n) ** 2 != n]
    if bad:
        parser.error(f"--sizes must be perfect squares (N = H*W of a square map), got {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.vs_reference:
            report = vs_reference(args)
            print(json.dumps(report) if args.json else "", end="\n" if args.json else "")
            if not args.json:
                print_vs_reference(report)
        elif args.attention:
            rows = attention_table(args)
            if args.json:
                print(json.dumps({"machine": machine(args.threads), "rows": rows}))
            else:
                print_attention_table(rows, args)
        elif args.attention_point:
            print(json.dumps(measure_attention_point(args)))
        elif args.reference_sampling:
            print(json.dumps(measure_reference_sampling(args)))
        elif args.flops:
            result = measure_flops(args)
            print(json.dumps(result) if args.json else "\n".join(f"{key}: {value}" for key, value in result.items()))
        else:
            result = measure_training(args)
            if args.json:
                print(json.dumps(result))
            else:
                print("\n".join(f"{key}: {value}" for key, value in result.items() if key != "profile"))
                for row in result.get("profile", []):
                    print(f"  {row['self_ms_per_step']:9.1f} ms/step  {row['share']:6.1%}  {row['calls_per_step']:4d}x  {row['op']}")
    except (BenchError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
