"""The calls the differential tests make, written once against a TransformerLens-like module ``lib``.

The worker (`tl_worker.py`, run by TransformerLens' own environment) calls each case with
``lib = transformer_lens``; the tests call it with ``lib = mechscope.tl``. A case returns a flat
dict of tensors, numbers, strings and lists; the tests compare the two dicts. This module
imports only torch, so it runs in both environments.
"""

from __future__ import annotations

import torch

PROMPT = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
SHORT, SHORT_CORRUPT = "When Mary and John went to", "When John and Mary went to"
"""Patching runs one forward per patch on the TransformerLens side: short prompts keep it quick."""
MODELS = ("gpt2", "gqa")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _metric(answer: int, wrong: int):
    def metric(logits):
        return (logits[:, -1, answer] - logits[:, -1, wrong]).mean()

    return metric


# ---------------------------------------------------------------------- model
def forward(lib, ctx, name):
    model = ctx.model(name)
    tokens = model.to_tokens(PROMPT)
    logits, loss = model(tokens, return_type="both")
    per_token = model(tokens, return_type="loss", loss_per_token=True)
    return {"tokens": tokens, "logits": logits, "loss": loss, "loss_per_token": per_token}


def cache(lib, ctx, name):
    model = ctx.model(name)
    tokens = model.to_tokens([PROMPT, CORRUPT])
    _, act = model.run_with_cache(tokens)
    names = [
        "hook_embed",
        "blocks.0.hook_resid_pre",
        "blocks.0.ln1.hook_scale",
        "blocks.0.attn.hook_q",
        "blocks.0.attn.hook_k",
        "blocks.0.attn.hook_v",
        "blocks.0.attn.hook_pattern",
        "blocks.0.attn.hook_z",
        "blocks.1.hook_attn_out",
        "blocks.1.mlp.hook_post",
        "blocks.1.hook_resid_post",
        "ln_final.hook_scale",
        "blocks.1.hook_mlp_out",
        "blocks.0.attn.hook_attn_scores",
    ]
    return {n: act[n] for n in names}


def processed(lib, ctx, name):
    model = ctx.model(name, processed=True)
    tokens = model.to_tokens(PROMPT)
    logits, act = model.run_with_cache(tokens)
    out = {
        "log_probs": logits.log_softmax(-1),
        "logits": logits,
        "default_prepend_bos": model.cfg.default_prepend_bos,
        "W_E": model.W_E,
        "W_U": model.W_U,
    }
    for hook in (
        "blocks.1.hook_resid_pre",
        "blocks.0.attn.hook_z",
        "blocks.0.attn.hook_pattern",
        "blocks.0.ln1.hook_normalized",
        "blocks.1.mlp.hook_post",
        "blocks.1.hook_attn_out",
    ):
        out[hook] = act[hook]
    return out


def loading(lib, ctx, name):
    from transformers import AutoModelForCausalLM

    path = ctx.checkpoints[name]
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    load = lib.HookedTransformer.from_pretrained_no_processing
    short = load(path, hf_model=hf_model, tokenizer=ctx.tokenizer(name), device="cpu", first_n_layers=1)
    left = load(path, hf_model=hf_model, tokenizer=ctx.tokenizer(name), device="cpu", default_padding_side="left")
    half = load(path, hf_model=hf_model, tokenizer=ctx.tokenizer(name), device="cpu", dtype="bfloat16")
    tokens = short.to_tokens(PROMPT)
    return {
        "first_n_layers_logits": short(tokens),
        "first_n_layers_n_layers": short.cfg.n_layers,
        "left_padded_tokens": left.to_tokens([PROMPT, "When Mary"]),
        "right_padded_tokens": short.to_tokens([PROMPT, "When Mary"]),
        "bf16_dtype": str(half.W_E.dtype),
        "bf16_logits": half(tokens).float(),
        "no_bos_tokens": load(
            path, hf_model=hf_model, tokenizer=ctx.tokenizer(name), device="cpu", default_prepend_bos=False
        ).to_tokens(PROMPT),
    }


