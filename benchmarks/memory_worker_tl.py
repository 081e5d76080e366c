"""Worker for benchmarks/memory.py, run under the TransformerLens 3.x venv: one measured sample.

Loads the local Hugging Face copy of the bundled SmolLM2 into TransformerLens' ``HookedTransformer``
(no weight processing) and runs its cached recipe for direct logit attribution and the logit lens
on the tokens in TOKEN_FILE: ``run_with_cache`` of the hooks both read, ``decompose_resid`` +
``logit_attrs`` at the last position, ``accumulated_resid(apply_ln=True)`` at the last position
times ``W_U``. Prints one JSON line: seconds, peak RSS increase (MiB) and the DLA values.

Usage: python memory_worker_tl.py TOKEN_FILE
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.set_offline_env()

import torch  # noqa: E402

torch.set_num_threads(2)
NAMES = ("hook_embed", "hook_attn_out", "hook_mlp_out", "hook_resid_pre", "hook_resid_post", "ln_final.hook_scale")


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
        local, hf_model=hf_model, tokenizer=AutoTokenizer.from_pretrained(common.HF_DIR), device="cpu"
    ).eval()


def main() -> None:
    from safetensors.torch import load_file

    data = load_file(sys.argv[1])
    tokens, answers = data["tokens"], data["answers"]
    model = load()

    def run(tokens, answers):
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith(NAMES))
        stack = cache.decompose_resid(layer=-1, pos_slice=-1)
        dla = cache.logit_attrs(stack, tokens=answers, pos_slice=-1)
        accumulated = cache.accumulated_resid(layer=-1, pos_slice=-1, apply_ln=True)
        return dla, accumulated @ model.W_U

    with torch.no_grad():
        run(tokens[:1, :16], answers[:1])
    gc.collect()
    common.reset_peak_rss()
    rss0 = common.current_rss_mib()
    start = time.perf_counter()
    with torch.no_grad():
        dla, lens = run(tokens, answers)
    seconds = time.perf_counter() - start
    peak = common.peak_rss_mib() - rss0
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "cache_bytes": 0, "dla": dla.tolist()}))


if __name__ == "__main__":
    main()
