"""``smolgpt serve``: trained models behind OpenAI's completions and chat completions API, and a
playground page.

The HTTP API is the one OpenAI's client libraries, chat front-ends and curl scripts already
speak (as llama.cpp's server and litgpt serve do)::

    POST /v1/completions        continue a prompt; "stream": true sends server-sent events
    POST /v1/chat/completions   the assistant's next message in a chat (see chat_prompt)
    GET  /v1/models             the models served (GET /v1/models/{id}: one of them)
    GET  /health                liveness, and how busy the server is
    GET  /openapi.json          the OpenAPI description of all of this
    GET  /                      the playground: a page to try prompts and watch text appear
    GET  /runs/{id}/loss        the loss curve of the run beside a model's checkpoint

A request's sampling settings are :class:`~smolgpt.config.SampleConfig`'s under OpenAI's
names (max_tokens, n) or their own (top_k, min_p, repetition_penalty), with the same defaults,
except the seed: without one, each request draws its own, as OpenAI's API does. The request
schemas below are the single definition of what is accepted (a chat request's is a completion
request's, with messages for the prompt): the OpenAPI description publishes them and
:func:`check` enforces them, answering a violation with status 400 and OpenAI's error shape,
``{"error": {"message", "type", "param", "code"}}``.

The models are base models, trained on plain text with no chat format: a chat reaches them as a
plain transcript that they continue, one "Role: content" line per message (:func:`chat_prompt`),
and the reply ends where the model begins the next role line (:func:`chat_stops`).

How a shared server stays alive: every torch call runs on one worker thread, and up to
``parallel`` requests take turns on it token by token, so a long request slows others down
but never blocks them; up to ``queue`` more wait for a turn, and beyond that the answer is
an immediate 503 "busy". A request has ``timeout`` seconds, its wait included. A client that
disconnects stops its generation at the next token. Prompt length, max_tokens and n have
caps. The framework is Starlette on uvicorn (the serve extra): small, and
built around streaming responses.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Sequence

from . import __version__
from .config import SampleConfig, ServeConfig
from .errors import SmolGPTError
from .extras import install_command
from .rundir import BEST, LATEST, METRICS

log = logging.getLogger("smolgpt")

API_KEY_VARIABLE = "SMOLGPT_API_KEY"
MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_STOP_CHARS = 200
MAX_SEED = 2**63 - 1
JSON_OVERHEAD = 64 * 1024  # bytes a request body may hold besides its prompts


class ApiError(Exception):
    """An answer other than success: an HTTP status and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


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
            "parameters": self.model.module.num_parameters(),
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


def load_models(paths: Sequence[str], device: str) -> list[Served]:
    """Every checkpoint, run directory or export in paths, loaded and named; a name that
    two paths would share gets -2, -3, ... in the order given."""
    from .api import load

    if not paths:
        raise SmolGPTError("give at least one checkpoint, run directory or export to serve")
    served: list[Served] = []
    for name in paths:
        path = Path(name)
        model = load(path, device)
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


# ------------------------------------------------------------------ the request schema

# OpenAI's names for SampleConfig's settings; the rest keep their own.
OPENAI_NAMES = {"max_new_tokens": "max_tokens", "num_samples": "n"}


def _sample_default(name: str) -> Any:
    return SampleConfig.__dataclass_fields__[name].default


