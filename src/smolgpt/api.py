"""The Python API: :func:`train` a model, :func:`load` one and generate text from it.

Everything the command line does goes through here (``smolgpt train`` is
``smolgpt.train(**flags)``, ``smolgpt generate`` is ``smolgpt.load(...).generate(...)``), so a
notebook gets the same checks, files and errors as ``train.py``::

    import smolgpt
    result = smolgpt.train(data="my_book.txt", level="char", preset="nano", time_budget=60)
    model = smolgpt.load(result.best_checkpoint)
    print(model.generate("Once upon a time", max_new_tokens=200))

Progress and reports go to the ``smolgpt`` logger. An application that configures logging
decides where they go; otherwise (a script, a notebook) :func:`train` shows them on stderr
while it runs, as the command line does. Mistakes raise
:class:`~smolgpt.errors.SmolGPTError` with a message that says what to change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import torch

from . import (
    distributed,
    finetune,
    hardware,
    sources,
    tokencache,
)
from .config import (
    ExportConfig,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    read_config_file,
    resolve_train_config,
)
from .errors import SmolGPTError
from .files import RunLock, ensure_writable_dir
from .model import GPT
from .rundir import BEST, LATEST, SAMPLES, locate
from .runsetup import colab_run_dir, prepare_run
from .sampling import TextStream
from .settings import QUANTIZE, check_choice
from .tokenizer import Tokenizer
from .training import Trainer

if TYPE_CHECKING:
    from .evaluate import Evaluation
    from .inspection import Inspection

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished training run left behind."""

    out_dir: Path  # the run directory
    iterations: int  # optimiser steps, over every process of the run
    best_val_loss: float
    last_val_loss: float
    elapsed_s: float  # training wall time, over every process of the run

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / BEST

    @property
    def latest_checkpoint(self) -> Path:
        return self.out_dir / LATEST


@contextlib.contextmanager
def _reports_on_stderr():
    """Show smolgpt's progress lines on stderr for the duration of a call, unless the
    application has configured logging itself (a handler on the root or smolgpt logger)."""
    package = logging.getLogger("smolgpt")
    if package.handlers or logging.getLogger().handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


def train(*, config: Optional[Union[str, Path]] = None, **settings: Any) -> TrainResult:
    """Train a model as ``smolgpt train`` does: the same settings by the flags' names
    (``level="char", preset="nano", max_iters=2000, ...``), the same preset rules, checks,
    run-directory lock, resume rules and files.

    config: a TOML file of settings, as ``--config`` reads it (see
    :func:`~smolgpt.config.read_config_file`); a setting given here wins over the file's.

    Raises SmolGPTError for a setting, text or run directory that cannot be used, and
    :class:`~smolgpt.training.TrainingInterrupted` after saving latest_model.pth if SIGINT or
    SIGTERM arrives (``resume=True`` continues the run).
    """
    if config is not None:
        # The file's values are settings as given: a preset fills in around them, and on
        # --resume the same rules apply to them as to flags.
        settings = {**read_config_file(config), **settings}
    # Paths may come as Path objects from Python: every setting holds them as text.
    settings = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in settings.items()}
    with _reports_on_stderr():
        return _train(settings)


def _resolve(
    settings: dict[str, Any], source: Optional[finetune.Source], cpu_float32: bool = False
) -> TrainConfig:
    """A run's config from the settings given (defaults < preset < given); when fine-tuning
    (settings already completed from the source), with the learning rates scaled down."""
    cfg = resolve_train_config(settings, cpu_float32)
    return cfg if source is None else finetune.scale_learning_rates(cfg, settings)


