"""What the machine can do: which device to use, which precision to compute in, how fast it is.

The precision policy (:class:`PrecisionPolicy`) is decided once per device from what the
hardware is (CPU flags, CUDA compute capability), never from a timing, so that two runs of
one command always train in the same precision. Reduced precision is used only where the
hardware multiplies it natively:

- x86 CPUs with AVX-512 BF16 or AMX, and aarch64 CPUs with the BF16 extension: bf16 autocast
  (several times faster than float32 there);
- every other CPU (AVX2 laptops and servers, older Arm): float32 everywhere, because a bf16
  product is emulated, some 100x slower than a float32 one;
- CUDA GPUs of compute capability 8.0 and later: bf16 autocast; earlier ones (T4, V100), whose
  bf16 is emulated: fp16 autocast with a gradient scaler;
- Apple MPS: float32.

Every place that picks a dtype follows the policy: the autocast of training and evaluation,
Muon's orthogonalisation and the head loss. ``--no-amp`` (``amp=False``) means float32
everywhere. The matmul peak that MFU (model FLOPs utilisation) is quoted against is measured
here too, in the policy's dtype.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import openmp
from .config import DEVICES
from .errors import SmolGPTError
from .files import atomic_write_text, cache_dir


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit choice must be available."""
    if name not in DEVICES:
        raise SmolGPTError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name == "cuda" and not cuda:
        raise SmolGPTError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    if name == "mps" and not mps:
        raise SmolGPTError("--device mps: Apple MPS is not available here; use --device cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------ the CPU

# The /proc/cpuinfo flags that decide (or explain) the CPU's precision policy.
PRECISION_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "bf16")
_ARM = ("aarch64", "arm64")


@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo says about a CPU: its name, the precision flags it has, and whether
    it multiplies bfloat16 natively."""

    model: str
    arch: str  # platform.machine(): "x86_64", "aarch64", ...
    flags: tuple[str, ...]  # the PRECISION_FLAGS present, in that order
    native_bf16: bool

    def describe(self) -> str:
        """e.g. "AMD EPYC 7B13 (x86_64: avx2; no native bf16)"."""
        flags = ", ".join(self.flags) or "none of " + ", ".join(PRECISION_FLAGS)
        native = "native" if self.native_bf16 else "no native"
        return f"{self.model} ({self.arch}: {flags}; {native} bf16)"


def parse_cpuinfo(text: str, arch: str) -> CpuInfo:
    """Read a /proc/cpuinfo text. x86 lists its features on "flags" lines, and multiplies bf16
    natively with AVX-512 BF16 or AMX; aarch64 lists them on "Features" lines, and does with
    the Armv8.6 BF16 extension ("bf16")."""
    model, features = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and features is None:
            features = set(value.split())
        elif key in ("model name", "cpu model") and not model:
            model = value.strip()
    features = features or set()
    if arch in _ARM:
        native = "bf16" in features
    else:
        native = "avx512_bf16" in features or "amx_bf16" in features
    return CpuInfo(
        model=model or "unknown CPU",
        arch=arch,
        flags=tuple(f for f in PRECISION_FLAGS if f in features),
        native_bf16=native,
    )


@functools.lru_cache(maxsize=None)
def cpu_info() -> CpuInfo:
    """This machine's CPU, read once per process."""
    arch = platform.machine().lower()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo(f.read(), arch)
    except OSError:  # not Linux: no cheap, reliable way to tell; float32 is the safe choice
        return CpuInfo(
            model=platform.processor() or "unknown CPU", arch=arch, flags=(), native_bf16=False
        )


# ----------------------------------------------------------------------- the policy

# "1" or "0" overrides what the CPU flags say about native bf16: for a virtual machine that
# hides its flags, and to run the other CPU kind's code path on any machine (the tests do).
CPU_BF16_ENV = "SMOLGPT_CPU_BF16"
# The compute capability whose policy a GPU follows instead of its own ("7.5": a T4's).
CUDA_CAPABILITY_ENV = "SMOLGPT_CUDA_CAPABILITY"


@dataclass(frozen=True)
class PrecisionPolicy:
    """The one decision about reduced precision on a device.

    ``reduced`` is the dtype that matrix products may run in under autocast (and, if it is
    bf16, in Muon's orthogonalisation), or None for float32 everywhere; ``reason`` says why,
    for the start-up line and benchmark records.
    """

    device_type: str
    reduced: Optional[torch.dtype]
    reason: str

    @property
    def muon_dtype(self) -> torch.dtype:
        """The dtype of the products smolgpt makes outside autocast (Muon's iteration): bf16
        where it is native, else float32 (fp16's narrow range does not suit an iteration
        that multiplies its matrices by themselves)."""
        return torch.bfloat16 if self.reduced == torch.bfloat16 else torch.float32

    @property
    def float32_cpu(self) -> bool:
        """A CPU that computes in float32: where presets may choose another recipe."""
        return self.device_type == "cpu" and self.reduced is None

    def grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        """A gradient scaler where the policy needs one: fp16 gradients underflow without
        loss scaling (bf16 has float32's range); else None."""
        return torch.amp.GradScaler(self.device_type) if self.reduced == torch.float16 else None

    def autocast(self):
        """The context a forward pass runs in under this policy."""
        if self.reduced is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.reduced)

    def describe(self) -> str:
        """e.g. "float32 (the CPU has no AVX512_BF16 or AMX: bf16 would be emulated)"."""
        name = "float32" if self.reduced is None else str(self.reduced).replace("torch.", "")
        return f"{name} ({self.reason})"


