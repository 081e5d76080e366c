"""Forward-pass options: partial runs, padding, loss, input validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mechscope as ms
from tests.conftest import tiny_model

TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8], [8, 9, 7, 9, 3, 2, 38, 1]])


@pytest.mark.parametrize("split", [0, 1, 2, 3, -1])
def test_stop_then_start_reproduces_the_full_forward(small_model, split):
    resid = small_model(TOKENS, stop_at_layer=split)
    assert resid.shape == (*TOKENS.shape, small_model.cfg.d_model)
    torch.testing.assert_close(small_model(resid, start_at_layer=split), small_model(TOKENS))


def test_stop_at_layer_returns_the_cached_residual(small_model):
    _, cache = small_model.run_with_cache(TOKENS)
    torch.testing.assert_close(small_model(TOKENS, stop_at_layer=2), cache["blocks.2.hook_resid_pre"])


@pytest.mark.parametrize("implementation", ["auto", "eager"])
def test_left_padding_matches_each_prompt_alone(small_model, implementation):
    lengths = [8, 3, 5]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, small_model.cfg.d_vocab, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    small_model.cfg.attn_implementation = implementation
    try:
        batched = small_model(tokens, attention_mask=mask)
        for i, p in enumerate(prompts):
            alone = small_model(p[None])
            torch.testing.assert_close(batched[i, -1], alone[0, -1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched[i, width - len(p) :], alone[0], atol=1e-5, rtol=1e-5)
    finally:
        small_model.cfg.attn_implementation = "auto"
    assert torch.isfinite(batched).all()


def test_right_padding_keeps_real_positions_exact(small_model):
    short = TOKENS[1, :4]
    tokens = torch.stack([TOKENS[0], torch.cat([short, torch.zeros(4, dtype=torch.long)])])
    mask = torch.ones_like(tokens)
    mask[1, 4:] = 0
    out = small_model(tokens, attention_mask=mask)
    torch.testing.assert_close(out[1, :4], small_model(short[None])[0], atol=1e-5, rtol=1e-5)


def test_loss_is_next_token_cross_entropy(small_model):
    logits, loss = small_model(TOKENS, return_type="both")
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), TOKENS[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    per_token = small_model(TOKENS, return_type="loss", loss_per_token=True)
    assert per_token.shape == (2, 7)
    torch.testing.assert_close(per_token.mean(), expected)
    assert small_model(TOKENS, return_type=None) is None


def test_masked_loss_ignores_padding(small_model):
    mask = torch.ones_like(TOKENS)
    mask[1, :5] = 0
    loss = small_model(TOKENS, return_type="loss", attention_mask=mask)
    per_token = small_model(TOKENS, return_type="loss", attention_mask=mask, loss_per_token=True)
    valid = torch.ones_like(per_token, dtype=torch.bool)
    valid[1, :5] = False
    torch.testing.assert_close(loss, per_token[valid].mean())


def test_bad_inputs_raise_clear_errors(small_model):
    with pytest.raises(ms.InputError, match="token ids must lie in"):
        small_model(torch.tensor([[0, small_model.cfg.d_vocab]]))
    with pytest.raises(ms.InputError, match="integer tensor"):
        small_model(torch.zeros(1, 3))
    with pytest.raises(ms.InputError, match="residual stream"):
        small_model(TOKENS, start_at_layer=1)
    with pytest.raises(ms.InputError, match="out of range"):
        small_model(TOKENS, stop_at_layer=7)
    with pytest.raises(ms.InputError, match="attention_mask has shape"):
        small_model(TOKENS, attention_mask=torch.ones(2, 3))
    with pytest.raises(ms.InputError, match="return_type"):
        small_model(TOKENS, return_type="probs")
    with pytest.raises(ms.InputError, match="no tokenizer"):
        small_model("hello")


def test_learned_positions_beyond_n_ctx_raise():
    model = tiny_model(n_ctx=6)
    with pytest.raises(ms.InputError, match="7 positions exceed this model's n_ctx=6 learned"):
        model(torch.zeros(1, 7, dtype=torch.long))
    cache = ms.model.context.KVCache(model.cfg.n_layers)
    model(torch.zeros(1, 4, dtype=torch.long), past_kv_cache=cache)
    with pytest.raises(ms.InputError, match="n_ctx=6"):  # positions continue past the cached ones
        model(torch.zeros(1, 3, dtype=torch.long), past_kv_cache=cache)
    padded = torch.zeros(2, 7, dtype=torch.long)  # seven columns, at most six real tokens per row
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[:, 0] = 0
    assert model(padded, attention_mask=mask).shape == (2, 7, model.cfg.d_vocab)


def test_rotary_positions_beyond_n_ctx_warn():
    model = tiny_model(n_ctx=6, positional_embedding_type="rotary")
    with pytest.warns(UserWarning, match="7 positions exceed the context length"):
        assert model(torch.zeros(1, 7, dtype=torch.long)).shape == (1, 7, model.cfg.d_vocab)


def test_sliding_window_limits_attention():
    model = tiny_model(sliding_window=3, normalization_type="RMS", positional_embedding_type="rotary")
    _, cache = model.run_with_cache(TOKENS, names_filter="blocks.0.attn.hook_pattern")
    pattern = cache["blocks.0.attn.hook_pattern"]
    q, k = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert torch.all(pattern[..., (k <= q - 3) | (k > q)] == 0)
    assert torch.all(pattern[..., (k > q - 3) & (k <= q)] > 0)
    torch.testing.assert_close(model(TOKENS), model.run_with_cache(TOKENS)[0])


def test_config_validation():
    with pytest.raises(ms.ConfigError, match="n_key_value_heads=3 must divide n_heads=4"):
        ms.ModelConfig(d_model=32, n_layers=1, n_heads=4, n_key_value_heads=3, d_mlp=8, d_vocab=5, n_ctx=4)
    with pytest.raises(ms.ConfigError, match="act_fn"):
        ms.ModelConfig(d_model=32, n_layers=1, n_heads=4, d_mlp=8, d_vocab=5, n_ctx=4, act_fn="tanh")
    cfg = ms.ModelConfig(d_model=32, n_layers=1, n_heads=4, d_mlp=8, d_vocab=5, n_ctx=4)
    assert ms.ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ms.ConfigError, match="unknown ModelConfig fields"):
        ms.ModelConfig.from_dict({**cfg.to_dict(), "d_modle": 3})


def _final_qk(model, cache, layer):
    if model.cfg.positional_embedding_type == "rotary":
        return cache["rot_q", layer], cache["rot_k", layer]
    return cache["q", layer], cache["k", layer]


@pytest.mark.parametrize("soft_cap", [None, 0.5])
def test_attention_scores_are_the_hooked_pre_softmax_values(small_model, soft_cap):
    small_model.cfg.attn_scores_soft_cap = soft_cap
    try:
        _, cache = small_model.run_with_cache(TOKENS)
        for layer, block in enumerate(small_model.blocks):
            scores = block.attn.scores(*_final_qk(small_model, cache, layer))  # [batch, head, query_pos, key_pos]
            hooked = cache["attn_scores", layer]
            allowed = torch.isfinite(hooked)
            assert torch.equal(allowed, torch.ones_like(allowed).tril())
            assert torch.equal(scores[allowed], hooked[allowed])
            pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            torch.testing.assert_close(pattern, cache["pattern", layer])
            if soft_cap is not None:
                assert scores.abs().max() <= soft_cap
    finally:
        small_model.cfg.attn_scores_soft_cap = None


def test_attention_scores_take_unexpanded_keys_and_extra_axes():
    model = tiny_model(n_key_value_heads=2, normalization_type="RMS", positional_embedding_type="rotary")
    _, cache = model.run_with_cache(TOKENS)
    q, k = cache["rot_q", 1], cache["rot_k", 1]
    attn = model.blocks[1].attn
    with pytest.raises(ms.InputError, match="kv_head, not expanded"):
        attn.scores(q, k.repeat_interleave(2, dim=2))
    stacked = attn.scores(torch.stack([q, 2 * q]), k)  # a leading axis before batch
    torch.testing.assert_close(stacked[1], 2 * stacked[0])
    torch.testing.assert_close(stacked[0], attn.scores(q, k))


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny GPT-2-style model with a small byte-level BPE tokenizer (BOS = EOS = pad)."""
    from tests.tl.checkpoints import make_tokenizer

    hf = make_tokenizer(tmp_path_factory.mktemp("tok"))
    return tiny_model(d_vocab=len(hf), n_ctx=12), hf


