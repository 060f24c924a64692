"""`smolgpt serve`'s log-probabilities and token-id prompts (what lm-evaluation-harness's
local-completions model sends): the real server in a subprocess on 127.0.0.1, a char model
and (with the tokenizers library) a bpe model, checked against the models themselves."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import smolgpt

from test_server import start_server, stop_server, stream

pytestmark = pytest.mark.slow
HAS_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None
LEVELS = [
    "char",
    pytest.param("bpe", marks=pytest.mark.skipif(not HAS_TOKENIZERS, reason="no tokenizers")),
]
# Longer than the tiny models' block_size (32 tokens): scored in several windows.
LONG = (
    "The old house stood by the river, and Holmes walked along the narrow lane "
    "with Watson, saying little."
)


@pytest.fixture(scope="module")
def runs(smol_runs, smol_cli, tmp_path_factory):
    """{level: run directory}: main's char model, and a bpe model trained here."""
    out = {"char": smol_runs["char"].out_dir}
    if HAS_TOKENIZERS:
        bpe = tmp_path_factory.mktemp("logprobs") / "bpe"
        args = smol_cli.train_args("bpe", bpe, "--vocab_size", "300", "--max_iters", "10")
        result = smol_cli.run("train", *args)
        assert result.returncode == 0, result.describe()
        out["bpe"] = bpe
    return out


@pytest.fixture(scope="module")
def server(smol_cli, runs):
    running = start_server(smol_cli, *runs.values())
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def models(runs):
    return {level: smolgpt.load(path, device="cpu") for level, path in runs.items()}


def complete(server, **body) -> dict:
    status, _, answer = server.complete(**body)
    assert status == 200, answer
    return answer


def scored(server, model: str, prompt, top: int = 3) -> dict:
    """The choice of an echo with no new tokens: the prompt's logprobs."""
    (choice,) = complete(server, model=model, prompt=prompt, echo=True, max_tokens=0, logprobs=top)[
        "choices"
    ]
    return choice


def direct(model, ids: list) -> list:
    """log p(ids[i] | the tokens before it in its window), the log_softmax of the model's
    logits, in smolgpt eval's windows (block_size + 1 tokens every block_size tokens)."""
    block = model.config.block_size
    out = [None]
    for start in range(0, len(ids) - 1, block):
        window = ids[start : start + block + 1]
        with torch.no_grad():
            logits, _ = model.module(torch.tensor([window[:-1]]))
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        out += [logp[i, token].item() for i, token in enumerate(window[1:])]
    return out


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("text", ["The old house", LONG])
def test_echo_without_new_tokens_is_the_models_log_probabilities(server, models, level, text):
    model = models[level]
    ids = model.tokenizer.encode(text)
    answer = complete(server, model=level, prompt=text, echo=True, max_tokens=0, logprobs=3)
    (choice,) = answer["choices"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 0
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [model.tokenizer.decode([i]) for i in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = direct(model, ids)
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected[1:], abs=1e-5)
    # The same numbers as smolgpt eval's loss over the same text.
    loss = -sum(logprobs["token_logprobs"][1:]) / (len(ids) - 1)
    assert loss == pytest.approx(model.evaluate(text).loss, abs=1e-5)
    for top, token, logprob in zip(
        logprobs["top_logprobs"][1:], logprobs["tokens"][1:], logprobs["token_logprobs"][1:]
    ):
        assert 3 <= len(top) <= 4 and top[token] == logprob  # the token itself is always there
        best = list(top.values())[:3]
        assert best == sorted(best, reverse=True) and best[0] >= logprob


def test_top_logprobs_hold_the_chosen_token(server):
    greedy = complete(server, model="char", prompt="The ", max_tokens=12, logprobs=2, temperature=0)
    logprobs = greedy["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 12
    for token, logprob, top in zip(
        *(logprobs[k] for k in ("tokens", "token_logprobs", "top_logprobs"))
    ):
        assert len(top) == 2 and max(top, key=top.get) == token and top[token] == logprob
    # Sampled from the whole distribution: the token is among the 1 best, or added after it.
    free = complete(
        server,
        model="char",
        prompt="The ",
        max_tokens=30,
        logprobs=1,
        temperature=1.5,
        top_k=0,
        seed=3,
    )["choices"][0]["logprobs"]
    assert any(len(top) == 2 for top in free["top_logprobs"])  # some token was not the likeliest
    for token, logprob, top in zip(free["tokens"], free["token_logprobs"], free["top_logprobs"]):
        assert 1 <= len(top) <= 2 and top[token] == logprob
        assert max(top.values()) == list(top.values())[0]
    # logprobs 0: each token's own log-probability alone, as OpenAI's API gives it.
    none = complete(server, model="char", prompt="The ", max_tokens=5, logprobs=0, seed=3)
    logprobs = none["choices"][0]["logprobs"]
    assert [list(top) for top in logprobs["top_logprobs"]] == [[t] for t in logprobs["tokens"]]


def test_generated_tokens_score_as_the_echoed_text_does(server):
    """A generated token's logprob is the model's before the sampling filters: the same as
    scoring the finished text (within one block)."""
    answer = complete(
        server,
        model="char",
        prompt="The ",
        max_tokens=20,
        logprobs=2,
        temperature=0.7,
        top_k=5,
        seed=9,
    )
    (choice,) = answer["choices"]
    again = scored(server, "char", "The " + choice["text"], top=2)["logprobs"]
    assert choice["logprobs"]["tokens"] == again["tokens"][4:]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(
        again["token_logprobs"][4:], abs=1e-4
    )
    assert choice["logprobs"]["text_offset"] == list(range(20))


@pytest.mark.parametrize("level", LEVELS)
def test_token_id_prompts_answer_as_their_text(server, models, level):
    texts = ["The old house", "Holmes said"]
    ids = [models[level].tokenizer.encode(t) for t in texts]
    body = dict(model=level, echo=True, max_tokens=8, logprobs=2, seed=4, n=2)
    by_text = complete(server, prompt=texts, **body)["choices"]
    by_ids = complete(server, prompt=ids, **body)["choices"]
    assert [c["text"] for c in by_ids] == [c["text"] for c in by_text]
    assert [c["logprobs"] for c in by_ids] == [c["logprobs"] for c in by_text]
    assert [c["text"][: len(texts[0])] for c in by_ids[:2]] == [texts[0]] * 2
    assert [c["text"][: len(texts[1])] for c in by_ids[2:]] == [texts[1]] * 2
    # One prompt of ids, one choice.
    (one,) = complete(server, prompt=ids[1], **{**body, "n": 1})["choices"]
    assert (
        one["text"] == complete(server, prompt=texts[1], **{**body, "n": 1})["choices"][0]["text"]
    )


@pytest.mark.parametrize("level", LEVELS)
def test_text_offsets_place_each_token_in_the_text(server, level):
    prompt = "Holmes saw it. " if level == "char" else "Holmes saw the café ☕ naïve "
    answer = complete(
        server,
        model=level,
        prompt=prompt,
        echo=True,
        max_tokens=15,
        logprobs=1,
        seed=2,
        temperature=1.0,
    )
    (choice,) = answer["choices"]
    text, logprobs = choice["text"], choice["logprobs"]
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(text)
    for token, offset in zip(logprobs["tokens"], offsets):
        # A byte-level token inside a character reads U+FFFD on its own.
        assert text[offset:].startswith(token) or "\ufffd" in token
    if level == "bpe":
        assert any("\ufffd" in token for token in logprobs["tokens"])  # ☕ is 3 bytes
    else:
        assert "".join(logprobs["tokens"]) == text


def test_streaming_gives_the_same_logprobs(server):
    body = dict(model="char", prompt="The old ", echo=True, max_tokens=25, logprobs=2, seed=6, n=2)
    whole = complete(server, **body)["choices"]
    chunks = [c for c in stream(server, body)[:-1]]
    for index, choice in enumerate(whole):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["text"] == "The old " and mine[0]["logprobs"]["tokens"] == list("The old ")
        joined = {key: [] for key in choice["logprobs"]}
        for chunk in mine:
            for key, values in (chunk["logprobs"] or {}).items():
                joined[key] += values
        assert joined == choice["logprobs"]
        assert "".join(c["text"] for c in mine) == choice["text"]


def test_a_stop_string_leaves_its_tokens_out(server):
    free = complete(server, model="char", prompt="The ", max_tokens=40, seed=5, logprobs=1)
    text = free["choices"][0]["text"]
    stop = text[10:12]
    cut = complete(
        server, model="char", prompt="The ", max_tokens=40, seed=5, logprobs=1, stop=[stop]
    )
    (choice,) = cut["choices"]
    assert choice["finish_reason"] == "stop"
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"] == text[: text.index(stop)]
    streamed = stream(
        server, dict(model="char", prompt="The ", max_tokens=40, seed=5, logprobs=1, stop=[stop])
    )
    tokens = [
        t for c in streamed[:-1] for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])
    ]
    assert "".join(tokens) == choice["text"]


