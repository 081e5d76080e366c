"""Trainer pieces against their definitions, exact resume from an atomic checkpoint, resume refusing
changed settings (naming them), and throughput counting only the resumed segment."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from mechscope.errors import ConfigError, LoadError
from mechscope.sae import (
    SAEConfig,
    SAETrainer,
    TensorSource,
    TrainConfig,
    geometric_median,
    make_sae,
    registered_architectures,
)

from .conftest import knobs_for, sparse_codes, unit_rows


def _data(n=1024, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return sparse_codes(n, 24, gen, p=0.1) @ unit_rows(24, d, gen) + 0.5


@pytest.mark.parametrize("arch", registered_architectures())
def test_fold_activation_scale_matches_scaled_input(arch):
    gen = torch.Generator().manual_seed(0)
    cfg = SAEConfig(d_in=8, d_sae=16, architecture=arch, **knobs_for(arch, k=4, jumprelu_init_threshold=0.05))
    sae = make_sae(cfg, seed=1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    x = torch.randn(32, 8, generator=gen)
    with torch.no_grad():
        expected_acts = sae.encode(x * 3.0)
        expected = sae(x * 3.0) / 3.0
        sae.fold_activation_scale(3.0, 3.0)
        torch.testing.assert_close(sae.encode(x), expected_acts, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), expected, atol=1e-5, rtol=1e-5)


def test_fold_activation_scale_transcoder_with_skip():
    cfg = SAEConfig(d_in=8, d_sae=16, d_out=6, hook_name="a", hook_name_out="b", skip_connection=True)
    sae = make_sae(cfg, seed=0)
    with torch.no_grad():
        sae.W_skip.copy_(torch.randn(6, 8))
        sae.b_enc.copy_(torch.randn(16) * 0.1)
        x = torch.randn(10, 8)
        expected = sae(x * 2.0) / 5.0
        sae.fold_activation_scale(2.0, 5.0)
        torch.testing.assert_close(sae(x), expected, atol=1e-5, rtol=1e-5)


def test_jumprelu_threshold_gradient_is_the_straight_through_estimate():
    cfg = SAEConfig(d_in=4, d_sae=3, architecture="jumprelu", jumprelu_bandwidth=0.5, sparsity_coefficient=0.7)
    sae = make_sae(cfg, seed=0)
    pre = torch.tensor([[0.30, -0.2, 1.0], [0.55, 0.2, 0.05], [0.2, 0.4, 0.9]])
    threshold = torch.tensor([0.5, 0.3, 0.1])
    with torch.no_grad():
        sae.log_threshold.copy_(threshold.log())
    pre_param = pre.clone().requires_grad_(True)
    from mechscope.sae.architectures.jumprelu import _JumpReLU, _Step

    acts = _JumpReLU.apply(pre_param, sae.threshold, 0.5)
    torch.testing.assert_close(acts.detach(), pre * (pre > threshold))
    upstream = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    grad_pre, grad_threshold = torch.autograd.grad(acts, (pre_param, sae.log_threshold), upstream)
    in_window = ((pre - threshold).abs() < 0.25).float()
    torch.testing.assert_close(grad_pre, (pre > threshold).float() * upstream)
    expected_dtheta = (-(threshold / 0.5) * in_window * upstream).sum(0)
    torch.testing.assert_close(grad_threshold, expected_dtheta * threshold)  # chain rule through exp
    step = _Step.apply(pre_param, sae.threshold, 0.5)
    (grad_threshold,) = torch.autograd.grad(step.sum(), (sae.log_threshold,))
    torch.testing.assert_close(grad_threshold, (-(1 / 0.5) * in_window).sum(0) * threshold)


def test_gradient_projection_keeps_unit_norm_rows():
    sae = make_sae(SAEConfig(d_in=8, d_sae=16), seed=0)
    sae.training_loss(torch.randn(20, 8)).loss.backward()
    grad_before = sae.W_dec.grad.clone()
    sae.remove_gradient_parallel_to_decoder_directions()
    unit = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    torch.testing.assert_close((sae.W_dec.grad * unit).sum(-1), torch.zeros(16), atol=1e-6, rtol=0)
    parallel = (grad_before * unit).sum(-1, keepdim=True) * unit
    torch.testing.assert_close(sae.W_dec.grad + parallel, grad_before)


def test_geometric_median_minimises_sum_of_distances():
    points = torch.randn(200, 5, generator=torch.Generator().manual_seed(0)) ** 3
    median = geometric_median(points)

    def cost(c):
        return float((points - c).norm(dim=-1).sum())

    for direction in torch.eye(5):
        for eps in (1e-2, -1e-2):
            assert cost(median) <= cost(median + eps * direction)
    assert cost(median) < cost(points.mean(0))


def test_lr_and_coefficient_schedules():
    cfg = TrainConfig(
        steps=100, lr=1.0, lr_warmup_steps=10, lr_decay_steps=20, lr_end_fraction=0.1, coefficient_warmup_steps=5
    )
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(50) == pytest.approx(1.0)
    assert cfg.lr_at(80) == pytest.approx(1 - 0.9 / 20) and cfg.lr_at(99) == pytest.approx(0.1)
    assert [cfg.coefficient_scale_at(s) for s in (0, 4, 50)] == pytest.approx([0.2, 1.0, 1.0])
    with pytest.raises(ConfigError, match="exceeds steps"):
        TrainConfig(steps=10, lr_warmup_steps=8, lr_decay_steps=8)
    with pytest.raises(ConfigError, match="did you mean 'lr_warmup_steps'"):
        TrainConfig.from_dict({"lr_warmup_step": 3})


def test_unknown_architecture_names_nearest():
    with pytest.raises(ConfigError, match="did you mean 'topk'"):
        SAEConfig(d_in=4, d_sae=8, architecture="topK")


def test_aux_k_loss_only_with_dead_latents():
    sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2), seed=0)
    x = torch.randn(10, 8)
    assert float(sae.training_loss(x, dead_mask=torch.zeros(16, dtype=torch.bool)).losses["aux_k"]) == 0
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:6] = True
    out = sae.training_loss(x, dead_mask=dead)
    assert float(out.losses["aux_k"].detach()) > 0
    out.losses["aux_k"].backward()
    # only dead latents receive decoder gradient from the aux-K loss
    assert sae.W_dec.grad[6:].abs().max() == 0 and sae.W_dec.grad[:6].abs().max() > 0


def test_resampling_revives_dead_latents():
    x = _data()
    cfg = SAEConfig(d_in=16, d_sae=32, hook_name="x", sparsity_coefficient=0.5)
    sae = make_sae(cfg, seed=0)
    with torch.no_grad():
        sae.b_enc[:10] = -100.0  # latents 0-9 can never fire
    trainer = SAETrainer(
        [sae],
        TensorSource({"x": x}, 128),
        TrainConfig(steps=30, dead_window=10, resample_steps=(20,), progress=False, log_every=10),
    )
    trainer.train()
    assert trainer.history[0]["dead"] >= 10 / 32  # dead before resampling at step 20
    assert (sae.b_enc[:10] > -1).all()
    assert int((trainer.states[0].steps_since_fired[:10] < 10).sum()) > 0


@pytest.mark.parametrize("arch", registered_architectures())
def test_checkpoint_resume_is_exact(arch, tmp_path):
    x = _data()
    cfg = SAEConfig(
        d_in=16, d_sae=32, hook_name="x", architecture=arch, **knobs_for(arch, k=3, jumprelu_init_threshold=0.1)
    )

    def trainer(steps, checkpoint_dir=None, every=0):
        train_cfg = TrainConfig(
            steps=steps,
            lr=3e-3,
            lr_warmup_steps=5,
            lr_decay_steps=10,
            coefficient_warmup_steps=8,
            dead_window=5,
            resample_steps=(12,),
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=every,
            progress=False,
            log_every=5,
        )
        return SAETrainer([make_sae(cfg, seed=0)], TensorSource({"x": x}, 64, seed=3), train_cfg)

    straight = trainer(30)
    [expected] = straight.train()
    first = trainer(30, tmp_path, every=15)
    first.train(stop_after=17)  # interrupted after the checkpoint at step 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    resumed = trainer(30, tmp_path, every=15)
    [got] = resumed.train()
    assert resumed.step == 30
    for (name, a), b in zip(expected.state_dict().items(), got.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    assert resumed.history == straight.history


def test_checkpoint_for_another_sae_is_refused(tmp_path):
    x = _data()
    src = TensorSource({"x": x}, 64)
    SAETrainer(
        [make_sae(SAEConfig(d_in=16, d_sae=32, hook_name="x"))],
        src,
        TrainConfig(steps=2, checkpoint_dir=str(tmp_path), checkpoint_every=2, progress=False),
    ).train()
    other = SAETrainer(
        [make_sae(SAEConfig(d_in=16, d_sae=64, hook_name="x"))],
        src,
        TrainConfig(steps=4, checkpoint_dir=str(tmp_path), progress=False),
    )
    with pytest.raises(LoadError, match="config differs"):
        other.train()


def test_several_saes_train_from_one_source():
    x = _data()
    y = x @ torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    saes = [
        make_sae(SAEConfig(d_in=16, d_sae=32, hook_name="x", architecture="topk", k=3)),
        make_sae(SAEConfig(d_in=12, d_sae=24, hook_name="y", architecture="topk", k=3)),
    ]
    trainer = SAETrainer(
        saes, TensorSource({"x": x, "y": y}, 64), TrainConfig(steps=40, lr=3e-3, progress=False, log_every=40)
    )
    trained = trainer.train()
    assert [s.cfg.d_in for s in trained] == [16, 12]
    assert trainer.history[-1]["0/fvu"] < 0.5 and trainer.history[-1]["1/fvu"] < 0.5
    with pytest.raises(ConfigError, match="no activations for 'z'"):
        SAETrainer(
            [make_sae(SAEConfig(d_in=16, d_sae=8, hook_name="z"))],
            TensorSource({"x": x}, 64),
            TrainConfig(steps=1, progress=False),
        ).train()


# ---------------------------------------------------------------------- resume guard and throughput
def small_trainer(tmp_path, **overrides) -> SAETrainer:
    settings = dict(steps=6, lr=1e-3, checkpoint_dir=str(tmp_path), checkpoint_every=2, progress=False)
    settings.update(overrides)
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2, hook_name="x"), seed=0)
    return SAETrainer([sae], TensorSource({"x": x}, batch_size=32), TrainConfig(**settings))


@pytest.mark.parametrize(
    "change, named",
    [
        ({"lr": 1.0}, "lr=0.001 -> 1.0"),
        ({"lr_warmup_steps": 2}, "lr_warmup_steps=0 -> 2"),
        ({"b_dec_init": "zeros"}, "b_dec_init='geometric_median' -> 'zeros'"),
        ({"dead_window": 10}, "dead_window=1000 -> 10"),
        ({"adam_betas": (0.8, 0.9)}, "adam_betas=(0.9, 0.999) -> (0.8, 0.9)"),
        ({"resample_steps": (3,)}, "resample_steps=() -> (3,)"),
    ],
)
def test_resume_refuses_changed_settings(tmp_path, change, named):
    small_trainer(tmp_path).train(stop_after=4)
    with pytest.raises(LoadError, match="trained with other settings") as info:
        small_trainer(tmp_path, **change).train()
    assert named in str(info.value)
    assert str(tmp_path / "checkpoint.pt") in str(info.value)


def test_resume_accepts_bookkeeping_changes_and_more_steps(tmp_path):
    first = small_trainer(tmp_path)
    first.train(stop_after=4)
    resumed = small_trainer(tmp_path, steps=8, log_every=1, checkpoint_every=4)
    resumed.train()
    assert resumed.step == 8
    # with an LR decay the schedule depends on steps, so more steps is a different run
    decaying = tmp_path / "decay"
    small_trainer(decaying, lr_decay_steps=2).train(stop_after=2)
    with pytest.raises(LoadError, match="steps=6 -> 8"):
        small_trainer(decaying, lr_decay_steps=2, steps=8).train()


def test_conflicts_list_every_changed_field():
    saved = asdict(TrainConfig(steps=10))
    assert TrainConfig(steps=10, lr=1e-3, seed=1, progress=False).resume_conflicts(saved) == [
        "lr=0.0002 -> 0.001",
        "seed=0 -> 1",
    ]
    assert TrainConfig(steps=10).resume_conflicts(saved) == []


def test_throughput_counts_only_the_resumed_segment(tmp_path):
    first = small_trainer(tmp_path)
    first.train(stop_after=4)
    assert first.segment_rows == 4 * 32 and first.segment_seconds > 0
    resumed = small_trainer(tmp_path)
    resumed.train()
    assert resumed.step == 6
    assert resumed.segment_rows == 2 * 32  # the checkpoint's 4 batches are not this segment's


def test_an_unreadable_checkpoint_names_its_path(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(LoadError, match=r"cannot read checkpoint .*checkpoint\.pt") as info:
        small_trainer(tmp_path).train()
    assert "weights_only" not in str(info.value)
