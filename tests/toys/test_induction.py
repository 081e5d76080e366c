"""Induction toy: data, head scores and composition against loops, and a short training run."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mechscope.errors import ConfigError, InputError, LoadError
from mechscope.model.transformer import HookedTransformer
from mechscope.toys import induction


def test_repeated_spans_are_copies_and_the_mask_marks_predictable_targets():
    cfg = induction.InductionConfig(d_vocab=1000, seq_len=20, min_span=3, max_span=6)
    tokens, mask = induction.repeated_span_batch(cfg, 200, torch.Generator().manual_seed(0))
    for row, m in zip(tokens.tolist(), mask.tolist()):
        positions = [t for t, v in enumerate(m) if v]
        assert 2 <= len(positions) <= 5 and positions == list(range(positions[0], positions[-1] + 1))
        span = len(positions) + 1
        second = positions[0]
        copy = row[second : second + span]
        # The span occurs earlier, entirely before the second copy.
        assert any(row[s : s + span] == copy for s in range(second - span + 1))
    with pytest.raises(ConfigError, match="min_span"):
        induction.InductionConfig(seq_len=10, min_span=6)


def _model(seed=0):
    cfg = induction.InductionConfig(d_vocab=30, seq_len=16, d_model=32, n_heads=4).model_config()
    return HookedTransformer(cfg).init_weights(seed=seed, std=0.3)


def test_attention_scores_against_loops():
    model = _model()
    tokens = induction.repeated_tokens(30, 8, 3, seed=1)
    scores = induction.attention_scores(model, tokens)
    _, cache = model.run_with_cache(tokens)
    for layer in range(2):
        pattern = cache["pattern", layer]
        for head in range(4):
            prev = [pattern[b, head, q, q - 1] for b in range(3) for q in range(1, 16)]
            ind = [pattern[b, head, q, q - 8 + 1] for b in range(3) for q in range(8, 16)]
            assert scores["previous_token"][layer, head].item() == pytest.approx(torch.stack(prev).mean().item(),
                                                                               rel=1e-5)
            assert scores["induction"][layer, head].item() == pytest.approx(torch.stack(ind).mean().item(), rel=1e-5)
    with pytest.raises(InputError, match="repeated"):
        induction.attention_scores(model, torch.randint(30, (2, 16)))


def test_composition_scores_against_the_definition():
    model = _model(seed=3)
    attn0, attn1 = model.blocks[0].attn, model.blocks[1].attn
    for mode in ("Q", "K", "V"):
        scores = induction.composition_scores(model, mode)
        for i in range(4):
            ov0 = attn0.W_V[i] @ attn0.W_O[i]
            for j in range(4):
                qk1 = attn1.W_Q[j] @ attn1.W_K[j].T
                right = {"Q": qk1, "K": qk1.T, "V": attn1.W_V[j] @ attn1.W_O[j]}[mode]
                expected = (ov0 @ right).norm() / (ov0.norm() * right.norm())
                assert scores[i, j].item() == pytest.approx(expected.item(), rel=1e-4)
    with pytest.raises(InputError, match="'Q', 'K' or 'V'"):
        induction.composition_scores(model, "X")


def test_k_composition_detects_a_constructed_circuit():
    """A layer-1 head whose keys read exactly what a layer-0 head writes composes most with it."""
    model = _model(seed=4)
    with torch.no_grad():
        d = 32
        basis = torch.linalg.qr(torch.randn(d, d))[0]
        write = basis[:, :8]  # the subspace layer-0 head 2 writes to
        attn0, attn1 = model.blocks[0].attn, model.blocks[1].attn
        attn0.w_o.view(d, 4, 8)[:, 2] = write * 3
        attn1.w_k.view(4, 8, d)[1] = write.T * 3  # layer-1 head 1 keys read that subspace only
    scores = induction.composition_scores(model, "K")
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
