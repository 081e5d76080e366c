"""mechscope.tl.patching on the batched engine equals TransformerLens' one-forward-per-patch loop
(run here with a custom setter, which takes that loop), and keeps TransformerLens' layouts."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import mechscope as ms
from mechscope.tl import patching
from tests.conftest import tiny_model

CLEAN = torch.tensor([[1, 5, 9, 12, 7, 3], [2, 8, 9, 4, 7, 3]])
CORRUPTED = torch.tensor([[1, 6, 9, 12, 7, 3], [2, 8, 10, 4, 7, 3]])


def _metric(logits):
    return (logits[:, -1, 4] - logits[:, -1, 11]).mean()


def _loop(setter):
    return lambda act, index, clean: setter(act, index, clean)  # not the module's setter: the naive loop runs


@pytest.mark.parametrize(
    "name, setter, activation, axes",
    [
        ("resid_pre", patching.layer_pos_patch_setter, "resid_pre", ("layer", "pos")),
        ("mlp_out", patching.layer_pos_patch_setter, "mlp_out", ("layer", "pos")),
        ("attn_head_out_by_pos", patching.layer_pos_head_vector_patch_setter, "z", ("layer", "pos", "head")),
        ("attn_head_k_all_pos", patching.layer_head_vector_patch_setter, "k", ("layer", "head")),
        ("attn_head_v_by_pos", patching.layer_pos_head_vector_patch_setter, "v", ("layer", "pos", "head")),
        ("attn_head_pattern_all_pos", patching.layer_head_pattern_patch_setter, "pattern", ("layer", "head_index")),
        (
            "attn_head_pattern_by_pos",
            patching.layer_head_pos_pattern_patch_setter,
            "pattern",
            ("layer", "head_index", "dest_pos"),
        ),
    ],
)
def test_batched_equals_loop(small_model, name, setter, activation, axes):
    _, cache = small_model.run_with_cache(CLEAN)
    batched = getattr(patching, f"get_act_patch_{name}")(small_model, CORRUPTED, cache, _metric)
    loop = patching.generic_activation_patch(small_model, CORRUPTED, cache, _metric, _loop(setter), activation, axes)
    assert batched.shape == loop.shape
    assert_close(batched, loop, atol=1e-5, rtol=1e-5)


def test_layouts_and_grouped_query_padding():
    model = tiny_model(seed=1, n_key_value_heads=2, normalization_type="RMS", positional_embedding_type="rotary")
    _, cache = model.run_with_cache(CLEAN)
    n_layers, n_heads, pos = model.cfg.n_layers, model.cfg.n_heads, CLEAN.shape[1]
    assert patching.get_act_patch_attn_head_k_all_pos(model, CORRUPTED, cache, _metric).shape == (n_layers, 2)
    every = patching.get_act_patch_attn_head_all_pos_every(model, CORRUPTED, cache, _metric)
    assert every.shape == (5, n_layers, n_heads) and torch.equal(every[2, :, 2:], torch.zeros(n_layers, 2))
    assert patching.get_act_patch_block_every(model, CORRUPTED, cache, _metric).shape == (3, n_layers, pos)
    by_pos = patching.get_act_patch_attn_head_by_pos_every(model, CORRUPTED, cache, _metric)
    assert by_pos.shape == (5, n_layers, pos, n_heads)


def test_metric_must_return_a_scalar(small_model):
    _, cache = small_model.run_with_cache(CLEAN)
    with pytest.raises(ms.InputError, match="scalar"):
        patching.get_act_patch_resid_pre(small_model, CORRUPTED, cache, lambda logits: logits[:, -1, 0])
