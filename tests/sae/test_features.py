"""Feature patching, ablation and AtP against a one-forward-per-patch loop and direct autograd."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError, InputError
from mechscope.patching import LogitDiff
from mechscope.sae import SAEConfig, make_sae
from mechscope.sae.features import feature_ablate, feature_attribution_patch, feature_patch
from mechscope.sae.splice import run_with_saes

from ..conftest import tiny_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def pair():
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 61, (2, 6), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, 61, (2,), generator=gen)
    return clean, corrupted


@pytest.fixture(scope="module")
def saes():
    """A residual SAE, a TopK hook_z SAE and a skip transcoder, with many live features."""
    out = []
    for seed, kw in enumerate([
        {"hook_name": "blocks.1.hook_resid_post"},
        {"hook_name": "blocks.2.attn.hook_z", "n_heads": 4, "architecture": "topk", "k": 6},
        {"hook_name": "blocks.0.ln2.hook_normalized", "hook_name_out": "blocks.0.hook_mlp_out", "d_out": 32,
         "skip_connection": True},
    ]):  # fmt: skip
        sae = make_sae(SAEConfig(d_in=32, d_sae=24, **kw), seed=seed)
        with torch.no_grad():
            sae.b_enc.fill_(0.1)
            if sae.W_skip is not None:
                sae.W_skip.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
        out.append(sae)
    return out


METRIC = LogitDiff(correct=[3, 7], wrong=[5, 9])


def _name(sae):
    return f"{sae.cfg.output_hook}.hook_sae_acts_post"


def _oracle_run(model, tokens, sae, edit):
    """One plain forward with a hand-written splice whose latents pass through ``edit``."""
    captured = {}

    def spliced(x, acts_fn):
        acts = sae.encode(x)
        skip = x if sae.W_skip is not None else None
        return sae.decode(acts_fn(acts), skip) - sae.decode(acts, skip)

    if sae.cfg.is_transcoder:
        hooks = [(sae.cfg.hook_name, lambda a, *, hook: captured.__setitem__("x", a)),
                 (sae.cfg.hook_name_out, lambda a, *, hook: a + spliced(captured["x"], edit))]  # fmt: skip
    else:

        def hook(a, *, hook):
            return a + spliced(a.flatten(2), edit).reshape(a.shape)

        hooks = [(sae.cfg.hook_name, hook)]
    with torch.no_grad():
        return METRIC(model.run_with_hooks(tokens, fwd_hooks=hooks))


def _oracle_acts(model, tokens, sae):
    _, cache = model.run_with_cache(tokens, names_filter=sae.cfg.hook_name)
    return sae.encode(cache[sae.cfg.hook_name].flatten(2)).detach()


def _oracle_sweep(model, base_tokens, source_acts, sae, features, per_pos):
    """``[pos?, n_features, n_prompts]`` by one forward per patch."""
    seq = base_tokens.shape[1]
    rows = []
    for pos in range(seq) if per_pos else [slice(None)]:
        row = []
        for f in features:

            def edit(acts, f=f, pos=pos):
                acts = acts.clone()
                acts[:, pos, f] = source_acts.expand_as(acts)[:, pos, f]
                return acts

            row.append(_oracle_run(model, base_tokens, sae, edit))
        rows.append(torch.stack(row))
    out = torch.stack(rows)
    return out if per_pos else out[0]


def test_patch_every_feature_denoising_matches_loop(model, pair, saes):
    clean, corrupted = pair
    got = feature_patch(model, saes, clean, corrupted, METRIC, batch_size=6, per_prompt=True)
    assert sorted(got) == sorted(_name(s) for s in saes)
    for sae in saes:
        expected = _oracle_sweep(model, corrupted, _oracle_acts(model, clean, sae), sae, range(24), per_pos=False)
        torch.testing.assert_close(got[_name(sae)], expected, atol=ATOL, rtol=0)
        assert (expected - METRIC(model(corrupted))).abs().max() > 1e-3  # the patches do something


def test_patch_by_position_noising_matches_loop(model, pair, saes):
    clean, corrupted = pair
    resid, z_sae, _ = saes
    dense = feature_patch(model, resid, clean, corrupted, METRIC, by=("pos", "d_sae"), direction="noising",
                          logit_positions=-1)[_name(resid)]  # fmt: skip
    expected = _oracle_sweep(model, clean, _oracle_acts(model, corrupted, resid), resid, range(24), per_pos=True)
    torch.testing.assert_close(dense, expected.mean(-1), atol=ATOL, rtol=0)
    # positions before the corrupted token are unchanged, so they report the clean metric exactly
    torch.testing.assert_close(dense[:2], METRIC(model(clean)).mean().expand(2, 24), atol=ATOL, rtol=0)
    chosen = [7, 0, 19]
    got = feature_patch(model, saes, clean, corrupted, METRIC, by=("d_sae", "pos"), direction="noising",
                        features={"blocks.2.attn.hook_z": chosen, "blocks.1.hook_resid_post": chosen,
                                  "blocks.0.hook_mlp_out": [2]}, per_prompt=True, memory_budget=2**16)  # fmt: skip
    assert got[_name(z_sae)].shape == (6, 3, 2)
    expected = _oracle_sweep(model, clean, _oracle_acts(model, corrupted, z_sae), z_sae, chosen, per_pos=True)
    torch.testing.assert_close(got[_name(z_sae)], expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(got[_name(resid)].mean(-1), dense[:, chosen], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
def test_ablation_matches_loop(model, pair, saes, kind):
    clean, corrupted = pair
    reference = torch.cat([clean, corrupted, clean.flip(0)])
    got = feature_ablate(
        model, saes, clean, METRIC, kind=kind, reference=reference, seed=3, per_prompt=True, batch_size=10
    )
    for sae in saes:
        ref_acts = _oracle_acts(model, reference, sae)
        if kind == "zero":
            source = torch.zeros_like(ref_acts[:1])
        elif kind == "mean":
            source = ref_acts.mean(0, keepdim=True)
        else:
            source = ref_acts[torch.randint(6, (2,), generator=torch.Generator().manual_seed(3))]
        expected = _oracle_sweep(model, clean, source, sae, range(24), per_pos=False)
        torch.testing.assert_close(got[_name(sae)], expected, atol=ATOL, rtol=0)


def test_attribution_matches_direct_autograd(model, pair, saes):
    clean, corrupted = pair
    per_feature = feature_attribution_patch(model, saes, clean, corrupted, METRIC)
    per_pos = feature_attribution_patch(model, saes, clean, corrupted, METRIC, by=("pos", "d_sae"))

    # Direct computation: each SAE's latents and error are explicit tensors of a hand-written splice.
    nodes, captured = {}, {}

    def splice_hook(sae):
        def run(x, a):
            acts = sae.encode(x.detach()).detach().requires_grad_(True)
            skip = x.detach() if sae.W_skip is not None else None
            error = a - sae.decode(acts, skip).detach()
            nodes[sae.cfg.output_hook] = (acts, error)
            return sae.decode(acts, skip) + error

        if sae.cfg.is_transcoder:
            return [(sae.cfg.hook_name, lambda a, *, hook: captured.__setitem__("x", a)),
                    (sae.cfg.hook_name_out, lambda a, *, hook: run(captured["x"], a))]  # fmt: skip
        return [(sae.cfg.hook_name, lambda a, *, hook: run(a.flatten(2), a.flatten(2)).reshape(a.shape))]

    hooks = [h for sae in saes for h in splice_hook(sae)]
    with torch.no_grad():
        model.run_with_hooks(clean, fwd_hooks=hooks)
    source = {k: (a.detach(), e.detach()) for k, (a, e) in nodes.items()}
    base_metric = METRIC(model.run_with_hooks(corrupted, fwd_hooks=hooks)).sum()
    tensors = [t for k in sorted(nodes) for t in nodes[k]]
    grads = dict(
        zip([(k, i) for k in sorted(nodes) for i in range(2)], torch.autograd.grad(base_metric, tensors), strict=False)
    )
    for sae in saes:
        key = sae.cfg.output_hook
        (acts, error), (src_acts, src_error) = nodes[key], source[key]
        feat = (src_acts - acts.detach()) * grads[key, 0]
        err = ((src_error - error.detach()) * grads[key, 1]).sum(-1)
        torch.testing.assert_close(per_feature[f"{key}.hook_sae_acts_post"], feat.sum(1).mean(0), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(per_pos[f"{key}.hook_sae_acts_post"], feat.mean(0), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(per_feature[f"{key}.hook_sae_error"], err.sum(1).mean(0), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(per_pos[f"{key}.hook_sae_error"], err.mean(0), atol=ATOL, rtol=1e-5)
        assert feat.abs().max() > 1e-3 and err.abs().max() > 1e-3


def _oracle_error_run(model, tokens, sae, source_error, pos):
    """One forward whose SAE output is ``recons + error`` with the error at ``pos`` taken from ``source_error``."""
    captured = {}

    def spliced(x, a):
        recons = sae.decode(sae.encode(x), x if sae.W_skip is not None else None)
        error = a - recons
        error[:, pos] = source_error.expand_as(error)[:, pos]
        return recons + error

    if sae.cfg.is_transcoder:
        hooks = [(sae.cfg.hook_name, lambda a, *, hook: captured.__setitem__("x", a)),
                 (sae.cfg.hook_name_out, lambda a, *, hook: spliced(captured["x"], a))]  # fmt: skip
    else:
        hooks = [(sae.cfg.hook_name, lambda a, *, hook: spliced(a.flatten(2), a.flatten(2)).reshape(a.shape))]
    with torch.no_grad():
        return METRIC(model.run_with_hooks(tokens, fwd_hooks=hooks))


def _oracle_error(model, tokens, sae):
    _, cache = model.run_with_cache(tokens, names_filter=list(dict.fromkeys([sae.cfg.hook_name, sae.cfg.output_hook])))
    x, a = cache[sae.cfg.hook_name].flatten(2), cache[sae.cfg.output_hook].flatten(2)
    return (a - sae.decode(sae.encode(x), x if sae.W_skip is not None else None)).detach()


def test_error_node_patching_and_ablation_match_loop(model, pair, saes):
    clean, corrupted = pair
    whole = feature_patch(model, saes, clean, corrupted, METRIC, error=True, features=[0], per_prompt=True)
    per_pos = feature_patch(model, saes, clean, corrupted, METRIC, by=("pos", "d_sae"), error=True, features=[0],
                            per_prompt=True)  # fmt: skip
    zero = feature_ablate(model, saes, clean, METRIC, kind="zero", error=True, features=[0], per_prompt=True)
    for sae in saes:
        name = f"{sae.cfg.output_hook}.hook_sae_error"
        source = _oracle_error(model, clean, sae)
        expected = _oracle_error_run(model, corrupted, sae, source, slice(None))
        torch.testing.assert_close(whole[name], expected, atol=ATOL, rtol=0)
        expected_pos = torch.stack([_oracle_error_run(model, corrupted, sae, source, p) for p in range(6)])
        torch.testing.assert_close(per_pos[name], expected_pos, atol=ATOL, rtol=0)
        assert (expected_pos - METRIC(model(corrupted))).abs().max() > 1e-3
        # zero-ablating the error is running the plain SAE
        plain = METRIC(run_with_saes(model, clean, saes=sae))
        torch.testing.assert_close(zero[name], plain, atol=ATOL, rtol=0)


def test_bad_input_names_the_fix(model, pair, saes):
    clean, corrupted = pair
    with pytest.raises(InputError, match="by must be 'd_sae'"):
        feature_patch(model, saes[0], clean, corrupted, METRIC, by="neuron")
    with pytest.raises(InputError, match=r"\[0, d_sae=24\)"):
        feature_patch(model, saes[0], clean, corrupted, METRIC, features=[24])
    with pytest.raises(InputError, match="no entry for the SAE at 'blocks.1.hook_resid_post'"):
        feature_patch(model, saes[0], clean, corrupted, METRIC, features={"blocks.0.hook_resid_post": [1]})
    with pytest.raises(InputError, match="kind must be"):
        feature_ablate(model, saes[0], clean, METRIC, kind="mode")
    embed_sae = make_sae(SAEConfig(d_in=32, d_sae=8, hook_name="hook_embed"))
    with pytest.raises(ConfigError, match="outside the blocks"):
        feature_ablate(model, embed_sae, clean, METRIC)
