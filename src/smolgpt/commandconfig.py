"""The settings of the commands other than ``smolgpt train`` (whose settings are in
``config.py``): sampling (:class:`SampleConfig`, the Python API's and the server's too),
``generate``, ``serve``, ``eval``, ``inspect``, ``plot``, ``export`` and ``info``. The command
line makes each command's flags from its dataclass (positional arguments aside), as it
does train's; see ``settings.py`` for what a field's metadata says.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .errors import SmolGPTError
from .settings import (
    EXPORT_FORMATS,
    GGUF_OUTTYPES,
    PLOT_AXES,
    PLOT_VALUES,
    QUANTIZE_HELP,
    check_fields,
    device_setting,
    encoding_setting,
    opt,
    quantize_setting,
)


@dataclass
class SampleConfig:
    """How to sample a continuation; names and defaults follow Hugging Face ``generate``
    where one exists, except the defaults of temperature and top_k, which suit small models.
    The filters apply in transformers' order: repetition penalty, temperature, top-k, top-p,
    min-p."""

    max_new_tokens: int = opt(
        100, "tokens (words or characters) to generate", "sampling", minimum=0
    )
    temperature: float = opt(
        0.8,
        "sampling temperature; 0 means greedy decoding (always the most likely token)",
        "sampling",
        minimum=0,
        note="(0 means greedy)",
    )
    top_k: int = opt(
        50,
        "sample only from the k most likely tokens (0 disables)",
        "sampling",
        minimum=0,
        note="(0 disables it)",
    )
    top_p: float = opt(
        1.0,
        "nucleus sampling: smallest set of tokens with this much probability",
        "sampling",
        interval="(0, 1]",
    )
    min_p: float = opt(
        0.0,
        "drop tokens less likely than min_p times the most likely one (0 disables)",
        "sampling",
        interval="[0, 1]",
        note="(0 disables it)",
    )
    repetition_penalty: float = opt(
        1.0,
        "divide the scores of tokens already in the text by this (CTRL's penalty, as in "
        "transformers; 1 disables, >1 repeats less)",
        "sampling",
        positive=True,
    )
    stop: tuple[str, ...] = opt(
        (),
        "stop at any of these strings (not printed); on the command line \\n and \\t "
        "mean a line break and a tab",
        "sampling",
        shown="none",
    )
    num_samples: int = opt(
        1, "independent continuations to generate, as one batch", "sampling", positive=True
    )
    seed: int = opt(1337, "random seed; the same seed gives the same text", "sampling")

    def __post_init__(self) -> None:
        check_fields(self, SampleConfig)
        if isinstance(self.stop, str):  # one string given where a list is expected
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise SmolGPTError(f"--stop strings must be non-empty text, got {list(self.stop)!r}")


@dataclass
class GenerateConfig(SampleConfig):
    """``smolgpt generate``: the sampling settings, plus what to continue, where to write it
    and where to run."""

    prompt: Optional[str] = opt(
        None,
        "text to continue",
        "input",
        shown="a line break at char and bpe level, the most frequent word at word level",
    )
    prompt_file: Optional[str] = opt(None, "read the text to continue from this file", "input")
    interactive: bool = opt(
        False,
        "a prompt loop that keeps the model loaded: type a prompt, "
        "see its continuation; a blank line or Ctrl-D quits, Ctrl-C stops "
        "one generation",
        "input",
    )
    out: Optional[str] = opt(
        None, "write the text to this file (atomically) instead of stdout", "output"
    )
    device: str = device_setting()
    quantize: str = quantize_setting()

    def __post_init__(self) -> None:
        check_fields(self, GenerateConfig)
        if self.prompt is not None and self.prompt_file is not None:
            raise SmolGPTError("give --prompt or --prompt_file, not both")
        if self.interactive and (
            self.prompt is not None or self.prompt_file is not None or self.out is not None
        ):
            raise SmolGPTError(
                "--interactive reads its prompts from the terminal: drop "
                "--prompt, --prompt_file and --out"
            )
        super().__post_init__()

    def sampling(self) -> SampleConfig:
        """The sampling settings alone."""
        return SampleConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(SampleConfig)}
        )


@dataclass
class ServeConfig:
    """``smolgpt serve``: where the server listens and the limits that keep a shared server
    alive. A request's sampling settings come in the request, with SampleConfig's defaults."""

    host: str = opt(
        "127.0.0.1",
        "address to listen on; 127.0.0.1 is this computer only, "
        "0.0.0.0 every network it is on (see the serving guide)",
        "server",
    )
    port: int = opt(8000, "port to listen on (0: any free port)", "server")
    api_key: Optional[str] = opt(
        None,
        "require this key from clients (Authorization: Bearer KEY); the environment "
        "variable SMOLGPT_API_KEY sets it too, out of sight of other users' ps",
        "server",
        shown="unset: no key",
    )
    max_prompt_chars: int = opt(
        20000, "longest prompt accepted, in characters", "limits", positive=True
    )
    max_tokens: int = opt(
        2000, "most tokens one completion may ask for (max_tokens)", "limits", positive=True
    )
    max_n: int = opt(
        8, "most completions one request may ask for (n times prompts)", "limits", positive=True
    )
    timeout: float = opt(
        120.0,
        "seconds a request may take, waiting included, before it is ended with status 504",
        "limits",
        positive=True,
    )
    parallel: int = opt(
        4, "requests generated at once, taking turns token by token", "limits", positive=True
    )
    queue: int = opt(
        16, "requests that may wait for a turn; more are answered 503 (busy)", "limits", minimum=0
    )
    device: str = device_setting()
    quantize: str = quantize_setting()

    def __post_init__(self) -> None:
        check_fields(self, ServeConfig)
        if (
            isinstance(self.port, bool)
            or not isinstance(self.port, int)
            or not 0 <= self.port <= 65535
        ):
            raise SmolGPTError(f"--port must be 0 to 65535, got {self.port!r}")
        if not self.host:
            raise SmolGPTError("--host is empty: give an address such as 127.0.0.1")
        if self.api_key is not None and not self.api_key.strip():
            raise SmolGPTError("--api_key is empty: give a key, or leave it out")


@dataclass
class EvalConfig:
    """``smolgpt eval``: what to score the model on, and how."""

    data: Optional[str] = opt(
        None,
        "the text to score, as train's --data takes it (a file, a directory of .txt files, "
        "a built-in corpus, a URL)",
        "options",
        shown="the model's validation split",
    )
    encoding: str = encoding_setting("options")
    json: bool = opt(
        False,
        "print one JSON object (loss, perplexity, bits_per_char, tokens, chars, unk_tokens) "
        "instead of a table",
        "options",
    )
    batch_size: int = opt(8, "windows scored at a time", "options", positive=True)
    device: str = device_setting("options")
    quantize: str = quantize_setting(
        "options", QUANTIZE_HELP + "; scored with and without it, a text shows what int8 costs"
    )

    def __post_init__(self) -> None:
        check_fields(self, EvalConfig)


@dataclass
class InspectConfig:
    """``smolgpt inspect``: where to draw, and from what text."""

    out: Optional[str] = opt(
        None,
        "the directory to draw into",
        "options",
        shown="inspect/ beside the checkpoint, or inside a run or export directory",
    )
    prompt: Optional[str] = opt(
        None,
        "the text whose attention is drawn, at most block_size tokens",
        "options",
        shown="the first 24 tokens of the text",
        escapes=True,
    )
    data: Optional[str] = opt(
        None,
        "the text whose loss per position is drawn, as train's --data takes it",
        "options",
        shown="the model's validation split",
    )
    encoding: str = encoding_setting("options")
    device: str = device_setting("options")

    def __post_init__(self) -> None:
        check_fields(self, InspectConfig)


@dataclass
class PlotConfig:
    """``smolgpt plot``: the picture of the runs' curves."""

    out: str = opt("loss_curves.png", "the PNG to write", "options")
    x: str = opt(
        "iter",
        "draw against iterations, wall time or training tokens",
        "options",
        choices=PLOT_AXES,
    )
    y: Optional[str] = opt(
        None,
        "draw val loss in nats per token, or val bits per character, which compares runs of "
        "different levels",
        "options",
        choices=PLOT_VALUES,
        shown="bits_per_char where the runs' levels or vocabularies differ, else loss",
    )
    ylim: Optional[tuple[float, float]] = opt(
        None,
        "the range of --y shown",
        "options",
        shown="all of it",
        argparse={"metavar": ("LOW", "HIGH")},
    )
    title: Optional[str] = opt(None, "a heading for the picture", "options", shown="none")

    def __post_init__(self) -> None:
        check_fields(self, PlotConfig)
        if self.ylim is not None:
            self.ylim = tuple(self.ylim)


@dataclass
class ExportConfig:
    """``smolgpt export``: the format to write."""

    format: str = opt(
        dataclasses.MISSING,
        "hf: a transformers model and tokenizer; safetensors: smolgpt's weights and "
        "settings, without pickle; gguf: one file for llama.cpp, Ollama and LM Studio",
        "options",
        choices=EXPORT_FORMATS,
    )
    outtype: str = opt(
        "f32",
        "gguf: the weight matrices in float32, float16, or llama.cpp's 8-bit q8_0",
        "options",
        choices=GGUF_OUTTYPES,
    )
    overwrite: bool = opt(
        False, "replace the output if it is an earlier export (of the same format)", "options"
    )

    def __post_init__(self) -> None:
        check_fields(self, ExportConfig)
        if self.outtype != "f32" and self.format != "gguf":
            raise SmolGPTError(
                f"--outtype is for --format gguf; {self.format} exports keep float32 weights"
            )


@dataclass
class InfoConfig:
    """``smolgpt info``: how to print the description."""

    json: bool = opt(False, "print one JSON object instead of key: value lines", "options")