def _train(settings: dict[str, Any]) -> TrainResult:
    source = None
    if settings.get("init_from") and not settings.get("resume"):
        # The source decides the level and shape: it is read before they are resolved.
        source = finetune.load_source(settings["init_from"])
        settings = finetune.source_settings(settings, source)
    requested = _resolve(settings, source)  # settings are checked before anything heavy
    if source is not None:  # a --block_size below the source's, now checked, crops it
        source.crop(requested.block_size)
    # The device and its precision policy are checked before anything touches the disk.
    policy = hardware.precision_policy(hardware.resolve_device(requested.device), requested.amp)
    if policy.float32_cpu and not requested.resume:
        # A preset's recipe can differ on CPUs that compute in float32 (no native bf16); a
        # resumed run keeps the recipe it started with.
        adapted = _resolve(settings, source, cpu_float32=True)
        changes = {
            k: v for k, v in dataclasses.asdict(adapted).items() if v != getattr(requested, k)
        }
        if changes:
            log.info(
                "preset %s for a CPU computing in float32: %s",
                adapted.preset,
                ", ".join(f"{k} {v}" for k, v in changes.items()),
            )
        requested = adapted
    out_dir = Path(settings.get("out_dir") or requested.default_out_dir)
    if requested.colab_drive:  # relative paths (and the default) land under MyDrive/smolgpt
        out_dir = colab_run_dir() / out_dir
    created = not out_dir.exists()
    ensure_writable_dir(out_dir)
    group = distributed.from_environment()  # one process, or one of torchrun's
    try:
        return _run(settings, requested, source, out_dir, group)
    except SmolGPTError:
        # A run refused before it wrote anything leaves no directory behind (its lock
        # file aside, it is empty; the lock was released when _run returned).
        if created and group.is_main and {p.name for p in out_dir.iterdir()} <= {RunLock.FILE}:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _run(
    settings: dict[str, Any],
    requested: TrainConfig,
    source: Optional[finetune.Source],
    out_dir: Path,
    group: distributed.Group,
) -> TrainResult:
    with distributed.session(group, hardware.resolve_device(requested.device)) as device:
        # Rank 0 holds the run directory's lock, and checks the run and builds the token
        # cache before the others read them.
        with RunLock(out_dir) if group.is_main else contextlib.nullcontext() as lock:
            cfg, tokens, resume_from = group.main_first(
                lambda: prepare_run(settings, requested, source, out_dir, lock, group)
            )
            samples = None
            if cfg.sample_every and group.is_main:
                samples = EvaluationSamples(out_dir, tokens.tokenizer, cfg)
            trainer = Trainer(
                cfg,
                tokens,
                out_dir,
                device,
                resume_from,
                init_weights=source.module.state_dict() if source else None,
                on_evaluation=samples,
                group=group,
            )
            progress = trainer.run()
    return TrainResult(
        out_dir=out_dir,
        iterations=progress.iter,
        best_val_loss=progress.best_val_loss,
        last_val_loss=progress.last_val_loss,
        elapsed_s=progress.elapsed_s,
    )


class EvaluationSamples:
    """--sample_every: at the evaluations sample_every steps apart (the first always), a
    short sample of the model in training, logged and added to samples.txt. The prompt and
    seed are the same every time, so the text changes only because the model did."""

    FILE = SAMPLES
    TOKENS = 100  # words or characters: a glance, not a story

    def __init__(self, out_dir: Path, tokenizer: Tokenizer, cfg: TrainConfig):
        self.path, self.tokenizer = out_dir / self.FILE, tokenizer
        self.every, self.seed = cfg.sample_every, cfg.seed
        self.last: Optional[int] = None  # the iteration of the last sample

    def __call__(self, module: GPT, iteration: int, losses: dict[str, float]) -> None:
        if self.last is not None and iteration - self.last < self.every:
            return
        self.last = iteration
        module.eval()  # no dropout while sampling; its RNG is its own, not training's
        try:
            text = Model(module, self.tokenizer, {}).generate(
                max_new_tokens=self.TOKENS, seed=self.seed
            )
        finally:
            module.train()
        heading = f"--- iter {iteration}, val loss {losses['val']:.4f} ---"
        log.info("%s\n%s", heading, text)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{heading}\n{text}\n\n")


