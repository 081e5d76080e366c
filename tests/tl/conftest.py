"""Fixtures of the differential tests: the TransformerLens environment, the tiny checkpoints and
the results of every case on both sides.

The TransformerLens environment is ``<repo>/.venv-tl`` (build it with ``bash tests/tl/make_env.sh``)
or the python named by ``MECHSCOPE_TL_PYTHON``. Without it the tests skip, unless
``MECHSCOPE_REQUIRE_TL=1`` (as in CI), which makes them fail.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "tl_worker.py"
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "2",
}


def tl_python() -> Path | None:
    path = Path(os.environ.get("MECHSCOPE_TL_PYTHON", REPO / ".venv-tl" / "bin" / "python"))
    return path if path.exists() else None


def missing_environment(reason: str) -> None:
    message = f"{reason}; build it with: bash tests/tl/make_env.sh (or set MECHSCOPE_TL_PYTHON)"
    if os.environ.get("MECHSCOPE_REQUIRE_TL") == "1":
        pytest.fail(message + " [MECHSCOPE_REQUIRE_TL=1]", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def tl_checkpoints(tmp_path_factory) -> dict[str, str]:
    from tests.tl.checkpoints import build_checkpoints

    return {name: str(path) for name, path in build_checkpoints(tmp_path_factory.mktemp("tl-ckpt")).items()}


@pytest.fixture(scope="session")
def tl_results(tl_checkpoints, tmp_path_factory) -> dict[str, dict]:
    """Every case run once through TransformerLens, in its own environment."""
    from tests.tl.exchange import load_results

    python = tl_python()
    if python is None:
        missing_environment("the TransformerLens 3.9 environment is missing")
    out = tmp_path_factory.mktemp("tl-out")
    spec = out / "checkpoints.json"
    spec.write_text(json.dumps(tl_checkpoints))
    proc = subprocess.run(
        [str(python), str(WORKER), str(out), str(spec)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **OFFLINE},
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        pytest.fail(f"the TransformerLens worker exited {proc.returncode}:\n{tail}", pytrace=False)
    return load_results(out)


@pytest.fixture(scope="session")
def ms_context(tl_checkpoints):
    import mechscope.tl
    from tests.tl.exchange import Context

    torch.set_num_threads(2)
    return Context(mechscope.tl, tl_checkpoints)
