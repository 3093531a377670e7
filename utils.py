"""Helpers the notebooks and scripts share around training: device and precision choice, image conversion, the
training clock and a Ctrl-C that waits for the end of a step."""
import platform
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def pick_device(preference: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; anything else is passed to torch.device as given."""
    if preference != "auto":
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={preference!r} was asked for, but CUDA is not available here; use 'auto' or 'cpu'")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device={preference!r} was asked for, but Apple MPS is not available here; use 'auto' or 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_features() -> dict[str, bool]:
    """What this CPU runs natively that decides bf16's speed: AMX tiles, AVX512-BF16, and AVX2 for reference."""
    checks = {"amx": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported", "avx2": "_is_avx2_supported"}
    return {name: bool(getattr(torch.cpu, check, lambda: False)()) for name, check in checks.items()}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting ('auto', 'fp32', 'bf16', 'bf16-sim' or 'fp16') on a device; None
    means fp32.

    'auto' is bf16 on CUDA GPUs that have it (fp16 on older ones) and on CPUs that run bf16 natively (AMX or
    AVX512-BF16: a 64x64 step 2.3x faster on an AMX Xeon); fp32 on other CPUs, where bf16 is emulated and a
    28x28 step is about 20x slower (AVX2, BENCHMARKS.md), and on MPS."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        features = cpu_features()
        return torch.bfloat16 if device.type == "cpu" and (features["amx"] or features["avx512_bf16"]) else None
    return {"fp32": None, "bf16": torch.bfloat16, "bf16-sim": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """'fp32', 'bf16' or 'fp16': how a resolved autocast dtype is reported."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def resolved_precision(precision: str, device: torch.device) -> str:
    """What a precision setting computes in on a device, as runs and notebooks report it: 'fp32', 'bf16', 'fp16' or
    'bf16-sim'."""
    return precision if precision == "bf16-sim" else precision_name(autocast_dtype(precision, device))


class SimulatedBf16(TorchDispatchMode):
    """bf16 autocast's numbers at about fp32's speed on a CPU without native bf16 (precision 'bf16-sim'), to measure
    what bf16 does to training where it would otherwise cost 20x (BENCHMARKS.md). Without AVX512-BF16 or AMX, torch
    runs bf16 convolutions and matrix products on slow generic kernels; in this mode they compute in fp32 on the bf16
    values and round each result to bf16 once. Products of bf16 numbers are exact in fp32 and native kernels sum in
    fp32, so these numbers differ from native bf16 only in the order of the sums. Attention runs on torch's own bf16
    kernel (it rounds the softmax weights to bf16 before the value product, on every CPU), and every other op in bf16
    as autocast makes it. Active for the whole step, backward included; not under torch.compile, which does not
    trace through a dispatch mode."""

    OPS = {aten.convolution.default, aten.convolution_backward.default, aten.mm.default, aten.addmm.default,
           aten.bmm.default, aten.baddbmm.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.OPS or not any(_is_bf16(leaf) for leaf in pytree.tree_leaves((args, kwargs))):
            return func(*args, **kwargs)
        on_meta = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        native = func(*on_meta[0], **on_meta[1])  # the dtypes the bf16 kernel returns, without computing anything
        in_fp32 = pytree.tree_map_only(torch.Tensor, lambda t: t.float() if _is_bf16(t) else t, (args, kwargs))
        result = func(*in_fp32[0], **in_fp32[1])
        return pytree.tree_map(lambda out, like: out.to(like.dtype) if isinstance(out, torch.Tensor) else out,
                               result, native)


def _is_bf16(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16


def memory_format_for(device: torch.device, channels_last: bool | None = None) -> torch.memory_format:
    """channels_last when asked, or by default on the CPU, where oneDNN's convolutions then skip their
    layout reorders (BENCHMARKS.md); contiguous by default on CUDA and MPS."""
    if channels_last is None:
        channels_last = device.type == "cpu"
    return torch.channels_last if channels_last else torch.contiguous_format


GRID_PADDING = 2  # pixels around and between the tiles of a sample grid (make_grid's default)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Model images in [-1, 1] -> [0, 1], clamped."""
    return images.add(1).div(2).clamp(0, 1)


class Stopwatch:
    """Seconds of training by the wall clock and by this process's CPU clock: counting on from a resumed run's
    totals, and leaving out what runs while paused."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0):
        self._wall_origin = time.perf_counter() - wall
        self._cpu_origin = time.process_time() - cpu

    def read(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds)."""
        return time.perf_counter() - self._wall_origin, time.process_time() - self._cpu_origin

    @contextmanager
    def paused(self):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._wall_origin += time.perf_counter() - wall
            self._cpu_origin += time.process_time() - cpu


def honour_ctrl_c() -> None:
    """Ctrl-C and `kill -INT` raise KeyboardInterrupt in this process even where it started with SIGINT ignored, as
    a shell script's background jobs do (`python study.py ... &`): stopping runs at a checkpoint, and scoring or
    waiting in between, relies on it. For the command-line entry points and the processes they start."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextmanager
def stop_at_step_boundary():
    """Ctrl-C (or a notebook's interrupt) sets a flag the loop checks between steps, so the run can
    checkpoint a consistent state and stop; a second Ctrl-C interrupts at once."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        requested.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def closing(*closables):
    """Close each of these that is not None on the way out, however the block ends."""
    try:
        yield
    finally:
        for closable in closables:
            if closable is not None:
                closable.close()