def completion_schema(cfg: ServeConfig, model_ids: Sequence[str]) -> dict[str, Any]:
    """The JSON schema (OpenAPI 3.0 dialect) of a completion request: what is accepted,
    with the limits of cfg."""

    def setting(name: str, schema: dict[str, Any]) -> dict[str, Any]:
        help_text = SampleConfig.__dataclass_fields__[name].metadata["help"]
        return {
            **schema,
            "nullable": True,
            "default": _sample_default(name),
            "description": help_text,
        }

    text = {"type": "string", "minLength": 1, "maxLength": cfg.max_prompt_chars}
    stop_text = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
    properties = {
        "model": {
            "type": "string",
            "enum": list(model_ids),
            "description": "the model's id (GET /v1/models); optional when one is served",
        },
        "prompt": {
            "oneOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": cfg.max_n}],
            "description": "the text to continue, or a list of texts",
        },
        "max_tokens": setting(
            "max_new_tokens", {"type": "integer", "minimum": 0, "maximum": cfg.max_tokens}
        ),
        "temperature": setting("temperature", {"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": setting(
            "top_p", {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1}
        ),
        "top_k": setting("top_k", {"type": "integer", "minimum": 0}),
        "min_p": setting("min_p", {"type": "number", "minimum": 0, "maximum": 1}),
        "repetition_penalty": setting(
            "repetition_penalty",
            {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 100},
        ),
        "stop": {
            "oneOf": [stop_text, {"type": "array", "items": stop_text, "maxItems": MAX_STOPS}],
            "nullable": True,
            "description": "end a completion at any of these strings (left out of it)",
        },
        "n": setting("num_samples", {"type": "integer", "minimum": 1, "maximum": cfg.max_n}),
        "seed": {
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_SEED,
            "nullable": True,
            "description": "the same seed and settings give the same text; default: a "
            "new random seed per request",
        },
        "stream": {
            "type": "boolean",
            "nullable": True,
            "default": False,
            "description": "send the text as server-sent events as it is made, ending "
            "with data: [DONE]",
        },
        "stream_options": {
            "type": "object",
            "nullable": True,
            "additionalProperties": False,
            "properties": {"include_usage": {"type": "boolean"}},
            "description": "include_usage: a last event with the token counts",
        },
        "echo": {
            "type": "boolean",
            "nullable": True,
            "default": False,
            "description": "begin each completion with its prompt",
        },
        "user": {"type": "string", "nullable": True, "description": "accepted and ignored"},
        "frequency_penalty": {
            "type": "number",
            "nullable": True,
            "minimum": 0,
            "maximum": 0,
            "description": "not supported: only 0 (use repetition_penalty)",
        },
        "presence_penalty": {
            "type": "number",
            "nullable": True,
            "minimum": 0,
            "maximum": 0,
            "description": "not supported: only 0 (use repetition_penalty)",
        },
    }
    required = ["prompt"] + (["model"] if len(model_ids) > 1 else [])
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


# A chat's roles, and the label each message's line begins with in the transcript.
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOPS = tuple(f"\n{label}:" for label in ROLES.values())


def chat_schema(cfg: ServeConfig, model_ids: Sequence[str]) -> dict[str, Any]:
    """The JSON schema of a chat request: a completion request's, with messages in place of
    prompt (and no echo)."""
    completion = completion_schema(cfg, model_ids)
    settings = {
        k: v for k, v in completion["properties"].items() if k not in ("model", "prompt", "echo")
    }
    message = {
        "type": "object",
        "properties": {
            "role": {"type": "string", "enum": list(ROLES)},
            "content": {"type": "string", "maxLength": cfg.max_prompt_chars},
            "name": {"type": "string", "nullable": True, "description": "accepted and ignored"},
        },
        "required": ["role", "content"],
        "additionalProperties": False,
    }
    messages = {
        "type": "array",
        "items": message,
        "minItems": 1,
        "description": "the chat so far; the model writes the assistant's next message, "
        "continuing a plain transcript of it (one 'Role: content' line per message, then "
        "'Assistant:') up to the next role line",
    }
    return {
        **completion,
        "properties": {
            "model": completion["properties"]["model"],
            "messages": messages,
            **settings,
        },
        "required": ["messages" if r == "prompt" else r for r in completion["required"]],
    }


def chat_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The plain transcript of a chat that a base model continues: one line per message, its
    role's label (System, User, Assistant), a colon, a space and its content (with the
    whitespace around it left out), then "Assistant:" for the model's turn::

        System: You answer in rhyme.
        User: Where is the key?
        Assistant:

    The reply is what the model writes next, up to the first of :func:`chat_stops` (left out
    of it), without the whitespace around it."""
    lines = [f"{ROLES[m['role']]}: {m['content'].strip()}" for m in messages]
    return "\n".join([*lines, f"{ROLES['assistant']}:"])


def chat_stops(tokenizer: Any) -> tuple[str, ...]:
    """Where a reply ends: at the next role line (CHAT_STOPS: a line break, then "User:",
    "System:" or "Assistant:"), as the model writes it. That is CHAT_STOPS themselves at char
    and bpe level; a word-level model keeps neither line breaks nor capitals and writes
    " user:" (" <UNK>:" where the label is not in its vocabulary). A char-level model missing
    a label's characters never writes its line, so that line is left out."""
    found: list[str] = []
    for stop in CHAT_STOPS:
        line = stop.lstrip("\n")
        try:  # the second of two role lines, as the model's tokens decode
            one = tokenizer.decode(tokenizer.encode(line))
            two = tokenizer.decode(tokenizer.encode(line + stop))
        except SmolGPTError:  # characters the model does not know
            continue
        if two[len(one) :] not in found:
            found.append(two[len(one) :])
    return tuple(found)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "null")


