"""Head detectors against naive loops, forced attention patterns and an analytic copy-suppression toy."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import mechscope as ms
from mechscope.analysis import (
    copy_suppression_scores,
    detect_head,
    duplicate_token_target,
    induction_scores,
    induction_target,
    previous_token_scores,
    previous_token_target,
    repeated_random_tokens,
    score_patterns,
    top_heads,
)
from mechscope.analysis.heads import attention_patterns
from tests.conftest import tiny_model

TOKENS = torch.tensor([[3, 14, 15, 3, 14, 5, 15, 3], [8, 9, 8, 9, 8, 2, 38, 9]])


def test_targets_match_naive_definitions():
    batch, seq = TOKENS.shape
    for b in range(batch):
        for q in range(seq):
            for k in range(seq):
                t = TOKENS[b]
                assert previous_token_target(TOKENS)[b, q, k] == (k == q - 1)
                assert duplicate_token_target(TOKENS)[b, q, k] == (k < q and bool(t[k] == t[q]))
                assert induction_target(TOKENS)[b, q, k] == (1 <= k < q and bool(t[k - 1] == t[q]))


def test_score_patterns_matches_loop(small_model):
    patterns = attention_patterns(small_model, TOKENS)
    target = induction_target(TOKENS).float() * torch.rand(
        TOKENS.shape[0], 8, 8, generator=torch.Generator().manual_seed(0)
    )
    scores = score_patterns(patterns, target)
    layers, batch, heads = patterns.shape[:3]
    for layer in range(layers):
        for head in range(heads):
            masses = [
                float((patterns[layer, b, head, q] * target[b, q]).sum())
                for b in range(batch)
                for q in range(TOKENS.shape[1])
                if target[b, q].sum() > 0
            ]
            assert_close(scores[layer, head], torch.tensor(sum(masses) / len(masses)), rtol=1e-5, atol=1e-6)


def _force_pattern(layer: int, head: int, target_fn):
    """A hook making one head attend uniformly to its target keys (itself when it has none)."""

    def hook(pattern, *, hook):
        tokens = hook_tokens["tokens"]
        target = target_fn(tokens).float()
        seq = target.shape[-1]
        target = target + torch.eye(seq) * (target.sum(-1, keepdim=True) == 0)
        pattern = pattern.clone()
        pattern[:, head] = target / target.sum(-1, keepdim=True)
        return pattern

    hook_tokens: dict = {}
    return f"blocks.{layer}.attn.hook_pattern", hook, hook_tokens


@pytest.mark.parametrize(
    "detector,target_fn", [(previous_token_scores, previous_token_target), (induction_scores, induction_target)]
)
def test_forced_head_scores_one(small_model, detector, target_fn):
    tokens = repeated_random_tokens(small_model, seq_len=6, batch=3, seed=1, prepend_bos=False)
    name, hook, holder = _force_pattern(1, 2, target_fn)
    holder["tokens"] = tokens
    with small_model.hooks(fwd_hooks=[(name, hook)]):
        scores = detector(small_model, tokens)
    assert_close(scores[1, 2], torch.tensor(1.0))
    assert top_heads(scores, 1)[0] == ("L1H2", 1.0)
    assert float(scores.max()) <= 1.0 + 1e-6 and float(scores.min()) >= 0.0


def test_detect_head_custom_and_errors(small_model):
    diag = detect_head(small_model, TOKENS, torch.eye(8))
    patterns = attention_patterns(small_model, TOKENS)
    assert_close(diag, patterns.diagonal(dim1=-2, dim2=-1).mean((1, 3)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ms.InputError, match="key_pos"):
        detect_head(small_model, TOKENS, torch.eye(5))
    with pytest.raises(ms.InputError, match="no query position"):
        detect_head(small_model, TOKENS, torch.zeros(8, 8))
    with pytest.raises(ms.InputError, match="needs a tokenizer"):
        repeated_random_tokens(small_model, prepend_bos=True)


def test_repeated_random_tokens():
    model = tiny_model()
    tokens = repeated_random_tokens(model, seq_len=7, batch=4, seed=3, prepend_bos=False)
    assert tokens.shape == (4, 14) and torch.equal(tokens[:, :7], tokens[:, 7:])
    assert torch.equal(tokens, repeated_random_tokens(model, seq_len=7, batch=4, seed=3, prepend_bos=False))


def _naive_copy_suppression(model, tokens):
    """Per head, query and key: the full vocabulary effect of the value written from the key."""
    cfg = model.cfg
    _, cache = model.run_with_cache(tokens)
    w_u = model.unembed.w_u.detach()
    scores = torch.zeros(cfg.n_layers, cfg.n_heads)
    batch, seq = tokens.shape
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            kv = head // cfg.n_kv_groups
            total, count = 0.0, 0
            for b in range(batch):
                for q in range(1, seq):
                    per_query = 0.0
                    for k in range(q):
                        out = cache["v", layer][b, k, kv] @ model.blocks[layer].attn.W_O[head].detach()
                        if cfg.normalization_type in ("LN", "LNPre"):
                            out = out - out.mean()
                        if model.ln_final is not None:
                            out = out * model.ln_final.w.detach()
                        effect = out @ w_u.T  # [d_vocab]
                        spread = effect.std(unbiased=False)
                        z = (effect[tokens[b, k]] - effect.mean()) / spread if spread > 0 else 0.0
                        per_query += float(cache["pattern", layer][b, head, q, k]) * -float(z)
                    total, count = total + per_query, count + 1
            scores[layer, head] = total / count
    return scores


def test_copy_suppression_matches_naive(small_model):
    tokens = TOKENS[:, :6]
    assert_close(
        copy_suppression_scores(small_model, tokens), _naive_copy_suppression(small_model, tokens), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_copy_suppression_sign_on_toy(sign):
    """Identity embeddings and unembeddings, heads whose OV is -I (suppress) or +I (copy) on their slice."""
    cfg = ms.ModelConfig(
        d_model=16,
        n_layers=1,
        n_heads=4,
        d_mlp=1,
        d_vocab=16,
        n_ctx=16,
        attn_only=True,
        normalization_type=None,
        positional_embedding_type="none",
    )
    model = ms.HookedTransformer(cfg).init_weights(seed=0)
    with torch.no_grad():
        model.embed.W_E.copy_(torch.eye(16))
        model.unembed.w_u.copy_(torch.eye(16))
        attn = model.blocks[0].attn
        attn.w_q.zero_()
        attn.w_k.zero_()  # uniform causal attention
        attn.w_v.copy_(torch.eye(16))
        attn.w_o.copy_(sign * torch.eye(16))
    scores = copy_suppression_scores(model, torch.arange(16)[None])
    assert bool((scores * sign < 0).all()), scores
    assert_close(scores, _naive_copy_suppression(model, torch.arange(16)[None]), rtol=1e-4, atol=1e-5)