def test_tokenizer_is_the_hugging_face_tokenizer(text_model):
    model, hf = text_model
    model.set_tokenizer(hf)
    assert model.tokenizer is hf and model.codec.hf is hf and hf.padding_side == "right"
    prompts = ["When Mary", "The cat sat on the mat"]
    right = model.to_tokens(prompts)
    hf.padding_side = "left"  # TransformerLens: the tokenizer's padding side is every call's default
    try:
        left = model.to_tokens(prompts)
        assert left[0, 0] == hf.pad_token_id and right[0, -1] == hf.pad_token_id
        assert torch.equal(model.to_tokens(prompts, padding_side="right"), right)
        # Left-padded token ids without a mask are masked at their leading pads, as strings are.
        torch.testing.assert_close(model(left)[:, -1], model(prompts)[:, -1])
        torch.testing.assert_close(model(left)[0, -1], model(prompts[0])[0, -1], atol=1e-5, rtol=1e-5)
    finally:
        hf.padding_side = "right"
    torch.testing.assert_close(model(right)[0, 2], model(prompts[0])[0, -1], atol=1e-5, rtol=1e-5)
    model.tokenizer = None
    assert model.codec is None
    with pytest.raises(ms.InputError, match="no tokenizer"):
        model.to_tokens("hello")
    model.tokenizer = hf
    assert model.codec.hf is hf


def test_context_length_of_text(text_model):
    model, hf = text_model
    model.set_tokenizer(hf)
    text = "When Mary and John went to the store, John gave a drink to Mary and the cat sat on the mat."
    n = len(model.to_str_tokens(text))
    assert n > model.cfg.n_ctx
    with pytest.raises(ms.InputError, match=f"{n} positions exceed this model's n_ctx=12"):
        model(text)
    with pytest.warns(UserWarning, match=f"cut {n} tokens to the model's n_ctx=12"):
        cut = model.to_tokens(text)
    assert cut.shape == (1, 12)
    assert model.to_str_tokens(cut) == model.to_str_tokens(text)[:12]
    assert model.to_tokens(text, truncate=False).shape == (1, n)
    assert model.to_str_tokens(model.to_tokens(text, truncate=False)) == model.to_str_tokens(text)


def test_token_helpers_take_transformer_lens_inputs(text_model):
    model, hf = text_model
    model.set_tokenizer(hf)
    ids = model.to_tokens("When Mary and John", prepend_bos=False)[0]
    assert model.to_string(ids.tolist()) == model.to_string(ids) == "When Mary and John"
    assert model.to_string(int(ids[1])) == model.to_str_tokens(ids[1])[0]
    assert model.to_str_tokens(ids.numpy()) == model.to_str_tokens(ids[None])
    with pytest.raises(ms.InputError, match=r"\[1, pos\]"):
        model.to_str_tokens(torch.stack([ids, ids]))
