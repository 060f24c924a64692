"""int8 weights (quantize.py, --quantize int8): which matrices become int8, how close their
logits stay to float32's, generation with the KV cache and streaming, evaluation, and the
commands generate, eval and serve with the flag, in real processes.

The tolerances were measured: the relative error |int8 - float32| / |float32| over all the
logits, and the KL divergence of int8's next-token distribution from float32's, averaged
over positions. On 3 random sequences: the tiny random models 0.011 to 0.012 and under 1e-5;
the scaled-up random models of e2e_sharp_model 0.023 and 4e-4; a micro model trained for two
minutes on tinyshakespeare 0.029 and 0.003. On its first validation window, the char model
smol_runs trains: 0.002 and 3e-6. The bounds below leave a factor of two or more.
"""

from __future__ import annotations

import copy
import json
import signal
import urllib.request

import pytest
import torch
import torch.nn as nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
from torch.nn import functional as F

import smolgpt
from smolgpt import kernels
from smolgpt.config import ModelConfig, SampleConfig
from smolgpt.errors import SmolGPTError
from smolgpt.model import GPT, KVCache
from smolgpt.quantize import INT8_MIN_WEIGHTS, to_int8
from smolgpt.sampling import generate

from e2e import e2e_sharp_model, names

RELATIVE_ERROR = 0.06  # |int8 logits - float32 logits| / |float32 logits|
MEAN_KL = 0.01  # nats: KL(float32's next-token distribution || int8's), averaged


def quantized_copy(model):
    """A float32 model with the fast kernels, as smolgpt.load gives it, and its int8 copy."""
    model = kernels.use_fast_kernels(model.eval())
    return model, to_int8(copy.deepcopy(model), min_weights=0)


def relative_error(ref: torch.Tensor, other: torch.Tensor) -> float:
    return ((other - ref).norm() / ref.norm()).item()


def mean_kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    """KL(softmax(ref) || softmax(other)) per position, averaged."""
    p, q = ref.log_softmax(-1), other.log_softmax(-1)
    return F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean().item()


def assert_close_logits(ref: torch.Tensor, other: torch.Tensor) -> None:
    """int8's logits near float32's, and not equal to them: int8 did change the numbers."""
    error = relative_error(ref, other)
    assert 0 < error < RELATIVE_ERROR, error
    assert mean_kl(ref, other) < MEAN_KL, mean_kl(ref, other)


# ------------------------------------------------------------------ the module itself


