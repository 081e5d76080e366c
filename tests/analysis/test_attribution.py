"""Direct logit attribution sums to the logits exactly; it matches ablations where effects are direct."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import mechscope as ms
from mechscope.analysis import Attribution, direct_logit_attribution, logit_lens, logit_target
from tests.conftest import tiny_model

TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5, 35], [8, 9, 7, 9, 3, 2, 38]])


@pytest.fixture
def run(small_model):
    logits, cache = small_model.run_with_cache(TOKENS)
    return small_model, logits, cache


@pytest.mark.parametrize("by", ["layer", "head"])
def test_decomposition_sums_to_logits(run, by):
    model, logits, cache = run
    dla = direct_logit_attribution(cache, answer=[4, 11], by=by)
    assert_close(dla.total(), logits[:, -1].gather(-1, torch.tensor([[4], [11]]))[:, 0], rtol=1e-5, atol=1e-5)
    if model.cfg.normalization_type in ("LN", "LNPre"):
        assert dla.labels[-1] == "ln_final.b" and "pos_embed" in dla.labels
    else:
        assert "ln_final.b" not in dla.labels and "pos_embed" not in dla.labels
    heads = [label for label in dla.labels if label.startswith("L") and "H" in label]
    assert len(heads) == (model.cfg.n_heads * model.cfg.n_layers if by == "head" else 0)


def test_logit_difference_at_per_prompt_positions(run):
    model, logits, cache = run
    pos = torch.tensor([3, 5])
    dla = direct_logit_attribution(cache, answer=[1, 2], against=[7, 8], by="head", pos=pos)
    expected = torch.stack([logits[0, 3, 1] - logits[0, 3, 7], logits[1, 5, 2] - logits[1, 5, 8]])
    assert_close(dla.total(), expected, rtol=1e-5, atol=1e-5)


def test_raw_direction(run):
    model, _, cache = run
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    dla = direct_logit_attribution(cache, direction, by="layer", pos=2)
    normed = model.ln_final(cache["resid_post", model.cfg.n_layers - 1])[:, 2]
    assert_close(dla.total(), normed @ direction, rtol=1e-5, atol=1e-5)


def test_biases_are_components():
    model = tiny_model(unembed_bias=True, attn_out_bias=True, attn_qkv_bias=True, mlp_bias=True, seed=3)
    logits, cache = model.run_with_cache(TOKENS)
    dla = direct_logit_attribution(cache, answer=9, against=4, by="head")
    assert_close(dla.total(), logits[:, -1, 9] - logits[:, -1, 4], rtol=1e-5, atol=1e-5)
    assert_close(dla["unembed.b_U"], (model.unembed.b_U[9] - model.unembed.b_U[4]).detach().expand(2))
    assert "L1_attn_bias" in dla.labels
    # by="neuron" splits the layer's MLP output exactly, bias included.
    layer_dla = direct_logit_attribution(cache, answer=9, by="layer")
    neurons = direct_logit_attribution(cache, answer=9, by="neuron", layer=1)
    assert neurons.labels[-1] == "L1_mlp_bias" and len(neurons.labels) == model.cfg.d_mlp + 1
    assert_close(neurons.total(), layer_dla["1_mlp_out"], rtol=1e-5, atol=1e-5)


def _frozen_final_scale(cache):
    scale = cache["ln_final.hook_scale"]
    return ("ln_final.hook_scale", lambda act, *, hook: scale)


def test_last_layer_heads_match_ablation_with_frozen_scale(small_model):
    """With the final norm's scale and the last MLP frozen, removing a last-layer head changes the logit by its DLA."""
    model = small_model
    last = model.cfg.n_layers - 1
    logits, cache = model.run_with_cache(TOKENS)
    dla = direct_logit_attribution(cache, answer=6, by="head")
    for head in range(model.cfg.n_heads):

        def zero_head(z, *, hook, head=head):
            z = z.clone()
            z[:, :, head] = 0
            return z

        frozen_mlp = (f"blocks.{last}.hook_mlp_out", lambda act, *, hook: cache[hook.name])
        hooks = [(f"blocks.{last}.attn.hook_z", zero_head), frozen_mlp, _frozen_final_scale(cache)]
        ablated = model.run_with_hooks(TOKENS, fwd_hooks=hooks)
        assert_close(logits[:, -1, 6] - ablated[:, -1, 6], dla[f"L{last}H{head}"], rtol=1e-4, atol=1e-5)


