"""`smolgpt serve`: the real server in a subprocess on 127.0.0.1, spoken to over real sockets,
by the official openai client, by schemathesis, and by a headless Chromium for the page.

Three servers are started once for the module: ``main`` (a char and a word model, default
limits), ``strict`` (one turn, a queue of one, a 3 s timeout, an API key, listening on
0.0.0.0) and ``chats`` (a char model trained on chat transcripts, beside main's two); a few
tests start their own.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import smolgpt
from smolgpt.serve_schema import CHAT_STOPS, chat_prompt, chat_stops
from smolgpt.server import ROUTES, playground_html
from smolgpt.tokenizer import BPETokenizer, CharTokenizer, WordTokenizer

from e2e import (
    E2E_ROOT,
    e2e_assert_install_advice,
    e2e_assert_one_line_error,
    e2e_corpus_text,
    smolgpt_without,
)

pytestmark = pytest.mark.slow
API_KEY = "test-key-123"
ARTIFACTS = Path(os.environ.get("SMOLGPT_TEST_ARTIFACTS", E2E_ROOT / "test-artifacts"))


class Server:
    """A running `smolgpt serve` and plain HTTP calls to it."""

    def __init__(self, process, url: str, key: str = None):
        self.process, self.url, self.key = process, url, key
        self.host, port = re.match(r"http://([^:/]+):(\d+)/", url).groups()
        self.port = int(port)

    def connection(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def call(
        self,
        method: str,
        path: str,
        body=None,
        headers: dict = None,
        raw: bytes = None,
        key: bool = True,
    ):
        """(status, headers, parsed JSON body or text) of one request."""
        headers = dict(headers or {})
        if self.key and key:
            headers.setdefault("Authorization", f"Bearer {self.key}")
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            headers.setdefault("Content-Type", "application/json")
        conn = self.connection()
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            text = response.read().decode("utf-8")
            kind = response.headers.get("content-type", "")
            return response.status, response.headers, json.loads(text) if "json" in kind else text
        finally:
            conn.close()

    def complete(self, **body):
        return self.call("POST", "/v1/completions", body)

    def health(self) -> dict:
        return self.call("GET", "/health")[2]


def start_server(smol_cli, *args, env: dict = None) -> Server:
    process = smol_cli.popen(
        "module", "serve", *args, "--port", "0", env=smol_cli.env(**(env or {}))
    ).outlive_tests()
    return Server(process, smol_cli.server_url(process), (env or {}).get("SMOLGPT_API_KEY"))


def stop_server(server: Server) -> str:
    """SIGTERM ends it promptly and quietly; returns its stderr."""
    server.process.send_signal(signal.SIGTERM)
    try:
        result = server.process.wait(timeout=30)
    finally:
        server.process.kill()
    assert result.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM), result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    return result.stderr


@pytest.fixture(scope="module")
def runs(smol_runs):
    return smol_runs["char"].out_dir, smol_runs["word"].out_dir


@pytest.fixture(scope="module")
def main(smol_cli, runs):
    server = start_server(smol_cli, *runs)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def strict(smol_cli, runs):
    server = start_server(
        smol_cli,
        runs[0],
        "--host",
        "0.0.0.0",
        "--parallel",
        "1",
        "--queue",
        "1",
        "--timeout",
        "3",
        "--max_tokens",
        "100000",
        env={"SMOLGPT_API_KEY": API_KEY},
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def char_model(runs):
    return smolgpt.load(runs[0], device="cpu")


def transcripts(chats: int = 600, seed: int = 7) -> str:
    """Chats in chat_prompt's transcript format: what a base model learns to go on with."""
    rng = random.Random(seed)
    things = "key lamp door letter river house garden clock".split()
    places = ["by the door", "in the garden", "under the lamp", "on the stair", "near the river"]
    out = []
    for _ in range(chats):
        if rng.random() < 0.3:
            out.append("System: You answer in one line.")
        for _ in range(rng.randint(1, 3)):
            thing = rng.choice(things)
            out += [
                f"User: Where is the {thing}?",
                f"Assistant: The {thing} is {rng.choice(places)}.",
            ]
        out.append("")
    return "\n".join(out)


