"""Helpers the notebooks and scripts share around training: device and precision choice, image conversion."""
import platform
from pathlib import Path

import torch


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
    """The autocast dtype for a precision setting ('auto', 'fp32', 'bf16' or 'fp16') on a device; None means fp32.

    'auto' is bf16 on CUDA GPUs that have it (fp16 on older ones) and on CPUs that run bf16 natively (AMX or
    AVX512-BF16: a 64x64 step 2.3x faster on an AMX Xeon); fp32 on other CPUs, where bf16 is emulated and a
    28x28 step is about 20x slower (AVX2, BENCHMARKS.md), and on MPS."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        features = cpu_features()
        return torch.bfloat16 if device.type == "cpu" and (features["amx"] or features["avx512_bf16"]) else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """'fp32', 'bf16' or 'fp16': how a resolved autocast dtype is reported."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def memory_format_for(device: torch.device, channels_last: bool | None = None) -> torch.memory_format:
    """channels_last when asked, or by default on the CPU, where oneDNN's convolutions then skip their
    layout reorders (BENCHMARKS.md); contiguous by default on CUDA and MPS."""
    if channels_last is None:
        channels_last = device.type == "cpu"
    return torch.channels_last if channels_last else torch.contiguous_format


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Model images in [-1, 1] -> [0, 1], clamped."""
    return images.add(1).div(2).clamp(0, 1)
