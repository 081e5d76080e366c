"""Generation: the key/value cache changes nothing, batches equal single prompts, hooks see every step."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
import mechscope.tl  # noqa: F401 - ms.tl below
from mechscope.model.context import KVCache
from mechscope.model.generate import sample_logits
from tests.conftest import tiny_model

GEMMA_LIKE = dict(
    seed=2,
    n_key_value_heads=2,
    normalization_type="RMS",
    positional_embedding_type="rotary",
    gated_mlp=True,
    act_fn="gelu_pytorch_tanh",
    qk_norm="head",
    post_norm=True,
    embed_scale=32**0.5,
    sliding_window=3,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    rotary_base_local=100.0,
    attn_scores_soft_cap=2.0,
    output_logits_soft_cap=5.0,
    n_ctx=64,
)
GREEDY = dict(do_sample=False, verbose=False)
"""Generation defaults to sampling with a progress bar, as in TransformerLens; these tests decode greedily."""
MODELS = {
    "gpt2_like": lambda: tiny_model(attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True, n_ctx=64),
    "llama_like_window": lambda: tiny_model(
        seed=1,
        n_key_value_heads=2,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        act_fn="silu",
        sliding_window=4,
    ),
    "gemma_like": lambda: tiny_model(**GEMMA_LIKE),
    "gptj_like": lambda: tiny_model(
        seed=3,
        positional_embedding_type="rotary",
        rotary_dim=4,
        parallel_attn_mlp=True,
        rotary_interleaved=True,
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def _left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return tokens, mask


def _prompts(model, lengths=(7, 2, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.cfg.d_vocab, (n,), generator=gen) for n in lengths]


def test_cache_forward_matches_full_forward(model):
    """Feeding a sequence in chunks through the cache gives the full forward's logits."""
    tokens, mask = _left_padded(_prompts(model, (9, 4, 6)))
    full = model(tokens, attention_mask=mask)
    cache = KVCache(model.cfg.n_layers)
    pieces = [model(tokens[:, :5], attention_mask=mask[:, :5], past_kv_cache=cache)]
    pieces += [model(tokens[:, i : i + 1], attention_mask=mask[:, i : i + 1], past_kv_cache=cache) for i in (5, 6)]
    pieces.append(model(tokens[:, 7:], past_kv_cache=cache))
    chunked = torch.cat(pieces, dim=1)
    real = mask.bool()
    torch.testing.assert_close(chunked[real], full[real], atol=1e-5, rtol=1e-5)
    assert len(cache) == tokens.shape[1]


@pytest.mark.parametrize("implementation", ["auto", "eager"])
def test_greedy_with_cache_equals_without(model, implementation):
    tokens = _prompts(model, (6,))[0][None]
    model.cfg.attn_implementation = implementation
    try:
        fast = model.generate(tokens, max_new_tokens=12, **GREEDY)
        slow = model.generate(tokens, max_new_tokens=12, use_past_kv_cache=False, **GREEDY)
    finally:
        model.cfg.attn_implementation = "auto"
    assert fast.shape == (1, 18)
    assert torch.equal(fast, slow)
    assert torch.equal(fast[:, :6], tokens)


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_batch_of_different_lengths_equals_each_alone(model, use_past_kv_cache):
    prompts = _prompts(model, (7, 2, 5), seed=1)
    tokens, mask = _left_padded(prompts)
    batched = model.generate(
        tokens, max_new_tokens=8, attention_mask=mask, use_past_kv_cache=use_past_kv_cache, **GREEDY
    )
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt, max_new_tokens=8, use_past_kv_cache=use_past_kv_cache, **GREEDY)
        assert torch.equal(batched[i, tokens.shape[1] :], alone[0, len(prompt) :]), f"row {i}"


