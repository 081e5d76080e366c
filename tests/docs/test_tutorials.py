"""The tutorials under ``docs/tutorials``: in the site's navigation, written against the public
API, each naming its full-size command, and executable.

`make docs` executes every tutorial while it builds the site (a cell that raises fails the
build), so the default run here only checks the files. ``MECHSCOPE_RUN_TUTORIALS=1`` executes
them as well, one test per tutorial, through the Jupyter kernel the build uses (needs the
``docs`` extra)::

    MECHSCOPE_RUN_TUTORIALS=1 .venv/bin/python -m pytest tests/docs/test_tutorials.py -k grokking
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.py"))
PUBLIC_PACKAGES = {
    "mechscope",
    "mechscope.analysis",
    "mechscope.circuits",
    "mechscope.data",
    "mechscope.data.corpus",
    "mechscope.features",
    "mechscope.patching",
    "mechscope.probing",
    "mechscope.probing.datasets",
    "mechscope.sae",
    "mechscope.subspace",
    "mechscope.subspace.tasks",
    "mechscope.subspace.toy",
    "mechscope.tl",
    "mechscope.toys",
    "mechscope.toys.othello.train",
    "mechscope.toys.othello.world",
    "mechscope.vision",
    "mechscope.viz",
}
RUN = os.environ.get("MECHSCOPE_RUN_TUTORIALS", "") not in ("", "0")


def _cells(path: Path) -> list[tuple[str, str]]:
    """``(kind, source)`` of each percent-format cell (``kind`` is ``"markdown"`` or ``"code"``)."""
    cells, kind, lines = [], None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        marker = re.match(r"^# %%( \[markdown\])?", line)
        if marker:
            if kind is not None:
                cells.append((kind, "\n".join(lines)))
            kind, lines = ("markdown" if marker.group(1) else "code"), []
        elif kind is not None:
            lines.append(line)
    if kind is not None:
        cells.append((kind, "\n".join(lines)))
    return cells


def test_the_tutorials_of_the_issues_exist():
    names = {path.stem for path in TUTORIALS}
    expected = {
        "first_steps",
        "induction_heads",
        "indirect_object_identification",
        "sparse_autoencoders",
        "grokking",
        "superposition",
        "circuits",
        "dashboards",
        "probing",
        "subspace",
        "vision",
    }
    assert expected <= names, f"missing tutorials: {sorted(expected - names)}"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_is_in_the_site_navigation(path):
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert f"tutorials/{path.name}" in nav, f"add tutorials/{path.name} to the Tutorials section of mkdocs.yml"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_opens_with_a_title_and_its_full_size_command(path):
    cells = _cells(path)
    assert cells and cells[0][0] == "markdown", f"{path.name}: the first cell must be a markdown cell"
    intro = cells[0][1]
    assert re.search(r"^# # \S", intro, re.MULTILINE), f"{path.name}: the first cell needs a '# # Title' heading"
    assert "# ```bash" in intro, f"{path.name}: the first cell must show the full-size command in a bash block"
    assert any(kind == "code" for kind, _ in cells), f"{path.name}: no code cell"


def _exported(module) -> set[str]:
    if hasattr(module, "__all__"):
        return set(module.__all__)

    def defined_here(value):
        return (
            value.__module__ == module.__name__
            if inspect.isclass(value) or inspect.isfunction(value)
            else not inspect.ismodule(value)
        )

    return {name for name, value in vars(module).items() if not name.startswith("_") and defined_here(value)}


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_uses_only_public_names(path):
    """Every ``from mechscope... import name`` names a public package and a name in its ``__all__``
    (or one of the public subpackages); a public module without ``__all__`` exports the classes,
    functions and constants it defines without a leading underscore."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mechscope") and alias.name not in PUBLIC_PACKAGES:
                    problems.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mechscope"):
            if node.module not in PUBLIC_PACKAGES:
                problems.append(f"line {node.lineno}: from {node.module} import ...")
                continue
            exported = _exported(importlib.import_module(node.module))
            exported |= {name.rpartition(".")[2] for name in PUBLIC_PACKAGES if name.startswith(f"{node.module}.")}
            problems += [
                f"line {node.lineno}: {node.module}.{alias.name} is not in its __all__"
                for alias in node.names
                if alias.name not in exported
            ]
    assert not problems, f"{path.name} reaches past the public API ({sorted(PUBLIC_PACKAGES)}):\n" + "\n".join(problems)


@pytest.mark.slow
@pytest.mark.skipif(not RUN, reason="make docs executes the tutorials; set MECHSCOPE_RUN_TUTORIALS=1 to run them here")
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_executes(path):
    jupytext = pytest.importorskip("jupytext", reason="the docs extra is needed: pip install -e '.[docs]'")
    nbclient = pytest.importorskip("nbclient")
    notebook = jupytext.read(path)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()


def test_the_tutorial_kernels_ignore_tqdms_missing_ipywidgets_warning():
    """The site build adds an ignore filter for tqdm's "IProgress not found" warning (the kernels have no
    ipywidgets) to the environment its kernels inherit, and the filter matches tqdm's message."""
    pytest.importorskip("griffe", reason="the docs extra is needed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocs", reason="the docs extra is needed: pip install -e '.[docs]'")
    spec = importlib.util.spec_from_file_location("mechscope_docs_hooks", ROOT / "docs" / "api" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    environ = {"PYTHONWARNINGS": "default::DeprecationWarning"}
    hooks.quiet_kernels(environ)
    hooks.quiet_kernels(environ)  # once is enough
    assert environ["PYTHONWARNINGS"] == "default::DeprecationWarning,ignore:IProgress not found"
    warn = (
        "import warnings; from tqdm.notebook import WARN_NOIPYW; from tqdm.std import TqdmWarning; "
        "warnings.warn(WARN_NOIPYW, TqdmWarning)"
    )
    for env, shown in (({}, True), (environ, False)):
        run = subprocess.run(
            [sys.executable, "-c", warn], capture_output=True, text=True, env={**os.environ, **env}, check=True
        )
        assert ("IProgress not found" in run.stderr) == shown, run.stderr