def cpu_policy(cpu: CpuInfo, amp: bool = True, forced: Optional[str] = None) -> PrecisionPolicy:
    """bf16 autocast where the CPU multiplies bf16 natively, float32 everywhere else.
    ``forced``: the value of $SMOLGPT_CPU_BF16, which wins over the flags."""
    if not amp:
        return PrecisionPolicy("cpu", None, "--no-amp")
    if forced is not None:
        if forced not in ("0", "1"):
            raise SmolGPTError(
                f"{CPU_BF16_ENV}={forced!r}: set it to 1 (native bf16) or 0 "
                "(float32), or unset it to follow the CPU's flags"
            )
        native, why = forced == "1", f"{CPU_BF16_ENV}={forced}"
    elif cpu.arch in _ARM:
        native = cpu.native_bf16
        why = (
            "the CPU has the Arm BF16 extension"
            if native
            else "the CPU has no Arm BF16 extension: bf16 would be emulated"
        )
    else:
        native = cpu.native_bf16
        found = " and ".join(f.upper() for f in ("avx512_bf16", "amx_bf16") if f in cpu.flags)
        why = (
            f"the CPU has {found}"
            if native
            else "the CPU has no AVX512_BF16 or AMX: bf16 would be emulated"
        )
    return PrecisionPolicy("cpu", torch.bfloat16 if native else None, why)


def forced_capability(value: Optional[str]) -> Optional[tuple[int, int]]:
    """The compute capability that $SMOLGPT_CUDA_CAPABILITY names (value, e.g. "7.5"), or
    None where it is unset."""
    if value is None:
        return None
    major, dot, minor = value.partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        raise SmolGPTError(
            f"{CUDA_CAPABILITY_ENV}={value!r}: set it to a compute capability such as 7.5 "
            "(a T4's policy: fp16 with loss scaling) or 8.0, or unset it to follow the GPU"
        )
    return int(major), int(minor)


def cuda_policy(
    capability: tuple[int, int], amp: bool = True, forced: Optional[str] = None
) -> PrecisionPolicy:
    """bf16 autocast from compute capability 8.0 (Ampere) on. On 7.x (T4, V100) bf16 is
    emulated, while the tensor cores multiply fp16: fp16 autocast with a gradient scaler.
    Older GPUs have no tensor cores: float32. ``forced``: the value of
    $SMOLGPT_CUDA_CAPABILITY, whose capability is followed instead of the GPU's own (to
    try a T4's path on a newer GPU)."""
    if not amp:
        return PrecisionPolicy("cuda", None, "--no-amp")
    if forced is not None:
        capability = forced_capability(forced)
    cc = f"compute capability {capability[0]}.{capability[1]}"
    if forced is not None:
        cc += f" ({CUDA_CAPABILITY_ENV}={forced})"
    if tuple(capability) >= (8, 0):
        return PrecisionPolicy("cuda", torch.bfloat16, f"{cc} has native bf16")
    if tuple(capability) >= (7, 0):
        return PrecisionPolicy(
            "cuda", torch.float16, f"{cc} has no native bf16: fp16 with loss scaling"
        )
    return PrecisionPolicy("cuda", None, f"{cc} has no tensor cores")


def precision_policy(device: torch.device, amp: bool = True) -> PrecisionPolicy:
    """The precision policy of a device, from what the hardware is, never from a timing."""
    if device.type == "cuda":
        forced = os.environ.get(CUDA_CAPABILITY_ENV)
        return cuda_policy(torch.cuda.get_device_capability(device), amp, forced)
    if device.type == "cpu":
        return cpu_policy(cpu_info(), amp, os.environ.get(CPU_BF16_ENV))
    # mps: autocast support is partial there; float32 is the safe choice
    return PrecisionPolicy(device.type, None, f"no mixed precision on {device.type}")


