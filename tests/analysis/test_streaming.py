"""Streaming DLA and logit lens equal their cached versions, and a naive per-component loop."""

from __future__ import annotations

import pytest
import torch
import transformers as hf
from torch.testing import assert_close

from mechscope.analysis import direct_logit_attribution, logit_lens
from mechscope.analysis.streaming import (
    dla_stream,
    final_norm_form,
    logit_lens_stream,
    run_streams,
    streaming_detect_head,
    streaming_dla,
    streaming_logit_lens,
)
from mechscope.errors import HookNameError, InputError
from mechscope.model.generic import GenericModel
from tests.conftest import randomize_, tiny_model


def test_streaming_dla_equals_cached(small_model):
    tokens = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(0))
    logits, cache = small_model.run_with_cache(tokens)
    for pos in (-1, [2, 5, 8]):
        cached = direct_logit_attribution(cache, answer=[4, 9, 11], against=17, pos=pos)
        streamed = streaming_dla(small_model, tokens, answer=[4, 9, 11], against=17, pos=pos)
        assert streamed.labels == cached.labels
        assert_close(streamed.values, cached.values, atol=1e-5, rtol=1e-5)
        index = torch.as_tensor(pos).expand(3) % 9
        rows = torch.arange(3)
        expected = logits[rows, index, torch.tensor([4, 9, 11])] - logits[rows, index, 17]
        assert_close(streamed.total(), expected, atol=1e-4, rtol=1e-4)


def test_streaming_dla_by_head_equals_cached(small_model):
    tokens = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(7))
    logits, cache = small_model.run_with_cache(tokens)
    cached = direct_logit_attribution(cache, answer=[3, 8], against=[5, 1], by="head", pos=[6, 7])
    streamed = streaming_dla(small_model, tokens, answer=[3, 8], against=[5, 1], by="head", pos=[6, 7])
    assert streamed.labels == cached.labels
    assert_close(streamed.values, cached.values, atol=1e-5, rtol=1e-5)
    expected = logits[torch.arange(2), [6, 7], [3, 8]] - logits[torch.arange(2), [6, 7], [5, 1]]
    assert_close(streamed.total(), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="by must be"):
        streaming_dla(small_model, tokens, answer=3, by="neuron")


def test_streaming_logit_lens_equals_cached(small_model):
    tokens = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    _, cache = small_model.run_with_cache(tokens)
    for pos in (None, -1, [0, 3]):
        cached = logit_lens(cache, pos=pos)
        streamed = streaming_logit_lens(small_model, tokens, pos=pos)
        assert (streamed.labels, streamed.positions) == (cached.labels, cached.positions)
        assert_close(streamed.logits, cached.logits, atol=1e-5, rtol=1e-5)


def test_streams_in_one_forward_equal_separate_runs(small_model):
    tokens = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(5))
    calls = []
    handle = small_model.blocks[0].register_forward_hook(lambda *args: calls.append(1))
    dla, lens = run_streams(
        small_model, tokens, dla_stream(small_model, tokens, 3, pos=[1, 4]), logit_lens_stream(small_model, tokens, -1)
    )
    assert len(calls) == 1
    handle.remove()
    alone = streaming_dla(small_model, tokens, 3, pos=[1, 4])
    assert dla.labels == alone.labels
    assert_close(dla.values, alone.values, atol=0, rtol=0)
    assert_close(lens.logits, streaming_logit_lens(small_model, tokens, -1).logits, atol=0, rtol=0)


def test_attn_only_and_bad_input():
    model = tiny_model(attn_only=True)
    tokens = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(2))
    cached = direct_logit_attribution(model.run_with_cache(tokens)[1], answer=3)
    streamed = streaming_dla(model, tokens, answer=3)
    assert streamed.labels == cached.labels
    assert_close(streamed.values, cached.values, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="pos must be"):
        streaming_dla(model, tokens, answer=3, pos=9)
    with pytest.raises(InputError, match=r"\[0, 61\)"):
        streaming_dla(model, tokens, answer=70)
    with pytest.raises(InputError, match="out of range"):
        streaming_logit_lens(model, tokens, pos=[7])


@pytest.mark.parametrize("arch", ["starcoder2", "bloom"])
def test_generic_models_against_a_naive_loop(arch):
    if arch == "starcoder2":
        config = hf.Starcoder2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_bias=True,
        )
    else:
        config = hf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    hf_model = randomize_(hf.AutoModelForCausalLM.from_config(config), seed=3).eval()
    model = GenericModel.wrap(hf_model)
    tokens = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    logits, cache = model.run_with_cache(tokens)
    dla = streaming_dla(model, tokens, answer=[5, 6], pos=-2)
    assert_close(dla.total(), logits[torch.arange(2), -2, torch.tensor([5, 6])], atol=1e-4, rtol=1e-4)
    # naive: each component's activation through the final norm with the full residual's scale
    form = final_norm_form(model)
    final = cache["blocks.1.hook_resid_post"][:, -2]
    for label, values in zip(dla.labels, dla.values, strict=True):
        if label == "embed":
            part = cache["hook_embed" if "hook_embed" in cache else "blocks.0.hook_resid_pre"][:, -2]
        elif label.endswith("_block_out"):
            layer = int(label.split("_")[0])
            part = cache["resid_post", layer][:, -2] - cache["resid_pre", layer][:, -2]
        elif label.endswith(("_attn_out", "_mlp_out")):
            layer, kind = label.split("_", 1)
            part = cache[f"blocks.{layer}.hook_{kind}"][:, -2]
        else:
            continue
        centred = part - part.mean(-1, keepdim=True) if form.centre else part
        normed = form.weight * centred / form.scale(final)
        expected = torch.stack([normed[b] @ model.W_U[:, t] for b, t in enumerate((5, 6))])
        assert_close(values, expected, atol=1e-5, rtol=1e-5)
    assert ("0_block_out" in dla.labels) == (arch == "bloom")
    with pytest.raises(HookNameError, match="family adapter"):
        streaming_dla(model, tokens, answer=5, by="head")
    lens = streaming_logit_lens(model, tokens, pos=[1, -1])
    assert_close(lens.logits[-1], logits[:, [1, 5]], atol=1e-5, rtol=1e-5)
    for layer in range(2):
        naive = (
            hf_model.lm_head(hf_model.transformer.ln_f(cache["resid_pre", layer][:, [1, 5]]))
            if arch == "bloom"
            else (hf_model.lm_head(hf_model.model.norm(cache["resid_pre", layer][:, [1, 5]])))
        )
        assert_close(lens.logits[layer], naive, atol=1e-5, rtol=1e-5)


def test_streaming_head_detectors_equal_cached(small_model):
    from mechscope.analysis import detect_head, duplicate_token_target, induction_target, previous_token_target

    half = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(6))
    tokens = torch.cat([half, half], dim=1)
    for target in (induction_target, previous_token_target, duplicate_token_target, torch.eye(10)):
        assert_close(
            streaming_detect_head(small_model, tokens, target),
            detect_head(small_model, tokens, target),
            atol=1e-6,
            rtol=1e-6,
        )
    with pytest.raises(InputError, match="target must be"):
        streaming_detect_head(small_model, tokens, torch.eye(4))
