"""The request schemas of ``smolgpt serve`` and their checker.

A request's sampling settings are :class:`~smolgpt.config.SampleConfig`'s under OpenAI's
names (max_tokens, n) or their own (top_k, min_p, repetition_penalty), with the same defaults,
except the seed: without one, each request draws its own, as OpenAI's API does. Their ranges
are those SampleConfig's fields declare (:func:`~smolgpt.settings.json_schema`), with the
server's caps on top. The request schemas here are the single definition of what is accepted (a
chat request's is a completion request's, with messages for the prompt): the OpenAPI
description (serve_openapi) publishes them and :func:`check` enforces them, answering a
violation with status 400 and OpenAI's error shape, ``{"error": {"message", "type", "param",
"code"}}``.

The models are base models, trained on plain text with no chat format: a chat reaches them as a
plain transcript that they continue, one "Role: content" line per message (:func:`chat_prompt`),
and the reply ends where the model begins the next role line (:func:`chat_stops`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from .config import SampleConfig, ServeConfig
from .errors import SmolGPTError
from .settings import json_schema

MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_STOP_CHARS = 200
MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20  # OpenAI's cap on logprobs in completions


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


# ------------------------------------------------------------------ the request schema

# OpenAI's names for SampleConfig's settings; the rest keep their own.
OPENAI_NAMES = {"max_new_tokens": "max_tokens", "num_samples": "n"}


def _setting(name: str, **server: Any) -> dict[str, Any]:
    """{name in requests: schema} of SampleConfig's setting name: the schema its field declares
    (settings.json_schema), with the server's additions, and null (the default) allowed."""
    schema = json_schema(SampleConfig.__dataclass_fields__[name])
    return {OPENAI_NAMES.get(name, name): {**schema, **server, "nullable": True}}


def _sampling(cfg: ServeConfig) -> dict[str, Any]:
    """The sampling settings a request may give, under their names in requests. The ranges are
    SampleConfig's; the maxima given here are the server's own caps."""
    stop_text = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
    return {
        **_setting("max_new_tokens", maximum=cfg.max_tokens),  # --max_tokens
        **_setting("temperature", maximum=2),  # OpenAI's API's cap
        **_setting("top_p"),
        **_setting("top_k"),
        **_setting("min_p"),
        **_setting("repetition_penalty", maximum=100),  # SampleConfig takes any positive one
        # OpenAI's: one string or a list of them; SampleConfig's stop is a tuple.
        "stop": {
            "oneOf": [stop_text, {"type": "array", "items": stop_text, "maxItems": MAX_STOPS}],
            "nullable": True,
            "description": "end a completion at any of these strings (left out of it)",
        },
        **_setting("num_samples", maximum=cfg.max_n),  # --max_n
        # The server's own: no default (each request draws its own), and the range of the
        # seeds it draws (SampleConfig's seed may be any int).
        "seed": {
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_SEED,
            "nullable": True,
            "description": "the same seed and settings give the same text; default: a "
            "new random seed per request",
        },
    }


def _unsupported(description: str) -> dict[str, Any]:
    """An OpenAI field accepted only at 0."""
    return {
        "type": "number",
        "nullable": True,
        "minimum": 0,
        "maximum": 0,
        "description": description,
    }


# What a request may say besides its prompt and sampling settings.
OPTIONS = {
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
    "logprobs": {
        "type": "integer",
        "nullable": True,
        "minimum": 0,
        "maximum": MAX_LOGPROBS,
        "description": "give each choice's logprobs: every token of its text (the prompt's "
        "too with echo) with its log-probability, the log_softmax of the model's logits before "
        "any sampling filter (temperature, top_k, top_p, min_p, repetition_penalty), and this "
        "many most likely tokens at its position, plus the token itself where it is not among "
        "them (as OpenAI's API). A prompt longer than the model's context is scored as "
        "smolgpt eval scores a text: in windows of block_size + 1 tokens every block_size "
        "tokens, each token predicted from those before it in its window; the first token has "
        "none (null). A token's text is its own decoded alone: U+FFFD for a byte-level token "
        "inside a character",
    },
    "user": {"type": "string", "nullable": True, "description": "accepted and ignored"},
    "frequency_penalty": _unsupported("not supported: only 0 (use repetition_penalty)"),
    "presence_penalty": _unsupported("not supported: only 0 (use repetition_penalty)"),
}


