"""Run every differential case through TransformerLens and save the results.

Run with the TransformerLens environment's python (see ``make_env.sh``)::

    .venv-tl/bin/python tests/tl/tl_worker.py OUT_DIR CHECKPOINTS_JSON

``CHECKPOINTS_JSON`` maps checkpoint names to local Hugging Face directories. TransformerLens
accepts only the model names it lists, so each directory is added to that list first.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path


def main(out_dir: str, checkpoints_json: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import cases
    import torch
    from exchange import Context, save_results

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    import transformer_lens
    from transformer_lens import supported_models

    checkpoints = json.loads(Path(checkpoints_json).read_text())
    supported_models.OFFICIAL_MODEL_NAMES.extend(checkpoints.values())
    ctx = Context(transformer_lens, checkpoints)
    results = {case_id: cases.run_case(case_id, transformer_lens, ctx) for case_id in cases.case_ids()}
    save_results(results, Path(out_dir))


if __name__ == "__main__":
    main(*sys.argv[1:3])
