"""Induction toy: data, head scores and composition against loops, and a short training run."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from mechscope.analysis import heads, weights
from mechscope.errors import ConfigError, InputError, LoadError
from mechscope.model.transformer import HookedTransformer
from mechscope.toys import induction


def test_repeated_spans_are_copies_and_the_mask_marks_predictable_targets():
    cfg = induction.InductionConfig(d_vocab=1000, seq_len=20, min_span=3, max_span=6)
    tokens, mask = induction.repeated_span_batch(cfg, 200, torch.Generator().manual_seed(0))
    for row, m in zip(tokens.tolist(), mask.tolist(), strict=True):
        positions = [t for t, v in enumerate(m) if v]
        assert 2 <= len(positions) <= 5 and positions == list(range(positions[0], positions[-1] + 1))
        span = len(positions) + 1
        second = positions[0]
        copy = row[second : second + span]
        # The span occurs earlier, entirely before the second copy.
        assert any(row[s : s + span] == copy for s in range(second - span + 1))
    with pytest.raises(ConfigError, match="min_span"):
        induction.InductionConfig(seq_len=10, min_span=6)
    with pytest.raises(ConfigError, match="seq_len <= 17"):
        induction.InductionConfig(d_vocab=8, seq_len=20)


def _model(seed=0):
    cfg = induction.InductionConfig(d_vocab=30, seq_len=16, d_model=32, n_heads=4).model_config()
    return HookedTransformer(cfg).init_weights(seed=seed, std=0.3)


def test_scoring_tokens_are_distinct_halves_repeated():
    tokens = induction.repeated_tokens(20, 10, 50, seed=3)
    assert torch.equal(tokens[:, :10], tokens[:, 10:])
    assert all(len(set(row)) == 10 for row in tokens[:, :10].tolist())
    with pytest.raises(InputError, match="d_vocab=8"):
        induction.repeated_tokens(8, 9, 2)


def test_head_scores_against_loops_and_the_detectors():
    model = _model()
    tokens = induction.repeated_tokens(30, 8, 3, seed=1)
    scores = induction.head_scores(model, tokens)
    _, cache = model.run_with_cache(tokens)
    for layer in range(2):
        pattern = cache["pattern", layer]
        for head in range(4):
            for b in range(3):
                prev = torch.stack([pattern[b, head, q, q - 1] for q in range(1, 16)]).mean()
                ind = torch.stack([pattern[b, head, q, q - 8 + 1] for q in range(8, 16)]).mean()
                assert_close(scores["previous_token"][b, layer, head], prev)
                assert_close(scores["induction"][b, layer, head], ind)
    # The mean over sequences is the analysis detectors' score on the whole batch.
    assert_close(scores["previous_token"].mean(0), heads.previous_token_scores(model, tokens))
    assert_close(scores["induction"].mean(0), heads.induction_scores(model, tokens))
    with pytest.raises(InputError, match="repeated"):
        induction.head_scores(model, torch.randint(30, (2, 16)))


def test_k_composition_ablation_against_a_naive_key_patch():
    """Mean-ablating layer-0 head i in layer-1 keys equals recomputing layer-1 attention by hand."""
    model = _model(seed=2)
    tokens = induction.repeated_tokens(30, 8, 6, seed=2)
    drops = induction.k_composition_ablation(model, tokens)
    _, cache = model.run_with_cache(tokens)
    attn0, attn1 = model.blocks[0].attn, model.blocks[1].attn
    resid = cache["resid_pre", 1]  # [batch, pos, d_model]
    target = heads.induction_target(tokens)
    base = heads.induction_scores(model, tokens)[1]
    for i in range(4):
        out = cache["z", 0][:, :, i] @ attn0.W_O[i]  # [batch, pos, d_model]
        keys_in = resid - (out - out.mean(0))
        for j in range(4):
            q = resid @ attn1.W_Q[j] + (attn1.b_q.view(4, 8)[j] if attn1.b_q is not None else 0)
            k = keys_in @ attn1.W_K[j] + (attn1.b_k.view(4, 8)[j] if attn1.b_k is not None else 0)
            scores = q @ k.transpose(-1, -2) / 8**0.5
            scores = scores.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
            pattern = scores.softmax(-1)
            score = heads.score_patterns(pattern[None, :, None], target)[0, 0]
            assert_close(drops[i, j], base[j] - score, atol=1e-5, rtol=1e-4)


def test_k_composition_detects_a_constructed_circuit():
    """A layer-1 head whose keys read exactly what a layer-0 head writes composes most with it."""
    model = _model(seed=4)
    with torch.no_grad():
        d = 32
        basis = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))[0]
        write = basis[:, :8]  # the subspace layer-0 head 2 writes to
        attn0, attn1 = model.blocks[0].attn, model.blocks[1].attn
        attn0.w_o.view(d, 4, 8)[:, 2] = write * 3
        attn1.w_k.view(4, 8, d)[1] = write.T * 3  # layer-1 head 1 keys read that subspace only
    scores = weights.composition_scores(model, "K")[0, :, 1]
    assert divmod(int(scores.argmax()), 4) == (2, 1)


def test_training_learns_induction_above_chance():
    cfg = induction.InductionConfig(d_vocab=32, seq_len=24, d_model=32, lr=1e-2, steps=800, batch_size=64)
    run = induction.train_induction(cfg, progress=False)
    summary = induction.induction_summary(run)
    chance = math.log(32)
    assert summary["chance_loss"] == pytest.approx(chance)
    assert summary["first_half_loss"] > 0.9 * chance  # random tokens stay unpredictable
    assert summary["second_half_loss"] < 0.5 * chance  # repeated tokens are copied
    prev = torch.tensor(summary["previous_token_scores"])
    ind = torch.tensor(summary["induction_scores"])
    layer0_head, layer1_head = summary["previous_token_head"][1], summary["induction_head"][1]
    assert prev[0, layer0_head] > 0.3 and prev[0, layer0_head] > 2 * prev[1].max()
    assert ind[1, layer1_head] > 0.5 and ind[1, layer1_head] > 2 * ind[0].max()
    assert summary["highest_k_composition_is_previous_token_to_induction"]
    assert summary["each_induction_head_composes_most_with_a_previous_token_head"]
    assert summary["each_induction_head_depends_most_on_a_previous_token_head"]
    assert layer0_head in summary["previous_token_heads"] and layer1_head in summary["top_induction_heads"]
    assert summary["induction_formed"]
    assert summary["verdict"].startswith(f"induction heads {summary['induction_heads']}")


def test_a_run_at_chance_reports_no_induction_head():
    cfg = induction.InductionConfig(steps=300)  # the default task, stopped long before induction forms
    summary = induction.induction_summary(induction.train_induction(cfg, progress=False), n_sequences=64)
    assert summary["second_half_loss"] > 0.8 * summary["chance_loss"]
    assert max(summary["induction_scores"][1]) < induction.HEAD_SCORE_THRESHOLD
    assert not summary["induction_formed"]
    assert summary["induction_heads"] == [] and summary["top_induction_heads"] == []
    assert summary["each_induction_head_composes_most_with_a_previous_token_head"] is None
    assert summary["verdict"].startswith("no induction head formed (best score 0.")


def _interrupt_after(monkeypatch, module, name, calls):
    """Make ``module.name`` raise KeyboardInterrupt on its call number ``calls + 1``."""
    original = getattr(module, name)
    count = {"n": 0}

    def interrupted(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)


def test_interrupted_training_resumes_exactly(tmp_path, monkeypatch):
    cfg = induction.InductionConfig(d_vocab=16, seq_len=12, d_model=16, steps=30, save_every=10)
    straight = induction.train_induction(cfg, progress=False)
    _interrupt_after(monkeypatch, induction, "_masked_losses", 25)  # dies in step 26; last save at step 20
    with pytest.raises(KeyboardInterrupt):
        induction.train_induction(cfg, tmp_path, progress=False)
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 20
    assert not list(tmp_path.glob("*.tmp"))
    monkeypatch.undo()
    resumed = induction.train_induction(cfg, tmp_path, progress=False)
    assert resumed.history == straight.history
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    again = induction.train_induction(cfg, tmp_path, progress=False)  # finished: loads, trains nothing
    assert torch.equal(again.model.blocks[1].attn.w_q, straight.model.blocks[1].attn.w_q)
    with pytest.raises(LoadError, match=r"lr=0\.003"):
        induction.train_induction(dataclasses.replace(cfg, lr=1e-2), tmp_path, progress=False)
    with pytest.raises(LoadError, match="steps >= 30"):
        induction.train_induction(dataclasses.replace(cfg, steps=20), tmp_path, progress=False)


def test_top_heads_ties_within_two_standard_errors():
    generator = torch.Generator().manual_seed(0)
    per_sequence = torch.tensor([0.8, 0.8, 0.5, 0.1]) + torch.randn(400, 4, generator=generator) * 0.05
    per_sequence[:, 1] = per_sequence[:, 0].flip(0)  # the same scores on other sequences: the same mean
    best, tied, strong = induction._top_heads(per_sequence)
    assert best in (0, 1) and tied == [0, 1] and strong == [0, 1, 2]
    per_sequence[:, 1] -= 0.02  # now clearly below head 0 (paired standard error about 0.0035)
    assert induction._top_heads(per_sequence)[:2] == (0, [0])
