"""Toy models of superposition: batched instances, known solutions, geometry measures, phase diagram."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from mechscope.errors import ConfigError, InputError, LoadError
from mechscope.toys import superposition as sp


def test_instances_are_independent_under_batched_training():
    toy = sp.ToyModel(
        6,
        3,
        n_instances=4,
        feature_probability=torch.tensor([[1.0], [0.5], [0.1], [0.03]]),
        importance=0.8 ** torch.arange(6.0),
        seed=0,
    )
    features = toy.generate_batch(64, torch.Generator().manual_seed(0))
    losses = toy.loss_per_instance(features, toy(features))
    total_grad = torch.autograd.grad(losses.sum(), toy.W, retain_graph=True)[0]
    for i in range(4):
        single = torch.autograd.grad(losses[i], toy.W, retain_graph=True)[0]
        assert_close(total_grad[i], single[i])
        assert single[torch.arange(4) != i].abs().max() == 0
    # Each instance's loss is the importance-weighted squared error of its own naive forward.
    for i in range(4):
        W, b = toy.W[i], toy.b_final[i]
        out = torch.relu(features[:, i] @ W.T @ W + b)
        expected = (toy.importance[i] * (features[:, i] - out).pow(2)).sum(-1).mean()
        assert_close(losses[i], expected)


def test_sparsity_of_generated_features():
    toy = sp.ToyModel(50, 5, n_instances=2, feature_probability=torch.tensor([[1.0], [0.1]]), seed=0)
    x = toy.generate_batch(4000, torch.Generator().manual_seed(1))
    present = (x > 0).float().mean((0, 2))
    assert_close(present, torch.tensor([1.0, 0.1]), atol=0.01, rtol=0)
    assert x.max() <= 1 and x.min() >= 0


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="n_hidden"):
        sp.ToyModel(5, 0)
    with pytest.raises(ConfigError, match="broadcast"):
        sp.ToyModel(5, 2, n_instances=3, feature_probability=torch.ones(2, 5))
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        sp.ToyModel(5, 2, feature_probability=0.0)
    with pytest.raises(InputError, match=r"\[inst, 1, 2\]"):
        sp.classify_two_feature_phase(torch.zeros(3, 2, 2))


def test_training_lowers_the_loss():
    toy = sp.ToyModel(
        5,
        2,
        n_instances=3,
        feature_probability=torch.tensor([[1.0], [0.3], [0.05]]),
        importance=0.9 ** torch.arange(5.0),
        seed=0,
    )
    history = sp.train_toy_model(toy, sp.SuperpositionTraining(steps=400, batch_size=512, lr=1e-2), progress=False)
    first, last = torch.tensor(history[0]), torch.tensor(history[-1])
    assert (last < 0.7 * first).all()


def test_two_features_one_dimension_known_solutions():
    """Dense with an unimportant second feature: W = (±1, 0), b = (0, E[x₂]) = (0, 0.5), loss 0.1/12.
    Sparse with equal importance: an antipodal pair, W = (w, -w) with |w| ≈ 1."""
    toy = sp.ToyModel(
        2,
        1,
        n_instances=2,
        feature_probability=torch.tensor([[1.0], [0.03]]),
        importance=torch.tensor([[1.0, 0.1], [1.0, 1.0]]),
        seed=0,
    )
    sp.train_toy_model(toy, sp.SuperpositionTraining(steps=1500, batch_size=1024, lr=1e-2), progress=False)
    W, b = toy.W.detach()[:, 0], toy.b_final.detach()
    assert_close(W[0].abs(), torch.tensor([1.0, 0.0]), atol=0.05, rtol=0)
    assert_close(b[0], torch.tensor([0.0, 0.5]), atol=0.05, rtol=0)
    features = toy.generate_batch(20000, torch.Generator().manual_seed(3))
    loss = toy.loss_per_instance(features, toy(features)).detach()
    assert loss[0].item() == pytest.approx(0.1 / 12, rel=0.1)
    assert W[1, 0] * W[1, 1] < 0
    assert_close(W[1].abs(), torch.ones(2), atol=0.15, rtol=0)
    assert sp.classify_two_feature_phase(toy.W.detach()) == ["not represented", "superposition"]
    assert_close(sp.feature_dimensionality(toy.W.detach())[1], torch.full((2,), 0.5), atol=0.02, rtol=0)


def test_geometry_measures_against_loops():
    torch.manual_seed(0)
    W = torch.randn(3, 4, 7)
    dims = sp.feature_dimensionality(W)
    interference = sp.feature_superposition(W)
    for inst in range(3):
        for i in range(7):
            wi = W[inst, :, i]
            unit = wi / wi.norm()
            overlaps = [(unit @ W[inst, :, j]) ** 2 for j in range(7)]
            assert dims[inst, i].item() == pytest.approx((wi.norm() ** 2 / sum(overlaps)).item(), rel=1e-5)
            assert interference[inst, i].item() == pytest.approx(
                sum(o for j, o in enumerate(overlaps) if j != i).item(), rel=1e-5
            )
    assert_close(sp.dimensions_per_feature(W), 4 / W.pow(2).sum((1, 2)))
    assert_close(sp.feature_norms(W), W.norm(dim=1))
    # Orthogonal features each get a full dimension and no interference.
    eye = torch.eye(3)[None]
    assert_close(sp.feature_dimensionality(eye), torch.ones(1, 3), atol=1e-6, rtol=0)
    assert_close(sp.feature_superposition(eye), torch.zeros(1, 3))


def test_phase_diagram_corners():
    diagram = sp.phase_diagram(
        densities=[1.0, 0.02],
        importances=[0.2, 1.0, 5.0],
        training=sp.SuperpositionTraining(steps=1000, batch_size=1024, lr=1e-2),
        progress=False,
    )
    assert diagram.phases[0][0] == "not represented"  # dense, unimportant
    assert diagram.phases[0][2] == "dedicated dimension"  # dense, more important than feature 1
    assert diagram.phases[1][1] == "superposition"  # sparse, equally important
    assert diagram.W.shape == (2, 3, 1, 2) and diagram.b.shape == (2, 3, 2)


def test_interrupted_training_resumes_exactly(tmp_path, monkeypatch):
    def toy():
        return sp.ToyModel(
            5,
            2,
            n_instances=3,
            feature_probability=torch.tensor([[1.0], [0.3], [0.05]]),
            importance=0.9 ** torch.arange(5.0),
            seed=0,
        )

    training = sp.SuperpositionTraining(steps=60, batch_size=64, lr=1e-2, save_every=20)
    straight = toy()
    straight_history = sp.train_toy_model(straight, training, progress=False)
    original, calls = sp.ToyModel.loss_per_instance, {"n": 0}

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] > 50:  # dies in step 51; the last save was after step 40
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(sp.ToyModel, "loss_per_instance", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sp.train_toy_model(toy(), training, progress=False, out_dir=tmp_path)
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 40
    monkeypatch.undo()
    resumed = toy()
    assert sp.train_toy_model(resumed, training, progress=False, out_dir=tmp_path) == straight_history
    assert torch.equal(resumed.W, straight.W) and torch.equal(resumed.b_final, straight.b_final)
    assert not list(tmp_path.glob("*.tmp"))
    other = sp.ToyModel(5, 2, n_instances=3, feature_probability=0.5, seed=0)
    with pytest.raises(LoadError, match="feature_probability="):
        sp.train_toy_model(other, training, progress=False, out_dir=tmp_path)
    with pytest.raises(LoadError, match="steps >= 60"):
        sp.train_toy_model(toy(), dataclasses.replace(training, steps=30), progress=False, out_dir=tmp_path)
