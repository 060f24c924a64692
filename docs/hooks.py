"""The site's build hooks: for MkDocs (mkdocs.yml: hooks) and for griffe, which reads the
docstrings of the Python API page (mkdocs.yml: mkdocstrings' extensions)."""

from __future__ import annotations

import re
from pathlib import Path

import griffe
from mkdocs.structure.files import File

# [text](../path) or [text](../path#anchor): relative links that climb out of the page's folder.
LINK = re.compile(r"\[([^\]]*)\]\((\.\./[^)\s#]+)(#[^)\s]*)?\)")
# A Sphinx role, as the docstrings name other code: :func:`train`, :class:`~smolgpt.x.Y`.
ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc):`(~?)([^`]+)`")


def on_files(files, config):
    """The site's home page is the README, written once: its links into docs/ are made
    relative to the site (docs/tour.md is tour.md there)."""
    readme = Path(config.config_file_path).resolve().parent / "README.md"
    home = readme.read_text(encoding="utf-8").replace("](docs/", "](")
    files.append(File.generated(config, "index.md", content=home))
    return files


def on_page_markdown(markdown, page, config, files):
    """Links from a page to the repository's own files outside docs/ (the tour's
    ../src/smolgpt/model.py) work where the Markdown is read on a forge or in a checkout, but
    are no page of the site: they point at the file in repo_url's main branch when mkdocs.yml
    names one, and are plain text otherwise. A link to a file the repository lacks is left
    alone, for the strict build to fail on."""
    root = Path(config.config_file_path).resolve().parent
    docs = Path(config.docs_dir).resolve()
    # (The generated home page has no file of its own: it stands at the top of docs/.)
    here = Path(page.file.abs_src_path or docs / page.file.src_uri).parent

    def rewrite(match: re.Match) -> str:
        text, target, anchor = match.group(1), match.group(2), match.group(3) or ""
        path = (here / target).resolve()
        if not path.exists() or docs in path.parents or root not in path.parents:
            return match.group(0)
        if config.repo_url:
            relative = path.relative_to(root).as_posix()
            return f"[{text}]({config.repo_url.rstrip('/')}/blob/main/{relative}{anchor})"
        return text

    return LINK.sub(rewrite, markdown)


class SphinxRoles(griffe.Extension):
    """The docstrings are prose with Sphinx roles, which Markdown would print as they are:
    each role becomes its name in code (~ keeps the last part only, as Sphinx shows it)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring:
            obj.docstring.value = ROLE.sub(self.name, obj.docstring.value)

    @staticmethod
    def name(match: re.Match) -> str:
        short, name = match.groups()
        return f"`{name.rsplit('.', 1)[-1] if short else name}`"
