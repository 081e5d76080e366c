"""A new SAE architecture is one class: defined and registered here alone, it trains with the
existing trainer, saves and loads in the SAELens layout, and splices into a model.

The architecture: ReLU latents each multiplied by a learned positive scale,
``f = exp(log_scale) * relu((x - b_dec) @ W_enc + b_enc)``, with one knob of its own
(``scale_init``) and a SAELens form that stores ``scale = exp(log_scale)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from mechscope.errors import ConfigError
from mechscope.sae import (
    SAE,
    SAE_REGISTRY,
    ActivationStore,
    SAEConfig,
    SAETrainer,
    TrainConfig,
    load_sae,
    make_sae,
    register_sae,
    registered_architectures,
    run_with_cache_with_saes,
    save_sae,
    splice,
)  # fmt: skip

from ..conftest import tiny_model

HOOK = "blocks.1.hook_resid_post"


@dataclass
class ScaledReLUConfig(SAEConfig):
    """`SAEConfig` of a scaled-ReLU SAE."""

    sparsity_coefficient: float = 1.0
    """Weight of the penalty ``sum_i f_i * ||W_dec[i]||``."""
    scale_init: float = 1.0
    """Initial scale of every latent."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale_init <= 0:
            raise ConfigError(f"scale_init must be positive, got {self.scale_init}")


class ScaledReLUSAE(SAE):
    """``f = exp(log_scale) * relu(pre)``; L1 penalty weighted by decoder norms."""

    config_class = ScaledReLUConfig

    def __init__(self, cfg: ScaledReLUConfig) -> None:
        super().__init__(cfg)
        self.log_scale = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.dtype))

    def init_weights(self, seed: int | None = 0) -> ScaledReLUSAE:
        super().init_weights(seed)
        with torch.no_grad():
            self.log_scale.fill_(math.log(self.cfg.scale_init))
        return self

    def encode_pre_and_acts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = self.hook_sae_acts_pre(self.encoder_pre(x))
        return pre, self.hook_sae_acts_post(torch.relu(pre) * self.log_scale.exp())

    def sparsity_losses(self, x, target, pre, acts, recons, coefficient_scale, dead_mask) -> dict[str, Tensor]:
        coef = self.cfg.sparsity_coefficient * coefficient_scale
        return {"sparsity": coef * (acts @ self.decoder_norms()).mean()}

    def to_saelens(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        _, weights = super().to_saelens()
        weights["scale"] = weights.pop("log_scale").exp()
        return {"scale_init": self.cfg.scale_init}, weights

    @classmethod
    def from_saelens(
        cls, saelens_cfg: dict[str, Any], weights: dict[str, Tensor]
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        weights = dict(weights)
        weights["log_scale"] = weights.pop("scale").log()
        return {"scale_init": saelens_cfg.get("scale_init", 1.0)}, weights


@pytest.fixture(scope="module", autouse=True)
def scaled_relu():
    """Register the architecture for this module's tests only (other modules iterate the registry)."""
    register_sae("scaled_relu")(ScaledReLUSAE)
    yield ScaledReLUSAE
    del SAE_REGISTRY["scaled_relu"]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def trained(model):
    tokens = torch.randint(0, 61, (2000,), generator=torch.Generator().manual_seed(0))
    store = ActivationStore(model, HOOK, tokens, context_size=10, batch_size=64, buffer_batches=4, seed=1)
    cfg = SAEConfig(
        architecture="scaled_relu", d_in=32, d_sae=64, hook_name=HOOK, sparsity_coefficient=0.01, scale_init=0.5
    )
    sae = make_sae(cfg, seed=0)
    trainer = SAETrainer([sae], store, TrainConfig(steps=20, lr=3e-3, log_every=5, progress=False))
    [trained] = trainer.train()
    return trained, trainer


def test_registered_from_this_module_with_its_own_knob(scaled_relu):
    assert "scaled_relu" in registered_architectures()
    cfg = SAEConfig(architecture="scaled_relu", d_in=8, d_sae=16, scale_init=2.0)
    assert type(cfg) is ScaledReLUConfig and cfg.scale_init == 2.0
    with pytest.raises(ConfigError, match="scale_init must be positive, got 0.0"):
        SAEConfig(architecture="scaled_relu", d_in=8, d_sae=16, scale_init=0.0)
    with pytest.raises(
        ConfigError,
        match=r"'scale_init' is not a setting of SAE architecture 'standard' \(it is one of \['scaled_relu'\]\)",
    ):
        SAEConfig(architecture="standard", d_in=8, d_sae=16, scale_init=2.0)
    with pytest.raises(ConfigError, match="did you mean 'scaled_relu'"):
        SAEConfig(architecture="scaled_reul", d_in=8, d_sae=16)


def test_trains_with_the_existing_trainer(trained):
    sae, trainer = trained
    assert isinstance(sae, ScaledReLUSAE) and trainer.step == 20
    first, last = trainer.history[0], trainer.history[-1]
    assert last["fvu"] < first["fvu"] and math.isfinite(last["loss"])
    # the learned scales moved away from their initial value
    assert (sae.log_scale.detach() - math.log(0.5)).abs().max() > 1e-3


def test_saves_and_loads_in_the_saelens_layout(trained, tmp_path):
    sae, _ = trained
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["scale_init"], cfg["metadata"]["hook_name"]) == ("scaled_relu", 0.5, HOOK)
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert sorted(weights) == ["W_dec", "W_enc", "b_dec", "b_enc", "scale"]
    torch.testing.assert_close(weights["scale"], sae.log_scale.detach().exp(), rtol=0, atol=0)

    loaded = load_sae(tmp_path)
    assert isinstance(loaded, ScaledReLUSAE) and loaded.cfg == sae.cfg
    for name, param in sae.named_parameters():
        exact = 0 if name != "log_scale" else 1e-6  # log(exp(.)) rounds
        torch.testing.assert_close(dict(loaded.named_parameters())[name], param, rtol=exact, atol=exact, msg=name)

    # the SAELens keys and weights alone (no mechscope config) give the same SAE
    del cfg["metadata"]["mechscope_config"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    alone = load_sae(tmp_path)
    assert isinstance(alone, ScaledReLUSAE) and alone.cfg.scale_init == 0.5 and alone.cfg.hook_name == HOOK
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(alone(x), sae(x), rtol=1e-5, atol=1e-6)


def test_splices_into_a_model(trained, model, tmp_path):
    sae, _ = trained
    loaded = load_sae(save_sae(sae, tmp_path))
    tokens = torch.randint(0, 61, (3, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        clean = model(tokens)
        with splice(model, loaded, use_error_term=True):
            exact = model(tokens)
        with splice(model, loaded):
            replaced = model(tokens)
        expected = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, *, hook: loaded(act))])
        _, cache = run_with_cache_with_saes(model, tokens, saes=loaded, names_filter=f"{HOOK}.hook_sae_acts_post")
    torch.testing.assert_close(exact, clean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(replaced, expected)
    assert not torch.allclose(replaced, clean, atol=1e-3)
    acts = cache[f"{HOOK}.hook_sae_acts_post"]
    _, plain = model.run_with_cache(tokens, names_filter=HOOK)
    torch.testing.assert_close(acts, loaded.encode(plain[HOOK]))
    assert acts.shape == (3, 10, 64) and bool((acts >= 0).all())
