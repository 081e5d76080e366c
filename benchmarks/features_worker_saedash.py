"""SAEDashboard side of benchmarks/features.py: runs under benchmarks/.venv-saedash.

    python features_worker_saedash.py WORK_DIR [N_FEATURES]

Reads ``WORK_DIR/tokens.safetensors`` (rows [n, 128]), the SAE folder ``WORK_DIR/sae`` (SAELens
layout) and ``WORK_DIR/reference.safetensors`` (mechscope's layer-6 activations of the first
rows: the run stops unless the two models agree to float32 rounding); runs SAEDashboard's
``SaeVisRunner`` with the layout its Neuronpedia runner uses (on the first N_FEATURES features,
default all) and converts the result to Neuronpedia JSON; writes ``WORK_DIR/saedash.json``
(timings, peak RSS, every feature's top examples and histogram) and ``WORK_DIR/saedash-batch.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.set_offline_env()

import torch  # noqa: E402

HOOK = "blocks.6.hook_resid_post"


def t4_dir() -> Path:
    """The local SmolLM2 folder with a config transformers 4.x reads right (top-level rope_theta)."""
    src, dst = common.HF_DIR, common.CACHE_DIR / "smollm2-hf-t4"
    if not (dst / "config.json").is_file():
        dst.mkdir(parents=True, exist_ok=True)
        tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 writes its own class name
        (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
        for f in src.iterdir():
            if f.name not in ("config.json", "tokenizer_config.json"):
                target = dst / f.name
                if not target.exists():
                    target.symlink_to(f.resolve())
        cfg = json.loads((src / "config.json").read_text())
        cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", 100000.0)
        cfg["rope_scaling"] = None
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def load_model():
    """SmolLM2 as a TransformerLens 2.17 ``HookedTransformer``, unprocessed (no folded norms, no
    centred weights: its residual stream is the model's own) and with SmolLM2's rotary base.

    TransformerLens 2.17 reads ``rope_theta`` for some families but not in its generic
    ``LlamaForCausalLM`` branch, so a Llama-architecture checkpoint gets the config default 10,000
    instead of SmolLM2's 100,000: every position after the first is rotated wrongly, and the
    layer-6 residual stream was up to 237 away from the reference's (on 4 x 64 corpus tokens;
    position 0, which rotary leaves alone, matched exactly). The base is set here from the checkpoint.
    """
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(t4_dir())
    if path not in loading.OFFICIAL_MODEL_NAMES:
        loading.OFFICIAL_MODEL_NAMES.append(path)
    rope_theta = float(json.loads((Path(path) / "config.json").read_text())["rope_theta"])
    convert = loading.convert_hf_model_config

    def convert_with_rope_theta(model_name, **kwargs):
        cfg = convert(model_name, **kwargs)
        cfg["rotary_base"] = rope_theta
        return cfg

    loading.convert_hf_model_config = convert_with_rope_theta
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = HookedTransformer.from_pretrained_no_processing(
            path, hf_model=hf_model, tokenizer=tokenizer, device="cpu"
        )
    finally:
        loading.convert_hf_model_config = convert
    if model.cfg.rotary_base != rope_theta:
        raise RuntimeError(f"TransformerLens kept rotary_base {model.cfg.rotary_base}, the checkpoint has {rope_theta}")
    return model


def check_activations(model, ref: dict[str, torch.Tensor]) -> float:
    """Largest difference of the layer-6 residual stream from mechscope's on the reference rows;
    raises when it is more than float32 rounding (1e-5 of the largest activation, which is in
    the hundreds on SmolLM2's first token): the dashboards would then not see the same numbers."""
    with torch.no_grad():
        _, cache = model.run_with_cache(ref["tokens"], names_filter=HOOK, stop_at_layer=7)
    max_diff = float((cache[HOOK] - ref["acts"]).abs().max())
    tolerance = 1e-5 * float(ref["acts"].abs().max())
    if max_diff > tolerance:
        raise RuntimeError(
            f"TransformerLens' {HOOK} differs from mechscope's by up to {max_diff:.4g} (tolerance {tolerance:.3g}) "
            "on the reference rows: check the model settings in load_model"
        )
    return max_diff


def shown_activation(seq) -> float | None:
    """The activation SAEDashboard shows at a sequence's qualifying token.

    With ``buffer=None`` its sequences show positions 1 .. n-1 of the row (the first position is
    kept back for the loss effect and dropped from the coloring), while ``qualifying_token_index``
    counts from position 0: the token's activation is ``feat_acts[index - 1]``. A top example at
    position 0 has no shown value (None)."""
    index = seq.qualifying_token_index
    return float(seq.feat_acts[index - 1]) if 1 <= index <= len(seq.feat_acts) else None


def main(work: Path, n_features: int | None = None) -> None:
    from sae_dashboard.data_writing_fns import save_feature_centric_vis  # noqa: F401  (import cost counted below)
    from sae_dashboard.feature_data import FeatureData  # noqa: F401
    from sae_dashboard.layout import (
        ActsHistogramConfig,
        Column,
        FeatureTablesConfig,
        LogitsHistogramConfig,
        LogitsTableConfig,
        SaeVisLayoutConfig,
        SequencesConfig,
    )
    from sae_dashboard.neuronpedia.neuronpedia_converter import NeuronpediaConverter
    from sae_dashboard.neuronpedia.neuronpedia_runner_config import NeuronpediaRunnerConfig
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    rows = load_file(str(work / "tokens.safetensors"))["tokens"]
    model = load_model()
    model.eval()
    max_diff = check_activations(model, load_file(str(work / "reference.safetensors")))
    sae = SAE.load_from_disk(str(work / "sae"), device="cpu")
    # SaeVisRunner folds the decoder norms into the encoder, which SAELens refuses for TopK SAEs;
    # this SAE's decoder rows have unit norm, so the fold would change nothing
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(sae.cfg.d_sae), atol=1e-5)
    sae.fold_W_dec_norm = lambda: None
    layout = SaeVisLayoutConfig(
        columns=[
            Column(
                SequencesConfig(
                    stack_mode="stack-all",
                    buffer=None,
                    compute_buffer=True,
                    n_quantiles=5,
                    top_acts_group_size=20,
                    quantile_group_size=5,
                ),  # fmt: skip
                ActsHistogramConfig(),
                LogitsHistogramConfig(),
                LogitsTableConfig(),
                FeatureTablesConfig(n_rows=3),
            )
        ]
    )
    cache_dir = Path(tempfile.mkdtemp(prefix="saedash-cache-"))
    cfg = SaeVisConfig(
        hook_point=HOOK, features=list(range(n_features or sae.cfg.d_sae)), minibatch_size_features=256,
        minibatch_size_tokens=32, quantile_feature_batch_size=64, verbose=False, device="cpu",
        feature_centric_layout=layout,
        perform_ablation_experiments=False, dtype="float32", cache_dir=cache_dir, ignore_tokens=set(), use_dfa=False,
    )  # fmt: skip
    common.reset_peak_rss()
    base_rss = common.current_rss_mib()
    start = time.perf_counter()
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=rows)
    generated = time.perf_counter() - start
    np_cfg = NeuronpediaRunnerConfig(
        sae_set="bench", sae_path=str(work / "sae"), np_set_name="bench", outputs_dir=str(work / "saedash-out"),
        n_prompts_total=rows.shape[0], n_tokens_in_prompt=rows.shape[1],
    )  # fmt: skip
    np_cfg.model_id, np_cfg.layer = "smollm2-135m", 6
    vocab = {v: k for k, v in model.tokenizer.vocab.items()}
    batch_json = NeuronpediaConverter.convert_to_np_json(model, data, np_cfg, vocab)
    total = time.perf_counter() - start
    peak = common.peak_rss_mib()
    (work / "saedash-batch.json").write_text(batch_json)
    timings = {"generate_s": generated, "total_s": total, "peak_rss_mib": peak, "base_rss_mib": base_rss}
    (work / "saedash-timings.json").write_text(json.dumps(timings))
    features = {}
    for f, fd in data.feature_data_dict.items():
        groups = fd.sequence_data.seq_group_data
        top = [(shown_activation(s), int(s.original_index), int(s.qualifying_token_index)) for s in groups[0].seq_data]
        hist = fd.acts_histogram_data
        features[f] = {"top": top, "bar_values": list(hist.bar_values), "bar_heights": list(hist.bar_heights),
                       "title": hist.title}  # fmt: skip
    out = {
        "generate_s": generated, "total_s": total, "peak_rss_mib": peak, "base_rss_mib": base_rss,
        "model_max_abs_diff": max_diff, "n_tokens": int(rows.numel()), "features": features,
    }  # fmt: skip
    (work / "saedash.json").write_text(json.dumps(out))
    shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
