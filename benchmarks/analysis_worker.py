"""Worker for benchmarks/analysis.py, run under the TransformerLens 3.x venv.

Loads the local Hugging Face copy of the bundled SmolLM2 into TransformerLens'
``HookedTransformer`` (no weight processing) once, then serves requests (``common.serve``):
``{"op": "run", "mode": "Q"}`` times the body of ``HookedTransformer.all_composition_scores``
on the heads of the first LAYERS layers (the full model does not fit in memory: TL broadcasts
every pair to ``[layer, head, layer, head, d_head, d_model]``); ``{"op": "save", "path": ...}``
saves the last scores of each mode.

Usage: python analysis_worker.py LAYERS
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.set_offline_env()

import torch  # noqa: E402

torch.set_num_threads(2)


def load():
    import transformer_lens.supported_models as supported
    import transformers
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    local = str(common.HF_DIR)
    if local not in supported.OFFICIAL_MODEL_NAMES:
        supported.OFFICIAL_MODEL_NAMES.append(local)  # the list its loader checks names against
    hf_model = AutoModelForCausalLM.from_pretrained(common.HF_DIR, dtype=torch.float32)
    return HookedTransformer.from_pretrained_no_processing(
        local,
        hf_model=hf_model,
        tokenizer=AutoTokenizer.from_pretrained(common.HF_DIR),
        device="cpu",
        dtype=torch.float32,
    ).eval()


def main() -> None:
    from transformer_lens.utilities import composition_scores

    layers = int(sys.argv[1])
    model = load()

    def all_composition_scores(mode: str) -> torch.Tensor:
        """``HookedTransformer.all_composition_scores`` restricted to the first ``layers`` layers."""
        left = model.OV[:layers]
        right = {"Q": model.QK[:layers], "K": model.QK[:layers].T, "V": model.OV[:layers]}[mode]
        scores = composition_scores(left, right, broadcast_dims=True)
        mask = torch.arange(layers)[:, None, None, None] < torch.arange(layers)[None, None, :, None]
        return torch.where(mask, scores, torch.zeros_like(scores))

    scores = {}

    def run(request: dict) -> dict:
        with torch.inference_mode():
            start = time.perf_counter()
            scores[request["mode"]] = all_composition_scores(request["mode"])
            return {"seconds": time.perf_counter() - start}

    def save(request: dict) -> dict:
        torch.save(scores, request["path"])
        return {}

    common.serve({"run": run, "save": save})


if __name__ == "__main__":
    main()
