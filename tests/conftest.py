"""Shared fixtures: tiny random Hugging Face models saved to disk, and small hooked models."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms

torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (tiny models gain nothing from more; a busy machine loses)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Re-draw every parameter so that each weight visibly affects the logits.

    Norm weights get 1 + noise and biases noise, so a dropped or mis-transposed tensor shows.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or "ln_" in name:
                p.copy_((1 + 0.2 * noise) if name.endswith("weight") else 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(std * noise)
    return model


def save_hf_model(hf_config, path, seed: int = 0):
    """Build a random ``AutoModelForCausalLM`` from ``hf_config``, save it, return it (eager attention)."""
    from transformers import AutoModelForCausalLM

    hf_config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    randomize_(model, seed)
    model.save_pretrained(path)
    return model.eval()


def tiny_config(**overrides) -> ms.ModelConfig:
    base = dict(d_model=32, n_layers=3, n_heads=4, d_mlp=48, d_vocab=61, n_ctx=24)
    base.update(overrides)
    return ms.ModelConfig(**base)


def tiny_model(seed: int = 0, **overrides) -> ms.HookedTransformer:
    model = ms.HookedTransformer(tiny_config(**overrides)).init_weights(seed=seed, std=0.2)
    randomize_(model, seed, std=0.2)  # norms and biases too
    return model.eval()


@pytest.fixture(params=["gpt2_like", "llama_like_gqa"])
def small_model(request) -> ms.HookedTransformer:
    """One LayerNorm/learned-position model and one RMSNorm/rotary/gated/GQA model."""
    if request.param == "gpt2_like":
        return tiny_model(attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True)
    return tiny_model(
        seed=1,
        n_key_value_heads=2,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        act_fn="silu",
    )
