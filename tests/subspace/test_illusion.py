"""The illusion check: the row-space/kernel split, the readers of the residual stream, planted
directions on the hand-built toys with their analytic effects, and the report's outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from mechscope.errors import ConfigError
from mechscope.names import SITES
from mechscope.patching.metrics import LogitDiff
from mechscope.subspace import head_readers, illusion_check, split_subspace
from mechscope.subspace.toy import GENUINE_DIRECTION, ILLUSORY_DIRECTION, TOY_HOOK, genuine_toy, illusion_toy, toy_pairs
from tests.conftest import tiny_model


def test_split_is_orthogonal_and_the_kernel_is_unread():
    gen = torch.Generator().manual_seed(0)
    readers = torch.randn(10, 3, generator=gen)
    basis = torch.linalg.qr(torch.randn(10, 2, generator=gen))[0]
    row, kernel = split_subspace(basis, readers)
    assert_close(row + kernel, basis)
    assert_close(kernel.T @ readers, torch.zeros(2, 3), atol=1e-5, rtol=0)
    assert_close(row.T @ kernel, torch.zeros(2, 2), atol=1e-5, rtol=0)
    # the row-space part is what the readers see: projecting it out leaves nothing readable
    assert_close(row.T @ readers, basis.T @ readers, atol=1e-5, rtol=1e-5)


def test_planted_directions_have_their_analytic_effects():
    weight = 8.0
    model, data = illusion_toy(weight), toy_pairs(16)
    names = ["planted", "disconnected", "dormant"]
    dormant = torch.tensor([0.0, 0.0, 1.0, 0.0])
    report = illusion_check(
        model, data.source_tokens, data.base_tokens, [ILLUSORY_DIRECTION, GENUINE_DIRECTION, dormant],
        data.metric(), TOY_HOOK, names=names,
    )  # fmt: skip
    planted, disconnected, dormant_row = report.rows
    # base logit difference (counterfactual - base answer) is -2; along the planted direction the
    # dormant neuron moves by 1/sqrt(2) of the disconnected pair's change, read with weight 8 and
    # doubled by the two answer logits: +8 sqrt(2)
    assert report.unpatched == -2.0
    assert_close(torch.tensor(planted.effect), torch.tensor(weight * math.sqrt(2)), atol=1e-4, rtol=1e-5)
    assert planted.illusory and planted.row_fraction == pytest.approx(0.5)
    assert planted.effect_row == 0.0 and planted.effect_kernel == 0.0
    assert planted.variance_row == 0.0 and planted.variance_kernel > 0
    assert not disconnected.illusory and disconnected.effect == 0.0 and disconnected.row_fraction == 0.0
    assert not dormant_row.illusory and dormant_row.effect == 0.0 and dormant_row.row_fraction == 1.0
    assert report.effect_full == 0.0


def test_a_genuinely_used_direction_is_not_flagged():
    model, data = genuine_toy(), toy_pairs(16)
    (row,) = illusion_check(
        model, data.source_tokens, data.base_tokens, GENUINE_DIRECTION, data.metric(), TOY_HOOK
    ).rows
    assert not row.illusory
    assert_close(torch.tensor([row.effect, row.effect_row]), torch.tensor([4.0, 4.0]), atol=1e-4, rtol=1e-5)
    assert row.effect_kernel == 0.0 and row.row_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_head_readers_read_what_the_query_reads(norm):
    model = tiny_model(normalization_type=norm, attn_qkv_bias=True)
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    layer, head = 2, 1
    _, cache = model.run_with_cache(tokens)
    x = cache["resid_pre", layer]
    scale = cache[f"blocks.{layer}.ln1.hook_scale"]
    q = cache[SITES["q"].hook(layer)][:, :, head]
    bias = model.b_Q[layer, head]
    if norm == "LN":
        bias = bias + model.blocks[layer].ln1.b @ model.W_Q[layer, head]
    assert_close(x @ head_readers(model, [(layer, head)]), scale * (q - bias).detach(), atol=1e-4, rtol=1e-4)


def test_report_outputs(tmp_path):
    model, data = illusion_toy(), toy_pairs(8)
    report = illusion_check(model, data.source_tokens, data.base_tokens, ILLUSORY_DIRECTION, data.metric(), TOY_HOOK)
    assert "illusory" in report.table().splitlines()[2]
    written = report.save(tmp_path / "check.html")
    assert [p.name for p in written] == ["check.html", "check_effect.png", "check_variance.png", "check.json"]
    assert json.loads(written[-1].read_text())["rows"][0]["illusory"] is True
    assert written[1].read_bytes()[:4] == b"\x89PNG"


def test_residual_sites_need_readers():
    model = tiny_model()
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(ConfigError, match="head_readers"):
        illusion_check(model, tokens, tokens, torch.randn(32), LogitDiff([1], [2]), "blocks.1.hook_resid_pre")
