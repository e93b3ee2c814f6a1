"""The docs cite only what exists, and the README stays short.

Every repository path that README.md, CONTRIBUTING.md, docs/*.md and benchmarks/README.md
cite must exist: paths under csrc/, gfl_ops/, tools/, tests/, benchmarks/, docs/ and .ci/,
and the top-level files (Makefile, pyproject.toml, setup.py, LICENSE, ...), wherever they
appear in the text (prose, backticks, code blocks), resolved against the repository root;
and markdown links, resolved against the citing file's folder. `path:line` and
`path::symbol` cite `path`; a path with `*` or `<` (a glob, a placeholder) is not checked.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest


def _repository_root() -> Path:
    """The folder holding pyproject.toml, above this file wherever the tests are grouped."""
    for folder in Path(__file__).resolve().parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    raise RuntimeError(f"no pyproject.toml above {__file__}")


ROOT = _repository_root()
README_MAX_LINES = 220

# A path under one of the repository's folders: starts at a word boundary (not inside a
# longer path, a URL or a module name), runs over path characters. `:` ends it, so that
# `path:line` and `path::symbol` give `path`; `*`, `<`, `>`, `{`, `}` and `$` are taken in
# so that a glob or a placeholder is seen whole and left out.
_FOLDERS = ("csrc", "gfl_ops", "tools", "tests", "benchmarks", "docs", ".ci")
_FOLDER_PATH = re.compile(
    r"(?<![\w./\-:$<>])((?:" + "|".join(re.escape(folder) for folder in _FOLDERS) + r")/[\w.\-/*<>{}$]*)"
)
_TOP_LEVEL_FILE = re.compile(
    r"(?<![\w./\-:$<>])(Makefile|pyproject\.toml|setup\.py|MANIFEST\.in|LICENSE(?:-AGPL-3\.0)?"
    r"|CHANGELOG\.md|CONTRIBUTING\.md|README\.md|requirements-[\w\-*<>]+\.txt)(?![\w\-/])"
)
# [text](target): the target up to a space, a closing parenthesis or a title.
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_TRAILING = ".,;:!?)'\""


def _clean(path: str) -> str:
    path = path.split("::")[0]
    path = re.sub(r":\d+(?:-\d+)?$", "", path)
    return path.rstrip(_TRAILING)


def _skipped(path: str) -> bool:
    return not path or any(mark in path for mark in "*<>{}$")


def citations(text: str) -> Iterator[Tuple[str, str]]:
    """("root" | "link", path) for every repository path the markdown text cites."""
    for pattern in (_FOLDER_PATH, _TOP_LEVEL_FILE):
        for match in pattern.finditer(text):
            path = _clean(match.group(1))
            if not _skipped(path):
                yield "root", path
    for match in _LINK.finditer(text):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.\-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:, ...) or an anchor of the same page
        path = _clean(target.split("#")[0])
        if not _skipped(path):
            yield "link", path


def missing_citations(document: Path, root: Path = ROOT) -> List[str]:
    """The paths `document` cites that do not exist, as `kind: path`."""
    missing = []
    for kind, path in citations(document.read_text(encoding="utf-8")):
        base = root if kind == "root" else document.parent
        if not (base / path).exists():
            missing.append(f"{kind}: {path}")
    return sorted(set(missing))


def _documents() -> List[Path]:
    documents = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md"]
    documents += sorted((ROOT / "docs").glob("*.md"))
    return documents


DOCUMENTS = _documents()


def test_the_documents_exist():
    names = {document.relative_to(ROOT).as_posix() for document in DOCUMENTS}
    for name in (
        "README.md",
        "CONTRIBUTING.md",
        "benchmarks/README.md",
        "docs/MATH.md",
        "docs/ARCHITECTURE.md",
        "docs/ENVIRONMENT.md",
    ):
        assert name in names and (ROOT / name).is_file(), name


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda document: document.relative_to(ROOT).as_posix())
def test_every_cited_path_exists(document):
    assert list(citations(document.read_text(encoding="utf-8"))), f"{document}: no citation found"
    missing = missing_citations(document)
    assert not missing, f"{document.relative_to(ROOT)} cites paths that do not exist:\n" + "\n".join(missing)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}"


def test_citations_are_found_and_checked(tmp_path):
    """The extraction itself: a stale path fails, the forms that are not paths do not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "gfl_ops").mkdir()
    (tmp_path / "gfl_ops" / "nn.py").write_text("")
    (tmp_path / "Makefile").write_text("")
    (tmp_path / "docs" / "MATH.md").write_text("")
    document = tmp_path / "docs" / "PAGE.md"
    document.write_text(
        "See `gfl_ops/nn.py:12`, gfl_ops/nn.py::FocalLoss, the Makefile, [maths](MATH.md#dfl),\n"
        "`csrc/cpu/gfl_cpu_*.cpp`, `benchmarks/results/<gpu>.json`, torch.ops.gfl_ops.qfl,\n"
        "/tmp/gfl_ops_gpu, https://example.org/tests/x.py, [web](https://example.org/docs/y),\n"
        "`mmdet/models/losses/utils.py::weight_reduce_loss`, (`gfl_ops/bench.py`), and\n"
        "[gone](../tools/gone.py), pyproject.toml.\n"
    )
    found = set(citations(document.read_text()))
    assert ("root", "gfl_ops/nn.py") in found
    assert ("root", "Makefile") in found
    assert ("link", "MATH.md") in found
    assert not any("*" in path or "<" in path for _, path in found)
    assert not any(path.startswith(("tmp", "mmdet", "example")) for _, path in found)
    assert missing_citations(document, tmp_path) == [
        "link: ../tools/gone.py",
        "root: gfl_ops/bench.py",
        "root: pyproject.toml",
    ]
