"""Code blocks of the project's markdown pages, extracted as a reader copies them.

A fenced block opened with `` ```python `` is a runnable example. An HTML comment
``<!-- skip-ci: reason -->`` on the line just above the fence (blank lines between allowed)
keeps that block out of the test run; the reason is required.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")
SKIP = re.compile(r"^<!--\s*skip-ci:\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, source text, first line number and skip reason."""

    path: Path
    language: str
    source: str
    line: int
    skip: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def markdown_pages() -> list[Path]:
    """README.md and every page under docs/, subfolders included (pages added later are picked up too)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def code_blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` in order, with the skip reason from the comment above it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, language = match.groups()
        end = i + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{i + 1}: code block never closed")
        above = i - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        skip = SKIP.match(lines[above].strip()) if above >= 0 else None
        if skip is not None and not skip.group(1):
            raise ValueError(f"{path}:{above + 1}: a skip-ci comment needs a reason")
        source = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(path, language.lower(), source, i + 2, skip.group(1) if skip else None))
        i = end + 1
    return blocks


def python_blocks(path: Path) -> list[Block]:
    return [b for b in code_blocks(path) if b.language in ("python", "py")]
