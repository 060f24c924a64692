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

A request's sampling settings and the chat transcript are serve_schema's; the models served,
and how their generations take turns on one worker thread, are the scheduler's; the OpenAPI
description is serve_openapi's. This module is the application: routes, the API key, the
answers and their event streams, and :func:`serve`. Prompt length, max_tokens and n have
caps. The framework is Starlette on uvicorn (the serve extra): small, and built around
streaming responses.
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
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Sequence

from .config import ServeConfig
from .errors import SmolGPTError
from .extras import install_command
from .scheduler import (
    Completion,
    Generator,
    Served,
    Turns,
    Usage,
    load_models,
    parse_chat,
    parse_completion,
)
from .serve_openapi import PUBLIC, openapi
from .serve_schema import ApiError, chat_schema, completion_schema
from .version import __version__

log = logging.getLogger("smolgpt")

API_KEY_VARIABLE = "SMOLGPT_API_KEY"
JSON_OVERHEAD = 64 * 1024  # bytes a request body may hold besides its prompts


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
        # A prompt may take 6 bytes a character in JSON (\uXXXX escapes), or 8 a token id
        # (a comma, a space and 6 digits), as many ids as characters.
        self.max_body = 8 * cfg.max_prompt_chars * cfg.max_n + JSON_OVERHEAD

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
        # Each choice's logprobs (with logprobs asked for), the lists of its events joined.
        scores = [None if job.logprobs is None else _no_logprobs() for _ in texts]
        usage = Usage()
        events = self.generator.events(job, deadline, usage, gone)
        async for index, piece, reason, logprobs in events:
            texts[index] += piece
            reasons[index] = reason or reasons[index]
            for key, values in (logprobs or {}).items():
                scores[index][key] += values
        return {
            **_head(job),
            "choices": [
                _choice(job, i, text, reasons[i], logprobs=scores[i])
                for i, text in enumerate(texts)
            ],
            "usage": usage.body(),
        }


def _no_logprobs() -> dict[str, list]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


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
    job: Completion,
    index: int,
    text: str,
    reason: Optional[str],
    chunk: bool = False,
    logprobs: Optional[dict[str, list]] = None,
) -> dict[str, Any]:
    """One choice of a response, or (chunk) its new text in an event of a stream, with the
    logprobs of its tokens (a completion's, where asked for)."""
    if not job.chat:
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}
    if chunk:  # a chat's deltas: the role came first (EventStream), then the text
        key, message = "delta", ({"content": text} if text else {})
    else:
        key, message = "message", {"role": "assistant", "content": text}
    return {"index": index, key: message, "logprobs": None, "finish_reason": reason}


# ------------------------------------------------------------------ the routes


def error_response(error: ApiError, headers: Optional[dict] = None) -> Any:
    """OpenAI's error object, with error's status (and Retry-After on a 503)."""
    from starlette.responses import JSONResponse

    if error.status == 503:
        headers = {**(headers or {}), "Retry-After": "1"}
    return JSONResponse(error.body(), error.status, headers)


Handler = Callable[[Server, Any], Awaitable[Any]]


def endpoint(handler: Handler, keyed: bool) -> Callable[[Any], Awaitable[Any]]:
    """A route's endpoint: the API key check (where keyed: the one check of the server), then
    handler(server, request), whose dict is answered as JSON, str as HTML and anything else
    as the ASGI application it is; an ApiError becomes OpenAI's error response."""

    async def answer(request: Any) -> Any:
        from starlette.responses import HTMLResponse, JSONResponse

        server = request.app.state.server
        try:
            if keyed:
                server.authorize(request.headers)
            result = await handler(server, request)
        except ApiError as error:
            return error_response(error)
        if isinstance(result, dict):
            return JSONResponse(result)
        return HTMLResponse(result) if isinstance(result, str) else result

    return answer