@pytest.fixture(scope="module")
def chat_run(smol_cli, tmp_path_factory):
    """A char model trained on transcripts (300 steps, seconds): it writes role lines. Some
    of the prose of main's models first, so that it knows every character they know."""
    base = tmp_path_factory.mktemp("chat")
    corpus = base / "transcripts.txt"
    corpus.write_text(e2e_corpus_text(20_000) + "\n" + transcripts(), encoding="utf-8")
    out = base / "chat"
    result = smol_cli.run(
        "train",
        "--level",
        "char",
        "--data",
        corpus,
        *smol_cli.tiny,
        "--out_dir",
        out,
        "--max_iters",
        "300",
    )
    assert result.returncode == 0, result.describe()
    return out


@pytest.fixture(scope="module")
def chats(smol_cli, chat_run, runs):
    server = start_server(smol_cli, chat_run, *runs)
    yield server
    stop_server(server)


def events(response) -> list:
    """The data of each server-sent event of a streamed response, as it arrives."""
    out = []
    for line in response:
        line = line.decode("utf-8").rstrip("\n")
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream(server: Server, body: dict, path: str = "/v1/completions") -> list:
    conn = server.connection()
    try:
        conn.request(
            "POST",
            path,
            json.dumps({**body, "stream": True}),
            {"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return events(response)
    finally:
        conn.close()


# ------------------------------------------------------------------ endpoints


def test_health_models_and_openapi(main):
    health = main.health()
    assert health["status"] == "ok" and health["models"] == ["char", "word"]
    assert health["generating"] == 0 and health["api_key_required"] is False

    status, _, listing = main.call("GET", "/v1/models")
    assert status == 200 and listing["object"] == "list"
    char, word = listing["data"]
    assert (char["id"], char["level"], word["id"], word["level"]) == (
        "char",
        "char",
        "word",
        "word",
    )
    assert char["object"] == "model" and char["owned_by"] == "smolgpt" and char["loss_curve"]
    assert main.call("GET", "/v1/models/word")[2] == word
    status, _, error = main.call("GET", "/v1/models/nope")
    assert status == 404 and error["error"]["code"] == "model_not_found"

    status, _, doc = main.call("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(doc["paths"])
    request = doc["components"]["schemas"]["CompletionRequest"]
    assert request["properties"]["model"]["enum"] == ["char", "word"]
    assert request["properties"]["max_tokens"]["maximum"] == 2000  # the server's cap
    assert request["required"] == ["prompt", "model"]  # two models: say which
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["required"] == ["messages", "model"]
    assert chat["properties"]["messages"]["items"]["properties"]["role"]["enum"] == [
        "system",
        "user",
        "assistant",
    ]
    # The sampling settings are the completions endpoint's, not a copy that could drift.
    for name in ("max_tokens", "temperature", "top_p", "top_k", "stop", "n", "seed", "stream"):
        assert chat["properties"][name] == request["properties"][name], name
    assert "prompt" not in chat["properties"] and "echo" not in chat["properties"]


def test_completion_is_the_api_generation(main, char_model):
    prompt = "The old house"
    status, _, result = main.complete(
        model="char", prompt=prompt, max_tokens=30, seed=7, temperature=0.9, top_k=20
    )
    assert status == 200, result
    assert result["object"] == "text_completion" and result["model"] == "char"
    assert result["id"].startswith("cmpl-")
    (choice,) = result["choices"]
    expected = char_model.generate(prompt, max_new_tokens=30, seed=7, temperature=0.9, top_k=20)
    assert choice["text"] == expected[len(prompt) :]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert result["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": 30,
        "total_tokens": len(prompt) + 30,
    }


def test_n_prompts_stop_and_echo(main, char_model):
    status, _, result = main.complete(
        model="char", prompt=["The ", "He "], n=2, max_tokens=8, seed=3
    )
    assert status == 200
    assert [c["index"] for c in result["choices"]] == [0, 1, 2, 3]
    batch = char_model.generate("He ", max_new_tokens=8, seed=3, num_samples=2)
    assert [c["text"] for c in result["choices"][2:]] == [t[3:] for t in batch]
    assert result["usage"]["completion_tokens"] == 32

    free = main.complete(model="char", prompt="The ", max_tokens=60, seed=5)[2]["choices"][0]
    stop = free["text"][10:12]  # a string the text is known to contain
    cut = main.complete(model="char", prompt="The ", max_tokens=60, seed=5, stop=[stop])[2]
    (choice,) = cut["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == free["text"][: free["text"].index(stop)]
    assert cut["usage"]["completion_tokens"] < 60

    echoed = main.complete(model="char", prompt="The ", max_tokens=60, seed=5, echo=True)[2]
    assert echoed["choices"][0]["text"] == "The " + free["text"]


def test_streaming_gives_the_same_text(main):
    body = {"model": "char", "prompt": "The ", "max_tokens": 40, "seed": 11}
    whole = main.complete(**body)[2]
    got = stream(main, {**body, "stream_options": {"include_usage": True}})
    assert got[-1] == "[DONE]"
    chunks, usage_chunk = got[:-2], got[-2]
    assert len(chunks) > 10  # piece by piece, not all at once
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert all(c["object"] == "text_completion" and c["model"] == "char" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    # Without stream_options, no usage chunk.
    assert all("usage" not in c for c in stream(main, body)[:-1])


def test_word_model_and_the_only_model_default(main, smol_cli, runs):
    status, _, result = main.complete(model="word", prompt="the old house", max_tokens=10)
    assert status == 200 and result["usage"]["completion_tokens"] == 10
    # With two models, "model" is required.
    status, _, error = main.complete(prompt="the", max_tokens=1)
    assert status == 400 and error["error"]["param"] == "model"


def test_official_openai_client(main):
    import openai

    client = openai.OpenAI(base_url=main.url + "v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["char", "word"]
    result = client.completions.create(
        model="char",
        prompt="The ",
        max_tokens=12,
        seed=1,
        temperature=0.5,
        top_p=0.9,
        stop=["\n\n"],
        extra_body={"top_k": 10, "repetition_penalty": 1.2},
    )
    assert result.object == "text_completion" and result.usage.completion_tokens <= 12
    streamed = client.completions.create(
        model="char",
        prompt="The ",
        max_tokens=12,
        seed=1,
        temperature=0.5,
        top_p=0.9,
        stop=["\n\n"],
        stream=True,
        extra_body={"top_k": 10, "repetition_penalty": 1.2},
    )
    assert "".join(c.choices[0].text for c in streamed) == result.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="char", prompt="x", temperature=3)


# ------------------------------------------------------------------ chats

CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Where is the key?"},
]
ROLE_LINES = ("\nSystem:", "\nUser:", "\nAssistant:")


def test_chat_prompt_is_a_plain_transcript():
    assert chat_prompt(CHAT) == (
        "System: You answer in one line.\nUser: Where is the key?\nAssistant:"
    )
    turns = [
        {"role": "user", "content": "  Hi\n"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": ""},
    ]
    assert chat_prompt(turns) == "User: Hi\nAssistant: Hello.\nUser: \nAssistant:"
    assert CHAT_STOPS == ROLE_LINES


def test_chat_stops_are_the_role_lines_as_each_level_writes_them():
    text = transcripts(20)
    assert chat_stops(CharTokenizer.train([text])) == ROLE_LINES
    assert chat_stops(BPETokenizer.train([text], 300)) == ROLE_LINES
    # A char model that cannot write "Assistant" never writes its line.
    assert chat_stops(CharTokenizer(set(text) - {"A"})) == ("\nSystem:", "\nUser:")
    # Word level keeps neither line breaks nor capitals; unknown labels read as <UNK>.
    words = WordTokenizer(["system", "user", "assistant", ":", "the"], min_word_freq=1)
    assert chat_stops(words) == (" system:", " user:", " assistant:")
    assert chat_stops(WordTokenizer(["the", ":"], min_word_freq=1)) == (" <UNK>:",)


def role_lines_cut(text: str) -> str:
    """text up to its first role line, without the whitespace around it."""
    ends = [text.index(line) for line in ROLE_LINES if line in text]
    return text[: min(ends, default=len(text))].strip()


def test_chat_with_the_openai_client(chats):
    import openai

    client = openai.OpenAI(base_url=chats.url + "v1", api_key="unused", max_retries=0)
    settings = dict(max_tokens=120, seed=5, temperature=0.9, n=3)
    result = client.chat.completions.create(
        model="chat", messages=CHAT, extra_body={"top_k": 20}, **settings
    )
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    assert result.model == "chat" and len(result.choices) == 3
    # The reply is the transcript's completion, cut where the model begins the next role line.
    status, _, raw = chats.complete(model="chat", prompt=chat_prompt(CHAT), top_k=20, **settings)
    assert status == 200, raw
    for choice, completion in zip(result.choices, raw["choices"]):
        assert choice.message.role == "assistant"
        assert choice.message.content == role_lines_cut(completion["text"])
        assert not any(line in choice.message.content for line in ROLE_LINES)
        # "stop" where the model began a role line within max_tokens, else "length".
        began = any(line in completion["text"] for line in ROLE_LINES)
        assert choice.finish_reason == ("stop" if began else "length")
    assert any("\nUser:" in c["text"] for c in raw["choices"])  # the stop is needed
    assert result.usage.prompt_tokens == len(chat_prompt(CHAT))
    assert result.usage.completion_tokens < raw["usage"]["completion_tokens"]

    chunks = list(
        client.chat.completions.create(
            model="chat",
            messages=CHAT,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"top_k": 20},
            **settings,
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    *deltas, usage = chunks
    assert usage.choices == [] and usage.usage == result.usage
    assert [c.choices[0].delta.role for c in deltas[:3]] == ["assistant"] * 3  # roles first
    assert len(deltas) > 20  # piece by piece
    for i, choice in enumerate(result.choices):
        mine = [c.choices[0] for c in deltas if c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        assert [c.finish_reason for c in mine][-1] == choice.finish_reason
        assert all(c.finish_reason is None for c in mine[:-1])


def test_chat_without_a_role_line_runs_to_max_tokens(chats):
    # A stop string of the request's own ends the reply too; without any, max_tokens does.
    body = {"model": "chat", "messages": CHAT, "max_tokens": 8, "seed": 2}
    status, _, result = chats.call("POST", "/v1/chat/completions", body)
    assert status == 200, result
    (choice,) = result["choices"]
    assert choice["finish_reason"] == "length" and result["usage"]["completion_tokens"] == 8
    assert set(choice["message"]) == {"role", "content"}
    assert choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    stop = content[3:5]  # a string the reply is known to contain
    cut = chats.call("POST", "/v1/chat/completions", {**body, "stop": stop})[2]["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["message"]["content"] == content[: content.index(stop)].strip()
    got = stream(chats, body, "/v1/chat/completions")
    assert got[-1] == "[DONE]" and got[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
    }
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in got[:-1]) == content


def test_chat_with_a_word_model_and_one_that_cannot_read_the_roles(chats):
    status, _, result = chats.call(
        "POST",
        "/v1/chat/completions",
        {
            "model": "word",
            "messages": [{"role": "user", "content": "the old house"}],
            "max_tokens": 10,
        },
    )
    assert status == 200, result
    assert result["choices"][0]["message"]["role"] == "assistant"
    # main's char model never saw a "U" or an "A": the transcript is refused, naming them.
    status, _, answer = chats.call(
        "POST", "/v1/chat/completions", {"model": "char", "messages": CHAT}
    )
    assert status == 400 and answer["error"]["param"] == "messages", answer
    assert "'U', 'A'" in answer["error"]["message"], answer
    assert "/v1/completions" in answer["error"]["message"]


BAD_CHATS = [
    # (body, param named, words in the message)
    ({"model": "chat", "messages": []}, "messages", "empty"),
    ({"model": "chat", "messages": "Hi"}, "messages", "array"),
    (
        {"model": "chat", "messages": [{"role": "bot", "content": "x"}]},
        "messages",
        "system, user, assistant",
    ),
    (
        {"model": "chat", "messages": [{"role": "user", "content": 3}]},
        "messages",
        "string, not integer",
    ),
    ({"model": "chat", "messages": [{"role": "user", "content": None}]}, "messages", "null"),
    (
        {
            "model": "chat",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
        },
        "messages",
        "string, not array",
    ),
    ({"model": "chat", "messages": [{"role": "user"}]}, "messages", "messages[0] needs 'content'"),
    (
        {"model": "chat", "messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        "messages",
        "tool_calls",
    ),
    (
        {"model": "chat", "messages": [{"role": "user", "content": "\u4e2d"}]},
        "messages",
        "vocabulary",
    ),
    (
        {"model": "chat", "messages": [{"role": "user", "content": "x" * 19990}] * 2},
        "messages",
        "limit is 20000",
    ),
    ({"model": "chat", "messages": CHAT, "temperature": 3}, "temperature", "at most 2"),
    ({"model": "chat", "messages": CHAT, "echo": True}, "echo", "unsupported"),
    ({"model": "chat", "prompt": "x"}, "prompt", "unsupported"),
    ({"model": "chat"}, "messages", "needs 'messages'"),
]


@pytest.mark.parametrize(
    "body,param,words", BAD_CHATS, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD_CHATS)]
)
def test_bad_chats_are_400_in_openai_shape(chats, body, param, words):
    for streaming in (False, True):  # refused before the status line either way
        status, _, answer = chats.call(
            "POST", "/v1/chat/completions", {**body, "stream": streaming}
        )
        assert status == 400, answer
        error = answer["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
        assert words in error["message"] and "\n" not in error["message"], error["message"]


def test_the_openai_client_sees_chat_refusals(chats):
    import openai

    client = openai.OpenAI(base_url=chats.url + "v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="chat", messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)


# ------------------------------------------------------------------ bad requests

BAD_REQUESTS = [
    # (body, param named, words in the message)
    ({"model": "char", "prompt": "x", "temperature": -0.1}, "temperature", "at least 0"),
    ({"model": "char", "prompt": "x", "top_p": 0}, "top_p", "above 0"),
    ({"model": "char", "prompt": "x", "max_tokens": 2001}, "max_tokens", "at most 2000"),
    ({"model": "char", "prompt": "x", "max_tokens": "10"}, "max_tokens", "integer"),
    ({"model": "char", "prompt": "x", "max_tokens": 1.5}, "max_tokens", "integer"),
    ({"model": "char", "prompt": "x", "n": True}, "n", "integer"),
    ({"model": "char", "prompt": "x", "n": 9}, "n", "at most 8"),
    ({"model": "char", "prompt": ["a", "b", "c"], "n": 3}, "n", "limit is 8"),
    ({"model": "char", "prompt": ""}, "prompt", "empty"),
    ({"model": "char", "prompt": []}, "prompt", "empty"),
    ({"model": "char", "prompt": "x" * 20001}, "prompt", "limit is 20000"),
    ({"model": "char", "prompt": [1.5, 2]}, "prompt", "string or an integer"),
    ({"model": "char", "prompt": "\u00e9\u4e2d"}, "prompt", "vocabulary"),
    ({"model": "char", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "limit is 4"),
    ({"model": "char", "prompt": "x", "stop": ""}, "stop", "empty"),
    ({"model": "char", "prompt": "x", "logprobs": 21}, "logprobs", "at most 20"),
    ({"model": "char", "prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty", "at most 0"),
    ({"model": "char", "prompt": "x", "stream_options": {"x": 1}}, "stream_options", "unknown"),
    ({"model": "char"}, "prompt", "needs 'prompt'"),
    ({"model": 3, "prompt": "x"}, "model", "string"),
]


@pytest.mark.parametrize(
    "body,param,words", BAD_REQUESTS, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD_REQUESTS)]
)
def test_bad_values_are_400_in_openai_shape(main, body, param, words):
    status, _, answer = main.complete(**body)
    assert status == 400, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"], error["message"]


@pytest.mark.parametrize(
    "raw,words",
    [
        (b'{"model": "char", "prompt": ', "not valid JSON"),
        (b'["a list"]', "JSON object"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"model": "char", "prompt": "x", "temperature": NaN}', "finite"),
        (b'{"model": "char", "prompt": "\\ud800"}', "surrogate"),
    ],
)
def test_malformed_bodies_are_400(main, raw, words):
    status, _, answer = main.call("POST", "/v1/completions", raw=raw)
    assert status == 400 and words in answer["error"]["message"], answer


def test_a_prompt_the_model_cannot_read_is_400_when_streaming_too(main):
    conn = main.connection()
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": "char", "prompt": "\u4e2d", "stream": True}),
        {"Content-Type": "application/json"},
    )
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    assert response.status == 400 and answer["error"]["param"] == "prompt"
    assert "\u4e2d" in answer["error"]["message"]  # the character the model does not know


def test_other_http_errors(main):
    status, _, answer = main.complete(model="nope", prompt="x")
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    status, headers, answer = main.call("GET", "/v1/completions")
    assert status == 405 and "POST" in headers["allow"] and answer["error"]["message"]
    status, _, answer = main.call("GET", "/v2/whatever")
    assert status == 404 and "openapi.json" in answer["error"]["message"]
    status, _, answer = main.call("POST", "/v1/completions", raw=b"x" * 3_000_000)
    assert status == 413 and answer["error"]["code"] == "too_large"
    assert main.health()["status"] == "ok"  # and it is still up


# ------------------------------------------------------------------ load, limits, clients


def test_twenty_concurrent_requests(main):
    def one(i: int):
        started = time.monotonic()
        status, _, result = main.complete(model="char", prompt="The ", max_tokens=20, seed=i)
        return status, result, time.monotonic() - started

    started = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    wall = time.monotonic() - started
    assert [r[0] for r in results] == [200] * 20, [r[1] for r in results if r[0] != 200]
    assert all(r[1]["usage"]["completion_tokens"] == 20 for r in results)
    slowest = max(r[2] for r in results)
    print(f"20 concurrent completions of 20 tokens: {wall:.2f} s in all, slowest {slowest:.2f} s")
    assert slowest < 60
    assert main.health()["generating"] == 0 and main.health()["waiting"] == 0


def test_busy_answer_when_the_queue_is_full(strict):
    holder = strict.connection()  # holds the only turn, streaming, until closed
    holder.request(
        "POST",
        "/v1/completions",
        json.dumps({"prompt": "The ", "max_tokens": 100000, "stream": True}),
        {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    held = holder.getresponse()
    assert held.status == 200 and held.readline().startswith(b"data: ")

    def one(i: int):
        return strict.complete(prompt="The ", max_tokens=5, seed=i)

    pool = ThreadPoolExecutor(20)
    futures = [pool.submit(one, i) for i in range(20)]
    answered = []
    deadline = time.monotonic() + 30
    while len(answered) < 19 and time.monotonic() < deadline:  # all but the one waiting
        answered = [f.result() for f in futures if f.done()]
        time.sleep(0.02)
    assert len(answered) == 19 and all(status == 503 for status, _, _ in answered), answered
    status, headers, answer = answered[0]
    assert headers["retry-after"] == "1" and answer["error"]["code"] == "busy"
    assert answer["error"]["type"] == "server_error"
    holder.close()  # its generation stops; the waiting request gets the turn
    waited = [f.result() for f in futures if (f.result()[0] != 503)]
    pool.shutdown()
    assert [w[0] for w in waited] == [200], waited


def test_timeout_ends_a_long_request(strict):
    started = time.monotonic()
    status, _, answer = strict.complete(prompt="The ", max_tokens=100000)
    assert status == 504 and answer["error"]["code"] == "timeout"
    assert 2.5 < time.monotonic() - started < 20
    # Streaming: the status has gone out already, so the error is the last event.
    got = stream_with_key(strict, {"prompt": "The ", "max_tokens": 100000})
    assert got[-1]["error"]["code"] == "timeout" and "[DONE]" not in got


def stream_with_key(server: Server, body: dict) -> list:
    conn = server.connection()
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({**body, "stream": True}),
        {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    try:
        return events(conn.getresponse())
    finally:
        conn.close()


def test_api_key_and_non_loopback_warning(strict):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        status, _, answer = strict.call("GET", "/v1/models", headers=headers, key=False)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key", headers
        status, _, _ = strict.call(
            "POST", "/v1/completions", {"prompt": "x"}, headers=headers, key=False
        )
        assert status == 401
    assert strict.call("GET", "/v1/models")[0] == 200
    # The page, health and the description need no key; the page then asks for it.
    assert strict.call("GET", "/health", key=False)[2]["api_key_required"] is True
    assert strict.call("GET", "/", key=False)[0] == 200
    doc = strict.call("GET", "/openapi.json", key=False)[2]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "--api_key" not in strict.process.stderr_so_far()  # it has one: no warning


def test_routes_and_their_description_agree(strict):
    # The paths served and those described: the same, with the same methods, and the API key
    # asked for exactly where the description says so (its security and its 401 answer).
    doc = strict.call("GET", "/openapi.json", key=False)[2]
    served = {path: {m.lower() for m in methods or ["GET"]} for path, _, methods in ROUTES}
    assert {path: set(operations) for path, operations in doc["paths"].items()} == served
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            status = strict.call(method.upper(), path.replace("{model}", "char"), key=False)[0]
            keyed = operation.get("security") == [{"bearer": []}]
            assert keyed == ("401" in operation["responses"]) == (status == 401), (method, path)
            assert keyed or status == 200, (method, path)


def test_disconnect_stops_generation(main):
    conn = main.connection()
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": "char", "prompt": "The ", "max_tokens": 2000, "stream": True}),
        {"Content-Type": "application/json"},
    )
    response = conn.getresponse()
    for _ in range(3):
        assert response.readline().startswith(b"data: ")
        response.readline()
    assert main.health()["generating"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 10
    while main.health()["generating"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert main.health()["generating"] == 0
    made = main.health()["tokens_generated"]
    time.sleep(0.3)
    assert main.health()["tokens_generated"] == made  # nothing runs on for it

    # A client that leaves a (non-streaming) request stops it too.
    before = main.health()["tokens_generated"]
    sock = socket.create_connection(("127.0.0.1", main.port))
    body = json.dumps({"model": "char", "prompt": "The ", "max_tokens": 2000}).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    while main.health()["tokens_generated"] == before:
        time.sleep(0.01)
    sock.close()
    deadline = time.monotonic() + 10
    while main.health()["generating"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert main.health()["generating"] == 0
    assert main.health()["tokens_generated"] - before < 2000


# ------------------------------------------------------------------ the description, fuzzed


def test_schemathesis_against_the_openapi_description(smol_cli, chat_run, tmp_path):
    # The chat model knows every character main's char model does, and can read the chat
    # transcript's role lines too ("U" and "A"), which main's cannot.
    server = start_server(
        smol_cli, chat_run, "--max_tokens", "16", "--max_n", "2", "--max_prompt_chars", "200"
    )
    try:
        # positive_data_acceptance is left out: a schema cannot say which characters a char
        # model knows, that n times the prompts has a cap, nor how long a chat's transcript
        # grows (all documented 400 answers).
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                server.url + "openapi.json",
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                "--max-examples",
                "25",
                "--generation-deterministic",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=smol_cli.env(),
            cwd=tmp_path,
        )
    finally:
        stop_server(server)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout


# ------------------------------------------------------------------ the page


def test_page_is_self_contained():
    html = playground_html()
    for attribute in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html):
        assert attribute.startswith("data:") or attribute.startswith("/"), attribute
    assert "http://" not in html and "https://" not in html and "@import" not in html


def chromium() -> str:
    found = (
        os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if not found:
        pytest.skip("no chromium: install Debian's chromium (apt-get install chromium)")
    return found


def test_playground_in_headless_chromium(main):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    requested, problems = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(),
            args=(
                "--no-sandbox --disable-gpu --disable-background-networking "
                "--disable-component-update --disable-sync --no-first-run"
            ).split(),
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.on("request", lambda r: requested.append(r.url))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(main.url)
            page.wait_for_selector("#model option", state="attached")
            assert page.eval_on_selector_all("#model option", "o => o.map(x => x.value)") == [
                "char",
                "word",
            ]
            page.wait_for_selector("#curve svg polyline", state="attached")  # its run's loss
            page.fill("#prompt", "The old house")
            page.eval_on_selector(
                "#max_tokens", "e => { e.value = 400; e.dispatchEvent(new Event('input')); }"
            )
            # Text appears while Generate is still disabled: it streams. Watched by the page
            # itself as the text changes (polling from here could miss a short generation on
            # a loaded machine: it once did).
            page.evaluate(
                """() => {
                    window.streamed = false;
                    new MutationObserver(() => {
                        const text = document.getElementById('completion')?.textContent;
                        if (text && document.getElementById('generate').disabled) {
                            window.streamed = true;
                        }
                    }).observe(document.body, {childList: true, subtree: true,
                                               characterData: true});
                }"""
            )
            page.click("#generate")
            page.wait_for_function(
                "document.getElementById('status').textContent.includes('tokens/s')", timeout=60_000
            )
            streamed = page.evaluate("window.streamed")
            text = page.text_content("#completion")
            page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert streamed
    assert len(text) > 100
    assert any(url.endswith("/v1/completions") for url in requested)
    assert all(url.startswith(main.url) for url in requested), requested  # nothing external


# ------------------------------------------------------------------ the command line


def test_command_line_errors_are_one_line(smol_cli, runs, tmp_path):
    missing = smol_cli.run("module", "serve", tmp_path / "nothing.pth")
    e2e_assert_one_line_error(missing, "nothing.pth", "not exist")
    for flags, needles in (
        (["--port", "70000"], ("--port", "70000")),
        (["--timeout", "0"], ("--timeout",)),
        (["--queue", "-1"], ("--queue", "-1")),
        (["--device", "tpu"], ("device", "'tpu'")),
    ):
        e2e_assert_one_line_error(smol_cli.run("module", "serve", runs[0], *flags), *needles)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = smol_cli.run("module", "serve", runs[0], "--port", port)
    # The port, the system's reason, and the flag that chooses another.
    e2e_assert_one_line_error(busy, str(port), os.strerror(errno.EADDRINUSE), "--port")
    without = smolgpt_without("starlette", "serve", runs[0])
    assert without.returncode == 2 and without.stderr.count("\n") == 1, without.stderr
    e2e_assert_install_advice(without.stderr, "serve")


def test_unique_names_and_the_warning_on_every_network(smol_cli, runs, tmp_path, main):
    other = tmp_path / "char"
    shutil.copytree(runs[0], other, ignore=shutil.ignore_patterns(".lock"))
    server = start_server(smol_cli, runs[0], other / "latest_model.pth", other, "--host", "0.0.0.0")
    try:
        assert server.health()["models"] == ["char", "char-latest", "char-2"]
    finally:
        stderr = stop_server(server)
    # A warning naming the address and the flag that closes it; none on the loopback.
    assert any("0.0.0.0" in line and "--api_key" in line for line in stderr.splitlines()), stderr
    assert "--api_key" not in main.process.stderr_so_far()


def test_python_api(runs, tmp_path):
    """smolgpt.serve() is the command's engine: a script can call it, and Ctrl-C ends it."""
    script = tmp_path / "serve.py"
    script.write_text(
        "import smolgpt, sys\n"
        "smolgpt.serve([sys.argv[1]], port=0, ready=lambda url: print(url, flush=True))\n"
    )
    process = subprocess.Popen(
        [sys.executable, str(script), str(runs[0])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = process.stdout.readline().strip()
        conn = http.client.HTTPConnection(*re.match(r"http://(.+):(\d+)/", url).groups())
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["models"] == ["char"]
        conn.close()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