def check(value: Any, schema: dict[str, Any], name: str, param: Optional[str] = None) -> None:
    """Raise ApiError(400) naming the first way value breaks schema (the subset of JSON
    schema completion_schema uses). param: the top-level field, reported as OpenAI does."""
    param = param or name
    if value is None:
        if schema.get("nullable"):
            return
        raise ApiError(400, f"{name} must not be null", param)
    if "oneOf" in schema:
        options = schema["oneOf"]
        kind = _json_type(value)
        matching = [
            o for o in options if o["type"] == kind or (o["type"] == "number" and kind == "integer")
        ]
        if not matching:
            raise ApiError(
                400,
                f"{name} must be a {' or an '.join(o['type'] for o in options)}, not {kind}",
                param,
            )
        return check(value, matching[0], name, param)
    kind, expected = _json_type(value), schema["type"]
    if not (kind == expected or (expected == "number" and kind == "integer")):
        raise ApiError(
            400,
            f"{name} must be a{'n' if expected[0] in 'aeiou' else ''} {expected}, not {kind}",
            param,
        )
    if expected == "number" and not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {value}", param)
    if "enum" in schema and value not in schema["enum"]:
        raise ApiError(400, f"{name} must be one of {', '.join(map(str, schema['enum']))}", param)
    if expected in ("integer", "number"):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and (value < low or (schema.get("exclusiveMinimum") and value == low)):
            relation = "above" if schema.get("exclusiveMinimum") else "at least"
            raise ApiError(400, f"{name} must be {relation} {low}, got {value}", param)
        if high is not None and value > high:
            raise ApiError(400, f"{name} must be at most {high}, got {value}", param)
    elif expected == "string":
        if len(value) < schema.get("minLength", 0):
            raise ApiError(400, f"{name} must not be empty", param)
        if len(value) > schema.get("maxLength", math.inf):
            raise ApiError(
                400,
                f"{name} is {len(value)} characters long; the limit is {schema['maxLength']}",
                param,
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(
                400, f"{name} is not valid Unicode (it holds a lone surrogate)", param
            ) from None
    elif expected == "array":
        if len(value) < schema.get("minItems", 0):
            raise ApiError(400, f"{name} must not be an empty list", param)
        if len(value) > schema.get("maxItems", math.inf):
            raise ApiError(
                400, f"{name} holds {len(value)} items; the limit is {schema['maxItems']}", param
            )
        for i, item in enumerate(value):
            check(item, schema["items"], f"{name}[{i}]", param)
    elif expected == "object":
        known = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ApiError(
                    400,
                    f"unknown or unsupported field(s) {', '.join(unknown)}"
                    f"{' in ' + name if name != 'request' else ''}: choose from "
                    f"{', '.join(known)}",
                    unknown[0] if name == "request" else param,
                )
        for field in schema.get("required", ()):
            if field not in value:
                if name == "request":
                    raise ApiError(400, f"the request needs {field!r}", field)
                raise ApiError(400, f"{name} needs {field!r}", param)
        for field, item in value.items():
            check(
                item,
                known[field],
                field if name == "request" else f"{name}.{field}",
                field if name == "request" else param,
            )


@dataclass
class Completion:
    """A checked completion request, or chat request (chat: its one prompt is the transcript,
    and the answer is in chat's shape)."""

    served: Served
    prompts: list[str]
    sampling: dict[str, Any]  # SampleConfig's settings
    stream: bool
    echo: bool
    include_usage: bool
    chat: bool = False

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.sampling.get("num_samples", 1)


def parse_completion(
    body: dict[str, Any], served: Sequence[Served], schema: dict[str, Any], cfg: ServeConfig
) -> Completion:
    model, sampling = _parse_request(body, served, schema)
    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
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
    ) -> AsyncIterator[tuple[int, str, Optional[str]]]:
        """(choice index, new text, finish reason or None) as the text is made, choice by
        choice in OpenAI's order (every sample of the first prompt, then the next prompt's);
        a chat reply without the whitespace around it. Returns early once gone() says the
        client left; ApiError 504 past the deadline."""
        n = job.sampling.get("num_samples", 1)
        for p, prompt in enumerate(job.prompts):
            try:
                stream = await self._call(
                    lambda prompt=prompt: job.served.model.text_stream(prompt, **job.sampling)
                )
            except SmolGPTError as exc:  # a prompt the model cannot read
                raise ApiError(400, str(exc), "messages" if job.chat else "prompt") from None
            usage.prompt_tokens += stream.prompt_tokens
            trims = [_Trimmed() for _ in range(n)]
            try:
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
                        if job.chat and not first:
                            piece = trims[j](piece)
                        if piece and (job.echo or not first):
                            yield p * n + j, piece, None
                    first = False
            finally:
                # On the worker, after any step still running there (a cancelled request's).
                self._worker.submit(stream.close)
            for j, sample in enumerate(stream.samples):
                usage.completion_tokens += sample.tokens
                yield p * n + j, "", "stop" if sample.stopped else "length"

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------ the application


