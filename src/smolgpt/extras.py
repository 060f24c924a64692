"""The optional parts of smolgpt (pyproject.toml's extras: plot, bpe, hf, serve, ...) and the
command that installs one, as it works where this smolgpt came from.

smolgpt is not on PyPI, so installing it by name fails everywhere. From a clone of the
repository (the usual case, an editable install) the command is ``pip install -e ".[plot]"``
in the clone; a smolgpt installed some other way (a wheel) gets the extra's
own packages, read from the installed metadata, so the list is pyproject.toml's.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Optional


def checkout() -> Optional[Path]:
    """The clone of the repository this smolgpt runs from (its src/smolgpt is this
    package), or None for an installed copy."""
    root = Path(__file__).resolve().parents[2]
    is_clone = (root / "pyproject.toml").is_file() and (root / "src" / "smolgpt").is_dir()
    return root if is_clone else None


def extra_packages(extra: str) -> list[str]:
    """The requirements pyproject.toml lists for an extra (as installed), e.g.
    ["matplotlib>=3.7"] for "plot"; [] where the metadata is missing."""
    try:
        requires = metadata.requires("smolgpt") or []
    except metadata.PackageNotFoundError:
        return []
    found = []
    for requirement in requires:
        spec, _, marker = requirement.partition(";")
        if f'extra == "{extra}"' in marker.replace("'", '"'):
            found.append(spec.strip().replace(" ", ""))
    return found


def install_command(extra: str) -> str:
    """The one command that installs an extra here: ``pip install -e ".[extra]"`` in a
    clone (its path instead of "." when the current directory is elsewhere), else pip
    install of the extra's packages."""
    root = checkout()
    if root is not None:
        here = Path.cwd().resolve() == root
        return f'pip install -e "{"." if here else root}[{extra}]"'
    packages = extra_packages(extra)
    return (
        "pip install " + " ".join(f'"{p}"' for p in packages)
        if packages
        else (f"install smolgpt's {extra} extra")
    )


def upgrade_advice() -> str:
    """How to get a newer smolgpt, for files written by one."""
    root = checkout()
    if root is not None:
        return f"update the clone ({root}): git pull"
    return "install a newer smolgpt"
