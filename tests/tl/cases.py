"""The calls the differential tests make, written once against a TransformerLens-like module ``lib``.

The worker (`tl_worker.py`, run by TransformerLens' own environment) calls each case with
``lib = transformer_lens``; the tests call it with ``lib = mechscope.tl``. A case returns a flat
dict of tensors, numbers, strings and lists; the tests compare the two dicts. This module
imports only torch, so it runs in both environments.
"""

from __future__ import annotations

import importlib

import torch

PROMPT = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
SHORT, SHORT_CORRUPT = "When Mary and John went to", "When John and Mary went to"
"""Patching runs one forward per patch on the TransformerLens side: short prompts keep it quick."""
MODELS = ("gpt2", "gqa")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _raises_assertion(fn) -> bool:
    """Whether ``fn()`` raises an ``AssertionError`` (TransformerLens' checks are asserts)."""
    try:
        fn()
    except AssertionError:
        return True
    return False


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
        "W_Q": model.W_Q,
        "W_K": model.W_K,
        "W_V": model.W_V,
        "W_O": model.W_O,
        "W_in": model.W_in,
        "W_out": model.W_out,
        "b_Q": model.b_Q,
        "b_O": model.b_O,
        "b_U": model.b_U,
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


def refactored(lib, ctx, name):
    from transformers import AutoModelForCausalLM

    path = ctx.checkpoints[name]
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = lib.HookedTransformer.from_pretrained(
        path, hf_model=hf_model, tokenizer=ctx.tokenizer(name), device="cpu", refactor_factored_attn_matrices=True
    )
    logits, act = model.run_with_cache(model.to_tokens(PROMPT))
    out = {"logits": logits, "pattern": act["blocks.1.attn.hook_pattern"], "z": act["blocks.1.attn.hook_z"]}
    # A singular direction's sign is arbitrary where singular values nearly coincide: compare the
    # query/key weights up to sign, and their bilinear form exactly.
    q_eff = torch.cat([model.W_Q, model.b_Q[:, :, None, :]], dim=2)
    k_eff = torch.cat([model.W_K, model.b_K[:, :, None, :]], dim=2)
    out.update(QK_eff=q_eff @ k_eff.transpose(-1, -2), abs_q_eff=q_eff.abs(), abs_k_eff=k_eff.abs())
    out.update(W_V=model.W_V, W_O=model.W_O, b_V=model.b_V, b_O=model.b_O)
    return out


def model_helpers(lib, ctx, name):
    model = ctx.model(name)
    out = {"head_labels": model.all_head_labels(), "W_E_pos": model.W_E_pos}
    for mode in ("Q", "K", "V"):
        out[f"composition_{mode}"] = model.all_composition_scores(mode)
    utils = importlib.import_module(f"{lib.__name__}.utils")
    out["composition_pair"] = utils.composition_scores(model.OV[0], model.QK[1])
    return out


def process_in_place(lib, ctx, name):
    from transformers import AutoModelForCausalLM

    path = ctx.checkpoints[name]
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    load = lib.HookedTransformer.from_pretrained_no_processing
    model = load(path, hf_model=hf_model, tokenizer=ctx.tokenizer(name), device="cpu")
    model.process_weights_()
    tokens = model.to_tokens(PROMPT)
    return {"log_probs": model(tokens).log_softmax(-1), "W_Q": model.W_Q, "W_U": model.W_U, "b_O": model.b_O}


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
        "missing_bos_is_assertion": _raises_assertion(
            lambda: model.get_token_position(model.tokenizer.bos_token_id, PROMPT, prepend_bos=False)
        ),
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
    default = model.cfg.default_prepend_bos
    model.cfg.default_prepend_bos = not default  # TransformerLens code flips it after loading
    try:
        out["flipped_default_tokens"] = model.to_tokens(PROMPT)
        out["flipped_default_str_tokens"] = model.to_str_tokens(SHORT)
        out["flipped_default_logits"] = model(SHORT)[:, -1]
    finally:
        model.cfg.default_prepend_bos = default
    return out


