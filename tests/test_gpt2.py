"""Starting from GPT-2 (issue #36): GPT-2's own tokenizer, its weights read into smolgpt's
model, --init_from gpt2 downloading from a Hub (a local one on 127.0.0.1 here) and
--init_from DIR. The GPT-2 is a tiny random one that transformers builds and saves as the
Hub's openai-community/gpt2 is laid out; smolgpt must compute what transformers does."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

import smolgpt as smolgpt_api
from smolgpt import finetune
from smolgpt.config import SampleConfig
from smolgpt.gpt2 import read_gpt2
from smolgpt.gpt2tokenizer import GPT2Tokenizer
from smolgpt.sampling import generate
from smolgpt.tokenizer import tokenizer_from_dict

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = (
    "It was the best of times, it was the worst of times,\n\n"
    "it was the age of wisdom, it was the age of foolishness... "
    "Café naïve 東京 123 4567  spaces   and\ttabs\r\n<|endoftext|>The end.\n"
)
# Texts whose ids must be GPT2TokenizerFast's: runs of spaces and line breaks, characters
# the vocabulary spells in bytes, the special token inside text.
PROBES = [
    TEXT,
    "",
    " ",
    "\n\n\n",
    "a  b   c\n \n",
    "emoji 🦙 and ünïcödé",
    "<|endoftext|><|endoftext|>x",
    "   leading and trailing   ",
]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A transformers GPT-2 directory as the Hub has it (config.json, model.safetensors,
    tokenizer.json, vocab.json, merges.txt, tokenizer_config.json): 2 layers, 32 wide,
    a byte-level BPE of a few hundred tokens ending in <|endoftext|>, weights scaled up so
    that logits differ clearly."""
    folder = tmp_path_factory.mktemp("gpt2")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT * 3], vocab_size=400, special_tokens=[])
    bpe.add_special_tokens(["<|endoftext|>"])
    bpe.save_model(str(folder))  # vocab.json and merges.txt
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "model_max_length": 64})
    )
    hf_tokenizer = transformers.GPT2TokenizerFast.from_pretrained(folder)
    config = transformers.GPT2Config(
        vocab_size=len(hf_tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=hf_tokenizer.eos_token_id,
        eos_token_id=hf_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(8)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def hf_tokenizer(folder: Path):
    return transformers.GPT2TokenizerFast.from_pretrained(folder)


# ------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab.json + merges.txt"])
def test_the_tokenizer_gives_gpt2_tokenizer_fasts_ids_and_decodes_exactly(
    gpt2_dir, tmp_path, files
):
    folder = gpt2_dir
    if files != "tokenizer.json":  # the older layout: vocabulary and merges only
        folder = tmp_path / "old"
        folder.mkdir()
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            (folder / name).write_bytes((gpt2_dir / name).read_bytes())
    ours, theirs = GPT2Tokenizer.from_files(folder), hf_tokenizer(folder)
    assert ours.vocab_size == len(theirs)
    assert ours.boundary_id() == theirs.eos_token_id == ours.encode("<|endoftext|>")[0]
    for text in PROBES:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.encode_array(text).tolist() == ids
        assert ours.decode(ids) == text == theirs.decode(ids)
        decoder = ours.decoder()
        assert "".join(decoder.add([i]) for i in ids) + decoder.flush() == text
        starts = ours.starts(text)
        assert len(starts) == len(ids) and starts == sorted(starts)
    assert ours.level == "bpe" and ours.unknown(TEXT) == []


def test_the_tokenizer_is_self_contained_in_a_checkpoints_dict(gpt2_dir):
    ours = GPT2Tokenizer.from_files(gpt2_dir)
    back = tokenizer_from_dict(ours.to_dict())
    assert type(back) is GPT2Tokenizer
    assert back.to_dict() == ours.to_dict()
    assert back.encode(TEXT) == ours.encode(TEXT)


# -------------------------------------------------------------------------- the weights


def test_smolgpt_computes_what_gpt2_lm_head_model_computes(gpt2_dir):
    module, tokenizer = read_gpt2(gpt2_dir)
    assert module.config.activation == "gelu_tanh" and module.config.position == "learned"
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    ids = tokenizer.encode(TEXT * 2)[:64]
    assert len(ids) == 64  # the whole context
    with torch.no_grad():
        ours = module(torch.tensor([ids]))[0][0]
        theirs = hf(torch.tensor([ids])).logits[0]
    assert ours.std() > 0.5  # logits that differ clearly: the comparison says something
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

    prompt, new = ids[:8], 40
    greedy = generate(module, prompt, SampleConfig(temperature=0, max_new_tokens=new))[0]
    hf_greedy = hf.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=new,
        min_new_tokens=new,  # (the model's eos would end transformers' continuation)
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    assert hf_greedy[0].tolist() == prompt + greedy
    assert len(set(greedy)) > 1


def test_the_hubs_older_names_and_mask_buffers_read_the_same(gpt2_dir, tmp_path):
    """openai-community/gpt2's model.safetensors names its tensors without "transformer."
    and holds each layer's attention mask (attn.bias): the same model."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "old"
    folder.mkdir()
    for f in gpt2_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    tensors = {
        k.removeprefix("transformer."): v
        for k, v in load_file(gpt2_dir / "model.safetensors").items()
    }
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(tensors, folder / "model.safetensors")
    a, _ = read_gpt2(gpt2_dir)
    b, _ = read_gpt2(folder)
    for name, t in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], t), name


# ------------------------------------------------------------------ the command line


def smolgpt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smolgpt", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_train_from_a_gpt2_directory_and_generate(gpt2_dir, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 20, encoding="utf-8")
    out = tmp_path / "run"
    args = ["--data", data, "--out_dir", out, "--max_iters", 5, "--batch_size", 2]
    result = smolgpt("train", "--init_from", gpt2_dir, *args, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    model = smolgpt_api.load(out, device="cpu")
    assert model.module.config.activation == "gelu_tanh"
    assert model.tokenizer.to_dict() == GPT2Tokenizer.from_files(gpt2_dir).to_dict()
    assert isinstance(model.generate("It was", max_new_tokens=5), str)

    conflict = smolgpt("train", "--init_from", gpt2_dir, *args, "--n_layer", 3, "--overwrite")
    assert conflict.returncode == 2 and "--n_layer 3 (source: 2)" in conflict.stderr


def test_a_smaller_block_size_keeps_what_the_source_computes_there(gpt2_dir):
    source = finetune.load_source(str(gpt2_dir))
    ids = torch.tensor([GPT2Tokenizer.from_files(gpt2_dir).encode(TEXT)[:32]])
    with torch.no_grad():
        expected, _ = source.module(ids)
        source.crop(32)
        cropped, _ = source.module(ids)
    assert source.module.config.block_size == 32 and source.module.wpe.weight.shape[0] == 32
    assert torch.equal(cropped, expected)


def test_train_a_gpt2_at_a_smaller_block_size(gpt2_dir, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 20, encoding="utf-8")
    out = tmp_path / "run"
    args = ["--data", data, "--out_dir", out, "--max_iters", 3, "--batch_size", 2]
    result = smolgpt("train", "--init_from", gpt2_dir, *args, "--block_size", 32)
    assert result.returncode == 0, result.stderr
    assert smolgpt_api.load(out, device="cpu").module.config.block_size == 32

    more = smolgpt("train", "--init_from", gpt2_dir, *args, "--block_size", 128, "--overwrite")
    lines = [line for line in more.stderr.splitlines() if line.strip()]
    assert more.returncode == 2 and len(lines) == 1, more.stderr
    assert "--block_size 128 is more than the 64 positions" in lines[0]


def test_init_from_gpt2_offline_says_what_it_needs_in_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = smolgpt("train", "--init_from", "gpt2", "--data", tmp_path, env=env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--init_from gpt2 needs the network once" in lines[0], lines


def test_an_unknown_name_lists_the_gpt2_names_in_one_line(tmp_path):
    result = smolgpt("train", "--init_from", "gpt3", "--data", tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "--init_from gpt3" in lines[0]
    assert all(name in lines[0] for name in ("gpt2,", "gpt2-medium", "gpt2-large", "gpt2-xl"))


def test_a_directory_that_is_not_a_gpt2_is_refused_in_one_line(gpt2_dir, tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = smolgpt("train", "--init_from", folder, "--data", tmp_path)
    assert result.returncode == 2 and "is not a GPT-2 directory" in result.stderr


# ------------------------------------------------------------------ the download


class LocalHub:
    """The Hugging Face Hub as huggingface_hub's snapshot_download asks it, on 127.0.0.1:
    the revision API (the commit and the files), the tree API (newer clients list the files
    there) and /{repo}/resolve/{revision}/{file} (HEAD for the ETag, commit and size, GET
    for the bytes), for one repository holding the files of folder. requests counts them."""

    COMMIT = "0" * 39 + "1"

    def __init__(self, repo_id: str, folder: Path) -> None:
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
                self.answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self.answer(body=True)

            def answer(self, body: bool) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                path = unquote(urlsplit(self.path).path)
                api = f"/api/models/{repo_id}"
                resolve = f"/{repo_id}/resolve/"
                headers = {"X-Repo-Commit": hub.COMMIT}
                if path in (api, f"{api}/revision/main", f"{api}/revision/{hub.COMMIT}"):
                    siblings = [{"rfilename": name} for name in files]
                    data = json.dumps({"id": repo_id, "sha": hub.COMMIT, "siblings": siblings})
                elif path.startswith(f"{api}/tree/"):
                    tree = [
                        {"type": "file", "path": name, "size": len(content), "oid": _sha1(content)}
                        for name, content in files.items()
                    ]
                    data = json.dumps(tree)
                elif path.startswith(resolve) and path.split("/")[-1] in files:
                    content = files[path.split("/")[-1]]
                    headers["ETag"] = f'"{hashlib.sha256(content).hexdigest()}"'
                    return self.send(content, "application/octet-stream", headers, body)
                else:
                    return self.send_error(404)
                self.send(data.encode(), "application/json", headers, body)

            def send(self, content: bytes, kind: str, headers: dict, body: bool) -> None:
                self.send_response(200)
                for name, value in {**headers, "Content-Type": kind}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if body:
                    self.wfile.write(content)

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def _sha1(content: bytes) -> str:
    """A file's git blob id, as the Hub lists it."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def hub_env(endpoint: str, home: Path) -> dict:
    """The environment of a smolgpt run whose Hub is endpoint and whose cache is under home
    (never the user's), online."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_init_from_gpt2_downloads_once_then_works_from_the_cache(gpt2_dir, tmp_path):
    pytest.importorskip("huggingface_hub")
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 20, encoding="utf-8")
    args = ["--data", data, "--max_iters", 2, "--batch_size", 2, "--block_size", 32]
    hub = LocalHub("openai-community/gpt2", gpt2_dir)
    try:
        env = hub_env(hub.url, tmp_path / "hf")
        first = smolgpt("train", "--init_from", "gpt2", *args, "--out_dir", tmp_path / "a", env=env)
    finally:
        hub.stop()
    assert first.returncode == 0, first.stderr
    downloads = [r for r in hub.requests if r.startswith("GET /openai-community/gpt2/resolve/")]
    assert len(downloads) == 6, hub.requests  # gpt2.FILES, each fetched once
    cached = list((tmp_path / "hf" / "hub").glob("models--openai-community--gpt2/snapshots/*"))
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    model = smolgpt_api.load(tmp_path / "a", device="cpu")
    assert model.tokenizer.to_dict() == GPT2Tokenizer.from_files(gpt2_dir).to_dict()

    # The Hub is gone now: the second run reads the cached copy.
    second = smolgpt("train", "--init_from", "gpt2", *args, "--out_dir", tmp_path / "b", env=env)
    assert second.returncode == 0, second.stderr


def test_init_from_gpt2_with_the_hub_unreachable_says_what_it_needs_in_one_line(tmp_path):
    pytest.importorskip("huggingface_hub")
    with socket.socket() as sock:  # a port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = hub_env(endpoint, tmp_path / "hf")
    result = smolgpt("train", "--init_from", "gpt2", "--data", tmp_path, env=env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--init_from gpt2 needs the network once" in lines[0], lines


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None,
    reason='needs the gguf and llamacpp extras: pip install -e ".[gguf,llamacpp]"',
)
def test_a_gpt2_exports_to_gguf_with_its_own_tokenizer(gpt2_dir, tmp_path):
    """GPT-2's architecture, tokenizer and <|endoftext|> in GGUF: llama.cpp reads smolgpt's
    ids and, with the same tanh GELU (but from its float16 table), nearly the same
    log-probabilities."""
    from llama_cpp import Llama

    from smolgpt.gguf_export import export_gguf

    module, tokenizer = read_gpt2(gpt2_dir)
    path = export_gguf(module.eval(), tokenizer, tmp_path / "gpt2.gguf")
    llama = Llama(
        model_path=str(path),
        n_ctx=64,
        n_batch=64,
        logits_all=True,
        type_k=0,
        type_v=0,
        verbose=False,
    )
    ids = tokenizer.encode(TEXT * 2)[:64]
    # (special: <|endoftext|> in the text is the token, as GPT-2's tokenizer reads it)
    assert llama.tokenize((TEXT * 2).encode(), add_bos=False, special=True)[:64] == ids
    assert llama.token_eos() == tokenizer.end_id == llama.token_bos()
    llama.eval(ids)
    theirs = torch.log_softmax(torch.tensor(llama.scores[: len(ids)], dtype=torch.float64), -1)
    with torch.no_grad():
        ours = torch.log_softmax(module(torch.tensor([ids]))[0][0].double(), -1)
    # (its GELU reads float16-rounded inputs from a table: 2.1e-3 at most was measured, over
    # every token of the vocabulary at every position)
    assert (theirs - ours).abs().max() < 5e-3


@pytest.mark.slow
def test_a_model_fine_tuned_from_gpt2_goes_everywhere_models_go(gpt2_dir, tmp_path):
    """eval, --resume, and the hf export back into transformers."""
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 20, encoding="utf-8")
    out = tmp_path / "run"
    args = ["--data", data, "--out_dir", out, "--batch_size", 2, "--eval_interval", 2]
    assert smolgpt("train", "--init_from", gpt2_dir, *args, "--max_iters", 2).returncode == 0
    resumed = smolgpt("train", "--init_from", gpt2_dir, *args, "--max_iters", 4, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    model = smolgpt_api.load(out, device="cpu")
    assert model.config.block_size == 64
    scored = smolgpt("eval", out)
    assert scored.returncode == 0 and "bits per char" in scored.stdout, scored.stderr
    export = model.export(tmp_path / "hf", format="hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(export).eval()
    ids = model.tokenizer.encode(TEXT)[:32]
    with torch.no_grad():
        torch.testing.assert_close(
            model.module(torch.tensor([ids]))[0][0],
            hf(torch.tensor([ids])).logits[0],
            rtol=0,
            atol=1e-4,
        )


@pytest.mark.slow
def test_a_model_fine_tuned_from_gpt2_serves_completions(gpt2_dir, smol_cli, tmp_path):
    """smolgpt serve on a fine-tune of a GPT-2: a completion through GPT-2's own tokenizer,
    its log-probabilities, and the same text greedy decoding gives in Python."""
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 20, encoding="utf-8")
    out = tmp_path / "tuned"
    args = ["--data", data, "--out_dir", out, "--max_iters", 2, "--batch_size", 2]
    assert smolgpt("train", "--init_from", gpt2_dir, *args).returncode == 0
    server = smol_cli.popen("module", "serve", out, "--port", "0")
    try:
        url = smol_cli.server_url(server)
        body = {"model": "tuned", "prompt": "It was", "max_tokens": 8, "temperature": 0}
        request = urllib.request.Request(
            url + "v1/completions",
            json.dumps({**body, "logprobs": 2}).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            (choice,) = json.loads(response.read())["choices"]
    finally:
        server.send_signal(signal.SIGTERM)
        result = server.wait(timeout=60)
    assert "Traceback" not in result.stderr, result.describe()
    model = smolgpt_api.load(out, device="cpu")
    assert choice["text"] == model.generate("It was", max_new_tokens=8, temperature=0)[6:]
    assert len(choice["logprobs"]["tokens"]) == 8