def test_greedy_matches_naive_argmax_loop(model):
    tokens = _prompts(model, (5,), seed=2)[0][None]
    expected = tokens
    for _ in range(6):
        expected = torch.cat((expected, model(expected)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(model.generate(tokens, max_new_tokens=6, **GREEDY), expected)


def test_hooks_see_each_new_position_and_steer_generation():
    model = MODELS["llama_like_window"]()
    tokens = _prompts(model, (5,), seed=3)[0][None]
    seen = []

    def record(resid, *, hook):
        seen.append(tuple(resid.shape))

    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", record)]):
        model.generate(tokens, max_new_tokens=4, **GREEDY)
    d = model.cfg.d_model
    assert seen == [(1, 5, d), (1, 1, d), (1, 1, d), (1, 1, d)]

    def favour_token_7(logits_in, *, hook):
        return logits_in + 100 * model.W_U[:, 7] / model.W_U[:, 7].norm() ** 2

    plain = model.generate(tokens, max_new_tokens=4, **GREEDY)
    for use_past_kv_cache in (True, False):
        with model.hooks(fwd_hooks=[("unembed.hook_in", favour_token_7)]):
            steered = model.generate(tokens, max_new_tokens=4, use_past_kv_cache=use_past_kv_cache, **GREEDY)
        assert steered[0, 5:].tolist() == [7, 7, 7, 7]
    assert plain[0, 5:].tolist() != [7, 7, 7, 7]


def test_stop_at_eos_pads_finished_rows():
    model = MODELS["gpt2_like"]()
    prompts = _prompts(model, (4, 6), seed=4)
    tokens, mask = _left_padded(prompts)
    free = model.generate(tokens, max_new_tokens=6, attention_mask=mask, stop_at_eos=False, **GREEDY)
    eos = int(free[0, tokens.shape[1]])  # row 0's first new token
    out = model.generate(tokens, max_new_tokens=6, attention_mask=mask, eos_token_id=eos, **GREEDY)
    assert torch.all(out[0, tokens.shape[1] :] == eos)
    row1 = free[1, tokens.shape[1] :].tolist()
    cut = row1.index(eos) + 1 if eos in row1 else len(row1)
    assert out[1, tokens.shape[1] : tokens.shape[1] + cut].tolist() == row1[:cut]


def test_sampling_is_seeded_and_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).repeat(2000, 1)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    draws = sample_logits(logits, generator=gen())
    assert torch.equal(draws, sample_logits(logits, generator=gen()))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.04, rtol=0)
    top2 = sample_logits(logits, top_k=2, generator=gen())
    assert set(top2.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.55, 0.20, 0.12, 0.07, 0.02 (roughly)
    keep = int((probs.sort(descending=True).values.cumsum(0) < 0.8).sum()) + 1
    nucleus = sample_logits(logits, top_p=0.8, generator=gen())
    assert set(nucleus.tolist()) == set(probs.argsort(descending=True)[:keep].tolist())
    cold = sample_logits(logits, temperature=0.05, generator=gen())
    assert torch.all(cold == 0)
    assert torch.equal(sample_logits(logits[:3], temperature=0.0), torch.zeros(3, dtype=torch.long))


def test_transformer_lens_defaults_sample():
    model = MODELS["gpt2_like"]()
    tokens = _prompts(model, (4,), seed=5)[0][None]
    torch.manual_seed(0)
    first = model.generate(tokens, max_new_tokens=20, stop_at_eos=False, verbose=False)
    torch.manual_seed(0)
    again = model.generate(tokens, max_new_tokens=20, stop_at_eos=False, verbose=False)
    greedy = model.generate(tokens, max_new_tokens=20, stop_at_eos=False, **GREEDY)
    assert torch.equal(first, again) and not torch.equal(first, greedy)
    seeded = model.generate(tokens, 20, False, seed=3, verbose=False)
    assert torch.equal(seeded, model.generate(tokens, 20, False, seed=3, verbose=False))
    assert torch.equal(model.generate(tokens, 5, False, temperature=0.0, verbose=False), greedy[:, :9])
    # A strong frequency penalty forbids repeating any token seen so far.
    unique = model.generate(tokens, 8, False, freq_penalty=1e4, seed=1, verbose=False)[0]
    assert len(set(unique[4:].tolist()) | set(tokens[0].tolist())) == len(set(tokens[0].tolist())) + 8


def test_eos_lists_and_strings():
    model = MODELS["gpt2_like"]()
    tokens = _prompts(model, (4,), seed=6)[0][None]
    free = model.generate(tokens, max_new_tokens=6, stop_at_eos=False, **GREEDY)
    stops = [int(free[0, 5]), int(free[0, 6])]
    out = model.generate(tokens, max_new_tokens=6, eos_token_id=stops, **GREEDY)
    first = min(i for i, t in enumerate(free[0, 4:].tolist()) if t in stops)
    assert out.shape[1] == 4 + first + 1
    assert torch.equal(out[0, : 4 + first + 1], free[0, : 4 + first + 1])


def test_sampling_penalties():
    logits = torch.tensor([[2.0, 1.0, -1.0]])
    seen = torch.tensor([[0, 0]])
    assert sample_logits(logits, temperature=0.0, repetition_penalty=4.0, tokens=seen).tolist() == [1]
    assert set(sample_logits(logits.repeat(500, 1), freq_penalty=5.0, tokens=seen.repeat(500, 1)).tolist()) <= {1, 2}
    with pytest.raises(ms.InputError, match="frequency penalty needs the tokens"):
        sample_logits(logits, freq_penalty=1.0)


def test_bad_generation_arguments_raise():
    model = MODELS["gpt2_like"]()
    with pytest.raises(ms.InputError, match="left padding"):
        model.generate(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 1, 0]]), **GREEDY)
    with pytest.raises(ms.InputError, match="n_ctx=64"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=70, **GREEDY)
    with pytest.raises(ms.InputError, match="top_p"):
        model.generate(torch.tensor([[1, 2, 3]]), top_p=1.5, verbose=False)
    with pytest.raises(ms.InputError, match="past_kv_cache needs a full forward"):
        model(torch.tensor([[1, 2]]), stop_at_layer=1, past_kv_cache=KVCache(3))