def cache_methods(lib, ctx, name):
    """TransformerLens' ActivationCache: int pos_slice drops the axis, keys resolve through
    get_act_name, decompositions, logit attributions, batch slicing, remove_batch_dim in place."""
    model = ctx.model(name)
    tokens = model.to_tokens([PROMPT, CORRUPT])
    _, cache = model.run_with_cache(tokens)
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    out = {
        "attn_alias": cache["attn", 0],
        "compact_k": cache["k1"],
        "compact_scale": cache["scale1ln2"],
        "embed_alias": cache["embed"],
        "negative_layer": cache["resid_post", -1],
        "negative_with_type": cache["z", -2, "attn"],
    }
    for apply_ln in (False, True):
        tag = "_ln" if apply_ln else ""
        resid, labels = cache.accumulated_resid(apply_ln=apply_ln, pos_slice=-1, return_labels=True)
        out["accumulated" + tag], out["accumulated_labels"] = resid, labels
        out["accumulated_mid" + tag] = cache.accumulated_resid(1, incl_mid=True, apply_ln=apply_ln, mlp_input=True)
        stack, labels = cache.decompose_resid(apply_ln=apply_ln, pos_slice=-1, return_labels=True)
        out["decompose" + tag], out["decompose_labels"] = stack, labels
        out["decompose_attn_mlp_input" + tag] = cache.decompose_resid(1, True, "attn", apply_ln, pos_slice=(1, 4))
        heads, labels = cache.stack_head_results(-1, True, True, -1, apply_ln)
        out["heads" + tag], out["heads_labels"] = heads, labels
    stack = cache.decompose_resid(pos_slice=-1)
    out["logit_attrs"] = cache.logit_attrs(stack, torch.tensor([mary, john]), torch.tensor([john, mary]), pos_slice=-1)
    out["logit_attrs_str"] = cache.logit_attrs(stack, " Mary", " John", pos_slice=-1)
    out["logit_attrs_mismatch_raises"] = ctx.raises(
        lambda: cache.logit_attrs(stack, torch.tensor([mary, john]), torch.tensor([john]), pos_slice=-1)
    )
    out["apply_ln_batch"] = cache.apply_ln_to_stack(stack, pos_slice=-1, batch_slice=[1])
    out["apply_ln_layer1_mlp"] = cache.apply_ln_to_stack(cache.decompose_resid(1, True), 1, True)
    out["neurons"] = cache.get_neuron_results(1, neuron_slice=(0, 6), pos_slice=-1)
    direction = torch.randn(model.cfg.d_model, generator=_gen(21))
    out["neurons_projected"] = cache.get_neuron_results(0, pos_slice=2, project_output_onto=direction)
    # Labels of neurons are left out: TransformerLens 3.9 formats them from tensor elements ("L0Ntensor(0)").
    out["stack_neurons"] = cache.stack_neuron_results(2, -1, (0, 4), True, True, True)[0]
    out["stack_neurons_projected"] = cache.stack_neuron_results(
        2, -1, apply_ln=True, project_output_onto=direction[:, None].repeat(1, 2)
    )
    for expand in (True, False):
        full, labels = cache.get_full_resid_decomposition(expand_neurons=expand, pos_slice=-1, return_labels=True)
        out[f"full_{expand}"], out[f"full_n_labels_{expand}"] = full, len(labels)
        out[f"full_ln_{expand}"] = cache.get_full_resid_decomposition(1, True, expand, True, pos_slice=(0, 3))
        out[f"full_projected_{expand}"] = cache.get_full_resid_decomposition(
            expand_neurons=expand, apply_ln=True, pos_slice=-1, project_output_onto=direction
        )
    out["stack_pattern"] = cache.stack_activation("pattern")
    out["stack_z_2"] = cache.stack_activation("z", 1)
    second = cache.apply_slice_to_batch_dim(1)
    out["batch_slice_has_batch"] = second.has_batch_dim
    out["batch_slice_resid"] = second["resid_pre", 1]
    out["batch_slice_accumulated"] = second.accumulated_resid(apply_ln=True, pos_slice=-1)
    cache.compute_head_results()
    out["computed_result"] = cache["result", 1]
    _, single = model.run_with_cache(model.to_tokens(PROMPT))
    out["remove_batch_dim_is_self"] = single.remove_batch_dim() is single
    out["remove_batch_dim_flag"] = single.has_batch_dim
    out["removed_resid"] = single["resid_pre", 1]
    out["removed_decompose_ln"] = single.decompose_resid(apply_ln=True, pos_slice=-1)
    out["removed_heads"] = single.stack_head_results(pos_slice=-1)
    out["remove_batch_dim_raises"] = ctx.raises(lambda: model.run_with_cache(tokens)[1].remove_batch_dim())
    return out


