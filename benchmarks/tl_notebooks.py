"""TransformerLens' demo notebooks, run cell by cell against `mechscope.tl`: passed / failed / not
applicable code cells.

The notebooks are not stored here. Fetch them from https://github.com/TransformerLensOrg/TransformerLens
(MIT licence), e.g. ``demos/Main_Demo.ipynb`` and ``demos/Exploratory_Analysis_Demo.ipynb``, then::

    .venv/bin/python benchmarks/tl_notebooks.py path/to/Main_Demo.ipynb [more.ipynb ...]

Each code cell gets the rewriting of `benchmarks/tl_upstream.py` (imports to `mechscope.tl`, hub
model names to tiny local checkpoints) and nothing else, except that IPython magics (``%pip``,
``!curl``) are dropped and ``get_ipython()`` answers with a stand-in whose magics do nothing.
Cells share one namespace and run in order, in a fresh process per notebook and side. The same
cells also run through TransformerLens 3.9 (``.venv-tl``, model names rewritten only); a cell is
*not applicable* when it fails there too (a package neither environment has, such as
``circuitsvis``, numbers of a pretrained model, or a cell after such a failure). The rate is
``passed / (passed + failed)``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tl_upstream import REPO, rewrite  # noqa: E402

RUNNER = r"""
import contextlib, io, json, sys, traceback, warnings
warnings.filterwarnings("ignore")

class _IPython:
    def magic(self, *args, **kwargs): return None
    run_line_magic = run_cell_magic = system = magic

cells = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__", "get_ipython": lambda: _IPython(), "display": lambda *a, **k: None}
try:
    import plotly.io as pio
    pio.renderers.default = "json"
    pio.show = lambda *a, **k: None
except ImportError:
    pass
results = []
for source in cells:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(source, "<cell>", "exec"), namespace)
        results.append(["passed", ""])
    except BaseException as exc:  # a cell may raise anything, SystemExit included
        results.append(["failed", f"{type(exc).__name__}: {str(exc)[:200]}"])
json.dump(results, open(sys.argv[2], "w"))
"""


def code_cells(notebook: Path) -> list[str]:
    """The notebook's code cells, with IPython magic lines left out."""
    cells = json.loads(notebook.read_text())["cells"]
    sources = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells]
    kinds = [c["cell_type"] for c in cells]
    keep = []
    for kind, source in zip(kinds, sources, strict=True):
        if kind != "code":
            continue
        lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
        keep.append("\n".join(lines) + "\n")
    return keep


def run_side(work: Path, cells: list[str], python: str, env: dict) -> list[list[str]]:
    (work / "cells.json").write_text(json.dumps(cells))
    (work / "runner.py").write_text(RUNNER)
    out = work / "results.json"
    subprocess.run(
        [python, str(work / "runner.py"), str(work / "cells.json"), str(out)], cwd=work, env=env, timeout=3600
    )
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("-v", "--verbose", action="store_true", help="list every failing cell with its error")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.tl.checkpoints import build_checkpoints

    work = Path(tempfile.mkdtemp(prefix="tl-notebooks-"))
    checkpoints = {k: str(v) for k, v in build_checkpoints(work / "checkpoints", n_ctx=256).items()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    env["TL_UPSTREAM_CHECKPOINTS"] = json.dumps(checkpoints)
    tl_python = REPO / ".venv-tl" / "bin" / "python"
    register = "from transformer_lens import supported_models\nimport json, os\n"
    register += (
        'supported_models.OFFICIAL_MODEL_NAMES.extend(json.loads(os.environ["TL_UPSTREAM_CHECKPOINTS"]).values())\n'
    )
    for notebook in args.notebooks:
        raw = code_cells(notebook)
        ours = [rewrite(c, checkpoints) for c in raw]
        theirs = [register] + [rewrite(c, checkpoints, imports=False) for c in raw]
        (work / "ms").mkdir(exist_ok=True)
        (work / "tl").mkdir(exist_ok=True)
        mine = run_side(work / "ms", ours, sys.executable, env)
        reference = run_side(work / "tl", theirs, str(tl_python), env)[1:] if tl_python.exists() else None
        counts = {"passed": 0, "failed": 0, "not applicable": 0}
        failing = []
        for i, (outcome, error) in enumerate(mine):
            if reference is not None and reference[i][0] == "failed":
                outcome = "not applicable"
            counts[outcome] += 1
            if outcome == "failed":
                failing.append(f"  cell {i}: {error}")
        applicable = counts["passed"] + counts["failed"]
        rate = 100 * counts["passed"] / applicable if applicable else 0.0
        summary = ", ".join(f"{v} {k}" for k, v in counts.items())
        print(f"{notebook.name}: {len(raw)} code cells; {summary}; {rate:.1f}% of {applicable} applicable cells run")
        if args.verbose:
            print("\n".join(failing))


if __name__ == "__main__":
    main()