def test_last_layer_neurons_match_ablation_with_frozen_scale(small_model):
    model = small_model
    last = model.cfg.n_layers - 1
    logits, cache = model.run_with_cache(TOKENS)
    dla = direct_logit_attribution(cache, answer=6, against=2, by="neuron", layer=-1)
    for neuron in (0, 5, model.cfg.d_mlp - 1):

        def zero_neuron(post, *, hook, neuron=neuron):
            post = post.clone()
            post[:, :, neuron] = 0
            return post

        ablated = model.run_with_hooks(
            TOKENS, fwd_hooks=[(f"blocks.{last}.mlp.hook_post", zero_neuron), _frozen_final_scale(cache)]
        )
        diff = (logits[:, -1, 6] - logits[:, -1, 2]) - (ablated[:, -1, 6] - ablated[:, -1, 2])
        assert_close(diff, dla[f"L{last}N{neuron}"], rtol=1e-4, atol=1e-5)


def test_attribution_helpers_and_errors(run):
    model, _, cache = run
    dla = direct_logit_attribution(cache, answer=3)
    assert isinstance(dla, Attribution) and dla.values.shape == (len(dla.labels), 2)
    top = dla.top(3)
    assert len(top) == 3 and abs(top[0][1]) >= abs(top[1][1]) >= abs(top[2][1])
    assert top[0][0] in dla.table(3)
    with pytest.raises(ms.InputError, match="by must be"):
        direct_logit_attribution(cache, answer=3, by="neurons")
    with pytest.raises(ms.InputError, match="layer="):
        direct_logit_attribution(cache, answer=3, by="neuron")
    with pytest.raises(ms.InputError, match="out of range"):
        direct_logit_attribution(cache, answer=3, pos=7)
    with pytest.raises(ms.InputError, match="batch of 2"):
        direct_logit_attribution(cache, answer=[1, 2, 3])
    with pytest.raises(ms.InputError, match=r"\[0, 61\)"):
        logit_target(model, 61)
    with pytest.raises(ms.HookNameError, match="L0H0"):
        direct_logit_attribution(cache, answer=3, by="head")["L0H9"]
    _, partial = model.run_with_cache(TOKENS, names_filter="hook_embed")
    with pytest.raises(ms.HookNameError, match="names_filter"):
        direct_logit_attribution(partial, answer=3)


def test_logit_lens(run):
    model, logits, cache = run
    lens = logit_lens(cache)
    assert lens.labels[-1] == "final_post" and lens.logits.shape == (model.cfg.n_layers + 1, 2, 7, model.cfg.d_vocab)
    assert_close(lens.logits[-1], logits, rtol=1e-5, atol=1e-5)
    expected = model.unembed(model.ln_final(cache["resid_pre", 1]))
    assert_close(lens.logits[1], expected, rtol=1e-5, atol=1e-5)
    probs, ids = lens.top_tokens(3)
    assert probs.shape == ids.shape == (model.cfg.n_layers + 1, 2, 7, 3)
    assert torch.equal(lens.ranks(0)[ids[..., 0] == 0], torch.zeros_like(lens.ranks(0)[ids[..., 0] == 0]))
    assert_close(lens.probs(5), lens.logits.softmax(-1)[..., 5])
    some = logit_lens(cache, pos=[-1, 2], incl_mid=True)
    assert some.positions == [6, 2] and "0_mid" in some.labels
    assert_close(some.logits[-1], logits[:, [6, 2]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ms.InputError, match="out of range"):
        logit_lens(cache, pos=9)


def test_folded_weights_give_the_same_exact_decomposition(small_model):
    """After fold_ln (and centring), DLA still sums to the logits and every component is unchanged."""
    from mechscope.model.processing import process_weights

    _, cache = small_model.run_with_cache(TOKENS)
    before = direct_logit_attribution(cache, answer=4, against=9, by="head")
    process_weights(small_model, processed=True, fold_value_biases=False)
    logits, cache = small_model.run_with_cache(TOKENS)
    after = direct_logit_attribution(cache, answer=4, against=9, by="head")
    assert_close(after.total(), logits[:, -1, 4] - logits[:, -1, 9], rtol=1e-5, atol=1e-5)
    for label in before.labels:
        if label in after.labels and label not in ("ln_final.b", "unembed.b_U"):
            assert_close(after[label], before[label], rtol=1e-4, atol=1e-5)
