"""The OpenAPI 3.0 description of ``smolgpt serve``: its endpoints, the request schemas of
serve_schema and the shapes of its answers, put together from a piece per endpoint."""

from __future__ import annotations

from typing import Any, Optional

from .version import __version__

REASONS = {
    400: "invalid request",
    401: "API key missing or wrong",
    404: "no such model",
    413: "request body too large",
    503: "busy: try again shortly",
    504: "the request took longer than the server's timeout",
}

# ------------------------------------------------------------------ the answers' shapes

FINISH_REASON = {"type": "string", "nullable": True, "enum": ["stop", "length", None]}


# A completion's logprobs (the request's logprobs says what they are), one item per token.
LOGPROBS = {
    "type": "object",
    "nullable": True,
    "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
    "properties": {
        "tokens": {
            "type": "array",
            "items": {"type": "string"},
            "description": "each token's text (U+FFFD for a byte-level token inside a character)",
        },
        "token_logprobs": {
            "type": "array",
            "items": {"type": "number", "nullable": True},
            "description": "each token's log-probability (null for a prompt's first token)",
        },
        "top_logprobs": {
            "type": "array",
            "items": {
                "type": "object",
                "nullable": True,
                "additionalProperties": {"type": "number"},
            },
            "description": "the most likely tokens at each position and the token itself, "
            "{text: log-probability} (null for a prompt's first token)",
        },
        "text_offset": {
            "type": "array",
            "items": {"type": "integer"},
            "description": "where each token's text begins in the choice's text",
        },
    },
    "description": "with logprobs asked for: the tokens of this text, scored (in a stream's "
    "chunk, those of its new text); else null",
}


def _choice(key: str, schema: dict[str, Any], logprobs: dict[str, Any]) -> dict[str, Any]:
    """A choice of an answer, whose text is under key."""
    return {
        "type": "object",
        "required": [key, "index", "finish_reason"],
        "properties": {
            key: schema,
            "index": {"type": "integer"},
            "logprobs": logprobs,
            "finish_reason": FINISH_REASON,
        },
    }


CHOICE = _choice("text", {"type": "string"}, LOGPROBS)
CHAT_CHOICE = _choice(
    "message",
    {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["assistant"]},
            "content": {"type": "string"},
        },
    },
    {"nullable": True, "description": "always null"},
)
USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    },
}
MODEL = {
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
MODEL_LIST = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"type": "string"},
        "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
    },
}
ERROR = {
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
}


def response(choice: dict[str, Any]) -> dict[str, Any]:
    """A completion's (or chat's) answer, with choices of this shape."""
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": USAGE,
        },
    }


# ------------------------------------------------------------------ the endpoints


def answers(*statuses: int, ok: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The responses of an endpoint: ok for 200, and OpenAI's error object for statuses."""
    error = {"$ref": "#/components/schemas/Error"}
    out = {"200": ok} if ok else {}
    out.update(
        {
            str(s): {
                "description": REASONS[s],
                "content": {"application/json": {"schema": error}},
            }
            for s in statuses
        }
    )
    return out


def json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def event_stream(name: str) -> dict[str, Any]:
    """A stream of {name} chunks: before OpenAPI 3.2, an event stream's schema is one event's."""
    return {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "description": f"a chunk as JSON (a {name} with the new text), or [DONE]",
                },
                "event": {"type": "string"},
            },
        }
    }


def generation(summary: str, name: str) -> dict[str, Any]:
    """A POST of {name}Request answered by a {name}, or with stream: true its events."""
    ok = {
        "description": f"the {name}, or with stream: true its events "
        "(data: {chunk} ... data: [DONE])",
        "content": {
            "application/json": {"schema": ref(name)},
            "text/event-stream": event_stream(name),
        },
    }
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref(f"{name}Request")}},
            },
            "responses": answers(400, 404, 413, 503, 504, ok=ok),
        }
    }


def get(summary: str, responses: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"get": {"summary": summary, **more, "responses": responses}}


# The paths anyone may call, whether or not the server has an API key: the page, liveness and
# this description. Every other path needs the key (server.py's routes take it from here).
PUBLIC = frozenset({"/", "/health", "/openapi.json"})


def paths(secured: list) -> dict[str, Any]:
    """Every endpoint; those not PUBLIC with the security secured (the API key's, or none)
    and the answer 401."""
    endpoints = _endpoints()
    for path, operations in endpoints.items():
        if path not in PUBLIC:
            for operation in operations.values():
                operation["security"] = secured
                operation["responses"].update(answers(401))
    return endpoints


def _endpoints() -> dict[str, Any]:
    """Every endpoint, what the API key adds aside."""
    model_param = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    anything = {"type": "object"}
    return {
        "/v1/completions": generation(
            "continue a prompt (stream: true for server-sent events)", "Completion"
        ),
        "/v1/chat/completions": generation(
            "the assistant's next message, continuing a plain transcript of the chat "
            "(one 'Role: content' line per message, then 'Assistant:') up to the next "
            "role line (stream: true for server-sent events)",
            "ChatCompletion",
        ),
        "/v1/models": get(
            "the models served",
            answers(ok=json_body(ref("ModelList"), "the models")),
        ),
        "/v1/models/{model}": get(
            "one model",
            answers(404, ok=json_body(ref("Model"), "the model")),
            parameters=model_param,
        ),
        "/runs/{model}/loss": get(
            "the loss curve of the training run beside a model's checkpoint",
            answers(404, ok=json_body(anything, "evaluations in order")),
            parameters=model_param,
        ),
        "/health": get("liveness, and how busy the server is", {"200": json_body(anything, "ok")}),
        "/openapi.json": get(
            "this description", {"200": json_body(anything, "the OpenAPI 3.0 description")}
        ),
        "/": get(
            "the playground page",
            {
                "200": {
                    "description": "an HTML page",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
        ),
    }


def openapi(schema: dict[str, Any], chat_schema: dict[str, Any], keyed: bool) -> dict[str, Any]:
    """The OpenAPI 3.0 description of the server's endpoints: schema and chat_schema are its
    requests' (with its limits); keyed: whether an API key is needed."""
    components: dict[str, Any] = {
        "schemas": {
            "CompletionRequest": schema,
            "Completion": response(CHOICE),
            "ChatCompletionRequest": chat_schema,
            "ChatCompletion": response(CHAT_CHOICE),
            "Model": MODEL,
            "ModelList": MODEL_LIST,
            "Error": ERROR,
        }
    }
    if keyed:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "smolgpt",
            "version": __version__,
            "description": "OpenAI-compatible completions and chat completions from smolgpt models",
        },
        "paths": paths([{"bearer": []}] if keyed else []),
        "components": components,
    }
