"""int8 weights for generation on a CPU: ``--quantize int8`` of ``smolgpt generate``, ``serve``
and ``eval``, and ``smolgpt.load(..., quantize="int8")``.

What it does: dynamic quantisation. Each weight matrix W (out x in) is stored as 8-bit
integers with one float scale per output row: row i becomes round(W[i] / s_i), with
s_i = max|W[i]| / 127, so that s_i times the integers gives W[i] back to within half a step.
The activations are quantised on the fly ("dynamic"): at every call the input x is mapped to
8-bit integers with a scale taken from its own range, the product is made in integers
(summed in int32), scaled back to float32, and the bias is added in float32.

Why it helps a CPU: a generation step with the KV cache multiplies one new token's vector by
every matrix of the model, two operations per weight read, so the step waits on memory, not
on arithmetic. int8 weights are 4x fewer bytes to read than float32's. That pays once the
weights no longer fit in the CPU's caches (the tiny preset's 43 MB, and up); a model of a few
MB (nano, micro) is read from cache anyway, and there quantising the activations at every
call makes int8 slower than float32 (benchmarks/generation.py measures both).

What it costs: rounding. Every weight and activation is off by up to half a step, so the
logits move a little: sampled text, and even greedy text (where two tokens were nearly tied),
can differ from float32's; ``smolgpt eval --quantize int8`` measures the cost in bits per
character. One call's activations share one scale, so the rows of a batch (num_samples) and
the positions of a prompt are rounded together: a sample can depend on the others in its
batch, and a step with the KV cache is rounded differently from the same step recomputed.

What is quantised: the linear layers of the blocks (attention's c_attn and c_proj, the MLP's
c_fc and c_proj) and the output head, each one that holds at least INT8_MIN_WEIGHTS weights.
A smaller matrix stays float32: quantising the activations costs about as much as a small
float32 product (a matrix-vector product of 128 x 512 weights: 13 us in float32, 25 us in
int8; 384 x 1536: 75 us against 27 us; 2-core AMD EPYC, AVX-512 BF16, torch 2.13), so for
the nano and micro presets int8 changes nothing. Not the embeddings (a lookup reads one row
per token: nothing to save), the LayerNorms or the biases (few numbers). A head tied to the token
embedding gets an int8 copy of it; the embedding itself stays float32. The int8 matrices are
buffers of the quantised modules, no longer parameters: count a model's parameters before.
"""

from __future__ import annotations

import importlib
import logging
import warnings

import torch
import torch.nn as nn

from .errors import SmolGPTError
from .model import GPT

log = logging.getLogger(__name__)

# Matrices with fewer weights stay float32 (see the module docstring). One matrix-vector
# product in int8 against float32, batch 1, on the CPU above, crosses over near 150,000
# weights (128 x 512: 0.5x, 192 x 768: 1.0x, 256 x 1024: 1.4x); in a whole generation step
# (batch 1 and 8) the tiny shape's 384 x 384 matrices gain too (new tokens/s with this line
# at 2^17 against 200,000: 454 against 388 at batch 1, 1,548 against 1,411 at batch 8), and
# micro's (128 wide) lose (761 against 1,153 in float32 at batch 1).
INT8_MIN_WEIGHTS = 1 << 17  # 131,072


def int8_device(device: str) -> str:
    """The device int8 weights run on, given --device: the CPU ("auto" picks it). A
    SmolGPTError, in one line, where they cannot run: a GPU named, or a PyTorch without int8
    CPU kernels. Asked before a model is read."""
    if device not in ("auto", "cpu"):
        raise SmolGPTError(
            f"--quantize int8 runs on a CPU only, not --device {device}: use --device cpu, "
            "or leave --quantize out to run in float32 on the GPU"
        )
    if torch.backends.quantized.engine == "none":
        raise SmolGPTError(
            f"--quantize int8 is not available: this PyTorch ({torch.__version__}) has no "
            "quantized CPU engine (fbgemm, x86 or qnnpack); leave --quantize out"
        )
    try:  # deprecated: a later torch may lack it
        importlib.import_module("torch.ao.quantization")
    except ImportError:
        raise SmolGPTError(
            f"--quantize int8 is not available: this PyTorch ({torch.__version__}) has no "
            "torch.ao.quantization; leave --quantize out, or use torch 2.13"
        ) from None
    return "cpu"


def to_int8(model: GPT, min_weights: int = INT8_MIN_WEIGHTS) -> GPT:
    """model (in eval mode, on the CPU) with the blocks' linear layers and the output head
    of at least min_weights weights replaced, in place, by int8 dynamically quantised ones
    (see the module docstring); returns it. Embeddings, LayerNorms and attention are left as
    they are, and forward, the KV cache and generation work as before."""
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    # PyTorch's own dynamic quantisation (fbgemm / x86 kernels, qnnpack on ARM), not torchao's
    # int8 configs. Measured on a 2-core AMD EPYC with AVX-512 BF16, torch 2.13, the tiny
    # shape (6 layers x 384, context 128) generating at batch 1 with the KV cache: float32
    # 187 new tokens/s; quantize_dynamic 496 (a scale per row; 530 with one per matrix);
    # torchao 0.18's Int8WeightOnlyConfig 186 and Int8DynamicActivationInt8WeightConfig 91,
    # without torch.compile, which a user's generate does not run. torchao would also be one
    # more dependency. torch.ao.quantization warns that it is deprecated in favour of torchao:
    # the warnings are silenced here (a user can do nothing about them), and int8_device
    # refuses in one line on a torch that no longer has it.
    per_row = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.split(".")[0] in ("blocks", "lm_head")
        and module.weight.numel() >= min_weights
    }
    if not per_row:
        log.info(
            "--quantize int8: every matrix of this model has fewer than %d weights, and is "
            "faster in float32: it runs in float32",
            min_weights,
        )
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
        return quantize_dynamic(
            model, per_row, dtype=torch.qint8, mapping={nn.Linear: Int8Linear}, inplace=True
        )