def playground_html() -> str:
    return resources.files("smolgpt").joinpath("playground.html").read_text(encoding="utf-8")


class Server:
    """The state behind the routes: models, limits, turns and the generator."""

    def __init__(self, served: Sequence[Served], cfg: ServeConfig, api_key: Optional[str]):
        self.served, self.cfg, self.api_key = list(served), cfg, api_key
        self.by_id = {s.id: s for s in self.served}
        self.schema = completion_schema(cfg, list(self.by_id))
        self.chat_schema = chat_schema(cfg, list(self.by_id))
        self.turns = Turns(cfg.parallel, cfg.queue)
        self.generator = Generator()
        # A prompt may take 6 bytes a character in JSON (\uXXXX escapes).
        self.max_body = 6 * cfg.max_prompt_chars * cfg.max_n + JSON_OVERHEAD

    def authorize(self, headers: Any) -> None:
        if self.api_key is None:
            return
        given = headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401,
                "a valid API key is needed: send the header Authorization: Bearer KEY",
                code="invalid_api_key",
            )

    def model(self, model_id: str) -> Served:
        if model_id not in self.by_id:
            raise ApiError(
                404,
                f"no model {model_id!r} here: choose one of {', '.join(self.by_id)}",
                "model",
                "model_not_found",
            )
        return self.by_id[model_id]

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "models": list(self.by_id),
            "generating": self.turns.active,
            "waiting": self.turns.waiting,
            "tokens_generated": self.generator.tokens_generated,
            "limits": {
                "max_tokens": self.cfg.max_tokens,
                "max_n": self.cfg.max_n,
                "max_prompt_chars": self.cfg.max_prompt_chars,
                "timeout": self.cfg.timeout,
            },
            "api_key_required": self.api_key is not None,
        }

    def loss_curve(self, model_id: str) -> dict[str, Any]:
        from .plots import read_metrics

        served = self.model(model_id)
        if served.run_dir is None:
            raise ApiError(
                404, f"{model_id}'s checkpoint has no training run beside it", code="no_run"
            )
        try:
            rows = read_metrics(served.run_dir)
        except SmolGPTError as exc:
            raise ApiError(404, str(exc), code="no_run") from None
        return {
            "model": model_id,
            "points": [
                {
                    "iter": r["iter"],
                    "train_loss": _finite(r["train_loss"]),
                    "val_loss": _finite(r["val_loss"]),
                }
                for r in rows
            ],
        }

    async def completion(
        self, job: Completion, deadline: float, gone: Callable[[], Awaitable[bool]]
    ) -> dict[str, Any]:
        """A whole completion (or chat) response (the caller holds a turn)."""
        texts = [""] * job.choices
        reasons: list[Optional[str]] = [None] * len(texts)
        usage = Usage()
        async for index, piece, reason in self.generator.events(job, deadline, usage, gone):
            texts[index] += piece
            reasons[index] = reason or reasons[index]
        return {
            **_head(job),
            "choices": [_choice(job, i, text, reasons[i]) for i, text in enumerate(texts)],
            "usage": usage.body(),
        }


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None  # JSON has no NaN