class Model:
    """A trained model, ready to generate text.

    ``module`` is the :class:`~smolgpt.model.GPT` (a ``torch.nn.Module``, in eval mode, on
    ``device``), ``tokenizer`` turns text into its token ids and back, ``config`` is its
    :class:`~smolgpt.config.ModelConfig`, and ``train_config`` the settings of the run that
    trained it (a dict; empty for checkpoints that did not record them). ``quantize`` says
    how the module's weight matrices are stored: "none" (as trained) or "int8" (see
    :mod:`smolgpt.quantize`; given as "int8", the module passed is converted, in place), and
    ``parameter_count`` is the model's number of parameters, int8 matrices included.
    """

    def __init__(
        self,
        module: GPT,
        tokenizer: Tokenizer,
        train_config: dict[str, Any],
        data_info: Optional[dict[str, Any]] = None,
        quantize: str = "none",
    ):
        # Counted before quantisation: int8 matrices are buffers, not parameters.
        self.parameter_count = module.num_parameters()
        if quantize == "int8":
            from .quantize import to_int8

            module = to_int8(module)
        self.module, self.tokenizer, self.train_config = module, tokenizer, train_config
        self.quantize = quantize
        # What the run recorded of its text ("fingerprint", "source"); {} where unknown.
        self.data_info = data_info or {}

    @property
    def config(self) -> ModelConfig:
        return self.module.config

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def default_prompt(self) -> str:
        """A prompt any model can read: a line break at char level (if the text had any) and
        bpe level, the most frequent word at word level."""
        return self.tokenizer.default_prompt()

    def generate(self, prompt: Optional[str] = None, **sampling: Any) -> Union[str, list[str]]:
        """The prompt (default: :meth:`default_prompt`) and its continuation as text: one
        string, or a list of num_samples.

        Sampling settings are :class:`~smolgpt.config.SampleConfig`'s, with the command
        line's names and defaults: max_new_tokens=100, temperature=0.8 (0: greedy), top_k=50,
        top_p=1.0, min_p=0.0, repetition_penalty=1.0, stop=() (strings that end the text,
        left out of it), num_samples=1, seed=1337 (the same seed gives the same text).
        """
        stream = self.text_stream(prompt, **sampling)
        texts = ["".join(pieces) for pieces in zip(*stream)]
        return texts[0] if len(texts) == 1 else texts

    def stream(self, prompt: Optional[str] = None, **sampling: Any) -> Iterator[str]:
        """:meth:`generate`'s text (num_samples=1) in pieces as it is made: first the prompt,
        then the continuation; the pieces join into what generate returns for the same
        settings. Stop iterating to stop generating. ``.new_tokens`` on the iterator counts
        the tokens made so far."""
        if sampling.get("num_samples", 1) != 1:
            raise SmolGPTError("stream() makes one sample; use generate() for num_samples > 1")
        return _Pieces(self.text_stream(prompt, **sampling))

    def evaluate(self, text: Optional[str] = None, batch_size: int = 8) -> "Evaluation":
        """How well the model predicts text (default: the validation split of the text it
        was trained on, as its run split it): loss and perplexity per token, and bits per
        character (comparable across levels), every token after the first scored once; see
        :func:`smolgpt.evaluate.evaluate_text` for the windows and how ``<UNK>`` is charged."""
        from .evaluate import evaluate_text

        if text is None:
            text, expected = self.validation_text()
            result = evaluate_text(self.module, self.tokenizer, text, batch_size)
            if result.tokens != expected:  # never report numbers for another text
                raise SmolGPTError(
                    f"the validation text read back encodes to {result.tokens} "
                    f"tokens, not the split's {expected}: cannot evaluate it"
                )
            return result
        return evaluate_text(self.module, self.tokenizer, text, batch_size)

    def validation_text(self) -> tuple[str, int]:
        """The validation split of the text the model was trained on, read again from its
        --data as the run gave it, and that split's token count. A SmolGPTError where the
        text cannot be found, has changed since, or now reads into another vocabulary."""
        cfg = self.train_config
        if not cfg.get("data"):
            raise SmolGPTError(
                "this model does not record the text it was trained on: give "
                "a text to evaluate (--data)"
            )
        try:
            corpus = sources.resolve_corpus(cfg["data"], cfg.get("encoding", "utf-8"))
        except SmolGPTError as exc:
            raise SmolGPTError(
                f"the model's training text: {exc}; or give a text to evaluate (--data)"
            ) from None
        # Hashed here although prepare hashes it again: a changed text would otherwise be
        # tokenized whole into a new cache entry before it is refused.
        fingerprint = self.data_info.get("fingerprint")
        if fingerprint and sources.fingerprint(corpus) != fingerprint:
            raise SmolGPTError(
                f"{cfg['data']} has changed since the model was trained on it: "
                "its validation split is gone; give a text to evaluate (--data)"
            )
        # Read as training read it: a fine-tuned model's run used the model's tokenizer.
        tokens = tokencache.prepare(
            corpus,
            self.tokenizer.level,
            cfg.get("min_word_freq", 3),
            self.tokenizer if cfg.get("init_from") else None,
            cfg.get("vocab_size") or self.tokenizer.vocab_size,
            strict=False,
        )
        if tokens.tokenizer.to_dict() != self.tokenizer.to_dict():
            raise SmolGPTError(
                f"this smolgpt reads {cfg['data']} into another vocabulary than "
                "the model's (trained by an older smolgpt?): give a text to "
                "evaluate (--data)"
            )
        return tokens.val_text(), len(tokens.val)

    def inspect(
        self, out_dir: Union[str, Path], prompt: Optional[str] = None, text: Optional[str] = None
    ) -> "Inspection":
        """Draw what the model does inside into out_dir, as ``smolgpt inspect`` does: every
        head's attention for prompt, the token embeddings in 2-D (with the nearest
        neighbours of the prompt's first tokens in the summary), and the loss at each
        position of the context over text; plus summary.txt. Needs matplotlib (the plot
        extra).

        prompt: default, the start of the text (24 tokens). text: default, the validation
        split of the text the model was trained on; where that cannot be read, the loss per
        position is skipped (the summary says why) and the default prompt is the model's
        own continuation of :meth:`default_prompt`."""
        from .inspection import PROMPT_TOKENS, inspect_model

        why = "no text given"
        tokens = None
        if text is None:
            try:
                text, _ = self.validation_text()
            except SmolGPTError as exc:
                why = str(exc)
        if text is not None:
            tokens = self.tokenizer.encode(text)
        if prompt is None:
            if tokens is not None and len(tokens) > 1:
                prompt_ids = tokens[:PROMPT_TOKENS]
            else:
                prompt_ids = self.tokenizer.encode(
                    self.generate(max_new_tokens=PROMPT_TOKENS - 1, temperature=0)
                )[:PROMPT_TOKENS]
        else:
            prompt_ids = self.tokenizer.encode(prompt)
            if not prompt_ids:
                raise SmolGPTError("the prompt has no tokens: give some text")
            if len(prompt_ids) > self.config.block_size:
                raise SmolGPTError(
                    f"the prompt is {len(prompt_ids)} tokens, more than the "
                    f"model's block_size {self.config.block_size}: shorten it"
                )
        return inspect_model(self.module, self.tokenizer, Path(out_dir), prompt_ids, tokens, why)

    def export(
        self,
        out: Union[str, Path],
        format: str = "hf",  # noqa: A002 - the command line's --format, by the same name
        overwrite: bool = False,
        outtype: str = "f32",
    ) -> Path:
        """Write the model to out as ``smolgpt export`` does: format "hf" (a directory
        transformers loads with no custom code; needs the hf extra), "safetensors"
        (smolgpt's own directory, without pickle) or "gguf" (one file for llama.cpp,
        Ollama and LM Studio, its weight matrices as outtype: "f32", "f16" or "q8_0"; needs
        the gguf extra). out must be new (a directory: or empty); overwrite replaces an
        earlier export only. Returns the path written."""
        from . import export, gguf_export, hf

        cfg = ExportConfig(format=format, outtype=outtype, overwrite=overwrite)  # checks both
        if self.quantize != "none":
            raise SmolGPTError(
                f"this model was loaded with quantize={self.quantize!r}: an export writes "
                "the weights as trained; load it without quantize to export it"
            )
        if cfg.format == "gguf":
            return gguf_export.export_gguf(self.module, self.tokenizer, out, outtype, overwrite)
        write = hf.export_hf if format == "hf" else export.export_safetensors
        return write(self.module, self.tokenizer, out, self.train_config, overwrite, self.data_info)

    def text_stream(
        self,
        prompt: Union[str, Sequence[int], None] = None,
        logprobs: Optional[int] = None,
        **sampling: Any,
    ) -> TextStream:
        """The :class:`~smolgpt.sampling.TextStream` of every sample at once, with how many
        tokens each took and whether a stop string ended it: what :meth:`generate` and
        :meth:`stream` are made of, for callers that need more than the text (the server).
        prompt: text, or its token ids; logprobs: score each generated token, with that many
        most likely alternatives (TextStream.scored)."""
        names = {f.name for f in dataclasses.fields(SampleConfig)}
        unknown = sorted(set(sampling) - names)
        if unknown:
            raise SmolGPTError(
                f"unknown sampling setting(s): {', '.join(unknown)}; choose "
                f"from {', '.join(sorted(names))}"
            )
        settings = SampleConfig(**sampling)
        if prompt is None:
            prompt = self.default_prompt()
        if not prompt:
            raise SmolGPTError("the prompt is empty: give some text to continue")
        prompt_ids = self._prompt_ids(prompt)
        if not prompt_ids:
            raise SmolGPTError("the prompt has no words the model can read: give some text")
        return TextStream(self.module, self.tokenizer, prompt_ids, settings, logprobs)

    def _prompt_ids(self, prompt: Union[str, Sequence[int]]) -> list[int]:
        """A prompt's token ids: text encoded, or ids checked against the vocabulary."""
        if not isinstance(prompt, str):
            vocab = self.tokenizer.vocab_size
            outside = [t for t in prompt if not 0 <= t < vocab]
            if outside:
                raise SmolGPTError(
                    f"token id {outside[0]} is not in the vocabulary (0 to {vocab - 1})"
                )
            return list(prompt)
        prompt_ids = self.tokenizer.encode(prompt)  # raises for unknown characters
        if self.tokenizer.unk_id is not None:  # (a char model's encode refused them)
            unknown_words = self.tokenizer.unknown(prompt)
            if unknown_words:
                log.warning(
                    "words not in the vocabulary, read as <UNK>: %s", ", ".join(unknown_words[:10])
                )
        return prompt_ids


