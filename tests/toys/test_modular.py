"""Modular addition: data, the fast training forward, resumable training, and an end-to-end grokking run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from mechscope.errors import ConfigError, InputError, LoadError
from mechscope.model.transformer import HookedTransformer
from mechscope.toys import fourier, modular


def test_data_covers_every_pair_once_with_correct_labels():
    p = 7
    data = modular.modular_addition_data(p, frac_train=0.3, seed=1)
    a, b, eq = data.tokens.unbind(-1)
    assert (eq == p).all()
    assert_close(data.labels, (a + b) % p)
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(i, j) for i in range(p) for j in range(p)]
    both = torch.cat([data.train_idx, data.test_idx]).sort().values
    assert torch.equal(both, torch.arange(p * p)) and len(data.train_idx) == int(0.3 * p * p)


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="frac_train"):
        modular.GrokkingConfig(frac_train=1.5)
    with pytest.raises(ConfigError, match="n_epochs"):
        modular.GrokkingConfig(n_epochs=0)
    cfg = modular.GrokkingConfig()
    assert (cfg.p, cfg.frac_train, cfg.lr, cfg.weight_decay, cfg.d_model, cfg.n_heads, cfg.d_mlp) == (
        113,
        0.3,
        1e-3,
        1.0,
        128,
        4,
        512,
    )
    mcfg = cfg.model_config()
    assert mcfg.normalization_type is None and mcfg.act_fn == "relu" and mcfg.n_layers == 1 and mcfg.d_vocab == 114


@pytest.mark.parametrize("overrides", [{}, {"n_layers": 2}, {"normalization_type": "LN", "n_layers": 2}])
def test_final_logits_equal_the_full_forward(overrides):
    cfg = dataclasses.replace(modular.GrokkingConfig(p=13, d_model=32, d_mlp=64).model_config(), **overrides)
    model = HookedTransformer(cfg).init_weights(seed=0, std=0.2)
    tokens = modular.modular_addition_data(13).tokens
    assert_close(modular.final_logits(model, tokens), model(tokens)[:, -1], atol=1e-5, rtol=1e-5)
    # Gradients agree too (the training step uses this path).
    grads = []
    for fn in (lambda: modular.final_logits(model, tokens), lambda: model(tokens)[:, -1]):
        model.zero_grad()
        fn()[:, :13].logsumexp(-1).sum().backward()
        grads.append(model.blocks[0].attn.w_q.grad.clone())
    assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def _small(**kw) -> modular.GrokkingConfig:
    return modular.GrokkingConfig(
        p=11, d_model=16, d_mlp=32, n_heads=2, n_epochs=30, log_every=5, checkpoint_every=10, save_every=10, **kw
    )


def test_resume_continues_exactly(tmp_path):
    straight = modular.train_grokking(_small(), progress=False)
    modular.train_grokking(dataclasses.replace(_small(), n_epochs=20), tmp_path, progress=False)
    assert (tmp_path / "state.pt").exists() and len(list((tmp_path / "checkpoints").iterdir())) == 3
    resumed = modular.train_grokking(_small(), tmp_path, progress=False)
    assert [h["epoch"] for h in resumed.history] == [h["epoch"] for h in straight.history]
    for name, tensor in straight.model.state_dict().items():
        assert_close(resumed.model.state_dict()[name], tensor, atol=1e-6, rtol=1e-6)
    assert sorted(resumed.checkpoints) == [0, 10, 20, 30]
    loaded = modular.load_grokking_run(tmp_path)
    assert loaded.epoch == 30 and sorted(loaded.checkpoints) == [0, 10, 20, 30]
    assert_close(loaded.model.blocks[0].mlp.w_in, straight.model.blocks[0].mlp.w_in, atol=1e-6, rtol=1e-6)
    with pytest.raises(LoadError, match="lr"):
        modular.train_grokking(_small(lr=5e-3), tmp_path, progress=False)
    assert not list(tmp_path.glob("**/*.tmp"))


def test_load_without_state_explains(tmp_path):
    with pytest.raises(LoadError, match="state.pt"):
        modular.load_grokking_run(tmp_path)


def test_quick_run_groks_and_the_analysis_finds_its_frequencies(tmp_path):
    """End to end (about 10-30 s): memorise first, generalise much later, sparse in Fourier space."""
    run = modular.train_grokking(modular.GrokkingConfig.quick(), tmp_path, progress=False)
    assert run.epoch == run.grokking_epoch() + 100  # stop_after_grokking
    again = modular.train_grokking(modular.GrokkingConfig.quick(), tmp_path, progress=False)
    assert again.epoch == run.epoch and again.history == run.history  # a finished run is not extended
    memorised = next(h["epoch"] for h in run.history if h["train_acc"] == 1.0)
    grokked = run.grokking_epoch()
    assert grokked is not None, run.history[-1]
    test_acc_when_memorised = next(h["test_acc"] for h in run.history if h["epoch"] == memorised)
    assert test_acc_when_memorised < 0.6
    assert grokked >= 3 * memorised
    analysis = modular.analyse_model(run.model, run.data, run.config.p)
    key = analysis["key_freqs_neurons"]
    assert analysis["key_frequency_rule"] == "gap"
    assert 1 <= len(key) <= 8
    assert key == analysis["key_freqs_embed"]  # the gap rule finds the same set in the neurons and the embedding
    assert analysis["frac_explained_by_key"] > 0.7
    assert modular.key_frequencies(run.model, run.data) == key
    measures = modular.progress_measures(run, key)
    assert modular.progress_measures(run, epochs=[run.epoch]) == measures[-1:]  # default: the gap rule's set
    final, at_memorised = measures[-1], min(measures, key=lambda m: abs(m["epoch"] - memorised))
    assert final["test_acc"] >= 0.99
    # The key frequencies alone carry the final model; removing them breaks it on the training set.
    assert final["restricted_loss"] < 0.5
    assert final["excluded_loss"] > 10 * final["train_loss"]
    assert final["embed_key_share"] > at_memorised["embed_key_share"]
    assert final["sum_sq_weights"] < max(m["sum_sq_weights"] for m in measures)


def test_analysis_rules_and_their_errors():
    run = modular.train_grokking(dataclasses.replace(_small(), n_epochs=10), progress=False)
    acts = modular.neuron_activations(run.model, run.data)
    threshold = modular.analyse_model(run.model, run.data, 11, rule="threshold")
    assert threshold["key_frequency_rule"] == "threshold"
    assert threshold["key_freqs_neurons"] == fourier.key_frequencies_from_neurons(acts, rule="threshold")
    assert threshold["key_freqs_embed"] == fourier.key_frequencies_from_embedding(run.model.W_E[:11], rule="threshold")
    assert_close(torch.tensor(threshold["neurons_per_frequency"]), fourier.neurons_per_frequency(acts))
    assert modular.key_frequencies(run.model, run.data, rule="threshold", min_fraction=0.3) == (
        fourier.key_frequencies_from_neurons(acts, rule="threshold", min_fraction=0.3)
    )
    with pytest.raises(ConfigError, match="unknown key-frequency rule 'treshold'.*did you mean 'threshold'"):
        modular.analyse_model(run.model, run.data, 11, rule="treshold")
    with pytest.raises(ConfigError, match="both key_freqs=\\[1\\] and rule='gap'"):
        modular.progress_measures(run, [1], rule="gap")
    with pytest.raises(ConfigError, match="min_fraction is an option of rule='threshold'"):
        modular.key_frequencies(run.model, run.data, min_fraction=0.3)


def test_missing_checkpoint_names_the_nearest():
    run = modular.train_grokking(dataclasses.replace(_small(), n_epochs=10), progress=False)
    with pytest.raises(InputError, match="nearest is epoch 10"):
        run.model_at(12)
