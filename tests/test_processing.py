"""Weight processing keeps log-probabilities and does what each step says to the weights."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.model.processing import STEPS, process_weights, resolve_steps, unsupported_steps
from tests.conftest import tiny_model

TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8], [8, 9, 7, 9, 3, 2, 38, 1]])
ARCHS = {
    "gpt2_like_tied": dict(attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "layernorm_no_biases": dict(seed=4),
    "neox_like": dict(
        seed=1,
        positional_embedding_type="rotary",
        rotary_dim=4,
        parallel_attn_mlp=True,
        attn_qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        unembed_bias=True,
    ),
    "llama_like_gqa": dict(
        seed=2,
        n_key_value_heads=2,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        act_fn="silu",
        attn_qkv_bias=True,
    ),
    "gemma_like": dict(
        seed=3,
        n_key_value_heads=1,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        act_fn="gelu_pytorch_tanh",
        qk_norm="head",
        post_norm=True,
        embed_scale=32**0.5,
        tie_word_embeddings=True,
        attn_scores_soft_cap=3.0,
        output_logits_soft_cap=6.0,
    ),
    "olmo2_like": dict(
        seed=5,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        act_fn="silu",
        qk_norm="full",
        pre_norm=False,
        post_norm=True,
    ),
    "attn_only": dict(seed=6, attn_only=True, attn_qkv_bias=True),
}


def _cases():
    for arch, kw in ARCHS.items():
        cfg_reasons = unsupported_steps(tiny_model(**kw).cfg)
        for step in (*STEPS, "processed"):
            if step not in cfg_reasons:
                yield pytest.param(arch, step, id=f"{arch}-{step}")


@pytest.mark.parametrize("arch,step", list(_cases()))
def test_log_probs_unchanged(arch, step):
    model = tiny_model(**ARCHS[arch])
    with torch.no_grad():
        before = model(TOKENS).log_softmax(-1)
        process_weights(model, **({"processed": True} if step == "processed" else {step: True}))
        after = model(TOKENS).log_softmax(-1)
    assert before.std() > 0.1, "logits too flat to test anything"
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_steps_change_the_weights_as_documented():
    model = tiny_model(**ARCHS["gpt2_like_tied"])
    w_e = model.W_E.detach().clone()
    process_weights(model, processed=True)
    assert model.cfg.extra["weight_processing"] == list(STEPS)
    assert not model.cfg.tie_word_embeddings and model.unembed.w_u is not model.embed.W_E
    assert model.cfg.normalization_type == "LNPre"  # TransformerLens' folded LayerNorm: no weight or bias
    assert not [name for name in model.state_dict() if "ln" in name]
    for block in model.blocks:
        assert block.ln1.w is None and block.ln1.b is None
        assert torch.all(block.attn.b_v == 0)
        torch.testing.assert_close(block.attn.w_o.mean(0), torch.zeros(block.attn.w_o.shape[1]))
        torch.testing.assert_close(block.mlp.w_out.mean(0), torch.zeros(block.mlp.w_out.shape[1]))
    torch.testing.assert_close(model.W_E, w_e - w_e.mean(-1, keepdim=True))
    torch.testing.assert_close(model.unembed.w_u.mean(0), torch.zeros(model.cfg.d_model), atol=1e-6, rtol=0)
    torch.testing.assert_close(model.unembed.b_U.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    # fold_ln centres every reader of a LayerNorm over d_model, as TransformerLens does.
    zeros = lambda n: torch.zeros(n)  # noqa: E731
    for block in model.blocks:
        for w in (block.attn.w_q, block.attn.w_k, block.attn.w_v, block.mlp.w_in):
            torch.testing.assert_close(w.mean(-1), zeros(w.shape[0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(model.unembed.w_u.mean(-1), zeros(model.cfg.d_vocab), atol=1e-6, rtol=0)


def test_fold_ln_matches_naive_scaled_weights():
    model = tiny_model(**ARCHS["llama_like_gqa"])
    ln_w = model.blocks[1].ln1.w.detach().clone()
    w_q = model.blocks[1].attn.w_q.detach().clone()
    process_weights(model, fold_ln=True)
    expected = torch.stack([w_q[:, i] * ln_w[i] for i in range(len(ln_w))], dim=1)
    torch.testing.assert_close(model.blocks[1].attn.w_q, expected)


def test_processed_picks_the_valid_steps_per_architecture():
    rms = tiny_model(**ARCHS["llama_like_gqa"]).cfg
    assert resolve_steps(rms, processed=True) == {
        "fold_ln": True,
        "center_writing_weights": False,
        "center_unembed": True,
        "fold_value_biases": True,
    }
    gemma = tiny_model(**ARCHS["gemma_like"]).cfg
    assert resolve_steps(gemma, processed=True)["center_unembed"] is False
    assert resolve_steps(rms, processed=True, fold_ln=False)["fold_ln"] is False


def test_impossible_steps_raise_with_the_reason():
    with pytest.raises(ms.ConfigError, match="center_writing_weights=True is impossible.*LayerNorm that centres"):
        process_weights(tiny_model(**ARCHS["llama_like_gqa"]), center_writing_weights=True)
    with pytest.raises(ms.ConfigError, match="center_unembed=True is impossible.*soft-capping"):
        process_weights(tiny_model(**ARCHS["gemma_like"]), center_unembed=True)
    with pytest.raises(ms.ConfigError, match="fold_ln=True is impossible.*no norms"):
        process_weights(tiny_model(normalization_type=None), fold_ln=True)
    with pytest.raises(ms.ConfigError, match="unknown weight-processing steps"):
        resolve_steps(tiny_model().cfg, fold_layernorm=True)


@pytest.mark.parametrize(
    "arch, folded", [("gpt2_like_tied", "LNPre"), ("gemma_like", "RMSPre"), ("olmo2_like", "RMSPre")]
)
def test_fold_ln_leaves_weightless_pre_norms_that_rebuild_from_cfg_and_state_dict(arch, folded):
    model = tiny_model(**ARCHS[arch])
    process_weights(model, processed=True)
    assert model.cfg.normalization_type == folded  # TransformerLens' LNPre/RMSPre
    pre_norms = [model.ln_final] + [getattr(b, n) for b in model.blocks for n in ("ln1", "ln2")]
    assert all(norm.w is None for norm in pre_norms if norm is not None)
    if model.cfg.post_norm:  # post-norms are not folded and keep their weights
        assert all(b.ln1_post.w is not None and b.ln2_post.w is not None for b in model.blocks)
    rebuilt = ms.HookedTransformer(ms.ModelConfig.from_dict(model.cfg.to_dict()))
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(TOKENS), model(TOKENS), atol=0, rtol=0)
    with pytest.raises(ms.ConfigError, match="already folded"):
        process_weights(model, fold_ln=True)