def tokens(lib, ctx, name):
    model = ctx.model(name)
    out = {
        "to_tokens": model.to_tokens(PROMPT),
        "to_tokens_no_bos": model.to_tokens(PROMPT, prepend_bos=False),
        "to_str_tokens": model.to_str_tokens(PROMPT),
        "to_string": model.to_string(model.to_tokens(PROMPT, prepend_bos=False)[0]),
        "to_single_token": model.to_single_token(" Mary"),
        "to_single_str_token": model.to_single_str_token(model.to_single_token(" Mary")),
        "position_first": model.get_token_position(" John", PROMPT),
        "position_last": model.get_token_position(" John", PROMPT, mode="last"),
        "residual_directions": model.tokens_to_residual_directions(model.to_tokens(" Mary John", prepend_bos=False)),
        "residual_direction": model.tokens_to_residual_directions(" Mary"),
        "multi_token_raises": ctx.raises(lambda: model.to_single_token(" Mary and John")),
        "missing_token_raises": ctx.raises(lambda: model.get_token_position(" Paris", PROMPT)),
        "to_string_2d": model.to_string(model.to_tokens([PROMPT, CORRUPT])),
        "to_string_int_list": model.to_string([307, 276, 306]),
        "to_string_0d": model.to_string(torch.tensor(307)),
        "to_str_tokens_0d": model.to_str_tokens(torch.tensor(307)),
        "to_str_tokens_numpy": model.to_str_tokens(model.to_tokens(PROMPT).cpu().numpy()),
        "to_str_tokens_list": model.to_str_tokens([PROMPT, CORRUPT]),
        "to_str_tokens_batch_raises": ctx.raises(lambda: model.to_str_tokens(model.to_tokens([PROMPT, CORRUPT]))),
        "n_params": model.cfg.n_params,
        "n_params_total": model.n_params_total,
    }
    embed, toks, _, mask = model.input_to_embed(PROMPT)
    out.update(input_to_embed=embed, input_to_embed_tokens=toks, input_to_embed_mask_is_none=mask is None)
    loss = model.loss_fn(model(toks), toks, per_token=True)
    out["loss_fn"] = loss
    return out


# ---------------------------------------------------------------------- patching
def patching(lib, ctx, name):
    model = ctx.model(name)
    clean, corrupted = model.to_tokens([SHORT, SHORT]), model.to_tokens([SHORT_CORRUPT, SHORT])
    _, clean_cache = model.run_with_cache(clean)
    metric = _metric(model.to_single_token(" Mary"), model.to_single_token(" John"))
    p = lib.patching
    out = {}
    for fn in (
        "resid_pre",
        "resid_mid",
        "attn_out",
        "mlp_out",
        "attn_head_out_all_pos",
        "attn_head_q_all_pos",
        "attn_head_k_all_pos",
        "attn_head_v_all_pos",
        "attn_head_pattern_all_pos",
        "attn_head_out_by_pos",
        "attn_head_k_by_pos",
        "attn_head_pattern_by_pos",
        "attn_head_all_pos_every",
        "block_every",
    ):
        out[fn] = getattr(p, f"get_act_patch_{fn}")(model, corrupted, clean_cache, metric)
    out["generic_custom_setter"] = p.generic_activation_patch(
        model,
        corrupted,
        clean_cache,
        metric,
        lambda act, index, clean: p.layer_pos_patch_setter(act, index, clean),
        "resid_pre",
        ("layer", "pos"),
    )
    return out


def patching_every_by_pos(lib, ctx, name):
    model = ctx.model(name)
    clean, corrupted = model.to_tokens(SHORT), model.to_tokens(SHORT_CORRUPT)
    _, clean_cache = model.run_with_cache(clean)
    metric = _metric(model.to_single_token(" Mary"), model.to_single_token(" John"))
    return {"by_pos_every": lib.patching.get_act_patch_attn_head_by_pos_every(model, corrupted, clean_cache, metric)}


def head_detector(lib, ctx, name):
    model = ctx.model(name)
    detect = lib.head_detector.detect_head
    repeated = "one two three four five one two three four five"
    out = {}
    for pattern in ("previous_token_head", "duplicate_token_head", "induction_head"):
        out[pattern] = detect(model, repeated, pattern)
        out[pattern + "_abs"] = detect(model, repeated, pattern, error_measure="abs", exclude_bos=True)
    out["exclude_current"] = detect(model, repeated, "duplicate_token_head", exclude_current_token=True)
    n = model.to_tokens(repeated).shape[-1]
    out["custom_heads"] = detect(model, repeated, torch.eye(n), heads=[(0, 1), (1, 2)])
    out["list_of_prompts"] = detect(model, [repeated, PROMPT], "previous_token_head")
    out["bad_pattern_raises"] = ctx.raises(lambda: detect(model, repeated, torch.ones(n, n)))
    out["bad_name_raises"] = ctx.raises(lambda: detect(model, repeated, "copy_head"))
    return out


