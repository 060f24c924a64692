"""smolgpt: a small GPT-2-style language model to train on your own text and sample from.

The API::

    smolgpt.train(**settings) -> TrainResult     train, as `smolgpt train` does
    smolgpt.load(path, device="auto") -> Model   a checkpoint, ready to .generate(prompt)
    smolgpt.info(path) -> dict                   what a checkpoint or run holds (smolgpt info)
    smolgpt.serve(checkpoints, **settings)       an OpenAI-style HTTP server (smolgpt serve)

Modules, in the order data flows through them: config -> sources -> tokenizer -> tokencache
(with tokendata) -> batches -> model (with kernels) -> optim, training (with runlog) ->
checkpoint -> sampling, and api, runinfo, inspection, server and cli on top.
``import smolgpt`` is cheap: torch is imported when train or load is first used.
"""

import os
import sys
from typing import Any

# Compute threads that spin only briefly when they wait between parallel operations. OpenMP
# (libgomp) keeps a finished thread spinning 300,000 times in case more work comes: on a
# CPU that other programs share, the spinning thread takes the core its partner needs, and
# training can collapse (1 step where a quiet run made ~200, beside two busy loops on 2
# cores). 10,000 spins keep a quiet CPU's speed; no spinning at all (OMP_WAIT_POLICY=
# PASSIVE) costs a third of it with small models (benchmarks/busy_cpu.py). OpenMP reads the
# setting once, when torch loads it: hence here, before anything of smolgpt imports torch.
# A setting of the user's own wins.
SPIN_COUNT = "10000"
WAIT_POLICY_IN_TIME = "torch" not in sys.modules
if not any(name in os.environ for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")):
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT

from .config import (  # noqa: E402 - after the spin count above
    GenerateConfig,
    ModelConfig,
    SampleConfig,
    ServeConfig,
    TrainConfig,
)
from .errors import SmolGPTError  # noqa: E402

__version__ = "0.12.0"
__all__ = [
    "train",
    "load",
    "info",
    "serve",
    "TrainResult",
    "Model",
    "TrainConfig",
    "ModelConfig",
    "SampleConfig",
    "GenerateConfig",
    "ServeConfig",
    "SmolGPTError",
    "__version__",
]

_FROM_API = ("train", "load", "TrainResult", "Model")


def __getattr__(name: str) -> Any:
    # PEP 562: the API (and torch with it) is imported on first use, not with the package.
    if name in _FROM_API:
        from . import api

        return getattr(api, name)
    if name == "info":  # `smolgpt info`, in runinfo.py (a module named info would shadow it)
        from .runinfo import describe

        return describe
    if name == "serve":
        from .server import serve

        return serve
    raise AttributeError(f"module 'smolgpt' has no attribute {name!r}")
