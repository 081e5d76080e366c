"""The generic (block-level) wrapper on architectures without a family adapter.

Each tiny random model is checked against ``transformers`` itself: block hook values against
``output_hidden_states`` and a capture by plain ``torch`` forward hooks, a patching sweep
against one forward per patch, and greedy generation against ``transformers``' own.
"""

from __future__ import annotations

import pytest
import torch
import transformers as hf
from torch.testing import assert_close

import mechscope as ms
from mechscope.model.generic import GenericModel
from mechscope.patching.activation import activation_patch
from tests.conftest import randomize_, save_hf_model

CONFIGS = {
    "falcon": lambda: hf.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4),
    "stablelm": lambda: hf.StableLmConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "starcoder2": lambda: hf.Starcoder2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "bloom": lambda: hf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=3, n_head=4),
    "mpt": lambda: hf.MptConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, expansion_ratio=2),
    "gpt_bigcode": lambda: hf.GPTBigCodeConfig(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=32),
}
# What each architecture's module tree lets the probe verify (Bloom adds residuals inside its
# attention and MLP modules and normalises the embedding; MPT's MLP adds its residual itself).
EXPECTED = {
    "falcon": {"hook_embed", "hook_attn_out", "hook_mlp_out"},
    "stablelm": {"hook_embed", "hook_attn_out", "hook_resid_mid", "hook_mlp_out"},
    "starcoder2": {"hook_embed", "hook_attn_out", "hook_resid_mid", "hook_mlp_out"},
    "bloom": set(),
    "mpt": {"hook_embed", "hook_attn_out", "hook_resid_mid"},
    "gpt_bigcode": {"hook_attn_out", "hook_resid_mid", "hook_mlp_out"},
}
OPTIONAL = ("hook_embed", "hook_attn_out", "hook_resid_mid", "hook_mlp_out")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    torch.manual_seed(0)
    config = CONFIGS[request.param]()
    config._attn_implementation = "eager"
    model = hf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed=1)
    return request.param, model.eval(), GenericModel.wrap(model)


def tokens(batch=2, seq=7, seed=0):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_offered_hooks(pair):
    arch, _, model = pair
    offered = {name.split(".")[-1] for name in model.hook_dict if name.split(".")[-1] in OPTIONAL}
    assert offered == EXPECTED[arch]
    for name in OPTIONAL:
        if name not in EXPECTED[arch]:
            assert name in model.notice


def test_block_hooks_equal_transformers(pair):
    _, hf_model, model = pair
    ids = tokens()
    manual: dict[str, torch.Tensor] = {}
    lay = model.layout
    handles = [lay.embed.register_forward_hook(lambda m, a, o: manual.__setitem__("hook_embed", o.clone()))]
    for layer, block in enumerate(lay.blocks):
        handles.append(
            block.register_forward_hook(
                lambda m, a, o, layer=layer: manual.__setitem__(
                    f"blocks.{layer}.hook_resid_post", (o if isinstance(o, torch.Tensor) else o[0]).clone()
                )
            )
        )
        for kind, module in (("attn_out", lay.attn[layer]), ("mlp_out", lay.mlp[layer])):
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o, k=f"blocks.{layer}.hook_{kind}": manual.__setitem__(
                        k, (o if isinstance(o, torch.Tensor) else o[0]).clone()
                    )
                )
            )
    with torch.no_grad():
        ref = hf_model(ids, output_hidden_states=True)
    for h in handles:
        h.remove()
    logits, cache = model.run_with_cache(ids)
    assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
    n = model.cfg.n_layers
    for layer in range(n):
        assert_close(cache[f"blocks.{layer}.hook_resid_pre"], ref.hidden_states[layer], atol=1e-5, rtol=1e-5)
    assert len(cache) == len(model.hook_dict)
    for name, value in cache.items():
        if name in manual:
            assert_close(value, manual[name], atol=1e-5, rtol=1e-5)
        if name.endswith("hook_resid_mid"):
            layer = int(name.split(".")[1])
            expected = ref.hidden_states[layer] + manual[f"blocks.{layer}.hook_attn_out"]
            assert_close(value, expected, atol=1e-5, rtol=1e-5)
    # the decomposition the probe verified sums to each block's output
    for layer in range(n):
        if f"blocks.{layer}.hook_mlp_out" in cache:
            total = cache["resid_pre", layer] + cache["attn_out", layer] + cache["mlp_out", layer]
            assert_close(total, cache["resid_post", layer], atol=1e-5, rtol=1e-5)