BAD = [
    ({"logprobs": 21}, "logprobs", "at most 20"),
    ({"logprobs": -1}, "logprobs", "at least 0"),
    ({"logprobs": 1.5}, "logprobs", "integer"),
    ({"logprobs": True}, "logprobs", "integer"),
    ({"prompt": [5, 100000]}, "prompt", "100000"),
    ({"prompt": [[5], [100000]]}, "prompt", "vocabulary"),
    ({"prompt": [5, -1]}, "prompt", "at least 0"),
    ({"prompt": [5, 1.5]}, "prompt", "integer"),
    ({"prompt": [1.5]}, "prompt", "string or an integer"),
    ({"prompt": [[]]}, "prompt", "empty"),
    ({"prompt": [[5], "x"]}, "prompt", "array"),
    ({"prompt": [5] * 20001}, "prompt", "limit is 20000"),
]


@pytest.mark.parametrize("body,param,words", BAD, ids=[str(b)[:30] for b, _, _ in BAD])
def test_bad_logprobs_and_token_ids_are_400(server, body, param, words):
    status, _, answer = server.complete(**{"model": "char", "prompt": "x", **body})
    assert status == 400, answer
    assert answer["error"]["param"] == param and words in answer["error"]["message"], answer


def test_chat_has_no_logprobs_field(server):
    status, _, answer = server.call(
        "POST",
        "/v1/chat/completions",
        {"model": "char", "messages": [{"role": "user", "content": "x"}], "logprobs": 1},
    )
    assert status == 400 and answer["error"]["param"] == "logprobs"


def test_official_openai_client_scores_a_prompt(server, models):
    import openai

    client = openai.OpenAI(base_url=server.url + "v1", api_key="unused", max_retries=0)
    result = client.completions.create(
        model="char", prompt="The old house", logprobs=2, echo=True, max_tokens=0
    )
    (choice,) = result.choices
    assert choice.text == "The old house" and choice.logprobs.tokens == list("The old house")
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.top_logprobs[1]) >= 2
    ids = models["char"].tokenizer.encode("The old house")
    by_ids = client.completions.create(
        model="char", prompt=[ids], logprobs=2, echo=True, max_tokens=0
    )
    assert by_ids.choices[0].logprobs == choice.logprobs
