"""Every relative link and image of every README resolves, anchors included, and the top README
lists every entry point."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.entry_points import ENTRY_POINTS
from tests.support.readme_shell import FENCE, ROOT, readmes

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.I)
HTML_ANCHOR = re.compile(r"<[^>]*\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


def outside_fences(text: str) -> str:
    kept, fence = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            kept.append(line)
    return "\n".join(kept)


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code, where links are links."""
    return re.sub(r"`[^`\n]*`", "", outside_fences(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a Markdown file defines: one per heading (repeats get -1, -2, ...) and HTML ids."""
    found, counts = set(), {}
    text = outside_fences(path.read_text()) if path.suffix == ".md" else ""
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        base = slug(heading.replace("`", ""))
        found.add(f"{base}-{counts[base]}" if base in counts else base)
        counts[base] = counts.get(base, 0) + 1
    return found | set(HTML_ANCHOR.findall(path.read_text()))


def targets(path: Path) -> list[str]:
    text = prose(path.read_text())
    return LINK.findall(text) + REFERENCE.findall(text) + HTML.findall(text)


def broken(readme: Path, root: Path = ROOT) -> list[str]:
    problems, root = [], root.resolve()
    for target in targets(readme):
        if EXTERNAL.match(target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (readme.parent / file).resolve() if file else readme.resolve()
        if not resolved.exists():
            problems.append(f"{target}: no such file")
        elif not resolved.is_relative_to(root):
            problems.append(f"{target}: outside the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading with this anchor in {resolved.resolve().relative_to(root)}")
    return problems


@pytest.mark.parametrize("readme", readmes(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_images_resolve(readme):
    assert broken(readme) == []


def test_the_checker_sees_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("# Top\n## A `code` heading: yes\n\n```\n[no](fenced.md)\n```\n")
    (tmp_path / "README.md").write_text(
        "# Top\n[ok](docs/README.md#a-code-heading-yes) [ok](#top) ![ok](docs) [ok](https://x.org/y)\n"
        "[bad](docs/missing.md) ![bad](img.png) [bad](docs/README.md#nope) [bad](#nope) `[not](a-link)`\n"
        "[ref]: ../outside.md\n")
    (tmp_path.parent / "outside.md").touch()
    assert broken(tmp_path / "README.md", root=tmp_path) == [
        "docs/missing.md: no such file", "img.png: no such file",
        "docs/README.md#nope: no heading with this anchor in docs/README.md", "#nope: no heading with this anchor in README.md",
        "../outside.md: outside the repository"]


def test_top_readme_lists_every_entry_point():
    text = (ROOT / "README.md").read_text()
    assert [m for m in ENTRY_POINTS if f"`python -m {m}`" not in text] == []
