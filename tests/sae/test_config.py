"""`SAEConfig`: architectures from the registry, knobs validated by their architecture's config class."""

from __future__ import annotations

import pytest

from mechscope.errors import ConfigError
from mechscope.sae import SAEConfig, make_sae, registered_architectures, sae_class
from mechscope.sae.config import config_keys

from .conftest import knobs_for


@pytest.mark.parametrize("arch", registered_architectures())
def test_every_architecture_builds_its_own_config_and_round_trips(arch):
    cfg = SAEConfig(d_in=8, d_sae=16, architecture=arch, hook_name="blocks.0.hook_resid_post", **knobs_for(arch, k=2))
    assert type(cfg) is sae_class(arch).config_class
    assert tuple(cfg.to_dict()) == config_keys(arch)
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    assert make_sae(cfg).architecture == arch


def test_a_knob_of_another_architecture_names_its_owners():
    with pytest.raises(
        ConfigError,
        match=r"'k' is not a setting of SAE architecture 'standard' \(it is one of \['batchtopk', 'topk'\]\)",
    ):
        SAEConfig(d_in=8, d_sae=16, k=4)
    with pytest.raises(ConfigError, match="unknown SAE config key 'lp_nrom'; did you mean 'lp_norm'"):
        SAEConfig.from_dict({"d_in": 8, "d_sae": 16, "lp_nrom": 0.5})


def test_knobs_are_validated_by_their_architecture():
    with pytest.raises(ConfigError, match=r"k must lie in \[1, d_sae=16\], got 17"):
        SAEConfig(d_in=8, d_sae=16, architecture="batchtopk", k=17)
    with pytest.raises(ConfigError, match="lp_norm must be positive"):
        SAEConfig(d_in=8, d_sae=16, lp_norm=0.0)
    with pytest.raises(ConfigError, match="jumprelu_init_threshold must be positive"):
        SAEConfig(d_in=8, d_sae=16, architecture="jumprelu", jumprelu_init_threshold=0.0)


def test_config_class_and_architecture_must_agree():
    topk = sae_class("topk").config_class
    with pytest.raises(
        ConfigError, match=r"TopKConfig is not the config of architecture 'standard'.*with_architecture"
    ):
        topk(d_in=8, d_sae=16, architecture="standard")
    cfg = SAEConfig(d_in=8, d_sae=16, architecture="batchtopk", k=2, hook_name="h", metadata={"a": 1})
    jump = cfg.with_architecture("jumprelu", jumprelu_init_threshold=0.2)
    assert (jump.architecture, jump.hook_name, jump.metadata, jump.jumprelu_init_threshold) == (
        "jumprelu",
        "h",
        {"a": 1},
        0.2,
    )


def test_apply_b_dec_to_input_defaults_by_width_and_refuses_an_explicit_true():
    assert SAEConfig(d_in=8, d_sae=16).apply_b_dec_to_input is True
    assert SAEConfig(d_in=8, d_sae=16, d_out=4, hook_name_out="b").apply_b_dec_to_input is False
    assert SAEConfig(d_in=8, d_sae=16, d_out=4, apply_b_dec_to_input=False).apply_b_dec_to_input is False
    with pytest.raises(
        ConfigError, match="apply_b_dec_to_input=True needs d_out == d_in.*pass apply_b_dec_to_input=False"
    ):
        SAEConfig(d_in=8, d_sae=16, d_out=4, apply_b_dec_to_input=True)
