"""What the machine can do: which device to use, which mixed precision pays, how fast it is.

On a CPU, bfloat16 autocast is used only where the CPU multiplies bfloat16 natively (AVX-512
BF16 or AMX, read from the CPU flags; several times faster than float32). Elsewhere bf16 is
emulated and slower, so training stays in float32. The choice must not depend on a timing,
or two runs of the same command could train in different precisions. On CUDA, bf16 is
used where the GPU supports it and fp16 with a gradient scaler elsewhere (T4, V100).
The same measurement gives the matmul peak that MFU (model FLOPs utilisation) is quoted
against.
"""

from __future__ import annotations

import functools
import time
from typing import Optional

import torch

from .errors import SmolGPTError


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit choice must be available."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name == "cuda" and not cuda:
        raise SmolGPTError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    if name == "mps" and not mps:
        raise SmolGPTError("--device mps: Apple MPS is not available here; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise SmolGPTError(f"unknown device {name!r}: choose auto, cpu, cuda or mps")
    return torch.device(name)


def _time_matmul(device: torch.device, dtype: torch.dtype, n: int = 1024, reps: int = 4) -> float:
    """Best-of-reps FLOP/s of an n x n matrix product."""
    # A private generator: measuring must not move the global RNG that training draws from.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    best = float("inf")
    for _ in range(reps + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


@functools.lru_cache(maxsize=None)
def matmul_flops(device_type: str, dtype: torch.dtype) -> float:
    """Measured peak-ish matmul FLOP/s on this device in this dtype (cached per process)."""
    n = 4096 if device_type == "cuda" else 1536
    return _time_matmul(torch.device(device_type), dtype, n=n, reps=3)


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bfloat16 dot-product instructions (x86 AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no cheap, reliable way to tell; float32 is the safe choice
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(device: torch.device, enabled: bool) -> Optional[torch.dtype]:
    """The autocast dtype to train in, or None for plain float32."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None  # mps: autocast support is partial; float32 is the safe choice


def peak_flops(device: torch.device, dtype: Optional[torch.dtype]) -> float:
    return matmul_flops(device.type, dtype or torch.float32)


def configure_backends(device: torch.device) -> None:
    """Fast paths that are safe for training: TF32 matmuls on Ampere and newer GPUs."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