def completion_schema(cfg: ServeConfig, model_ids: Sequence[str]) -> dict[str, Any]:
    """The JSON schema (OpenAPI 3.0 dialect) of a completion request: what is accepted,
    with the limits of cfg."""
    text = {"type": "string", "minLength": 1, "maxLength": cfg.max_prompt_chars}
    # Token ids: as many as the characters a text may hold (a token is at least one).
    ids = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0},
        "minItems": 1,
        "maxItems": cfg.max_prompt_chars,
    }
    properties = {
        "model": {
            "type": "string",
            "enum": list(model_ids),
            "description": "the model's id (GET /v1/models); optional when one is served",
        },
        "prompt": {
            "oneOf": [
                text,
                {"type": "array", "items": text, "minItems": 1, "maxItems": cfg.max_n},
                ids,
                {"type": "array", "items": ids, "minItems": 1, "maxItems": cfg.max_n},
            ],
            "description": "the text to continue, a list of texts, the token ids of one "
            "(below the model's vocab_size, GET /v1/models; at most max_prompt_chars of them), "
            "or a list of those; one choice per prompt (times n)",
        },
        **_sampling(cfg),
        **OPTIONS,
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
        k: v
        for k, v in completion["properties"].items()
        # A chat's logprobs are another field (a flag, with top_logprobs), not served.
        if k not in ("model", "prompt", "echo", "logprobs")
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
        return check(value, _one_of(value, schema["oneOf"], name, param), name, param)
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
    checks = {
        "integer": _check_number,
        "number": _check_number,
        "string": _check_string,
        "array": _check_array,
        "object": _check_object,
    }
    if expected in checks:
        checks[expected](value, schema, name, param)


def _one_of(value: Any, options: list[dict[str, Any]], name: str, param: str) -> dict[str, Any]:
    """The option of a oneOf that value's type picks (an array's: its first item's type)."""
    matching = [o for o in options if _fits(value, o)]
    if not matching:
        kinds = " or an ".join(dict.fromkeys(o["type"] for o in options))
        raise ApiError(400, f"{name} must be a {kinds}, not {_json_type(value)}", param)
    arrays = [o for o in matching if o["type"] == "array" and value and _fits(value[0], o["items"])]
    if len(matching) > 1 and value and not arrays:
        kinds = " or an ".join(dict.fromkeys(o["items"]["type"] for o in matching))
        raise ApiError(400, f"{name}[0] must be a {kinds}, not {_json_type(value[0])}", param)
    return (arrays or matching)[0]


def _fits(value: Any, schema: dict[str, Any]) -> bool:
    """Whether value has schema's type."""
    kind = _json_type(value)
    return schema["type"] == kind or (schema["type"] == "number" and kind == "integer")


def _check_number(value: float, schema: dict[str, Any], name: str, param: str) -> None:
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and (value < low or (schema.get("exclusiveMinimum") and value == low)):
        relation = "above" if schema.get("exclusiveMinimum") else "at least"
        raise ApiError(400, f"{name} must be {relation} {low}, got {value}", param)
    if high is not None and value > high:
        raise ApiError(400, f"{name} must be at most {high}, got {value}", param)


def _check_string(value: str, schema: dict[str, Any], name: str, param: str) -> None:
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


def _check_array(value: list, schema: dict[str, Any], name: str, param: str) -> None:
    if len(value) < schema.get("minItems", 0):
        raise ApiError(400, f"{name} must not be an empty list", param)
    if len(value) > schema.get("maxItems", math.inf):
        raise ApiError(
            400, f"{name} holds {len(value)} items; the limit is {schema['maxItems']}", param
        )
    for i, item in enumerate(value):
        check(item, schema["items"], f"{name}[{i}]", param)


def _check_object(value: dict, schema: dict[str, Any], name: str, param: str) -> None:
    """An object's fields: none unknown, the required there, each as its schema says (the
    request's own fields are named, and reported as param, as they are)."""
    top = name == "request"
    known = schema.get("properties", {})
    if schema.get("additionalProperties") is False:
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ApiError(
                400,
                f"unknown or unsupported field(s) {', '.join(unknown)}"
                f"{'' if top else ' in ' + name}: choose from {', '.join(known)}",
                unknown[0] if top else param,
            )
    for field in schema.get("required", ()):
        if field not in value:
            if top:
                raise ApiError(400, f"the request needs {field!r}", field)
            raise ApiError(400, f"{name} needs {field!r}", param)
    for field, item in value.items():
        check(item, known[field], field if top else f"{name}.{field}", field if top else param)
