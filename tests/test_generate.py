"""generate.py as a user meets it: text streams to stdout as it is made and equals the API's
text, stop strings typed on a shell, prompts from files, output to files, and the interactive
prompt loop driven through a pipe (Ctrl-C included)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest

import smolgpt

pytestmark = pytest.mark.slow

PROMPT = "The old "


@pytest.fixture(scope="module")
def char_ckpt(smol_runs):
    return smol_runs["char"].out_dir / "best_model.pth"


@pytest.fixture(scope="module")
def char_model(char_ckpt):
    return smolgpt.load(char_ckpt, device="cpu")


def generate_process(smol_cli, *args, **kwargs) -> subprocess.Popen:
    """generate.py with pipes for stdin, stdout and stderr."""
    return subprocess.Popen(
        smol_cli.argv("generate", *args),
        env=smol_cli.env(),
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def test_printed_text_equals_the_api_text_at_both_levels(smol_cli, smol_runs, char_model):
    word_ckpt = smol_runs["word"].out_dir / "best_model.pth"
    char, word = smol_cli.run_many(
        [
            (
                "generate",
                [
                    smol_runs["char"].out_dir / "best_model.pth",
                    "--prompt",
                    PROMPT,
                    "--max_new_tokens",
                    "60",
                    "--seed",
                    "5",
                    "--min_p",
                    "0.05",
                    "--repetition_penalty",
                    "1.2",
                ],
            ),
            (
                "generate",
                [word_ckpt, "--prompt", "the old house", "--max_new_tokens", "30", "--seed", "5"],
            ),
        ]
    )
    assert char.returncode == 0, char.describe()
    assert (
        char.stdout
        == char_model.generate(
            PROMPT, max_new_tokens=60, seed=5, min_p=0.05, repetition_penalty=1.2
        )
        + "\n"
    )
    assert word.returncode == 0, word.describe()
    word_model = smolgpt.load(word_ckpt, device="cpu")
    assert word.stdout == word_model.generate("the old house", max_new_tokens=30, seed=5) + "\n"


def test_text_appears_while_it_is_generated(smol_cli, char_ckpt):
    # 20,000 characters past a 32-token window take several seconds: the first ones must
    # arrive long before the process ends.
    proc = generate_process(smol_cli, char_ckpt, "--prompt", PROMPT, "--max_new_tokens", "20000")
    try:
        first = proc.stdout.read(len(PROMPT) + 20)
        assert first.startswith(PROMPT) and len(first) == len(PROMPT) + 20
        assert proc.poll() is None, "the text came only when generation was over"
    finally:
        proc.kill()
        proc.communicate()


def test_stop_strings_typed_on_a_shell(smol_cli, char_ckpt, char_model):
    result = smol_cli.run(
        "generate",
        char_ckpt,
        "--prompt",
        PROMPT,
        "--max_new_tokens",
        "300",
        "--stop",
        r"\n",
        "--stop",
        "zzz",
    )
    assert result.returncode == 0, result.describe()
    expected = char_model.generate(PROMPT, max_new_tokens=300, stop=["\n", "zzz"])
    full = char_model.generate(PROMPT, max_new_tokens=300)
    assert "\n" in full[len(PROMPT) :]  # the stop string is reached ...
    assert result.stdout == expected + "\n" == full[: full.index("\n", len(PROMPT))] + "\n"


def test_prompt_file_and_out_file(smol_cli, char_ckpt, char_model, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_bytes(b"\xef\xbb\xbfThe old\r\nhouse ")  # a BOM and a Windows line end
    out = tmp_path / "story.txt"
    out.write_text("an earlier story\n", encoding="utf-8")
    result = smol_cli.run(
        "generate",
        char_ckpt,
        "--prompt_file",
        prompt_file,
        "--max_new_tokens",
        "50",
        "--num_samples",
        "2",
        "--out",
        out,
    )
    assert result.returncode == 0, result.describe()
    assert result.stdout == ""  # the text went to the file
    texts = char_model.generate("The old\nhouse ", max_new_tokens=50, num_samples=2)
    assert out.read_text(encoding="utf-8") == "\n---\n".join(texts) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompt.txt", "story.txt"]


def test_interactive_loop_through_a_pipe(smol_cli, char_ckpt, char_model):
    proc = generate_process(
        smol_cli, char_ckpt, "--interactive", "--max_new_tokens", "40", "--seed", "3"
    )
    out, err = proc.communicate("The old\nThe cat\n\nnot read: the loop has ended\n", timeout=120)
    assert proc.returncode == 0, err
    assert out == "".join(
        char_model.generate(prompt, max_new_tokens=40, seed=3 + turn) + "\n"
        for turn, prompt in enumerate(["The old", "The cat"])
    )
    assert "Ctrl-D" in err  # the hint names the keys that end the loop
    assert "Traceback" not in err


def test_interactive_loop_ends_at_end_of_input(smol_cli, char_ckpt):
    proc = generate_process(smol_cli, char_ckpt, "--interactive", "--max_new_tokens", "5")
    out, err = proc.communicate("The old", timeout=120)  # no newline, then end of input
    assert proc.returncode == 0, err
    assert out.startswith("The old") and len(out) == len("The old") + 5 + 1


class PipeReader:
    """Everything a process writes to a pipe, collected by a thread (a read never blocks a test)."""

    def __init__(self, pipe):
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        while chunk := pipe.read(1):
            self.text += chunk

    def wait_for(self, needle: str, after: int = 0, timeout: float = 60) -> int:
        """Wait until needle appears in the text at or after index after; return its index."""
        deadline = time.monotonic() + timeout
        while (found := self.text.find(needle, after)) < 0:
            assert time.monotonic() < deadline, f"{needle!r} never came: {self.text[-200:]!r}"
            time.sleep(0.02)
        return found


def test_interactive_ctrl_c_stops_one_generation_only(smol_cli, char_ckpt):
    proc = generate_process(smol_cli, char_ckpt, "--interactive", "--max_new_tokens", "1000000")
    out, err = PipeReader(proc.stdout), PipeReader(proc.stderr)
    try:
        for turn, prompt in enumerate(["The old", "The cat"]):
            proc.stdin.write(prompt + "\n")
            proc.stdin.flush()
            start = out.wait_for(prompt, after=len(out.text) if turn else 0)
            out.wait_for(prompt, after=start)  # (it is there already)
            while len(out.text) < start + len(prompt) + 20:  # generation is under way
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
            err.wait_for("(stopped)", after=err.text.find("(stopped)") + 1 if turn else 0)
        proc.stdin.close()  # end of input: the loop ends
        assert proc.wait(timeout=60) == 0, err.text
    finally:
        proc.kill()
    assert err.text.count("(stopped)") == 2 and "Traceback" not in err.text
    assert "\nThe cat" in out.text  # the stopped line was ended; the next turn began