def test_the_blocks_matrices_and_the_head_become_int8(tiny_model):
    embedding = tiny_model.wte.weight.detach().clone()
    _, q = quantized_copy(tiny_model)
    int8 = {name for name, m in q.named_modules() if isinstance(m, Int8Linear)}
    expected = {
        f"blocks.{i}.{part}"
        for i in range(q.config.n_layer)
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert int8 == expected | {"lm_head"}
    assert not [m for m in q.modules() if type(m) is nn.Linear]  # no float matrix left
    for name in int8:
        weight = q.get_submodule(name).weight()
        assert weight.dtype == torch.qint8
        assert weight.qscheme() == torch.per_channel_affine  # a scale per output row
        assert weight.q_per_channel_scales().shape == (weight.size(0),)
    # Embeddings and norms stay float32; the tied embedding is not changed by its int8 copy.
    assert type(q.wte) is nn.Embedding and q.wte.weight.dtype == torch.float32
    assert torch.equal(q.wte.weight, embedding)
    assert all(
        type(b.ln_1) is nn.LayerNorm and b.ln_1.weight.dtype == torch.float32 for b in q.blocks
    )


@pytest.mark.parametrize("sharp", [False, True], ids=["initialised", "scaled-up"])
def test_logits_stay_close_to_float32(tiny_config, sharp):
    torch.manual_seed(0)
    if sharp:
        model = e2e_sharp_model(tiny_config.vocab_size, tiny_config.position, block_size=32)
    else:
        model = GPT(tiny_config)
    model, q = quantized_copy(model)
    idx = torch.randint(model.config.vocab_size, (3, model.config.block_size))
    with torch.no_grad():
        assert_close_logits(model(idx)[0], q(idx)[0])


def test_the_kv_cache_steps_match_a_full_forward(tiny_model):
    """Step by step with the cache, int8 gives the logits of one forward pass over the whole
    sequence, to int8's rounding (the activations are quantised per call: not exactly)."""
    _, q = quantized_copy(tiny_model)
    T = q.config.block_size
    idx = torch.randint(q.config.vocab_size, (2, T))
    with torch.no_grad():
        full = q(idx)[0]
        cache = KVCache(q.config)
        steps = [q(idx[:, :4], cache=cache)[0]]
        steps += [q(idx[:, t : t + 1], cache=cache)[0] for t in range(4, T)]
    assert relative_error(full, torch.cat(steps, dim=1)) < RELATIVE_ERROR


def test_generation_runs_past_the_context(tiny_model):
    """With the cache, then the sliding window past block_size: every token in the vocabulary."""
    _, q = quantized_copy(tiny_model)
    settings = SampleConfig(max_new_tokens=3 * q.config.block_size, num_samples=2)
    rows = generate(q, [1, 2, 3], settings)
    assert [len(r) for r in rows] == [settings.max_new_tokens] * 2
    assert all(0 <= t < q.config.vocab_size for r in rows for t in r)
    assert rows == generate(q, [1, 2, 3], settings)  # the same seed, the same tokens


def test_matrices_too_small_to_gain_stay_float32(tiny_model):
    """By default only matrices of INT8_MIN_WEIGHTS weights and more become int8: a model
    whose matrices are all smaller runs in float32 as it was."""
    model = kernels.use_fast_kernels(copy.deepcopy(tiny_model).eval())
    assert max(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) < (
        INT8_MIN_WEIGHTS
    )
    assert to_int8(model) is model
    assert not [m for m in model.modules() if isinstance(m, Int8Linear)]
    wide = GPT(ModelConfig(vocab_size=65, block_size=16, n_layer=1, n_head=4, n_embd=320))
    to_int8(wide.eval())
    int8 = {name for name, m in wide.named_modules() if isinstance(m, Int8Linear)}
    # c_attn (320 x 960) and the MLP's c_fc and c_proj (320 x 1280) pass the line; attention's
    # c_proj (320 x 320) and the head (65 x 320) do not.
    expected = {
        name
        for name, m in GPT(wide.config).named_modules()
        if isinstance(m, nn.Linear) and m.weight.numel() >= INT8_MIN_WEIGHTS
    }
    assert int8 == expected == {"blocks.0.attn.c_attn", "blocks.0.mlp.c_fc", "blocks.0.mlp.c_proj"}


@pytest.fixture(scope="module")
def wide_run(smol_cli, tmp_path_factory):
    """A char model wide enough (320) for int8 to apply to three of its block's matrices,
    trained a few steps."""
    out = tmp_path_factory.mktemp("int8") / "wide"
    args = smol_cli.train_args("char", out, "--max_iters", "10")
    args += ["--n_embd", "320", "--n_head", "4"]  # (the last flag wins)
    result = smol_cli.run("train", *args)
    assert result.returncode == 0, result.describe()
    return out


# ------------------------------------------------------------------ the Python API


@pytest.mark.slow
def test_load_int8_generates_streams_and_evaluates(wide_run):
    run = wide_run
    ref, q = smolgpt.load(run, device="cpu"), smolgpt.load(run, quantize="int8")
    assert q.quantize == "int8" and q.device == torch.device("cpu")
    assert isinstance(q.module.blocks[0].mlp.c_fc, Int8Linear)
    assert q.parameter_count == ref.parameter_count == ref.module.num_parameters()
    text = q.validation_text()[0]
    ids = torch.tensor([q.tokenizer.encode(text)[: q.config.block_size]])
    with torch.no_grad():
        assert_close_logits(ref.module(ids)[0], q.module(ids)[0])
    text = q.generate("the ", max_new_tokens=40, temperature=0)
    assert text.startswith("the ") and len(text) > len("the ")
    assert "".join(q.stream("the ", max_new_tokens=40, temperature=0)) == text
    assert len(q.generate(max_new_tokens=10, num_samples=3)) == 3
    # Scoring the validation text: int8 costs a little, measured in bits per character.
    bits, bits_int8 = ref.evaluate().bits_per_char, q.evaluate().bits_per_char
    assert bits_int8 != bits and abs(bits_int8 - bits) < 0.05 * bits
    with pytest.raises(SmolGPTError, match=names("int8", "without quantize")):
        q.export(run.parent / "export", "safetensors")


def test_load_refuses_what_int8_cannot_do(tmp_path):
    """Checked before the path is read: no checkpoint is needed to be refused."""
    missing = tmp_path / "model.pth"
    with pytest.raises(SmolGPTError, match=names("quantize", "int4", "none", "int8")):
        smolgpt.load(missing, quantize="int4")
    for device in ("cuda", "mps"):  # whether or not this machine has one
        with pytest.raises(SmolGPTError, match=names("--quantize int8", device, "--device cpu")):
            smolgpt.load(missing, device=device, quantize="int8")


# ------------------------------------------------------------------ the commands


@pytest.mark.slow
def test_generate_and_eval_commands_with_int8(smol_cli, wide_run):
    run = wide_run
    generated, scored, float32, refused = smol_cli.run_many(
        [
            ("module", ["generate", run, "--quantize", "int8", "--max_new_tokens", "30"]),
            ("module", ["eval", run, "--quantize", "int8", "--json"]),
            ("module", ["eval", run, "--json"]),
            ("module", ["generate", run, "--quantize", "int8", "--device", "cuda"]),
        ]
    )
    assert generated.returncode == 0, generated.describe()
    assert generated.stdout.strip() and "tokens/s" in generated.stderr
    assert "Warning" not in generated.stderr  # torch.ao's deprecation warnings are not shown
    assert scored.returncode == 0 and float32.returncode == 0, scored.describe()
    bits = json.loads(float32.stdout)["bits_per_char"]
    assert abs(json.loads(scored.stdout)["bits_per_char"] - bits) < 0.05 * bits
    smol_cli.assert_one_line_error(refused, "--quantize int8", "cuda")


@pytest.mark.slow
def test_serve_with_int8_answers_a_completion(smol_cli, wide_run):
    run = wide_run
    server = smol_cli.popen("module", "serve", run, "--quantize", "int8", "--port", "0")
    try:
        url = smol_cli.server_url(server)
        body = json.dumps({"model": "wide", "prompt": "the ", "max_tokens": 20}).encode()
        request = urllib.request.Request(
            url + "v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert answer["usage"]["completion_tokens"] == 20
        assert answer["choices"][0]["text"]
        with urllib.request.urlopen(url + "v1/models", timeout=60) as response:
            (model,) = json.loads(response.read())["data"]
        # The parameters of the model as trained, int8 matrices included.
        assert model["parameters"] == smolgpt.load(run, device="cpu").parameter_count
    finally:
        server.send_signal(signal.SIGTERM)
        result = server.wait(timeout=60)
    assert "Traceback" not in result.stderr, result.describe()