def run_with_cache(lib, ctx, name):
    model = ctx.model(name)
    tokens = model.to_tokens([PROMPT, CORRUPT])
    names = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_pre", "blocks.0.attn.hook_pattern", "ln_final.hook_scale"]
    _, last = model.run_with_cache(tokens, names_filter=names, pos_slice=-1)
    _, span = model.run_with_cache(tokens, names_filter=names, pos_slice=(2, 5))
    _, single = model.run_with_cache(model.to_tokens(PROMPT), names_filter=names, remove_batch_dim=True)
    logits, plain = model.run_with_cache(tokens, names_filter="hook_embed", return_cache_object=False)
    out = {f"last/{n}": last[n] for n in names}
    out.update({f"span/{n}": span[n] for n in names})
    out.update({f"single/{n}": single[n] for n in names})
    out["single_has_batch_dim"] = single.has_batch_dim
    out["plain_type"] = type(plain).__name__
    out["plain_keys"] = sorted(plain)
    out["logits"] = logits
    return out


def hooks(lib, ctx, name):
    model = ctx.model(name)
    tokens = model.to_tokens(PROMPT)
    point = model.hook_dict["blocks.1.hook_resid_pre"]
    order = []
    point.add_hook(lambda x, hook: order.append("first"))
    point.add_hook(lambda x, hook: order.append("prepended"), prepend=True)
    point.add_perma_hook(lambda x, hook: order.append("permanent"))
    model(tokens)
    out = {"order": list(order), "n_fwd": len(point.fwd_hooks), "layer": point.layer(), "name": point.name}
    model.reset_hooks()
    out["after_reset"] = len(point.fwd_hooks)
    model.reset_hooks(including_permanent=True)
    out["after_full_reset"] = len(point.fwd_hooks)
    post = model.hook_dict["blocks.0.hook_resid_post"]
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: None)]):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: None)]):
            out["levels"] = [h.context_level for h in post.fwd_hooks]
        out["levels_after_inner"] = [h.context_level for h in post.fwd_hooks]
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: None)], reset_hooks_end=False)
    out["kept_without_reset"] = len(post.fwd_hooks)
    model.remove_all_hook_fns()
    out["after_remove_all"] = len(post.fwd_hooks)
    model.add_hook(lambda n: n.endswith("hook_z"), lambda z, hook: z * 0.5)
    out["filter_hooked"] = model(tokens)
    model.reset_hooks()
    grads = {}

    def keep(grad, hook):
        grads[hook.name] = grad.detach().clone()

    with model.hooks(bwd_hooks=[("blocks.0.hook_resid_pre", keep)]):
        model(tokens, return_type="loss").backward()
    plain = grads.pop("blocks.0.hook_resid_pre")
    with model.hooks(
        bwd_hooks=[("blocks.1.hook_resid_pre", lambda g, hook: (2 * g,)), ("blocks.0.hook_resid_pre", keep)]
    ):
        model(tokens, return_type="loss").backward()
    out["bwd_plain"], out["bwd_doubled"] = plain, grads["blocks.0.hook_resid_pre"]
    model.zero_grad()
    return out


def custom_root(lib, ctx, name):
    class Tiny(lib.HookedRootModule):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 3)
            self.hook_in = lib.hook_points.HookPoint()
            self.hook_out = lib.hook_points.HookPoint()
            self.setup()

        def forward(self, x):
            return self.hook_out(self.linear(self.hook_in(x)))

    torch.manual_seed(0)
    tiny = Tiny()
    x = torch.randn(2, 3, generator=_gen(20))
    out, cache = tiny.run_with_cache(x)
    zeroed = tiny.run_with_hooks(x, fwd_hooks=[("hook_in", lambda t, hook: torch.zeros_like(t))])
    return {
        "out": out,
        "cache_keys": sorted(cache),
        "cache_type": type(cache).__name__,
        "hook_out": cache["hook_out"],
        "zeroed": zeroed,
        "mod_dict": sorted(tiny.mod_dict),
        "hook_dict": sorted(tiny.hook_dict),
        "names": [tiny.hook_in.name, tiny.linear.name],
        "hooks_left": len(tiny.hook_in.fwd_hooks),
    }