class _Pieces:
    """The first sample's pieces of a TextStream, skipping empty ones."""

    def __init__(self, stream: TextStream):
        self._stream = stream

    @property
    def new_tokens(self) -> int:
        return self._stream.new_tokens

    def __iter__(self) -> "_Pieces":
        return self

    def __next__(self) -> str:
        while True:
            (piece,) = next(self._stream)
            if piece:
                return piece

    def close(self) -> None:
        self._stream.close()


def load(path: Union[str, Path], device: str = "auto", quantize: str = "none") -> Model:
    """A model from a checkpoint written by :func:`train` (best_model.pth or
    latest_model.pth; a run directory means its best_model.pth), or from a directory
    ``smolgpt export`` wrote (either format), checked before use, on device ("auto": cuda,
    then mps, then cpu).

    quantize="int8" stores the weight matrices as 8-bit integers (:mod:`smolgpt.quantize`):
    generation on a CPU is faster, at a little cost in quality (greedy text may differ from
    float32's). It runs on the CPU only: "auto" then means the CPU, and a GPU is refused."""
    from . import interop

    check_choice("quantize", quantize, QUANTIZE)
    if quantize == "int8":  # refused, where it cannot run, before anything is read
        from .quantize import int8_device

        device = int8_device(device)
    located = locate(path, transformers_dirs=True)
    if located.kind == "run directory":
        log.info("%s is a run directory: using %s", located.given, located.model)
    module, tokenizer, train_config, data_info = interop.load_source(
        located.model, hardware.resolve_device(device)
    )
    return Model(module, tokenizer, train_config, data_info, quantize)
