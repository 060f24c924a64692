"""What smolgpt advises for a missing optional part: a command that works from the clone
(smolgpt is not on PyPI, so `pip install 'smolgpt[plot]'` fails everywhere)."""

import re

import pytest

from smolgpt import extras

from e2e import E2E_ROOT, e2e_assert_install_advice

EXTRAS = ("bpe", "hf", "plot", "tensorboard", "serve")


@pytest.mark.parametrize("extra", EXTRAS)
def test_the_advice_installs_the_extra_from_the_clone(extra, tmp_path, monkeypatch):
    monkeypatch.chdir(E2E_ROOT)
    assert extras.install_command(extra) == f'pip install -e ".[{extra}]"'
    monkeypatch.chdir(tmp_path)  # elsewhere: the clone by its path
    e2e_assert_install_advice(extras.install_command(extra), extra, cwd=tmp_path)


def test_the_extras_packages_come_from_pyproject():
    assert any(p.startswith("matplotlib") for p in extras.extra_packages("plot"))
    assert any(p.startswith("tokenizers") for p in extras.extra_packages("bpe"))
    assert extras.extra_packages("no-such-extra") == []


def test_no_message_or_page_advises_installing_from_pypi():
    """Every `pip install` line of the code, the README and the docs works from a clone."""
    pages = [E2E_ROOT / "README.md", *(E2E_ROOT / "docs").rglob("*.md")]
    sources = [*(E2E_ROOT / "src" / "smolgpt").glob("*.py"), *pages]
    wrong = re.compile(r"pip install (-U )?['\"]?smolgpt\b")
    found = [
        f"{path.relative_to(E2E_ROOT)}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if wrong.search(line)
    ]
    assert not found, "\n".join(found)
