"""auto-circuit's EAP on the same model and prompts, for benchmarks/circuits.py (runs in its own venv).

``benchmarks/.venv-autocircuit``: torch 2.13.0, then ``auto-circuit==1.0.1`` (which resolves
``transformer-lens>=1.13`` to 4.3.0, where the ``HookedTransformer`` it imports no longer exists),
then ``transformer-lens==3.9.0`` and ``attrs`` (imported by auto-circuit, not declared). TransformerLens
3.9 renamed ``HookedTransformerKeyValueCache`` to ``cache.key_value_cache.TransformerLensKeyValueCache``
and dropped ``transformer_lens.past_key_value_caching``; `alias_renamed_cache` points the old names
at the new class before auto-circuit is imported. The model is TransformerLens' classic ``HookedTransformer`` on
the local Hugging Face copy of the bundled SmolLM2 (``forward_worker``'s ``tl3`` contender).
EAP is auto-circuit's ``mask_gradient_prune_scores`` with ``mask_val=0`` (its documented
equivalent of edge attribution patching), logit-difference metric, clean prompts patched from
corrupted ones. Edge names are mapped to mechscope's (``A3.2 -> a3.h2``, ``MLP 4 -> m4``,
``Resid Start -> input``, ``A5.1.Q -> a5.h1<q>``, ``Resid End -> logits``).

    benchmarks/.venv-autocircuit/bin/python benchmarks/circuits_autocircuit.py DATA.pt OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.set_offline_env()

import torch  # noqa: E402

torch.set_num_threads(2)


def node_name(name: str, kv_groups: int) -> str:
    if name == "Resid Start":
        return "input"
    if name == "Resid End":
        return "logits"
    if name.startswith("MLP "):
        return f"m{name.split()[1]}"
    parts = name[1:].split(".")
    if len(parts) == 2:
        return f"a{parts[0]}.h{parts[1]}"
    layer, head, which = parts
    which = which.lower()
    if which == "q" or kv_groups == 1:
        return f"a{layer}.h{head}<{which}>"
    return f"a{layer}.kv{int(head)}<{which}>"


def alias_renamed_cache() -> None:
    """The key-value cache under the names auto-circuit imports (TransformerLens < 3)."""
    import types

    import transformer_lens
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    transformer_lens.HookedTransformerKeyValueCache = TransformerLensKeyValueCache
    shim = types.ModuleType("transformer_lens.past_key_value_caching")
    shim.HookedTransformerKeyValueCache = TransformerLensKeyValueCache
    sys.modules["transformer_lens.past_key_value_caching"] = shim


def main(data_path: str, out_path: str) -> None:
    import forward_worker as fw

    alias_renamed_cache()
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
    from auto_circuit.utils.graph_utils import patchable_model

    data = torch.load(data_path, weights_only=True)
    model = fw.CONTENDERS["tl3"]().model
    model.cfg.use_split_qkv_input = True
    model.cfg.use_attn_result = True
    model.cfg.use_hook_mlp_in = True
    model.setup()
    clean, corrupted = data["clean"], data["corrupted"]
    dataset = PromptDataset(list(clean), list(corrupted), [a[None] for a in data["correct"]],
                            [w[None] for w in data["wrong"]])  # fmt: skip
    loader = PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=len(clean), shuffle=False)
    start = time.perf_counter()
    patchable = patchable_model(model, factorized=True, slice_output="last_seq", separate_qkv=True)
    wrap_seconds = time.perf_counter() - start
    times, scores = [], None
    for _ in range(int(data["repeats"])):
        start = time.perf_counter()
        scores = mask_gradient_prune_scores(patchable, loader, None, grad_function="logit",
                                            answer_function="avg_diff", mask_val=0.0)  # fmt: skip
        times.append(time.perf_counter() - start)
    groups = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
    edges = {}
    for edge in patchable.edges:
        name = f"{node_name(edge.src.name, groups)}->{node_name(edge.dest.name, groups)}"
        edges[name] = float(edge.prune_score(scores))
    Path(out_path).write_text(json.dumps({"seconds": times, "wrap_seconds": wrap_seconds, "edges": edges}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