@pytest.mark.slow
def test_bundled_model_generates_sensible_text():
    try:
        model = ms.load("smollm2-135m", device="cpu")
    except ms.LoadError as exc:
        pytest.skip(str(exc))
    text = model.generate("The capital of France is", max_new_tokens=6, **GREEDY)
    assert text.startswith("The capital of France is ")
    assert "Paris" in text
    batch = model.generate(["The capital of France is", "One, two, three, four,"], max_new_tokens=4, **GREEDY)
    assert "Paris" in batch[0] and "five" in batch[1]


def test_frozen_cache_serves_many_continuations():
    """TransformerLens' cache API: a frozen prefix is read by every continuation and never grows."""
    model = MODELS["llama_like_window"]()
    tokens = _prompts(model, (9,), seed=7)[0][None]
    cache = ms.tl.TransformerLensKeyValueCache.init_cache(model.cfg, "cpu")
    assert ms.tl.HookedTransformerKeyValueCache is KVCache
    model(tokens[:, :6], past_kv_cache=cache)
    cache.freeze()
    full = model(tokens)
    for end in (7, 9):
        step = model(tokens[:, 6:end], past_kv_cache=cache)
        torch.testing.assert_close(step[:, -1], full[:, end - 1], atol=1e-5, rtol=1e-5)
        assert len(cache) == 6 and cache.previous_attention_mask.shape == (1, 6)
    assert cache.append_attention_mask(torch.ones(1, 2, dtype=torch.long)).shape == (1, 8) and len(cache) == 6
    cache.unfreeze()
    model(tokens[:, 6:], past_kv_cache=cache)
    assert len(cache) == 9
