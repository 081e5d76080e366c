"""One hook-name grammar: `mechscope.names.act_name` is TransformerLens' ``get_act_name``
(aliases, compact names, sublayer spellings), and the cache reads keys through it."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.names import act_name
from mechscope.tl import utils

SHORT_NAMES = [
    (("k", 6, "a"), "blocks.6.attn.hook_k"),
    (("k6",), "blocks.6.attn.hook_k"),
    (("scale4ln1",), "blocks.4.ln1.hook_scale"),
    (("pre5",), "blocks.5.mlp.hook_pre"),
    (("attn", 1), "blocks.1.attn.hook_pattern"),
    (("attn_logits", 0), "blocks.0.attn.hook_attn_scores"),
    (("value", 2, "attention"), "blocks.2.attn.hook_v"),
    (("mlp_post", 3, "m"), "blocks.3.mlp.hook_post"),
    (("resid_pre", 0, "block"), "blocks.0.hook_resid_pre"),
    (("normalized", 27, "ln2"), "blocks.27.ln2.hook_normalized"),
    (("scale",), "ln_final.hook_scale"),
    (("embed",), "hook_embed"),
    (("blocks.3.hook_mlp_out",), "blocks.3.hook_mlp_out"),
]


@pytest.mark.parametrize(("args", "full"), SHORT_NAMES)
def test_act_name_is_get_act_name(args, full):
    assert act_name(*args) == full
    assert utils.get_act_name(*args) == full


def test_unknown_short_names_raise_with_the_valid_ones():
    with pytest.raises(ms.HookNameError, match="closest valid names"):
        act_name("resid_prev", 0)
    with pytest.raises(ms.HookNameError, match="needs a layer"):
        act_name("z")


def test_cache_keys_take_the_grammar(small_model):
    model = small_model
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3, 4]]))
    assert torch.equal(cache["k1"], cache["blocks.1.attn.hook_k"])
    assert torch.equal(cache["attn", 0], cache["blocks.0.attn.hook_pattern"])
    assert torch.equal(cache["scale0ln2"], cache["blocks.0.ln2.hook_scale"])
    assert torch.equal(cache["value", -1, "a"], cache[f"blocks.{model.cfg.n_layers - 1}.attn.hook_v"])
    assert "k1" in cache and "not_a_hook" not in cache and ("q", 99) not in cache
    with pytest.raises(ms.HookNameError):
        cache["not_a_hook"]
