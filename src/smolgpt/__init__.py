"""smolgpt: a small GPT-2-style language model to train on your own text and sample from.

The API::

    smolgpt.train(**settings) -> TrainResult     train, as `smolgpt train` does
    smolgpt.load(path, device="auto") -> Model   a checkpoint, ready to .generate(prompt)
    smolgpt.info(path) -> dict                   what a checkpoint or run holds (smolgpt info)
    smolgpt.serve(checkpoints, **settings)       an OpenAI-style HTTP server (smolgpt serve)

Modules, in the order data flows through them: config -> sources -> tokenizer -> tokencache
(with tokendata) -> batches -> model (with kernels) -> optim, training (with runlog) ->
checkpoint -> sampling, and api, runinfo, inspection, server and cli on top; their layers
are drawn in docs/architecture.md.
``import smolgpt`` is cheap: torch is imported when train or load is first used.
"""

from typing import TYPE_CHECKING, Any

from . import openmp  # noqa: F401 - first: before anything imports torch (see there)
from .config import (
    GenerateConfig,
    ModelConfig,
    SampleConfig,
    ServeConfig,
    TrainConfig,
)
from .errors import SmolGPTError
from .version import __version__

if TYPE_CHECKING:
    # What __getattr__ imports on first use, named here for type checkers and for the
    # manual's API reference (which reads the source, not the running module).
    from .api import Model, TrainResult, load, train
    from .runinfo import describe as info
    from .server import serve

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
