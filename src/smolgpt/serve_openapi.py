"""The OpenAPI 3.0 description of ``smolgpt serve``: its endpoints, the request schemas of
serve_schema and the shapes of its answers."""

from __future__ import annotations

from typing import Any, Optional

from . import __version__


def openapi(schema: dict[str, Any], chat_schema: dict[str, Any], keyed: bool) -> dict[str, Any]:
    """The OpenAPI 3.0 description of the server's endpoints: schema and chat_schema are its
    requests' (with its limits); keyed: whether an API key is needed."""
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

    secured = [{"bearer": []}] if keyed else []
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
                "CompletionRequest": schema,
                "Completion": response(choice),
                "ChatCompletionRequest": chat_schema,
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
    if keyed:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