def describe_hardware(device: torch.device, policy: PrecisionPolicy) -> dict:
    """What a benchmark record names: the CPU and its precision flags, the GPU if any, the
    torch build and the policy."""
    cpu = cpu_info()
    info = {
        "cpu": cpu.describe(),
        "cpu_model": cpu.model,
        "arch": cpu.arch,
        "cpu_flags": list(cpu.flags),
        "cpu_native_bf16": cpu.native_bf16,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": device.type,
        "policy": policy.describe(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def this_cpu() -> dict:
    """describe_hardware() of this CPU under its default policy, plus "line": the one-line
    form that benchmark tables print above themselves."""
    cpu = torch.device("cpu")
    info = describe_hardware(cpu, precision_policy(cpu))
    info["line"] = f"CPU: {info['cpu']}; smolgpt's precision policy: {info['policy']}"
    return info


class OtherLoad:
    """How many cores other programs kept busy while the block ran: from Linux's
    /proc/stat (every process's CPU time) less this process's own; ``cores`` is None where
    there is no /proc/stat. Use as a context manager around the work measured."""

    def __enter__(self) -> "OtherLoad":
        self.start, self.cores = _cpu_seconds(), None
        return self

    # /proc/stat counts in ticks (10 ms): a shorter block is lengthened to this, idly.
    MIN_SECONDS = 0.2

    def __exit__(self, *exc) -> None:
        if self.start is not None:
            time.sleep(max(self.MIN_SECONDS - (time.perf_counter() - self.start[0]), 0.0))
        end = _cpu_seconds()
        if self.start is not None and end is not None:
            wall, busy, own = (b - a for a, b in zip(self.start, end))
            self.cores = max(busy - own, 0.0) / max(wall, 1e-9)


def _cpu_seconds() -> Optional[tuple[float, float, float]]:
    """(wall clock, CPU seconds of every process, of this one), or None without
    /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = sum(fields[3:5])  # idle and iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal
    return time.perf_counter(), busy, time.process_time()


def may_choose_threads(device: torch.device) -> bool:
    """Whether smolgpt may choose how many threads compute on this device: a CPU with more
    than one, where neither OMP_NUM_THREADS nor MKL_NUM_THREADS says how many (set one of
    them for a count that never varies, as bit-for-bit comparisons of runs need)."""
    user_set = any(os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))
    return device.type == "cpu" and not user_set and torch.get_num_threads() > 1


def describe_threads(busy_cores: Optional[float] = None, timed_against: int = 0) -> str:
    """How this process computes on the CPU, for the start-up log: its compute threads (and
    with busy_cores, the cores other programs kept busy at start-up, and timed_against, the
    other count timed then) and how they wait between operations (see SPIN_COUNT in
    smolgpt/__init__.py)."""
    count = torch.get_num_threads()
    threads = f"{count} compute thread{'' if count == 1 else 's'}"
    if timed_against:
        threads += (
            f" (other programs kept {busy_cores:.1f} cores busy: a training pass timed on "
            f"{count} and on {timed_against}, and {count} was faster; OMP_NUM_THREADS fixes "
            "the count)"
        )
    spin, policy = os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY")
    if not openmp.WAIT_POLICY_IN_TIME and spin == openmp.SPIN_COUNT:
        return (
            f"{threads}, waiting as OpenMP does by default: torch was loaded before smolgpt "
            f"(set GOMP_SPINCOUNT={openmp.SPIN_COUNT} before importing torch, or import "
            "smolgpt first, so that a CPU busy with other work slows training in "
            "proportion, not several-fold)"
        )
    if spin == openmp.SPIN_COUNT and policy is None:
        return (
            f"{threads}, spinning briefly while they wait (GOMP_SPINCOUNT={spin}: a CPU "
            "busy with other work slows training in proportion, not several-fold)"
        )
    yours = (("GOMP_SPINCOUNT", spin), ("OMP_WAIT_POLICY", policy))
    return f"{threads}, waiting as " + ", ".join(f"{k}={v}" for k, v in yours if v is not None)


# ----------------------------------------------------------------------- the peak


def _time_matmul(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Best-of-reps FLOP/s of an n x n matrix product."""
    # A private generator: measuring must not move the global RNG that training draws from.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# The longest one product of the peak measurement may take: an emulated dtype (bf16 on a CPU
# without it, forced by SMOLGPT_CPU_BF16=1) is measured on smaller matrices rather than for
# seconds of a --time_budget.
PRODUCT_SECONDS = 0.05


@functools.lru_cache(maxsize=None)
def matmul_flops(device_type: str, dtype: torch.dtype) -> float:
    """Measured peak-ish matmul FLOP/s on this device in this dtype (cached per process): the
    best of several products (a roof, which a busy moment of the machine must not lower) of
    1024 x 1024 matrices on a CPU (4096 on a GPU), or smaller ones where a product would take
    longer than PRODUCT_SECONDS."""
    device = torch.device(device_type)
    n, reps = (4096, 3) if device_type == "cuda" else (1024, 12)
    # A small product first: it starts the threads and tells how large a product fits.
    probe = _time_matmul(device, dtype, n=256, reps=2)
    while n > 256 and 2 * n**3 / probe > PRODUCT_SECONDS:
        n //= 2
    _time_matmul(device, dtype, n=n, reps=2)  # warm-up at the measured size
    return _time_matmul(device, dtype, n=n, reps=reps)


# The highest matmul peak measured on this machine so far, per device, dtype, torch build and
# thread count: {key: FLOP/s}, in the cache directory.
PEAKS_FILE = "matmul_peaks.json"


def peak_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a peak measurement holds for: the processor, the dtype, torch and its threads."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_info().model
    dtype_name = str(dtype).replace("torch.", "")
    return f"{name} | {dtype_name} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def peak_flops(device: torch.device, policy: PrecisionPolicy) -> float:
    """The matmul peak that MFU is quoted against, in the dtype the model's products run in:
    the highest of this process's measurement and every earlier one on this machine (kept in
    the cache directory). A peak measured while other work runs comes out low, and MFU
    against it could read above 100%; the roof of all measurements only rises towards the
    true peak."""
    dtype = policy.reduced or torch.float32
    measured = matmul_flops(device.type, dtype)
    path, key = cache_dir() / PEAKS_FILE, peak_key(device, dtype)
    try:
        peaks = json.loads(path.read_text(encoding="utf-8"))
        known = float(peaks.get(key, 0.0))
    except (OSError, ValueError, TypeError, AttributeError):  # none yet, or not ours: anew
        peaks, known = {}, 0.0
    if measured > known:
        # A read-only or full cache directory only loses the memory of this measurement.
        with contextlib.suppress(OSError, SmolGPTError):
            atomic_write_text(path, json.dumps({**peaks, key: measured}, indent=1) + "\n")
    return max(measured, known)


def configure_backends(device: torch.device) -> None:
    """Fast paths that are safe for training: TF32 matmuls on Ampere and newer GPUs."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ------------------------------------------------------------------ passes and threads

# Other programs keeping this many cores busy make a run time its pass on one thread too.
BUSY_CORES = 0.5


@dataclass
class PassTimes:
    """What time_passes measured: seconds of an evaluation batch and of a training pass;
    the cores other programs kept busy meanwhile (None without /proc/stat); and the
    thread count timed against where the other was chosen (0: the count did not change)."""

    batch_s: float
    pass_s: float
    busy_cores: Optional[float]
    timed_against: int = 0


def time_passes(
    model: torch.nn.Module,
    eval_loss: Callable,
    training_loss: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    policy: PrecisionPolicy,
    device: torch.device,
) -> PassTimes:
    """Time one evaluation batch (eval_loss(x, y), model in eval mode) and one training pass
    (training_loss(x, y) and its backward, no optimiser step): each the faster of two, as the
    first may pay one-off costs (a compilation with --compile). On a CPU whose threads are
    smolgpt's to choose (may_choose_threads) and that other programs keep busy
    (BUSY_CORES), the training pass is timed on one thread too, and the faster count is
    kept: there, short operations can spend more time waiting for a second thread to be
    scheduled than they save. (Not on a quiet CPU: changing the count and back leaves
    OpenMP's threads some 15% slower.) The training pass runs with torch's RNG forked for
    its dropout and leaves no gradient behind: nothing a checkpoint holds changes."""

    def timed(run: Callable[[], torch.Tensor]) -> float:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            run().item()  # waits for the device
            times.append(time.perf_counter() - start)
        return min(times)

    def forward() -> torch.Tensor:
        with torch.no_grad(), policy.autocast():
            return eval_loss(x, y)

    def forward_backward() -> torch.Tensor:
        with policy.autocast():
            loss = training_loss(x, y)
        loss.backward()
        return loss.detach()

    model.eval()
    try:
        batch_s = timed(forward)
    finally:
        model.train()
    # The other programs' load is measured only where it may change the thread count: the
    # measurement lengthens start-up to OtherLoad.MIN_SECONDS.
    load = OtherLoad() if may_choose_threads(device) else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with load or contextlib.nullcontext():
            pass_s = timed(forward_backward)
        times = PassTimes(batch_s, pass_s, load.cores if load is not None else None)
        if times.busy_cores is not None and times.busy_cores >= BUSY_CORES:
            times = _faster_on_one_thread(times, lambda: timed(forward_backward))
    model.zero_grad(set_to_none=True)
    return times


def _faster_on_one_thread(times: PassTimes, time_pass: Callable[[], float]) -> PassTimes:
    """Time the training pass on one thread too, and keep whichever count was faster (the
    evaluation batch is not timed again: scaled as the pass was)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one_s = time_pass()
    if one_s < times.pass_s:
        return PassTimes(times.batch_s * one_s / times.pass_s, one_s, times.busy_cores, threads)
    torch.set_num_threads(threads)
    return times
