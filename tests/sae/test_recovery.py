"""Every architecture recovers known sparse directions (mean max cosine >= 0.9) in seconds."""

from __future__ import annotations

import pytest
import torch

from mechscope.sae import SAEConfig, SAETrainer, TensorSource, TrainConfig, make_sae, registered_architectures

from .conftest import mean_max_cosine, sparse_codes, unit_rows

D_IN, N_TRUE, D_SAE, STEPS = 32, 48, 96, 500

CASES = {
    "standard_l1": dict(architecture="standard", sparsity_coefficient=0.5),
    "standard_sqrt": dict(architecture="standard", sparsity_coefficient=0.3, lp_norm=0.5),
    "gated": dict(architecture="gated", sparsity_coefficient=0.5),
    "topk": dict(architecture="topk", k=3),
    "batchtopk": dict(architecture="batchtopk", k=3),
    "jumprelu": dict(
        architecture="jumprelu", sparsity_coefficient=0.3, jumprelu_bandwidth=0.1, jumprelu_init_threshold=0.3
    ),
}


def test_every_registered_architecture_has_a_recovery_case():
    assert {case["architecture"] for case in CASES.values()} == set(registered_architectures())


def train(cfg: SAEConfig, tensors: dict, steps: int = STEPS, lr: float = 3e-3, **train_kwargs):
    train_cfg = TrainConfig(
        steps=steps, lr=lr, lr_decay_steps=steps // 5, dead_window=200, progress=False, **train_kwargs
    )
    trainer = SAETrainer([make_sae(cfg, seed=0)], TensorSource(tensors, batch_size=256), train_cfg)
    return trainer.train()[0], trainer


@pytest.fixture(scope="module")
def synthetic():
    gen = torch.Generator().manual_seed(0)
    directions = unit_rows(N_TRUE, D_IN, gen)
    codes = sparse_codes(8192, N_TRUE, gen)
    return codes, directions


@pytest.mark.parametrize("case", sorted(CASES))
def test_architecture_recovers_known_directions(case, synthetic):
    codes, directions = synthetic
    x = codes @ directions + 0.3  # an offset for b_dec to absorb
    sae, trainer = train(SAEConfig(d_in=D_IN, d_sae=D_SAE, hook_name="x", **CASES[case]), {"x": x})
    assert mean_max_cosine(sae.W_dec.detach(), directions) >= 0.9
    assert trainer.history[-1]["fvu"] < 0.2
    # the returned SAE works on raw (unnormalised) activations
    with torch.no_grad():
        recons = sae(x[:512])
    fvu = (recons - x[:512]).pow(2).sum() / (x[:512] - x[:512].mean(0)).pow(2).sum()
    assert float(fvu) < 0.25
    if case == "batchtopk":
        assert sae.architecture == "jumprelu"  # stored for inference as a thresholded JumpReLU
        l0 = float((sae.encode(x[:512]) > 0).sum(-1).float().mean())
        assert 1.5 < l0 < 6.0


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_recovers_output_directions(skip):
    gen = torch.Generator().manual_seed(1)
    d_out = 24
    in_dirs, out_dirs = unit_rows(N_TRUE, D_IN, gen), unit_rows(N_TRUE, d_out, gen)
    codes = sparse_codes(8192, N_TRUE, gen)
    x = codes @ in_dirs
    target = codes @ out_dirs
    if skip:
        # a dense input part that only the skip connection W_skip ~ M can carry to the output
        x = x + 0.2 * torch.randn(x.shape, generator=gen)
        skip_map = torch.randn(d_out, D_IN, generator=gen) / D_IN**0.5
        target = target + x @ skip_map.T
    cfg = SAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        d_out=d_out,
        architecture="topk",
        k=4,
        hook_name="in",
        hook_name_out="out",
        skip_connection=skip,
    )
    assert cfg.is_transcoder and not cfg.apply_b_dec_to_input
    sae, trainer = train(cfg, {"in": x, "out": target}, steps=800, lr=1e-2)
    assert sae.W_dec.shape == (D_SAE, d_out)
    assert mean_max_cosine(sae.W_dec.detach(), out_dirs) >= 0.9
    with torch.no_grad():
        pred = sae(x[:512])
    if skip:
        assert float((sae.W_skip.detach() - skip_map).norm() / skip_map.norm()) < 0.5
    fvu = (pred - target[:512]).pow(2).sum() / (target[:512] - target[:512].mean(0)).pow(2).sum()
    assert float(fvu) < 0.3


def test_hook_z_sae_recovers_directions_and_attributes_heads():
    n_heads, d_head = 4, 8
    gen = torch.Generator().manual_seed(2)
    # every true direction lives in a single head's block
    heads = torch.arange(N_TRUE) % n_heads
    directions = torch.zeros(N_TRUE, n_heads, d_head)
    directions[torch.arange(N_TRUE), heads] = unit_rows(N_TRUE, d_head, gen)
    flat_dirs = directions.reshape(N_TRUE, -1)
    codes = sparse_codes(8192, N_TRUE, gen, p=0.04)
    z = (codes @ flat_dirs).reshape(-1, n_heads, d_head)  # [batch, head, d_head] as hook_z gives
    cfg = SAEConfig(
        d_in=n_heads * d_head, d_sae=D_SAE, architecture="topk", k=3, hook_name="blocks.0.attn.hook_z", n_heads=n_heads
    )
    sae, _ = train(cfg, {"blocks.0.attn.hook_z": z})
    assert mean_max_cosine(sae.W_dec.detach(), flat_dirs) >= 0.9
    assert sae(z[:5]).shape == (5, n_heads, d_head)

    attribution = sae.head_attribution().detach()
    expected = torch.stack([sae.W_dec[:, h * d_head : (h + 1) * d_head].norm(dim=-1) for h in range(n_heads)], -1)
    torch.testing.assert_close(attribution, expected.detach())
    # the latent that matches each true direction puts almost all its decoder norm on that direction's head
    unit = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    best = (flat_dirs @ unit.T).argmax(-1)
    share = attribution[best] / attribution[best].sum(-1, keepdim=True)
    assert float(share[torch.arange(N_TRUE), heads].mean()) > 0.9