def padding(lib, ctx, name):
    model = ctx.model(name)
    prompts = [PROMPT, "When Mary"]
    out = {"right": model.to_tokens(prompts), "default_side": model.tokenizer.padding_side}
    out["tokenizer_decodes"] = model.tokenizer.decode(model.to_tokens(PROMPT, prepend_bos=False)[0])
    model.tokenizer.padding_side = "left"
    try:
        left = model.to_tokens(prompts)
        out["left"] = left
        out["left_str_logits"] = model(prompts)[:, -1]
        out["left_token_logits"] = model(left)[:, -1]
        out["left_loss"] = model(left, return_type="loss")
        out["explicit_right"] = model.to_tokens(prompts, padding_side="right")
    finally:
        model.tokenizer.padding_side = "right"
    long = " ".join([PROMPT] * 6)
    out["truncated_shape"] = list(model.to_tokens(long).shape)
    out["untruncated_len"] = model.to_tokens(long, truncate=False).shape[1]
    return out


def generation(lib, ctx, name):
    import inspect

    model = ctx.model(name)
    params = inspect.signature(model.generate).parameters
    tl_names = [
        "input", "max_new_tokens", "stop_at_eos", "eos_token_id", "do_sample", "top_k", "top_p",
        "temperature", "freq_penalty", "use_past_kv_cache", "prepend_bos", "padding_side", "return_type", "verbose",
    ]  # fmt: skip
    out = {"generate_params": [[n, repr(params[n].default)] for n in tl_names]}
    out["generate_order"] = [n for n in params if n in tl_names]
    greedy = dict(do_sample=False, verbose=False, stop_at_eos=False)
    tokens = model.to_tokens(SHORT)
    out["greedy_tokens"] = model.generate(tokens, max_new_tokens=6, **greedy)
    out["greedy_no_cache"] = model.generate(tokens, max_new_tokens=6, use_past_kv_cache=False, **greedy)
    out["greedy_str"] = model.generate(SHORT, max_new_tokens=6, **greedy)
    out["greedy_batch"] = model.generate([SHORT, "When Mary"], max_new_tokens=4, **greedy)
    out["greedy_return_tokens"] = model.generate(SHORT, max_new_tokens=4, return_type="tokens", **greedy)
    eos = int(out["greedy_tokens"][0, tokens.shape[1] + 2])
    out["eos_stop"] = model.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False, eos_token_id=eos)
    out["temperature_zero"] = model.generate(tokens, 6, False, do_sample=True, temperature=0.0, verbose=False)
    torch.manual_seed(0)
    out["sampled_shape"] = list(model.generate(tokens, max_new_tokens=5, stop_at_eos=False, verbose=False).shape)
    cache_cls = lib.TransformerLensKeyValueCache
    cache = cache_cls.init_cache(model.cfg, "cpu", 1)
    first = model(tokens[:, :4], past_kv_cache=cache)
    cache.freeze()
    out["kv_frozen_step"] = model(tokens[:, 4:], past_kv_cache=cache)[:, -1]
    out["kv_frozen_mask"] = cache.previous_attention_mask.shape[1]
    cache.unfreeze()
    out["kv_step"] = model(tokens[:, 4:], past_kv_cache=cache)[:, -1]
    out["kv_first"] = first
    out["kv_mask"] = cache.previous_attention_mask.shape[1]
    out["full"] = model(tokens)[:, -1]
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
    for key, call in {
        "empty": lambda: detect(model, "", "previous_token_head"),
        "too_long": lambda: detect(model, "a " * model.cfg.n_ctx, "previous_token_head"),
        "not_lower_triangular": lambda: detect(model, repeated, torch.ones(n, n)),
    }.items():
        try:
            call()
            out[f"{key}_error"] = "no error"
        except AssertionError as exc:  # TransformerLens asserts
            out[f"{key}_error"] = str(exc)
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
        ("mlp_mid", 3, "m"),
        ("q", 2, "attention"),
    ]
    out = {"get_act_name": [u.get_act_name(*args) for args in names]}
    try:
        out["get_act_name_unknown"] = u.get_act_name("resid_mid10")
    except KeyError as exc:
        out["get_act_name_unknown"] = type(exc).__name__
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
    pre = lib.HookedTransformerConfig(
        d_model=24,
        d_head=6,
        n_layers=2,
        n_ctx=16,
        d_vocab=30,
        act_fn="gelu",
        normalization_type="LNPre",
        attn_scale=2.0,
    )
    for label, c in (("ln", cfg), ("rot", rot), ("pre", pre)):
        built = lib.HookedTransformer(c)
        out[f"{label}_model_cfg"] = [
            built.cfg.normalization_type,
            built.cfg.positional_embedding_type,
            float(built.cfg.attn_scale),
        ]
        out[f"{label}_norm_keys"] = sorted(k for k in built.state_dict() if k.startswith("ln_final.") or ".ln" in k)
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
    hooked = lib.HookedTransformer(
        lib.HookedTransformerConfig(
            d_model=16, d_head=4, n_layers=1, n_ctx=8, d_vocab=20, act_fn="relu", use_hook_tokens=True, seed=0
        )
    )
    ids = torch.tensor([[1, 2, 3]])
    _, hooked_cache = hooked.run_with_cache(ids)
    out["hook_tokens"] = hooked_cache["hook_tokens"]
    zeroed = hooked.run_with_hooks(ids, fwd_hooks=[("hook_tokens", lambda t, hook: torch.zeros_like(t))])
    out["hook_tokens_replaces"] = bool(torch.equal(zeroed, hooked(torch.zeros_like(ids))))
    out["no_hook_tokens_by_default"] = "hook_tokens" in model.hook_dict
    return out