def test_hooks_change_the_output_and_stop_start(pair):
    _, _, model = pair
    ids = tokens()
    plain = model(ids)
    zeroed = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, *, hook: x * 0.5)])
    assert not torch.allclose(plain, zeroed)
    resid = model(ids, stop_at_layer=2)
    _, cache = model.run_with_cache(ids)
    assert_close(resid, cache["resid_pre", 2], atol=0, rtol=0)
    calls = []
    handle = model.layout.blocks[0].register_forward_hook(lambda *args: calls.append(1))
    assert model.skips_prefix
    assert_close(model(resid, start_at_layer=2), plain, atol=1e-5, rtol=1e-5)
    assert calls == []  # the blocks before start_at_layer were skipped
    _, late = model.run_with_cache(resid, start_at_layer=2)
    assert sorted(late) == sorted(n for n in model.hook_dict if n.startswith(("blocks.2.", "ln_final")))
    assert_close(late["resid_pre", 2], resid, atol=0, rtol=0)
    model.skips_prefix = False
    try:
        assert_close(model(resid, start_at_layer=2), plain, atol=1e-5, rtol=1e-5)
        _, slow = model.run_with_cache(resid, start_at_layer=2)  # earlier blocks run, their hooks do not
        assert sorted(slow) == sorted(late)
    finally:
        model.skips_prefix = True
        handle.remove()
    assert calls == [1, 1]
    assert_close(model(cache["resid_post", 2], start_at_layer=3), plain, atol=1e-5, rtol=1e-5)
    assert_close(model.run_with_hooks(ids, fwd_hooks=[]), plain, atol=0, rtol=0)


def test_patching_sweep_equals_one_forward_per_patch(pair):
    _, _, model = pair
    clean, corrupt = tokens(seed=1), tokens(seed=2)
    metric = lambda logits: logits[:, -1, 3] - logits[:, -1, 5]  # noqa: E731
    sites = ["resid_pre"] + [s for s in ("attn_out", "mlp_out") if f"blocks.0.hook_{s}" in model.hook_dict]
    for site in sites:
        batched = activation_patch(model, clean, corrupt, metric, site, per_prompt=True)
        _, clean_cache = model.run_with_cache(clean)
        for layer in range(model.cfg.n_layers):
            name = f"blocks.{layer}.hook_{site}"
            for pos in range(clean.shape[1]):

                def patch(x, *, hook, pos=pos, name=name, source=clean_cache):
                    x = x.clone()
                    x[:, pos] = source[name][:, pos]
                    return x

                with torch.no_grad():
                    expected = metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, patch)]))
                assert_close(batched[layer, pos], expected, atol=1e-4, rtol=1e-4)


def test_generate_equals_transformers_greedy(pair):
    _, hf_model, model = pair
    ids = tokens(batch=1, seq=5)
    ours = model.generate(ids, max_new_tokens=6, do_sample=False, verbose=False, stop_at_eos=False)
    slow = model.generate(ids, 6, do_sample=False, verbose=False, stop_at_eos=False, use_past_kv_cache=False)
    with torch.no_grad():
        theirs = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
    assert torch.equal(ours, theirs)
    assert torch.equal(slow, theirs)


def test_per_head_hooks_name_the_adapter_contract(pair):
    _, _, model = pair
    with pytest.raises(ms.HookNameError, match="family adapter.*loading/families"):
        model.run_with_cache(tokens(), names_filter=["blocks.0.attn.hook_z"])
    with pytest.raises(ms.HookNameError, match="family adapter"):
        model.add_hook("blocks.1.attn.hook_pattern", lambda x, *, hook: x)
    with pytest.raises(ms.HookNameError, match="hook_resid_pre"):
        model.add_hook("blocks.0.hook_resid_pr", lambda x, *, hook: x)
    with pytest.raises(ms.HookNameError, match="family adapter"):  # before the norm's weights, as in TL
        model.run_with_cache(tokens(), names_filter=["ln_final.hook_normalized"])