def _head(job: Completion, chunk: bool = False) -> dict[str, Any]:
    """What a response (chunk: every event of a stream) begins with, as OpenAI's does."""
    if job.chat:
        kind, prefix = ("chat.completion.chunk" if chunk else "chat.completion"), "chatcmpl"
    else:
        kind, prefix = "text_completion", "cmpl"
    return {
        "id": f"{prefix}-{secrets.token_hex(12)}",
        "object": kind,
        "created": int(time.time()),
        "model": job.served.id,
    }


def install_hint() -> str:
    return f"smolgpt serve needs starlette and uvicorn: {install_command('serve')}"


def _choice(
    job: Completion, index: int, text: str, reason: Optional[str], chunk: bool = False
) -> dict[str, Any]:
    """One choice of a response, or (chunk) its new text in an event of a stream."""
    if not job.chat:
        return {"text": text, "index": index, "logprobs": None, "finish_reason": reason}
    if chunk:  # a chat's deltas: the role came first (EventStream), then the text
        key, message = "delta", ({"content": text} if text else {})
    else:
        key, message = "message", {"role": "assistant", "content": text}
    return {"index": index, key: message, "logprobs": None, "finish_reason": reason}


def build_app(served: Sequence[Served], cfg: ServeConfig, api_key: Optional[str] = None):
    """The ASGI application serving these models (Starlette), for uvicorn or any ASGI server."""
    try:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import HTMLResponse, JSONResponse, Response
        from starlette.routing import Route
    except ImportError:
        raise SmolGPTError(install_hint()) from None

    server = Server(served, cfg, api_key)

    def error_response(error: ApiError, headers: Optional[dict] = None) -> Response:
        if error.status == 503:
            headers = {**(headers or {}), "Retry-After": "1"}
        return JSONResponse(error.body(), error.status, headers)

    def answers(handler):
        """An endpoint whose ApiErrors become OpenAI-shaped error responses."""

        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as error:
                return error_response(error)

        return endpoint

    async def read_json(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > server.max_body:
            raise _too_large(server.max_body)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > server.max_body:
                raise _too_large(server.max_body)
        try:
            parsed = json.loads(body)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return parsed

    def generation(parse: Callable[..., Completion], schema: dict[str, Any]):
        """The endpoint of completions (or chats): parse reads a request that schema checks."""

        @answers
        async def endpoint(request: Request) -> Response:
            started = time.monotonic()
            server.authorize(request.headers)
            job = parse(await read_json(request), server.served, schema, cfg)
            deadline = started + cfg.timeout
            if job.stream:
                return EventStream(server, job, deadline, started)
            await server.turns.enter(deadline)
            try:
                result = await server.completion(job, deadline, request.is_disconnected)
            finally:
                server.turns.leave()
            _log_request(job, result["usage"]["completion_tokens"], started)
            return JSONResponse(result)

        return endpoint

    @answers
    async def models(request: Request) -> Response:
        server.authorize(request.headers)
        return JSONResponse({"object": "list", "data": [s.description() for s in server.served]})

    @answers
    async def one_model(request: Request) -> Response:
        server.authorize(request.headers)
        return JSONResponse(server.model(request.path_params["model"]).description())

    @answers
    async def loss(request: Request) -> Response:
        server.authorize(request.headers)
        return JSONResponse(server.loss_curve(request.path_params["model"]))

    async def health(request: Request) -> Response:
        return JSONResponse(server.health())

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(openapi(server))

    async def page(request: Request) -> Response:
        return HTMLResponse(playground_html())

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        message = (
            "no such endpoint: see /openapi.json"
            if status == 404
            else f"{request.method} is not allowed here"
            if status == 405
            else "server error"
        )
        # The headers of Starlette's answer: Allow, with a 405.
        return error_response(
            ApiError(
                status, message, kind="invalid_request_error" if status < 500 else "server_error"
            ),
            getattr(exc, "headers", None),
        )

    class EventStream(Response):
        """A completion streamed as server-sent events, holding its turn until it ends."""

        media_type = "text/event-stream"

        def __init__(self, server: Server, job: Completion, deadline: float, started: float):
            # Response.__init__ would declare a body of length 0.
            self.status_code, self.background = 200, None
            self.init_headers({"Cache-Control": "no-cache"})
            self.server, self.job, self.deadline, self.started = server, job, deadline, started

        async def __call__(self, scope, receive, send) -> None:
            try:
                await self.server.turns.enter(self.deadline)
            except ApiError as error:
                return await error_response(error)(scope, receive, send)
            left = asyncio.Event()

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                left.set()

            async def gone() -> bool:
                return left.is_set()

            watcher = asyncio.ensure_future(watch())
            usage = Usage()
            events = self.server.generator.events(self.job, self.deadline, usage, gone)
            head = _head(self.job, chunk=True)
            try:
                try:  # the first event before the status line: a prompt the model cannot read
                    event = await anext(events, None)  # is answered 400 like any bad value
                except ApiError as error:
                    return await error_response(error)(scope, receive, send)
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
                try:
                    for index in range(self.job.choices if self.job.chat else 0):
                        # A chat's first chunk of each choice says whose message it is.
                        first = _choice(self.job, index, "", None, chunk=True)
                        first["delta"] = {"role": "assistant", "content": ""}
                        await _event(send, {**head, "choices": [first]})
                    while event is not None:
                        index, piece, reason = event
                        await _event(
                            send,
                            {**head, "choices": [_choice(self.job, index, piece, reason, True)]},
                        )
                        event = await anext(events, None)
                    if left.is_set():
                        return
                    if self.job.include_usage:
                        await _event(send, {**head, "choices": [], "usage": usage.body()})
                    await _send(send, b"data: [DONE]\n\n")
                except ApiError as error:  # the timeout, after the status line went out
                    await _event(send, error.body())
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the connection broke while sending
                left.set()
            finally:
                await events.aclose()  # its own finally stops the generation
                watcher.cancel()
                self.server.turns.leave()
                _log_request(
                    self.job,
                    usage.completion_tokens,
                    self.started,
                    " (client left)" if left.is_set() else "",
                )

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/health", health),
            Route("/openapi.json", openapi_json),
            Route("/v1/models", models),
            Route("/v1/models/{model}", one_model),
            Route("/v1/completions", generation(parse_completion, server.schema), methods=["POST"]),
            Route(
                "/v1/chat/completions",
                generation(parse_chat, server.chat_schema),
                methods=["POST"],
            ),
            Route("/runs/{model}/loss", loss),
        ],
        exception_handlers={404: not_found, 405: not_found},
    )
    app.state.server = server
    return app


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"the request body is over {limit} bytes: send a shorter prompt", code="too_large"
    )


