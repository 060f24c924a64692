"""The models ``smolgpt serve`` answers for, and how their generations are scheduled.

Every torch call runs on one worker thread (:class:`Generator`), and up to ``parallel``
requests take turns on it token by token (:class:`Turns`), so a long request slows others down
but never blocks them; up to ``queue`` more wait for a turn, and beyond that the answer is an
immediate 503 "busy". A request has ``timeout`` seconds, its wait included. A client that
disconnects stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Sequence, Union

from .config import SampleConfig, ServeConfig
from .errors import SmolGPTError
from .logprobs import TokenLogprob, prompt_logprobs, report
from .rundir import BEST, LATEST, METRICS
from .sampling import TextStream
from .serve_schema import MAX_SEED, OPENAI_NAMES, ApiError, chat_prompt, chat_stops, check

# ------------------------------------------------------------------ the models served


@dataclass
class Served:
    """One model the server answers for: its id in requests, and where it came from."""

    id: str
    path: Path
    model: Any  # smolgpt.api.Model
    created: int  # when its checkpoint was written (seconds since 1970), as OpenAI reports it
    run_dir: Optional[Path]  # the training run beside it, if its metrics.jsonl is there

    def description(self) -> dict[str, Any]:
        config = self.model.config
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": "smolgpt",
            "level": self.model.tokenizer.level,
            "parameters": self.model.parameter_count,
            "block_size": config.block_size,
            "vocab_size": config.vocab_size,
            "loss_curve": self.run_dir is not None,
        }


def model_id(path: Path) -> str:
    """The name a checkpoint is served under: its run's directory name for best_model.pth
    (with "-latest" for latest_model.pth), a directory's own name, else the file's stem."""
    resolved = path.resolve()
    if resolved.is_dir():
        return resolved.name
    if resolved.name == BEST:
        return resolved.parent.name
    if resolved.name == LATEST:
        return f"{resolved.parent.name}-latest"
    return resolved.stem


def load_models(paths: Sequence[str], device: str, quantize: str = "none") -> list[Served]:
    """Every checkpoint, run directory or export in paths, loaded (on device, its matrices
    stored as quantize says) and named; a name that two paths would share gets -2, -3, ... in
    the order given."""
    from .api import load

    if not paths:
        raise SmolGPTError("give at least one checkpoint, run directory or export to serve")
    served: list[Served] = []
    for name in paths:
        path = Path(name)
        model = load(path, device, quantize)
        base = model_id(path)
        taken = {s.id for s in served}
        unique = (
            base
            if base not in taken
            else next(f"{base}-{k}" for k in range(2, len(paths) + 2) if f"{base}-{k}" not in taken)
        )
        run_dir = path if path.is_dir() else path.parent
        created = int(path.stat().st_mtime)
        served.append(
            Served(unique, path, model, created, run_dir if (run_dir / METRICS).is_file() else None)
        )
    return served


@dataclass
class Completion:
    """A checked completion request, or chat request (chat: its one prompt is the transcript,
    and the answer is in chat's shape)."""

    served: Served
    prompts: list[Union[str, list[int]]]  # texts, or token ids
    sampling: dict[str, Any]  # SampleConfig's settings
    stream: bool
    echo: bool
    include_usage: bool
    chat: bool = False
    logprobs: Optional[int] = None  # give logprobs with this many most likely tokens

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.sampling.get("num_samples", 1)


def parse_completion(
    body: dict[str, Any], served: Sequence[Served], schema: dict[str, Any], cfg: ServeConfig
) -> Completion:
    model, sampling = _parse_request(body, served, schema)
    prompt = body["prompt"]
    # One text or one list of ids is one prompt (the schema let through no empty list).
    prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    vocab = model.model.tokenizer.vocab_size
    outside = [t for p in prompts if not isinstance(p, str) for t in p if t >= vocab]
    if outside:
        raise ApiError(
            400,
            f"prompt holds token id {outside[0]}, outside model {model.id}'s vocabulary "
            f"(0 to {vocab - 1})",
            "prompt",
        )
    n = sampling.get("num_samples", 1)
    if n * len(prompts) > cfg.max_n:
        raise ApiError(
            400,
            f"n ({n}) times {len(prompts)} prompts asks for "
            f"{n * len(prompts)} completions; the limit is {cfg.max_n}",
            "n",
        )
    return _completion(body, model, prompts, sampling)


def parse_chat(
    body: dict[str, Any], served: Sequence[Served], schema: dict[str, Any], cfg: ServeConfig
) -> Completion:
    """A chat request as the completion of its transcript (:func:`chat_prompt`), ending at the
    next role line (:func:`chat_stops`) as well as at the request's own stop strings."""
    model, sampling = _parse_request(body, served, schema)
    prompt = chat_prompt(body["messages"])
    if len(prompt) > cfg.max_prompt_chars:
        raise ApiError(
            400,
            f"the messages make a transcript of {len(prompt)} characters; the limit is "
            f"{cfg.max_prompt_chars}",
            "messages",
        )
    tokenizer = model.model.tokenizer
    labels = chat_prompt([{"role": m["role"], "content": ""} for m in body["messages"]])
    try:
        tokenizer.encode(labels)
    except SmolGPTError:  # a char-level model that lacks a character of "User: " and such
        missing = ", ".join(map(repr, tokenizer.unknown(labels)))
        raise ApiError(
            400,
            f"model {model.id} cannot read the chat transcript's role lines: {missing} "
            "not in its vocabulary (use /v1/completions with a prompt it can read)",
            "messages",
        ) from None
    stop = sampling.get("stop", ())
    sampling["stop"] = ((stop,) if isinstance(stop, str) else tuple(stop)) + chat_stops(tokenizer)
    return _completion(body, model, [prompt], sampling, chat=True)


def _parse_request(
    body: dict[str, Any], served: Sequence[Served], schema: dict[str, Any]
) -> tuple[Served, dict[str, Any]]:
    """The model a request names, and its SampleConfig settings, once body passes schema."""
    by_id = {s.id: s for s in served}
    if isinstance(body.get("model"), str) and body["model"] not in by_id:  # OpenAI says 404
        raise ApiError(
            404,
            f"no model {body['model']!r} here: choose one of {', '.join(by_id)}",
            "model",
            "model_not_found",
        )
    check(body, schema, "request")
    model = by_id[body["model"]] if body.get("model") is not None else served[0]
    if body.get("model") is None and len(served) > 1:
        raise ApiError(
            400, f"several models are served: say which (model: one of {', '.join(by_id)})", "model"
        )
    sampling = {
        name: body[api_name]
        for name in SampleConfig.__dataclass_fields__
        if body.get(api_name := OPENAI_NAMES.get(name, name)) is not None
    }
    return model, sampling


def _completion(
    body: dict[str, Any],
    model: Served,
    prompts: list[str],
    sampling: dict[str, Any],
    chat: bool = False,
) -> Completion:
    if "seed" not in sampling:
        sampling["seed"] = secrets.randbelow(MAX_SEED + 1)
    try:
        SampleConfig(**sampling)  # its own checks, which the schema should already imply
    except SmolGPTError as exc:
        raise ApiError(400, str(exc)) from None
    stream = bool(body.get("stream"))
    return Completion(
        model,
        prompts,
        sampling,
        stream,
        bool(body.get("echo")),
        stream and bool((body.get("stream_options") or {}).get("include_usage")),
        chat,
        body.get("logprobs"),
    )


# ------------------------------------------------------------------ generation


class Turns:
    """Admission: up to ``parallel`` requests generate at once, ``queue`` more may wait."""

    def __init__(self, parallel: int, queue: int):
        self._free = asyncio.Semaphore(parallel)
        self.queue = queue
        self.waiting = 0
        self.active = 0

    async def enter(self, deadline: float) -> None:
        """Take a turn, waiting until deadline at most: ApiError 503 if the queue is full,
        504 when the wait outlasts the deadline."""
        if self._free.locked() and self.waiting >= self.queue:
            raise ApiError(
                503,
                f"the server is busy ({self.active} requests generating, "
                f"{self.waiting} waiting): try again shortly",
                code="busy",
                kind="server_error",
            )
        self.waiting += 1
        try:
            await asyncio.wait_for(self._free.acquire(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise _timeout() from None
        finally:
            self.waiting -= 1
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        self._free.release()


def _timeout() -> ApiError:
    return ApiError(
        504,
        "the request took longer than the server's timeout: ask for fewer tokens",
        code="timeout",
        kind="server_error",
    )


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def body(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class _Trimmed:
    """A chat reply's pieces without the whitespace around the whole reply: what it begins
    with is dropped, and whitespace is held back until text follows it."""

    def __init__(self):
        self.begun, self.held = False, ""

    def __call__(self, piece: str) -> str:
        text = self.held + piece
        shown = text.rstrip()
        self.held = text[len(shown) :]
        if not self.begun:
            shown = shown.lstrip()
            self.begun = bool(shown)
        return shown


class Generator:
    """Runs completions on the one worker thread that makes every torch call."""

    def __init__(self):
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smolgpt-generate")
        self.tokens_generated = 0

    async def _call(self, function: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    async def events(
        self, job: Completion, deadline: float, usage: Usage, gone: Callable[[], Awaitable[bool]]
    ) -> AsyncIterator[tuple[int, str, Optional[str], Optional[dict[str, list]]]]:
        """(choice index, new text, finish reason or None, logprobs or None) as the text is
        made, choice by choice in OpenAI's order (every sample of the first prompt, then the
        next prompt's); a chat reply without the whitespace around it. With job.logprobs,
        logprobs are those of the new text's tokens in OpenAI's shape (logprobs.report),
        offsets in the choice's text; the echoed prompt's come with its text. Returns early
        once gone() says the client left; ApiError 504 past the deadline."""
        n = job.sampling.get("num_samples", 1)
        for p, prompt in enumerate(job.prompts):
            stream = await self._open(job, prompt)
            usage.prompt_tokens += stream.prompt_tokens
            try:
                async for j, piece, logprobs in self._pieces(job, stream, deadline, gone):
                    yield p * n + j, piece, None, logprobs
            finally:
                # On the worker, after any step still running there (a cancelled request's).
                self._worker.submit(stream.close)
            if await gone():
                return
            for j, sample in enumerate(stream.samples):
                usage.completion_tokens += sample.tokens
                yield p * n + j, "", "stop" if sample.stopped else "length", None

    async def _open(self, job: Completion, prompt: Union[str, list[int]]) -> TextStream:
        try:
            return await self._call(
                lambda: job.served.model.text_stream(prompt, job.logprobs, **job.sampling)
            )
        except SmolGPTError as exc:  # a prompt the model cannot read
            raise ApiError(400, str(exc), "messages" if job.chat else "prompt") from None

    async def _pieces(
        self,
        job: Completion,
        stream: TextStream,
        deadline: float,
        gone: Callable[[], Awaitable[bool]],
    ) -> AsyncIterator[tuple[int, str, Optional[dict[str, list]]]]:
        """(sample, new text, logprobs or None) of one prompt's samples, step by step (see
        :meth:`events`); returns early once gone() says the client left."""
        n, tokenizer = len(stream.samples), job.served.model.tokenizer
        scoring = job.logprobs is not None
        echoed = await self._scored_prompt(job, stream, deadline, gone) if job.echo else []
        trims = [_Trimmed() for _ in range(n)]
        first = True
        while True:
            if await gone():
                return
            if time.monotonic() > deadline:
                raise _timeout()
            before = stream.new_tokens
            pieces = await self._call(next, stream, None)
            if pieces is None:
                break
            self.tokens_generated += (stream.new_tokens - before) * n
            for j, piece in enumerate(pieces):
                if first and not job.echo:
                    continue
                if job.chat and not first:
                    piece = trims[j](piece)
                scored = echoed if first else stream.scored[j]
                shift = len(stream.samples[j].prompt) if job.echo and not first else 0
                if piece or (scoring and scored):
                    yield j, piece, report(tokenizer, scored, shift) if scoring else None
            first = False

    async def _scored_prompt(
        self,
        job: Completion,
        stream: TextStream,
        deadline: float,
        gone: Callable[[], Awaitable[bool]],
    ) -> list[TokenLogprob]:
        """The prompt's tokens scored (none without job.logprobs), a window per call on the
        worker so that other requests take their turns between them."""
        if job.logprobs is None:
            return []
        model = job.served.model
        windows = prompt_logprobs(model.module, model.tokenizer, stream.prompt, job.logprobs)
        scored: list[TokenLogprob] = []
        while not await gone():
            if time.monotonic() > deadline:
                raise _timeout()
            window = await self._call(next, windows, None)
            if window is None:
                break
            scored += window
        return scored

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