def _counts(listed: dict) -> list:
    """``list_hooks()`` as ``[[name, number of hooks], ...]`` (dicts do not travel)."""
    return [[k, len(v)] for k, v in sorted(listed.items())]


def caching_hooks(lib, ctx, name):
    import warnings

    model = ctx.model(name)
    tokens = model.to_tokens(SHORT)
    names = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_post"]
    store = model.add_caching_hooks(names_filter=names)
    out = {"attached": _counts(model.list_hooks()), "empty_before_run": len(store)}
    model(tokens)
    out["cached_keys"] = sorted(store)
    out["z"], out["resid"] = store["blocks.0.attn.hook_z"], store["blocks.1.hook_resid_post"]
    model.reset_hooks()
    out["after_reset"] = _counts(model.list_hooks())
    store = model.add_caching_hooks(lambda n: n.endswith("hook_scale"), remove_batch_dim=True)
    model(tokens)
    out["filtered_keys"] = sorted(store)
    out["scale_no_batch"] = store["ln_final.hook_scale"]
    model.reset_hooks()
    grads = model.add_caching_hooks("blocks.0.hook_resid_pre", incl_bwd=True)
    with torch.enable_grad():
        model(tokens, return_type="loss").backward()
    model.reset_hooks()
    model.zero_grad()
    out["bwd_keys"] = sorted(grads)
    out["resid_grad"] = grads["blocks.0.hook_resid_pre_grad"]
    every, some = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.cache_all(every)
        model(tokens)
        model.reset_hooks()
        model.cache_some(some, lambda n: n.endswith("hook_v"))
        model(tokens)
        model.reset_hooks()
    out["cache_all_count"] = len(every)
    out["cache_all_embed"] = every["hook_embed"]
    out["cache_some_keys"] = sorted(some)
    model.add_hook("blocks.0.hook_mlp_out", lambda x, hook: None)
    model.add_perma_hook("blocks.1.hook_mlp_out", lambda x, hook: None)
    model.add_hook("blocks.1.hook_mlp_out", lambda x, hook: None, dir="bwd")
    out["list_all"] = _counts(model.list_hooks())
    out["list_fwd"] = _counts(model.list_hooks(dir="fwd"))
    out["list_bwd"] = sorted(model.list_hooks(dir="bwd"))
    out["list_no_permanent"] = sorted(model.list_hooks(including_permanent=False))
    out["list_by_name"] = sorted(model.list_hooks("blocks.0.hook_mlp_out"))
    out["list_by_list"] = sorted(model.list_hooks(["blocks.1.hook_mlp_out", "not.a.hook"]))
    out["permanent_flags"] = [h.is_permanent for h in model.list_hooks()["blocks.1.hook_mlp_out"]]
    model.reset_hooks(including_permanent=True)
    return out