async def _send(send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _event(send, payload: dict[str, Any]) -> None:
    await _send(send, b"data: " + json.dumps(payload).encode() + b"\n\n")


def _log_request(job: Completion, tokens: int, started: float, note: str = "") -> None:
    log.info(
        "%s %s: %d prompt(s), %d token(s) in %.2f s%s",
        "chat completion" if job.chat else "completion",
        job.served.id,
        len(job.prompts),
        tokens,
        time.monotonic() - started,
        note,
    )


# ------------------------------------------------------------------ the OpenAPI description


def openapi(server: Server) -> dict[str, Any]:
    """The OpenAPI 3.0 description of the server's endpoints, with its limits."""
    error = {"$ref": "#/components/schemas/Error"}

    def answers(*statuses: int, ok: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        reasons = {
            400: "invalid request",
            401: "API key missing or wrong",
            404: "no such model",
            413: "request body too large",
            503: "busy: try again shortly",
            504: "the request took longer than the server's timeout",
        }
        out = {"200": ok} if ok else {}
        out.update(
            {
                str(s): {
                    "description": reasons[s],
                    "content": {"application/json": {"schema": error}},
                }
                for s in statuses
            }
        )
        return out

    def json_body(ref: str, description: str) -> dict[str, Any]:
        return {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": ref}}},
        }

    def generation(summary: str, name: str) -> dict[str, Any]:
        """A POST of {name}Request answered by a {name}, or with stream: true its events."""
        return {
            "post": {
                "summary": summary,
                "security": secured,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{name}Request"}
                        }
                    },
                },
                "responses": answers(
                    400,
                    401,
                    404,
                    413,
                    503,
                    504,
                    ok={
                        "description": f"the {name}, or with stream: true its events "
                        "(data: {chunk} ... data: [DONE])",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": f"#/components/schemas/{name}"}
                            },
                            # Before OpenAPI 3.2, an event stream's schema is one event's.
                            "text/event-stream": {
                                "schema": {
                                    "type": "object",
                                    "required": ["data"],
                                    "properties": {
                                        "data": {
                                            "type": "string",
                                            "description": f"a chunk as JSON (a {name} "
                                            "with the new text), or [DONE]",
                                        },
                                        "event": {"type": "string"},
                                    },
                                }
                            },
                        },
                    },
                ),
            }
        }

    def response(choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "items": choice},
                "usage": usage,
            },
        }

    secured = [{"bearer": []}] if server.api_key else []
    finish_reason = {"type": "string", "nullable": True, "enum": ["stop", "length", None]}
    choice = {
        "type": "object",
        "required": ["text", "index", "finish_reason"],
        "properties": {
            "text": {"type": "string"},
            "index": {"type": "integer"},
            "logprobs": {"nullable": True},
            "finish_reason": finish_reason,
        },
    }
    chat_choice = {
        "type": "object",
        "required": ["message", "index", "finish_reason"],
        "properties": {
            "message": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"type": "string", "enum": ["assistant"]},
                    "content": {"type": "string"},
                },
            },
            "index": {"type": "integer"},
            "logprobs": {"nullable": True},
            "finish_reason": finish_reason,
        },
    }
    usage = {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        },
    }
    model = {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["model"]},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "level": {"type": "string"},
            "parameters": {"type": "integer"},
            "block_size": {"type": "integer"},
            "vocab_size": {"type": "integer"},
            "loss_curve": {"type": "boolean"},
        },
    }
    model_param = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    doc = {
        "openapi": "3.0.3",
        "info": {
            "title": "smolgpt",
            "version": __version__,
            "description": "OpenAI-compatible completions and chat completions from smolgpt models",
        },
        "paths": {
            "/v1/completions": generation(
                "continue a prompt (stream: true for server-sent events)", "Completion"
            ),
            "/v1/chat/completions": generation(
                "the assistant's next message, continuing a plain transcript of the chat "
                "(one 'Role: content' line per message, then 'Assistant:') up to the next "
                "role line (stream: true for server-sent events)",
                "ChatCompletion",
            ),
            "/v1/models": {
                "get": {
                    "summary": "the models served",
                    "security": secured,
                    "responses": answers(
                        401, ok=json_body("#/components/schemas/ModelList", "the models")
                    ),
                }
            },
            "/v1/models/{model}": {
                "get": {
                    "summary": "one model",
                    "security": secured,
                    "parameters": model_param,
                    "responses": answers(
                        401, 404, ok=json_body("#/components/schemas/Model", "the model")
                    ),
                }
            },
            "/runs/{model}/loss": {
                "get": {
                    "summary": "the loss curve of the training run beside a model's checkpoint",
                    "security": secured,
                    "parameters": model_param,
                    "responses": answers(
                        401,
                        404,
                        ok={
                            "description": "evaluations in order",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                    ),
                }
            },
            "/health": {
                "get": {
                    "summary": "liveness, and how busy the server is",
                    "responses": {
                        "200": {
                            "description": "ok",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/": {
                "get": {
                    "summary": "the playground page",
                    "responses": {
                        "200": {
                            "description": "an HTML page",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "CompletionRequest": server.schema,
                "Completion": response(choice),
                "ChatCompletionRequest": server.chat_schema,
                "ChatCompletion": response(chat_choice),
                "Model": model,
                "ModelList": {
                    "type": "object",
                    "required": ["object", "data"],
                    "properties": {
                        "object": {"type": "string"},
                        "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["message", "type"],
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "param": {"type": "string", "nullable": True},
                                "code": {"type": "string", "nullable": True},
                            },
                        }
                    },
                },
            }
        },
    }
    if server.api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


# ------------------------------------------------------------------ running it


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or a SmolGPTError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        hint = "; choose another --port (0: any free one)" if port else ""
        raise SmolGPTError(f"cannot listen on {host}:{port} ({reason}){hint}") from None
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def serve(
    checkpoints: Sequence[str], ready: Optional[Callable[[str], None]] = None, **settings: Any
) -> None:
    """Serve checkpoints (paths to checkpoints, run directories or exports) until
    interrupted; settings are :class:`~smolgpt.config.ServeConfig`'s. The address is
    logged once the server listens, and passed to ready(url) if given."""
    cfg = ServeConfig(**settings)
    api_key = cfg.api_key or os.environ.get(API_KEY_VARIABLE) or None
    try:  # both, before any model loads
        importlib.import_module("starlette")
        import uvicorn
    except ImportError:
        raise SmolGPTError(install_hint()) from None
    sock = listen(cfg.host, cfg.port)  # first: a port in use fails before models load
    try:
        app = build_app(load_models(checkpoints, cfg.device), cfg, api_key)
    except BaseException:
        sock.close()
        raise
    if not is_loopback(cfg.host) and api_key is None:
        log.warning(
            "listening on %s without an API key: anyone who can reach this computer "
            "can use the models (see --api_key)",
            cfg.host,
        )
    address = url(sock)
    log.info(
        "serving %s at %s (the playground; the API under %sv1; Ctrl-C stops)",
        ", ".join(app.state.server.by_id),
        address,
        address,
    )
    if ready is not None:
        ready(address)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=3
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        app.state.server.generator.close()
        sock.close()
