"""The precision policy: decided from what the hardware is (CPU flags, CUDA capability), and
followed by every matrix product of training, evaluation and generation.

The product checks watch the real aten operations with a TorchDispatchMode, so they hold on
whichever CPU runs them: SMOLGPT_CPU_BF16 forces each CPU kind's path.
"""

import json
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smolgpt import hardware, sources, tokencache
from smolgpt.config import SampleConfig, resolve_train_config
from smolgpt.errors import SmolGPTError
from smolgpt.sampling import generate
from smolgpt.training import Trainer

from e2e import names

# Abridged /proc/cpuinfo texts of each CPU kind (one processor each; real files repeat the
# block per core). The flags are the real ones of these CPUs, shortened.
ZEN2_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni clwb
"""
ZEN4_AVX512_BF16 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse sse2 avx f16c avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni
"""
SAPPHIRE_RAPIDS_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
AMX_ONLY = """model name\t: Hypothetical CPU
flags\t\t: sse2 avx avx2 avx512f amx_bf16 amx_tile
"""
GRAVITON3_BF16 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sve asimdfhm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""
GRAVITON2_NO_BF16 = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""


@pytest.mark.parametrize(
    "text, arch, native, flags",
    [
        (ZEN2_AVX2, "x86_64", False, ("avx2",)),
        (ZEN4_AVX512_BF16, "x86_64", True, ("avx2", "avx512f", "avx512_bf16")),
        (SAPPHIRE_RAPIDS_AMX, "x86_64", True, ("avx2", "avx512f", "avx512_bf16", "amx_bf16")),
        (AMX_ONLY, "x86_64", True, ("avx2", "avx512f", "amx_bf16")),
        (GRAVITON3_BF16, "aarch64", True, ("asimd", "bf16")),
        (GRAVITON2_NO_BF16, "aarch64", False, ("asimd",)),
        ("", "x86_64", False, ()),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(text, arch, native, flags):
    cpu = hardware.parse_cpuinfo(text, arch)
    assert cpu.native_bf16 is native
    assert cpu.flags == flags
    policy = hardware.cpu_policy(cpu)
    assert policy.reduced == (torch.bfloat16 if native else None)
    assert policy.muon_dtype == (torch.bfloat16 if native else torch.float32)
    assert policy.grad_scaler() is None


def test_the_policy_says_why():
    zen2 = hardware.parse_cpuinfo(ZEN2_AVX2, "x86_64")
    assert zen2.model == "AMD EPYC 7B12"
    assert "avx2" in zen2.describe() and "no native bf16" in zen2.describe()
    assert hardware.cpu_policy(zen2).describe().startswith("float32")
    assert "emulated" in hardware.cpu_policy(zen2).describe()
    amx = hardware.cpu_policy(hardware.parse_cpuinfo(SAPPHIRE_RAPIDS_AMX, "x86_64"))
    assert amx.describe().startswith("bfloat16") and "AVX512_BF16" in amx.describe()
    assert "AMX_BF16" in amx.describe()  # every flag that decided it
    arm = hardware.cpu_policy(hardware.parse_cpuinfo(GRAVITON3_BF16, "aarch64"))
    assert "BF16 extension" in arm.describe()


def test_no_amp_means_float32_everywhere():
    for policy in (
        hardware.cpu_policy(hardware.parse_cpuinfo(ZEN4_AVX512_BF16, "x86_64"), amp=False),
        hardware.cuda_policy((9, 0), amp=False),
    ):
        assert policy.reduced is None and policy.muon_dtype == torch.float32
        assert "--no-amp" in policy.describe()


def test_the_environment_forces_either_cpu_kind():
    zen2 = hardware.parse_cpuinfo(ZEN2_AVX2, "x86_64")
    zen4 = hardware.parse_cpuinfo(ZEN4_AVX512_BF16, "x86_64")
    assert hardware.cpu_policy(zen2, forced="1").reduced == torch.bfloat16
    assert hardware.cpu_policy(zen4, forced="0").reduced is None
    assert "SMOLGPT_CPU_BF16=1" in hardware.cpu_policy(zen2, forced="1").describe()
    with pytest.raises(SmolGPTError, match=names("SMOLGPT_CPU_BF16", "'yes'")):
        hardware.cpu_policy(zen2, forced="yes")


@pytest.mark.parametrize(
    "capability, reduced",
    [
        ((6, 1), None),  # Pascal (GTX 10xx): no tensor cores
        ((7, 0), torch.float16),  # V100
        ((7, 5), torch.float16),  # T4: the original project's GPU, bf16 emulated
        ((8, 0), torch.bfloat16),  # A100
        ((8, 9), torch.bfloat16),  # L4
        ((9, 0), torch.bfloat16),  # H100
    ],
)
def test_cuda_policy_follows_the_compute_capability(capability, reduced):
    policy = hardware.cuda_policy(capability)
    assert policy.reduced == reduced
    with warnings.catch_warnings():  # "CUDA is not available": the scaler is built all the same
        warnings.simplefilter("ignore", UserWarning)
        assert (policy.grad_scaler() is not None) is (reduced == torch.float16)
    # Muon's iteration: bf16 where native, never fp16 (its range is too narrow).
    assert policy.muon_dtype == (torch.bfloat16 if reduced == torch.bfloat16 else torch.float32)
    assert f"{capability[0]}.{capability[1]}" in policy.describe()


def test_the_environment_makes_a_gpu_follow_another_compute_capability():
    """SMOLGPT_CUDA_CAPABILITY=7.5 gives an H100 a T4's policy: fp16 with a gradient
    scaler, Muon in float32; the reason names the variable."""
    t4_path = hardware.cuda_policy((9, 0), forced="7.5")
    assert t4_path.reduced == torch.float16 and t4_path.muon_dtype == torch.float32
    assert "compute capability 7.5 (SMOLGPT_CUDA_CAPABILITY=7.5)" in t4_path.describe()
    assert hardware.cuda_policy((7, 5), forced="9.0").reduced == torch.bfloat16
    assert hardware.cuda_policy((9, 0), amp=False, forced="7.5").reduced is None
    for wrong in ("7", "t4", "7.x", ""):
        with pytest.raises(SmolGPTError, match=names("SMOLGPT_CUDA_CAPABILITY", repr(wrong))):
            hardware.cuda_policy((9, 0), forced=wrong)


def test_mps_and_unknown_devices_stay_in_float32():
    assert hardware.precision_policy(torch.device("meta")).reduced is None


def test_benchmark_records_name_the_hardware():
    cpu = torch.device("cpu")
    info = hardware.describe_hardware(cpu, hardware.precision_policy(cpu))
    assert info["cpu"] == hardware.cpu_info().describe()
    assert set(info) >= {"cpu_model", "cpu_flags", "cpu_native_bf16", "policy", "torch"}
    assert info["policy"] == hardware.precision_policy(cpu).describe()


# ------------------------------------------------------------------- products, watched

_PRODUCTS = ("mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "linear", "dot")


class ProductDtypes(TorchDispatchMode):
    """Records the dtypes of the floating-point inputs of every matrix product and every
    attention kernel (forward and backward) dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]  # "addmm.default" -> "addmm"
        if name in _PRODUCTS or "scaled_dot_product" in name:
            for a in args:
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    self.seen.append((name, a.dtype))
        return func(*args, **(kwargs or {}))

    def dtypes(self) -> set:
        return {dtype for _, dtype in self.seen}

    def ops(self) -> set:
        return {name for name, _ in self.seen}


def _trainer(tmp_path, level: str, **overrides) -> Trainer:
    text = "the cat sat on the mat. the dog ran to the cat, and the cat ran away! " * 60
    corpus = sources.Corpus("t", ((tmp_path / "t.txt"),))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    tokens = tokencache.prepare(corpus, level, min_word_freq=1)
    settings = {
        "level": level,
        "preset": "nano",
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 16,
        "block_size": 16,
        "batch_size": 4,
        "eval_iters": 2,
        "dropout": 0.1,
        **overrides,
    }
    trainer = Trainer(
        resolve_train_config(settings), tokens, tmp_path / f"run-{level}", torch.device("cpu")
    )
    if level == "word":  # the chunked head loss, as at a real word-level vocabulary
        trainer.training_loss.chunk_elements = 4 * tokens.tokenizer.vocab_size
        trainer.training_loss.min_chunk_rows = 1
    return trainer


TRAINING_CASES = [
    ("char", {"optimizer": "adamw"}),
    ("char", {"optimizer": "muon"}),
    ("word", {"optimizer": "adamw"}),
    ("word", {"optimizer": "muon", "gradient_accumulation_steps": 2}),
    ("char", {"optimizer": "muon", "gradient_accumulation_steps": 3}),
]


@pytest.mark.parametrize("level, overrides", TRAINING_CASES)
def test_without_native_bf16_no_product_runs_in_reduced_precision(
    tmp_path, monkeypatch, level, overrides
):
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "0")
    trainer = _trainer(tmp_path, level, **overrides)
    assert trainer.precision.reduced is None
    with ProductDtypes() as watch:
        for _ in range(2):  # two steps: Muon's and AdamW's state exist on the second
            trainer.train_step()
        trainer.evaluate()
        generate(trainer.model.eval(), [1, 2, 3], SampleConfig(max_new_tokens=20, top_k=5))
    assert watch.seen, "no matrix product was seen: the watch is broken"
    assert watch.dtypes() == {torch.float32}, sorted(set(watch.seen), key=str)
    assert {"mm", "addmm"} <= watch.ops()
    if overrides["optimizer"] == "muon":
        assert "baddbmm" in watch.ops()  # the Newton-Schulz iteration was watched too
    assert any("scaled_dot_product" in op for op in watch.ops())


@pytest.mark.parametrize("level, overrides", TRAINING_CASES[1:4])
def test_with_native_bf16_the_products_run_in_bf16(tmp_path, monkeypatch, level, overrides):
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "1")
    trainer = _trainer(tmp_path, level, **overrides)
    assert trainer.precision.reduced == torch.bfloat16
    with ProductDtypes() as watch:
        trainer.train_step()
    bf16 = {name for name, dtype in watch.seen if dtype == torch.bfloat16}
    assert {"addmm", "mm"} <= bf16  # the linear layers, forward and backward
    if overrides["optimizer"] == "muon":
        assert "baddbmm" in bf16  # Muon's iteration
    if level == "word":  # the chunked loss's head products
        assert any(dtype == torch.bfloat16 and name == "mm" for name, dtype in watch.seen)


def test_trainer_follows_the_policy_of_no_amp(tmp_path, monkeypatch):
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "1")
    trainer = _trainer(tmp_path, "char", optimizer="muon", amp=False)
    assert trainer.precision.reduced is None
    assert trainer.optimizers[1].ns_dtype == torch.float32
    with ProductDtypes() as watch:
        trainer.train_step()
    assert watch.dtypes() == {torch.float32}


# ------------------------------------------------------------------------- the peak


def test_mfu_is_quoted_against_the_best_peak_measured_on_this_machine(isolated_cache):
    """A peak measured while other work runs comes out low; the roof of every measurement
    kept in the cache is what MFU is quoted against, and it only rises."""
    cpu = torch.device("cpu")
    policy = hardware.precision_policy(cpu)
    measured = hardware.matmul_flops("cpu", policy.reduced or torch.float32)
    peaks = isolated_cache / hardware.PEAKS_FILE
    key = hardware.peak_key(cpu, policy.reduced or torch.float32)

    assert hardware.peak_flops(cpu, policy) == measured  # the first measurement is kept
    assert json.loads(peaks.read_text()) == {key: measured}
    peaks.write_text(json.dumps({key: measured * 10, "another machine": 1.0}))
    assert hardware.peak_flops(cpu, policy) == measured * 10  # a quieter moment, earlier
    peaks.write_text(json.dumps({key: measured / 10, "another machine": 1.0}))
    assert hardware.peak_flops(cpu, policy) == measured  # a busier one: this one wins
    assert json.loads(peaks.read_text()) == {key: measured, "another machine": 1.0}
    peaks.write_text("not json")
    assert hardware.peak_flops(cpu, policy) == measured  # unreadable: measured anew