# ---------------------------------------------------------------------- no model
def utils(lib, ctx, name):
    u = lib.utils
    names = [
        ("k", 6, "a"),
        ("pre", 2, None),
        ("embed", None, None),
        ("normalized", 27, "ln2"),
        ("k6", None, None),
        ("scale4ln1", None, None),
        ("pre5", None, None),
        ("attn", 3, None),
        ("attn_logits", 1, None),
        ("scale", None, None),
        ("resid_pre", 4, None),
        ("mlp_post", 0, None),
        ("value", 2, None),
        ("blocks.0.hook_resid_pre", None, None),
        ("result", 1, "b"),
        ("resid_mid10", None, None),
    ]
    out = {"get_act_name": [u.get_act_name(*args) for args in names]}
    logits = torch.randn(2, 5, 7, generator=_gen(0))
    toks = torch.randint(0, 7, (2, 5), generator=_gen(1))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    out["ce"] = u.lm_cross_entropy_loss(logits, toks)
    out["ce_mask"] = u.lm_cross_entropy_loss(logits, toks, attention_mask=mask)
    out["ce_per_token"] = u.lm_cross_entropy_loss(logits, toks, per_token=True)
    x = torch.arange(60.0).reshape(3, 4, 5)
    out["corner"] = u.get_corner(x, 2)
    out["remove_batch_dim"] = u.remove_batch_dim(x[:1])
    out["to_numpy"] = torch.as_tensor(u.to_numpy(x))
    out["slice_int"] = u.Slice(2).apply(x, dim=1)
    out["slice_tuple"] = u.Slice((1, 4, 2)).apply(x, dim=2)
    out["slice_list"] = u.Slice([0, 2]).apply(x)
    out["slice_indices"] = torch.as_tensor(u.Slice((1, None)).indices(5))
    out["gelu_new"] = u.gelu_new(torch.linspace(-3, 3, 11))
    out["gelu_fast"] = u.gelu_fast(torch.linspace(-3, 3, 11))
    out["solu"] = u.solu(torch.linspace(-3, 3, 11))
    out["fan"] = [list(u.calc_fan_in_and_fan_out(torch.zeros(*s))) for s in ((5,), (3, 4), (2, 3, 4))]
    tok = ctx.tokenizer()
    padded = torch.tensor([[0, 5, 6, 0, 0], [0, 0, 5, 6, 7]])
    out["attention_mask_right"] = u.get_attention_mask(tok, padded, prepend_bos=True, padding_side="right")
    out["attention_mask_left"] = u.get_attention_mask(tok, padded, prepend_bos=True, padding_side="left")
    return out


def factored(lib, ctx, name):
    FM = lib.FactoredMatrix
    A, B = torch.randn(6, 3, generator=_gen(2)), torch.randn(3, 5, generator=_gen(3))
    fm = FM(A, B)
    sq = FM(torch.randn(5, 2, generator=_gen(4)), torch.randn(2, 5, generator=_gen(5)))
    wide = FM(torch.randn(4, 6, generator=_gen(6)), torch.randn(6, 4, generator=_gen(7)))
    batched = FM(torch.randn(2, 3, 6, 2, generator=_gen(8)), torch.randn(2, 3, 2, 6, generator=_gen(9)))
    U, S, V = fm.svd()
    out = {
        "AB": fm.AB,
        "U": U,
        "S": S,
        "V": V,
        "U_prop": fm.U,
        "V_prop": fm.V,
        "norm": fm.norm(),
        "shape": list(fm.shape),
        "ndim": fm.ndim,
        "ldim_mdim_rdim": [fm.ldim, fm.mdim, fm.rdim],
    }
    eig = sq.eigenvalues
    out["eig_real_sorted"] = torch.sort(eig.real).values
    out["eig_count"] = eig.shape[-1]
    out["eig_wide_count"] = wide.eigenvalues.shape[-1]
    m = torch.randn(5, 4, generator=_gen(10))
    out["matmul_AB"], out["matmul_mdim"] = (fm @ m).AB, (fm @ m).mdim
    left = torch.randn(2, 6, generator=_gen(11))
    out["rmatmul_AB"], out["rmatmul_mdim"] = (left @ fm).AB, (left @ fm).mdim
    out["fm_fm_mdim"] = (fm @ FM(torch.randn(5, 4, generator=_gen(12)), torch.randn(4, 7, generator=_gen(13)))).mdim
    out["vec"] = fm @ torch.randn(5, generator=_gen(14))
    out["rvec"] = torch.randn(6, generator=_gen(15)) @ fm
    out["mul_tensor_shape"] = list((fm * torch.tensor([2.0])).shape)
    out["mul_AB"] = (fm * 2.5).AB
    out["rmul_AB"] = (2.5 * fm).AB
    out["T"] = fm.T.AB
    out["index_lead"] = batched[1].AB
    out["index_row_shape"] = list(batched[1, 2, 0].shape)
    out["index_row_col"] = batched[1, 2, :3, -1].AB
    out["collapse_l"] = fm.collapse_l()
    out["collapse_r"] = fm.collapse_r()
    out["make_even"] = fm.make_even().AB
    out["corner"] = batched.get_corner(2)
    out["pair_A"] = fm.pair[0]
    out["unsqueeze_shape"] = list(fm.unsqueeze(0).shape)
    out["inner_mismatch_raises"] = ctx.raises(lambda: FM(torch.zeros(3, 4), torch.zeros(5, 3)))
    out["BA_nonsquare_raises"] = ctx.raises(lambda: fm.BA)
    return out