async def read_json(request: Any, limit: int) -> dict[str, Any]:
    """The request's body as a JSON object, of limit bytes at most."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    try:
        parsed = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return parsed


async def _generate(
    server: Server, request: Any, parse: Callable[..., Completion], schema: dict[str, Any]
) -> Any:
    """A completion (or chat): parse reads a request that schema checks; the whole answer, or
    with stream: true its events."""
    started = time.monotonic()
    job = parse(await read_json(request, server.max_body), server.served, schema, server.cfg)
    deadline = started + server.cfg.timeout
    if job.stream:
        return EventStream(server, job, deadline, started)
    await server.turns.enter(deadline)
    try:
        result = await server.completion(job, deadline, request.is_disconnected)
    finally:
        server.turns.leave()
    _log_request(job, result["usage"]["completion_tokens"], started)
    return result


async def completions(server: Server, request: Any) -> Any:
    return await _generate(server, request, parse_completion, server.schema)


async def chat_completions(server: Server, request: Any) -> Any:
    return await _generate(server, request, parse_chat, server.chat_schema)


async def models(server: Server, request: Any) -> dict[str, Any]:
    return {"object": "list", "data": [s.description() for s in server.served]}


async def one_model(server: Server, request: Any) -> dict[str, Any]:
    return server.model(request.path_params["model"]).description()


async def loss(server: Server, request: Any) -> dict[str, Any]:
    return server.loss_curve(request.path_params["model"])


async def health(server: Server, request: Any) -> dict[str, Any]:
    return server.health()


async def openapi_json(server: Server, request: Any) -> dict[str, Any]:
    return openapi(server.schema, server.chat_schema, keyed=server.api_key is not None)


async def page(server: Server, request: Any) -> str:
    return playground_html()


async def not_found(request: Any, exc: Exception) -> Any:
    """A 404 or 405 from the router, in OpenAI's error shape."""
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
        ApiError(status, message, kind="invalid_request_error" if status < 500 else "server_error"),
        getattr(exc, "headers", None),
    )


# path, handler, methods (None: GET); the API key is needed on all but serve_openapi's PUBLIC.
ROUTES: list[tuple[str, Handler, Optional[list[str]]]] = [
    ("/", page, None),
    ("/health", health, None),
    ("/openapi.json", openapi_json, None),
    ("/v1/models", models, None),
    ("/v1/models/{model}", one_model, None),
    ("/v1/completions", completions, ["POST"]),
    ("/v1/chat/completions", chat_completions, ["POST"]),
    ("/runs/{model}/loss", loss, None),
]


def build_app(served: Sequence[Served], cfg: ServeConfig, api_key: Optional[str] = None):
    """The ASGI application serving these models (Starlette), for uvicorn or any ASGI server."""
    try:
        from starlette.applications import Starlette
        from starlette.routing import Route
    except ImportError:
        raise SmolGPTError(install_hint()) from None
    app = Starlette(
        routes=[
            Route(path, endpoint(handler, keyed=path not in PUBLIC), methods=methods)
            for path, handler, methods in ROUTES
        ],
        exception_handlers={404: not_found, 405: not_found},
    )
    app.state.server = Server(served, cfg, api_key)
    return app


# ------------------------------------------------------------------ streaming


class EventStream:
    """A completion streamed as server-sent events (an ASGI application), holding its turn
    until it ends."""

    headers = [
        (b"cache-control", b"no-cache"),
        (b"content-type", b"text/event-stream; charset=utf-8"),
    ]

    def __init__(self, server: Server, job: Completion, deadline: float, started: float):
        self.server, self.job, self.deadline, self.started = server, job, deadline, started
        self.left = asyncio.Event()  # the client disconnected
        self.usage = Usage()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self.server.turns.enter(self.deadline)
        except ApiError as error:
            return await error_response(error)(scope, receive, send)
        watcher = asyncio.ensure_future(self._watch(receive))
        events = self.server.generator.events(self.job, self.deadline, self.usage, self._gone)
        try:
            try:  # the first event before the status line: a prompt the model cannot read
                event = await anext(events, None)  # is answered 400 like any bad value
            except ApiError as error:
                return await error_response(error)(scope, receive, send)
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            if await self._send_events(send, event, events):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke while sending
            self.left.set()
        finally:
            await events.aclose()  # its own finally stops the generation
            watcher.cancel()
            self.server.turns.leave()
            note = " (client left)" if self.left.is_set() else ""
            _log_request(self.job, self.usage.completion_tokens, self.started, note)

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.left.set()

    async def _gone(self) -> bool:
        return self.left.is_set()

    async def _send_events(self, send, event: Any, events: AsyncIterator) -> bool:
        """Every event from the first on, then the usage (if asked for) and [DONE]; a timeout
        as an error event. False when the client left, and the body is not to be ended."""
        head = _head(self.job, chunk=True)
        try:
            for index in range(self.job.choices if self.job.chat else 0):
                # A chat's first chunk of each choice says whose message it is.
                first = _choice(self.job, index, "", None, chunk=True)
                first["delta"] = {"role": "assistant", "content": ""}
                await _event(send, {**head, "choices": [first]})
            while event is not None:
                index, piece, reason, logprobs = event
                choice = _choice(self.job, index, piece, reason, chunk=True, logprobs=logprobs)
                await _event(send, {**head, "choices": [choice]})
                event = await anext(events, None)
            if self.left.is_set():
                return False
            if self.job.include_usage:
                await _event(send, {**head, "choices": [], "usage": self.usage.body()})
            await _send(send, b"data: [DONE]\n\n")
        except ApiError as error:  # the timeout, after the status line went out
            await _event(send, error.body())
        return True


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
        app = build_app(load_models(checkpoints, cfg.device, cfg.quantize), cfg, api_key)
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