def test_load_wraps_unadapted_model_type_with_a_notice(tmp_path):
    config = CONFIGS["bloom"]()
    hf_model = save_hf_model(config, tmp_path)
    with pytest.warns(UserWarning, match="'bloom' has no family adapter.*hook_embed"):
        model = ms.load(tmp_path, device="cpu")
    assert isinstance(model, GenericModel)
    ids = tokens()
    with torch.no_grad():
        assert_close(model(ids), hf_model(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ms.LoadError, match="'generic'"):
        ms.load(tmp_path, adapter="generc")
    with pytest.raises(ms.HookNameError, match="not offered for this model.*add up"):
        model.run_with_cache(ids, names_filter="blocks.0.hook_attn_out")


def test_adapter_generic_on_an_adapted_family(tmp_path):
    config = hf.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    hf_model = save_hf_model(config, tmp_path)
    model = ms.load(tmp_path, device="cpu", adapter="generic")
    adapted = ms.load(tmp_path, device="cpu")
    assert isinstance(model, GenericModel) and model.notice == ""
    ids = tokens()
    _, generic_cache = model.run_with_cache(ids)
    _, cache = adapted.run_with_cache(ids, names_filter=list(generic_cache))  # ln_final.hook_out is opt-in there
    assert "ln_final.hook_out" in generic_cache
    for name in generic_cache:
        assert_close(generic_cache[name], cache[name], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert_close(model(ids), hf_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_sae_training_on_a_generic_hook():
    from mechscope.sae import ActivationStore, train_sae

    torch.manual_seed(0)
    config = CONFIGS["starcoder2"]()
    model = GenericModel.wrap(randomize_(hf.AutoModelForCausalLM.from_config(config), seed=2).eval())
    stream = torch.randint(0, 64, (400,), generator=torch.Generator().manual_seed(3))
    name = "blocks.1.hook_mlp_out"
    store = ActivationStore(model, [name], stream, context_size=8, batch_size=16, buffer_batches=2, prepend_bos=False)
    batch = store.next_batch()[name]
    _, cache = model.run_with_cache(stream[: 50 * 8].reshape(50, 8), names_filter=[name])
    every = cache[name].reshape(-1, 32)
    nearest = (
        torch.cdist(batch, every, compute_mode="donot_use_mm_for_euclid_dist").min(-1).values
    )  # each harvested vector is one of the model's
    assert_close(nearest, torch.zeros_like(nearest), atol=1e-4, rtol=0)
    sae = train_sae({"d_in": 32, "d_sae": 64, "hook_name": name}, store, {"steps": 3, "progress": False})
    assert sae.cfg.hook_name == name


@pytest.mark.parametrize("arch", ["stablelm", "mpt"])
def test_bfloat16_models_keep_the_same_hooks(arch):
    config = CONFIGS[arch]()
    hf_model = randomize_(hf.AutoModelForCausalLM.from_config(config), seed=1).eval().to(torch.bfloat16)
    model = GenericModel.wrap(hf_model)
    offered = {name.split(".")[-1] for name in model.hook_dict if name.split(".")[-1] in OPTIONAL}
    assert offered == EXPECTED[arch]
    ids = tokens()
    with torch.no_grad():
        assert_close(model(ids), hf_model(ids).logits, atol=0, rtol=0)


def test_padding_leaves_real_tokens_unchanged(pair):
    _, _, model = pair
    ids = tokens(batch=1, seq=5, seed=4).clamp(min=1)
    alone = model(ids)[0]
    pad = torch.zeros(1, 3, dtype=torch.long)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 5)], 1).long()
    left = model(torch.cat([pad, ids], 1), attention_mask=mask)[0, 3:]
    right = model(torch.cat([ids, pad], 1), attention_mask=mask.flip(1))[0, :5]
    assert_close(left, alone, atol=1e-5, rtol=1e-5)
    assert_close(right, alone, atol=1e-5, rtol=1e-5)
