"""Every Python block of README.md and docs/*.md runs as written, in order.

The blocks of one page share a namespace, as when a reader pastes them one after another into
one session; they run in a temporary working directory. A block that cannot run here (it needs
two GPUs, say) carries ``<!-- skip-ci: reason -->`` on the line above its fence. Pages show
small settings where the real ones take long, with the real command beside them, so that every
page runs in seconds and none is left out of `make test`.
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.docs.blocks import ROOT, code_blocks, markdown_pages, python_blocks

PAGES = markdown_pages()


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_the_python_blocks_of_a_page_run_in_order(page, tmp_path, monkeypatch, record_property):
    runnable = [block for block in python_blocks(page) if block.skip is None]
    if not runnable:
        pytest.skip(f"{page.name} has no Python block to run")
    monkeypatch.chdir(tmp_path)  # what the examples write lands in a temporary folder
    namespace: dict = {"__name__": "__main__"}
    threads = torch.get_num_threads()
    durations = {}
    try:
        with torch.set_grad_enabled(torch.is_grad_enabled()):  # a block may switch gradients off
            for block in runnable:
                start = time.perf_counter()
                exec(compile(block.source, block.where, "exec"), namespace)  # noqa: S102 - the page's own code
                durations[block.where] = round(time.perf_counter() - start, 1)
    finally:
        torch.set_num_threads(threads)
        record_property("seconds_per_block", durations)


def test_blocks_are_read_as_a_reader_copies_them(tmp_path, monkeypatch):
    import tests.docs.blocks as blocks

    page = tmp_path / "page.md"
    page.write_text(
        "Intro\n\n```python\nx = 1\n```\n\n<!-- skip-ci: needs two GPUs -->\n\n```python\ny = 2\n```\n\n"
        "```bash\nmake demo\n```\n\n````python\nz = '```'\n````\n"
    )
    monkeypatch.setattr(blocks, "ROOT", tmp_path)
    found = code_blocks(page)
    assert [(b.language, b.source, b.line, b.skip) for b in found] == [
        ("python", "x = 1\n", 4, None),
        ("python", "y = 2\n", 10, "needs two GPUs"),
        ("bash", "make demo\n", 14, None),
        ("python", "z = '```'\n", 18, None),
    ]
    assert [b.where for b in python_blocks(page)] == ["page.md:4", "page.md:10", "page.md:18"]
    page.write_text("<!-- skip-ci: -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="needs a reason"):
        code_blocks(page)
    page.write_text("```python\nx = 1\n")
    with pytest.raises(ValueError, match="never closed"):
        code_blocks(page)


def test_every_page_has_closed_blocks_and_reasons_for_skips():
    for page in PAGES:
        blocks = code_blocks(page)  # raises on an unclosed fence or a skip without a reason
        skipped = [b.where for b in blocks if b.skip is not None and b.language not in ("python", "py")]
        assert not skipped, f"skip-ci marks only Python blocks: {skipped}"
