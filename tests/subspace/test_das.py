"""DAS: the differentiable interchange run against a full hooked forward, seeding, save/load,
and the ground truth of the hand-built toys."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mechscope.errors import ConfigError, InputError
from mechscope.subspace import (
    DASConfig,
    InterchangeData,
    InterchangeRun,
    LearnedSubspace,
    Predicts,
    illusion_check,
    interchange,
    interchange_scores,
    orthonormal_basis,
    subspace_patch,
    train_das,
)
from mechscope.subspace.toy import TOY_HOOK, genuine_toy, illusion_toy, toy_pairs
from tests.conftest import tiny_model


def gqa_model():
    return tiny_model(
        seed=1, n_layers=2, d_mlp=8, n_key_value_heads=2, normalization_type="RMS",
        positional_embedding_type="rotary", gated_mlp=True, act_fn="silu",
    )  # fmt: skip


def random_data(model, n=4, seq=6, seed=0, mask=False):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(model.cfg.d_vocab, (n, seq), generator=gen)
    source = torch.randint(model.cfg.d_vocab, (n, seq), generator=gen)
    labels = torch.randint(model.cfg.d_vocab, (2, n), generator=gen)
    attention = None
    if mask:
        attention = torch.ones(n, seq, dtype=torch.long)
        attention[0, :2] = 0  # the first pair is left-padded by two tokens
    return InterchangeData(base, source, labels[0], labels[1], attention)


def hooked_logits(model, data, hook_name, position, basis):
    """The reference: full forwards of the base prompts with the interchange done by a plain hook."""
    _, cache = model.run_with_cache(data.source_tokens, names_filter=[hook_name], attention_mask=data.attention_mask)
    source = cache[hook_name][:, position]

    def hook(x, *, hook):
        out = x.clone()
        out[:, position] = interchange(x[:, position], source, basis)
        return out

    logits = model.run_with_hooks(data.base_tokens, fwd_hooks=[(hook_name, hook)], attention_mask=data.attention_mask)
    return logits[:, -1]


@pytest.mark.parametrize(
    "hook_name, position, mask",
    [
        ("blocks.1.hook_resid_pre", 3, False),
        ("blocks.0.mlp.hook_post", 2, True),
        ("blocks.1.hook_resid_post", 0, False),
    ],
)
def test_interchange_run_matches_a_full_hooked_forward_in_values_and_gradients(hook_name, position, mask):
    model = gqa_model()
    data = random_data(model, mask=mask)
    d_act = model.cfg.d_mlp if "mlp" in hook_name else model.cfg.d_model
    basis = orthonormal_basis(torch.randn(d_act, 2, generator=torch.Generator().manual_seed(2))).requires_grad_()
    run = InterchangeRun(model, data, hook_name, position)
    index = torch.tensor([2, 0, 3])
    got = run.logits(index, lambda base, source: interchange(base, source, basis))
    want = hooked_logits(model, data, hook_name, position, basis)[index]
    assert_close(got, want, atol=2e-5, rtol=1e-5)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
    (grad_got,) = torch.autograd.grad((got * weights).sum(), basis)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), basis)
    assert_close(grad_got, grad_want, atol=5e-5, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_das_is_seeded_and_orthonormal():
    model, data = illusion_toy(), toy_pairs(32)
    config = DASConfig(steps=5, lr=5e-2, batch_size=8, seed=3)
    a, b = train_das(model, data, TOY_HOOK, config=config), train_das(model, data, TOY_HOOK, config=config)
    assert torch.equal(a.basis, b.basis) and a.losses == b.losses
    c = train_das(model, data, TOY_HOOK, config=DASConfig(steps=5, lr=5e-2, batch_size=8, seed=4))
    assert not torch.allclose(a.basis, c.basis)
    wide = train_das(gqa_model(), random_data(gqa_model()), "blocks.1.hook_resid_pre", 2, DASConfig(d_sub=3, steps=3))
    assert_close(wide.basis.T @ wide.basis, torch.eye(3), atol=1e-5, rtol=0)


def test_das_on_the_illusion_toy_finds_a_large_effect_that_the_check_flags():
    model, data = illusion_toy(), toy_pairs(96, seed=1)
    train, test = data.split(64)
    sub = train_das(model, train, TOY_HOOK, config=DASConfig(steps=60, lr=5e-2, batch_size=32))
    assert sub.losses[-1] < 0.2 * sub.losses[0]
    scores = interchange_scores(model, sub, test)
    assert scores.iia == 1.0
    assert scores.recovered > 1.0  # beyond reversing the preference: the dormant path overshoots
    report = illusion_check(model, test.source_tokens, test.base_tokens, sub, test.metric(), TOY_HOOK)
    (row,) = report.rows
    assert row.illusory
    assert_close(torch.tensor(row.effect), torch.tensor(scores.logit_diff - scores.logit_diff_unpatched))
    assert abs(row.effect_row) < 1e-4 and abs(row.effect_kernel) < 1e-4
    assert row.variance_row < 1e-8 < row.variance_kernel  # the read part is dormant, the varying part unread
    assert report.effect_full == 0.0  # patching the whole hidden activation does nothing


def test_das_on_the_genuine_toy_is_not_flagged():
    model, data = genuine_toy(), toy_pairs(96, seed=2)
    train, test = data.split(64)
    sub = train_das(model, train, TOY_HOOK, config=DASConfig(steps=60, lr=5e-2, batch_size=32))
    assert interchange_scores(model, sub, test).iia == 1.0
    (row,) = illusion_check(model, test.source_tokens, test.base_tokens, sub, test.metric(), TOY_HOOK).rows
    assert not row.illusory
    assert row.effect_row > 0.5 * row.effect


def test_boundless_das_learns_a_subspace_and_its_width():
    model, data = illusion_toy(), toy_pairs(96, seed=3)
    train, test = data.split(64)
    config = DASConfig(steps=60, lr=5e-2, batch_size=32, boundless=True)
    sub = train_das(model, train, TOY_HOOK, config=config)
    assert 1 <= sub.d_sub < 4
    assert_close(sub.basis.T @ sub.basis, torch.eye(sub.d_sub), atol=1e-5, rtol=0)
    assert interchange_scores(model, sub, test).iia == 1.0


def test_save_and_load_keep_the_subspace(tmp_path):
    model, data = illusion_toy(), toy_pairs(16)
    sub = train_das(model, data, TOY_HOOK, config=DASConfig(steps=3, boundless=True, temperature=(5.0, 1.0)))
    loaded = LearnedSubspace.load(sub.save(tmp_path / "sub"))
    assert torch.equal(loaded.basis, sub.basis)
    assert (loaded.config, loaded.hook_name, loaded.position, loaded.losses) == (
        sub.config, sub.hook_name, sub.position, sub.losses,
    )  # fmt: skip
    assert interchange_scores(model, loaded, data) == interchange_scores(model, sub, data)


def test_errors_name_the_fix():
    model = gqa_model()
    data = random_data(model)
    with pytest.raises(InputError, match="choose among"):
        train_das(model, data, "blocks.0.attn.hook_z", 1)
    with pytest.raises(ConfigError, match="d_sub=40 exceeds"):
        train_das(model, data, "blocks.0.hook_resid_pre", 1, DASConfig(d_sub=40))
    with pytest.raises(ConfigError, match="temperature"):
        DASConfig(temperature=(1.0, 0.0))
    with pytest.raises(InputError, match="one token id per pair"):
        InterchangeData(data.base_tokens, data.source_tokens, torch.tensor([1]), data.base_labels)
    with pytest.raises(InputError, match="outside prompts"):
        InterchangeRun(model, data, "blocks.0.hook_resid_pre", 6)


def test_interchange_scores_match_the_batched_engine():
    model = gqa_model()
    data = random_data(model, n=5, seed=4)
    basis = orthonormal_basis(torch.randn(model.cfg.d_model, 2, generator=torch.Generator().manual_seed(6)))
    scores = interchange_scores(model, basis, data, "blocks.1.hook_resid_mid", 2, batch_size=2)
    ld = subspace_patch(model, data.source_tokens, data.base_tokens, basis[None], data.metric(), "resid_mid",
                        layers=[1], positions=[2], per_prompt=True).flatten()  # fmt: skip
    hits = subspace_patch(model, data.source_tokens, data.base_tokens, basis[None], Predicts(data.labels),
                          "resid_mid", layers=[1], positions=[2], per_prompt=True).flatten()  # fmt: skip
    unpatched = data.metric()(model(data.base_tokens)).mean()
    assert_close(torch.tensor(scores.logit_diff), ld.mean(), atol=1e-5, rtol=1e-5)
    assert_close(torch.tensor(scores.logit_diff_unpatched), unpatched.detach(), atol=1e-5, rtol=1e-5)
    assert scores.iia == float(hits.mean())
