"""README.md is a front page: short, every link in it and in the docs resolves, a fixed top level."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from helpers import REPO_ROOT

README = REPO_ROOT / "README.md"
README_MAX_CHARS = 15_000
PAGES = [README, REPO_ROOT / "CONTRIBUTING.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
TOP_LEVEL = {  # the fixed layout, plus what may sit beside it (dotfiles are allowed too)
    "README.md",
    "requirements.txt",
    "notebooks",
    "helpers",
    "sample_images",
    "tests",
    "Makefile",
    "pyproject.toml",
    "LICENSE",
    "CONTRIBUTING.md",
    "docs",
}
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*:")


def relative_links(page: Path) -> list[str]:
    """The targets of the page's Markdown links that point inside the repository (code spans left out)."""
    text = _CODE.sub("", _FENCE.sub("", page.read_text(encoding="utf-8")))
    return [t for t in _LINK.findall(text) if not _SCHEME.match(t) and not t.startswith("#")]


def test_readme_is_a_front_page() -> None:
    assert len(README.read_text(encoding="utf-8")) <= README_MAX_CHARS


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert page.is_file(), page
    links = relative_links(page)
    assert links, f"{page.name} links to nothing in the repository"
    missing = [t for t in links if not (page.parent / t.split("#")[0].split("?")[0]).is_file()]
    assert not missing, f"{page.relative_to(REPO_ROOT)}: links to missing files {missing}"


def test_relative_links_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("[a](docs/a.md) [b](https://example.com) `[c](d.md)` [e](#top)\n```\n[f](g.md)\n```\n")
    assert relative_links(page) == ["docs/a.md"]


def test_readme_links_every_reference_page() -> None:
    linked = {(REPO_ROOT / t.split("#")[0]).resolve() for t in relative_links(README)}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"README does not link {page.relative_to(REPO_ROOT)}"


def _top_level_names() -> set[str]:
    """Top-level names git tracks (a copy without git: what is there, less the names .gitignore lists)."""
    try:
        files = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "ls-files"], capture_output=True, text=True, check=True
        ).stdout.split()
        if files:
            return {f.split("/")[0] for f in files}
    except (OSError, subprocess.CalledProcessError):
        pass
    ignored = {line.strip().strip("/") for line in (REPO_ROOT / ".gitignore").read_text().splitlines()}
    return {p.name for p in REPO_ROOT.iterdir() if p.name not in ignored}


def test_top_level_is_the_fixed_layout() -> None:
    extra = sorted(n for n in _top_level_names() if not n.startswith(".") and n not in TOP_LEVEL)
    assert not extra, f"not part of the fixed top-level layout: {extra}"
    assert (REPO_ROOT / ".ci" / "run").is_file()


def test_ci_runs_the_readme_test_command() -> None:
    readme_commands = [
        line.split("#")[0].strip()
        for block in _FENCE.findall(README.read_text(encoding="utf-8"))
        for line in block.splitlines()
    ]
    assert "make test" in readme_commands
    ci = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci
    makefile = (REPO_ROOT / "Makefile").read_text()
    for command in readme_commands:
        if command.startswith("make "):
            assert re.search(rf"^{command.split()[1]}:", makefile, re.MULTILINE), command


def test_helpers_call_no_source_unknown_and_render_no_lesson_code() -> None:
    """COURSE.md: sources are cited, never disclaimed, and lesson code lives in cells; what helpers prints
    into a notebook too (helpers/tooling aside: it checks for these words). The notebooks in the pattern
    are held to the same by tests/test_workshop.py."""
    banned = ("getsource", "記録がありません", "日付不明")
    files = [p for p in sorted((REPO_ROOT / "helpers").rglob("*.py")) if "tooling" not in p.parts]
    found = [
        f"{p.relative_to(REPO_ROOT)}: {word}"
        for p in files
        for word in banned
        if word in p.read_text("utf-8")
    ]
    assert found == []


def test_the_notebooks_cite_the_articles_they_build_on() -> None:
    """01 names the rinna article by its title; 02 links the batch-inference article; 03 the DALI article."""
    text = {p.name[:2]: p.read_text("utf-8") for p in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert "画像分類の革命児、CLIPによる画像分類サンプル解説" in text["01"]
    assert "https://zenn.dev/yagiyuki/articles/clip_acceleration_techniques" in text["02"]
    assert "https://www.yurui-deep-learning.com/2020/08/10/" in text["03"]