def config(lib, ctx, name):
    cfg = lib.HookedTransformerConfig(d_model=24, d_head=6, n_layers=2, n_ctx=16, d_vocab=30, act_fn="gelu")
    rot = lib.HookedTransformerConfig(
        d_model=24,
        d_head=6,
        n_layers=2,
        n_ctx=16,
        d_vocab=30,
        act_fn="silu",
        positional_embedding_type="rotary",
        normalization_type="RMS",
        gated_mlp=True,
        n_key_value_heads=2,
    )
    out = {}
    for label, c in (("ln", cfg), ("rot", rot)):
        out[label] = [
            c.n_heads,
            c.d_mlp,
            c.d_vocab_out,
            float(c.attn_scale),
            float(c.initializer_range),
            c.n_params,
            c.rotary_dim,
            c.device,
            c.normalization_type,
            c.positional_embedding_type,
            c.act_fn,
        ]
    out["bad_act_raises"] = ctx.raises(
        lambda: lib.HookedTransformerConfig(d_model=8, d_head=4, n_layers=1, n_ctx=4, act_fn="tanh")
    )
    out["indivisible_raises"] = ctx.raises(
        lambda: lib.HookedTransformerConfig(d_model=10, d_head=4, n_layers=1, n_ctx=4)
    )
    odd = lib.HookedTransformerConfig(d_model=10, d_head=5, n_layers=1, n_ctx=8, d_vocab=11, act_fn="relu", seed=1)
    model = lib.HookedTransformer(odd)
    out["odd_head_logits_shape"] = list(model(torch.tensor([[1, 2, 3]])).shape)
    big = lib.HookedTransformer(
        lib.HookedTransformerConfig(d_model=64, d_head=16, n_layers=1, n_ctx=32, d_vocab=500, act_fn="relu", seed=0)
    )
    out["init_W_E_std"] = float(big.W_E.detach().std())
    out["init_W_U_std"] = float(big.W_U.detach().std())
    out["init_b_U_abs"] = float(big.unembed.b_U.detach().abs().sum())
    return out


CASES = {
    "forward": (forward, MODELS),
    "cache": (cache, MODELS),
    "processed": (processed, MODELS),
    "loading": (loading, MODELS),
    "tokens": (tokens, MODELS),
    "patching": (patching, MODELS),
    "patching_every_by_pos": (patching_every_by_pos, ("gpt2",)),
    "head_detector": (head_detector, MODELS),
    "utils": (utils, ("none",)),
    "factored": (factored, ("none",)),
    "config": (config, ("none",)),
}
"""Case name -> (function, the checkpoints it runs on)."""


def case_ids() -> list[str]:
    return [f"{case}-{model}" for case, (_, models) in CASES.items() for model in models]


def run_case(case_id: str, lib, ctx) -> dict:
    """Run one case; an exception becomes ``{"error": "<type>: <message>"}``."""
    case, model = case_id.rsplit("-", 1)
    fn = CASES[case][0]
    try:
        return fn(lib, ctx, model)
    except Exception as exc:  # the other side may raise the same
        return {"error": f"{type(exc).__name__}: {exc}"}
