"""Splicing against hand-written hooks, and evaluation figures against their naive definitions."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError, HookNameError
from mechscope.sae import SAEConfig, make_sae
from mechscope.sae.evaluate import evaluate_sae
from mechscope.sae.splice import run_with_cache_with_saes, run_with_saes, splice

from ..conftest import tiny_model

RESID = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 61, (6, 10), generator=torch.Generator().manual_seed(0))


def _sae(hook=RESID, seed=0, **kw):
    kw = {"d_in": 32, "d_sae": 64, **kw}
    sae = make_sae(SAEConfig(hook_name=hook, **kw), seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
        sae.W_dec.mul_(0.5)
    return sae


def _replace_with(fn):
    return lambda act, *, hook: fn(act)


def test_splice_without_error_matches_manual_hook(model, tokens):
    sae = _sae()
    expected = model.run_with_hooks(tokens, fwd_hooks=[(RESID, _replace_with(lambda a: sae.decode(sae.encode(a))))])
    torch.testing.assert_close(run_with_saes(model, tokens, saes=sae), expected)
    assert not torch.allclose(expected, model(tokens), atol=1e-3)


def test_error_term_keeps_outputs_and_upstream_gradients_exact(model, tokens):
    sae = _sae()
    clean = model(tokens)
    with splice(model, sae, use_error_term=True):
        torch.testing.assert_close(model(tokens), clean, atol=1e-5, rtol=1e-5)

    def grad_at_resid_pre(spliced: bool):
        grads = {}

        def keep(grad, *, hook):
            grads["g"] = grad

        with model.hooks(bwd_hooks=[("blocks.0.hook_resid_pre", keep)]):
            if spliced:
                with splice(model, sae, use_error_term=True):
                    loss = model(tokens, return_type="loss")
            else:
                loss = model(tokens, return_type="loss")
            loss.backward()
        return grads["g"]

    torch.testing.assert_close(grad_at_resid_pre(True), grad_at_resid_pre(False), atol=1e-6, rtol=1e-5)
    # latents still receive the gradient of the loss through the decoder
    feature_grad = {}

    def keep_grad(acts, *, hook):
        acts.retain_grad()
        feature_grad["acts"] = acts

    resid_grad = {}
    with splice(model, sae, use_error_term=True):
        sae.hook_sae_acts_post.add_hook(keep_grad)
        try:
            with model.hooks(bwd_hooks=[(RESID, lambda g, *, hook: resid_grad.setdefault("g", g))]):
                loss = model(tokens, return_type="loss")
        finally:
            sae.reset_hooks()
    loss.backward()
    acts = feature_grad["acts"]
    # d loss / d latents = (d loss / d spliced output) @ W_dec.T
    torch.testing.assert_close(acts.grad, resid_grad["g"] @ sae.W_dec.detach().T, atol=1e-7, rtol=1e-5)
    assert acts.grad.abs().sum() > 0


def test_feature_cache_and_ablation(model, tokens):
    sae = _sae()
    _, clean = model.run_with_cache(tokens, names_filter=RESID)
    out, cache = run_with_cache_with_saes(
        model, tokens, saes=sae, names_filter=lambda n: "hook_sae" in n or n == "blocks.2.hook_resid_pre"
    )
    name = f"{RESID}.hook_sae_acts_post"
    torch.testing.assert_close(cache[name], sae.encode(clean[RESID]))
    torch.testing.assert_close(cache[f"{RESID}.hook_sae_recons"], sae.decode(sae.encode(clean[RESID])))
    torch.testing.assert_close(cache["blocks.2.hook_resid_pre"], cache[f"{RESID}.hook_sae_output"])
    assert [p.name for p in sae.hook_dict.values()][0] == "hook_sae_input"  # names restored

    top = int(cache[name].sum((0, 1)).argmax())

    def ablate(acts, *, hook):
        assert hook.name == name
        acts = acts.clone()
        acts[..., top] = 0
        return acts

    def manual(a):
        acts = sae.encode(a)
        acts[..., top] = 0
        return sae.decode(acts)

    got = run_with_saes(model, tokens, saes=sae, fwd_hooks=[(name, ablate)])
    torch.testing.assert_close(got, model.run_with_hooks(tokens, fwd_hooks=[(RESID, _replace_with(manual))]))
    with pytest.raises(HookNameError, match="hook_sae_acts_post"):
        run_with_saes(model, tokens, saes=sae, fwd_hooks=[(f"{RESID}.hook_sae_acts_pots", ablate)])


def test_several_saes_transcoder_and_hook_z(model, tokens):
    resid = _sae()
    transcoder = _sae(
        "blocks.0.ln2.hook_normalized", seed=1, d_out=32, hook_name_out="blocks.0.hook_mlp_out", skip_connection=True
    )
    with torch.no_grad():
        transcoder.W_skip.normal_(0, 0.1)
    z_sae = _sae("blocks.2.attn.hook_z", seed=2, n_heads=4, architecture="topk", k=5)
    captured = {}

    def cap(a, *, hook):
        captured["in"] = a

    def tc(a, *, hook):
        x = captured["in"]
        return transcoder.decode(transcoder.encode(x), x)

    def z(a, *, hook):
        return z_sae.decode(z_sae.encode(a)).reshape(a.shape)

    expected = model.run_with_hooks(
        tokens,
        fwd_hooks=[
            ("blocks.0.ln2.hook_normalized", cap),
            ("blocks.0.hook_mlp_out", tc),
            (RESID, _replace_with(lambda a: resid.decode(resid.encode(a)))),
            ("blocks.2.attn.hook_z", z),
        ],
    )
    torch.testing.assert_close(run_with_saes(model, tokens, saes=[transcoder, resid, z_sae]), expected)
    with pytest.raises(ConfigError, match="same hook"):
        run_with_saes(model, tokens, saes=[resid, _sae(seed=3)])
    with pytest.raises(HookNameError, match="blocks.1.hook_resid_post"):
        run_with_saes(model, tokens, saes=_sae("blocks.1.hook_resid_pots"))


@torch.no_grad()
def test_evaluation_matches_naive_figures(model, tokens):
    sae = _sae()
    result = evaluate_sae(model, sae, tokens, batch_size=4, dense_threshold=0.3)
    _, cache = model.run_with_cache(tokens, names_filter=RESID)
    x = cache[RESID].reshape(-1, 32).double()
    acts = sae.encode(cache[RESID]).reshape(-1, 64).double()
    xh = sae.decode(sae.encode(cache[RESID])).reshape(-1, 32).double()
    assert result.n_tokens == 60
    assert result.l0 == pytest.approx(float((acts != 0).sum(-1).double().mean()))
    assert result.mse == pytest.approx(float((x - xh).pow(2).mean()), rel=1e-6)
    assert result.fvu == pytest.approx(float((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-6)
    assert result.cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(x, xh).mean()), rel=1e-6)
    assert result.l2_ratio == pytest.approx(float((xh.norm(dim=-1) / x.norm(dim=-1)).mean()), rel=1e-6)
    density = (acts != 0).double().mean(0)
    assert result.dead_fraction == pytest.approx(float((density == 0).double().mean()))
    assert result.dense_fraction == pytest.approx(float((density > 0.3).double().mean()))
    assert sum(result.density_histogram["counts"]) == 64

    assert result.ce_clean == pytest.approx(float(model(tokens, return_type="loss")), rel=1e-5)
    spliced = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(RESID, _replace_with(lambda a: sae(a)))])
    zero = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(RESID, _replace_with(torch.zeros_like))])
    mean = cache[RESID].mean((0, 1))
    mean_ce = model.run_with_hooks(
        tokens, return_type="loss", fwd_hooks=[(RESID, _replace_with(lambda a: mean.expand_as(a)))]
    )
    assert result.ce_spliced == pytest.approx(float(spliced), rel=1e-5)
    assert result.ce_zero_ablation == pytest.approx(float(zero), rel=1e-5)
    assert result.ce_mean_ablation == pytest.approx(float(mean_ce), rel=1e-5)
    assert result.ce_loss_recovered == pytest.approx(
        float((zero - spliced) / (zero - model(tokens, return_type="loss"))), rel=1e-4
    )
    clean_lp = model(tokens)[:, :-1].log_softmax(-1)
    spliced_lp = model.run_with_hooks(tokens, fwd_hooks=[(RESID, _replace_with(lambda a: sae(a)))])[:, :-1].log_softmax(
        -1
    )
    assert result.kl_spliced == pytest.approx(
        float((clean_lp.exp() * (clean_lp - spliced_lp)).sum(-1).mean()), rel=1e-4
    )
    assert result.kl_random_perturbation > 1e-4 and result.ce_random_perturbation != result.ce_clean
    assert result.pathology_ratio == pytest.approx(
        (result.ce_spliced - result.ce_clean) / (result.ce_random_perturbation - result.ce_clean)
    )


def test_exact_sae_has_no_error_and_no_pathology(model, tokens):
    # relu(x) - relu(-x) = x: a perfect standard SAE with d_sae = 2 d_in
    sae = make_sae(SAEConfig(d_in=32, d_sae=64, hook_name=RESID, apply_b_dec_to_input=False))
    with torch.no_grad():
        eye = torch.eye(32)
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    result = evaluate_sae(model, sae, tokens)
    assert result.fvu == pytest.approx(0, abs=1e-10) and result.cosine == pytest.approx(1)
    assert result.l0 == pytest.approx(32) and result.dead_fraction < 0.1
    assert result.ce_spliced == pytest.approx(result.ce_clean, abs=1e-5)
    assert result.ce_random_perturbation == pytest.approx(result.ce_clean, abs=1e-5)
    assert result.kl_spliced == pytest.approx(0, abs=1e-5) and result.ce_loss_recovered == pytest.approx(1, abs=1e-5)


def test_patched_latents_with_error_term_change_output_by_the_reconstruction_change(model, tokens):
    sae = _sae()
    name = f"{RESID}.hook_sae_acts_post"

    def double_feature_5(acts, *, hook):
        acts = acts.clone()
        acts[..., 5] *= 2
        return acts

    def manual(a):
        acts = sae.encode(a)
        doubled = acts.clone()
        doubled[..., 5] *= 2
        return a + sae.decode(doubled) - sae.decode(acts)

    got = run_with_saes(model, tokens, saes=sae, use_error_term=True, fwd_hooks=[(name, double_feature_5)])
    torch.testing.assert_close(
        got, model.run_with_hooks(tokens, fwd_hooks=[(RESID, _replace_with(manual))]), atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(got, model(tokens), atol=1e-3)