def generate_logits(lib, ctx, name):
    model = ctx.model(name)
    tokens = model.to_tokens(SHORT)
    greedy = dict(do_sample=False, verbose=False, stop_at_eos=False)
    out = {}
    for key, kwargs in {"cached": {}, "uncached": {"use_past_kv_cache": False}}.items():
        result = model.generate(tokens, max_new_tokens=4, output_logits=True, **greedy, **kwargs)
        out[f"{key}_type"] = type(result).__name__
        out[f"{key}_sequences"] = result.sequences
        out[f"{key}_logits"] = torch.stack(result.logits)
    text = model.generate(SHORT, max_new_tokens=3, output_logits=True, return_dict_in_generate=True, **greedy)
    out["str_sequences"] = text.sequences
    out["str_logits"] = torch.stack(text.logits)
    out["plain"] = model.generate(tokens, max_new_tokens=4, **greedy)
    return out


def same_names(lib, ctx, name):
    """TransformerLens' names with TransformerLens' values: the config fields, ``b_U``, the
    unembedding's hook points, the norms' ``hook_scale``/``hook_normalized`` (values and edits,
    with and without their weights) and their ``state_dict`` keys and config after ``fold_ln``."""
    out = {}
    for label, processed in (("raw", False), ("folded", True)):
        model = ctx.model(name, processed=processed)
        cfg = model.cfg
        out[f"{label}_cfg"] = [cfg.normalization_type, cfg.positional_embedding_type, float(cfg.attn_scale)]
        out[f"{label}_norm_keys"] = sorted(k for k in model.state_dict() if k.startswith("ln_final.") or ".ln" in k)
        out[f"{label}_b_U"], out[f"{label}_unembed_b_U"] = model.b_U, model.unembed.b_U
        tokens = model.to_tokens(PROMPT)
        logits, act = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("unembed."))
        out[f"{label}_unembed_hooks"] = sorted(act.keys())
        out[f"{label}_unembed_hook_in"], out[f"{label}_unembed_hook_out"] = (
            act["unembed.hook_in"],
            act["unembed.hook_out"],
        )
        _, norms = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_scale", "hook_normalized")))
        out[f"{label}_norm_hooks"] = sorted(norms.keys())
        for hook_name in sorted(norms.keys()):
            out[f"{label}_{hook_name}"] = norms[hook_name]  # x / scale before the weights, and the scale

        def edit(x, hook):  # a norm's output is hook_normalized * w + b: the edit goes through them
            return 2 * x + 0.5

        def edit_in_place(x, hook):
            x[..., 0] = 1.0

        out[f"{label}_edited_normalized_logits"] = model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.0.ln2.hook_normalized", edit), ("ln_final.hook_normalized", edit)]
        )
        out[f"{label}_edited_in_place_normalized_logits"] = model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.ln1.hook_normalized", edit_in_place)]
        )
        out[f"{label}_hook_out_is_logits"] = bool(torch.equal(act["unembed.hook_out"], logits))
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[("unembed.hook_in", lambda x, hook: torch.zeros_like(x))])
        out[f"{label}_zeroed_input_logits"] = zeroed  # b_U at every position
        doubled = model.run_with_hooks(tokens, fwd_hooks=[("unembed.hook_out", lambda x, hook: 2 * x)])
        out[f"{label}_doubled_logits"] = doubled
    return out


CASES = {
    "forward": (forward, MODELS),
    "cache": (cache, MODELS),
    "processed": (processed, MODELS),
    "loading": (loading, MODELS),
    "refactored": (refactored, MODELS),
    "process_in_place": (process_in_place, MODELS),
    "model_helpers": (model_helpers, ("gpt2",)),
    "tokens": (tokens, MODELS),
    "patching": (patching, MODELS),
    "patching_every_by_pos": (patching_every_by_pos, ("gpt2",)),
    "head_detector": (head_detector, MODELS),
    "cache_methods": (cache_methods, MODELS),
    "run_with_cache": (run_with_cache, MODELS),
    "hooks": (hooks, MODELS),
    "custom_root": (custom_root, ("none",)),
    "padding": (padding, MODELS),
    "generation": (generation, MODELS),
    "caching_hooks": (caching_hooks, MODELS),
    "generate_logits": (generate_logits, MODELS),
    "utils": (utils, ("none",)),
    "factored": (factored, ("none",)),
    "config": (config, ("none",)),
    "same_names": (same_names, MODELS),
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
