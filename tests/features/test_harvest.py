"""Harvesting against naive full-activation references, resuming after an interruption, source
attribution of hook_z SAE features, logit effects."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError
from mechscope.features import (
    DirectionSource,
    HarvestConfig,
    NeuronSource,
    harvest,
    logit_effects,
    nearest_features,
    token_rows,
)
from mechscope.sae import SAEConfig, make_sae
from tests.features.conftest import topk_sae

CFG = HarvestConfig(context_size=16, batch_size=3, top_k=5, pool=12, left=4, right=2, hist_bins=64)


def full_acts(model, sae, rows):
    """Every activation of every feature, [n_rows, pos, d_sae], from one cached forward per row batch."""
    _, cache = model.run_with_cache(rows, names_filter=sae.cfg.hook_name)
    return sae.encode(cache[sae.cfg.hook_name]).float()


def test_statistics_and_topk_match_the_full_activations(text_model, corpus_tokens):
    sae = topk_sae()
    result = harvest(text_model, sae, corpus_tokens, CFG, progress=False)
    rows = token_rows(text_model, corpus_tokens, CFG)
    assert bool((rows[:, 0] == text_model.tokenizer.bos_token_id).all())
    acts = full_acts(text_model, sae, rows)[:, 1:]  # BOS excluded
    flat = acts.reshape(-1, sae.cfg.d_sae)
    index = (torch.arange(rows.shape[0])[:, None] * 16 + torch.arange(1, 16)).reshape(-1)
    sk = result.sketches[sae.cfg.hook_name]
    assert int(sk.n_tokens) == flat.shape[0] == result.n_tokens
    torch.testing.assert_close(sk.fire, (flat > 0).sum(0))
    torch.testing.assert_close(sk.max, flat.max(0).values)
    torch.testing.assert_close(sk.sum_all, flat.double().sum(0), rtol=1e-6, atol=1e-6)
    checked = 0
    for f in range(sae.cfg.d_sae):
        col = flat[:, f]
        order = torch.argsort(col, descending=True, stable=True)[:5]
        expected = [(float(col[i]), int(index[i])) for i in order if col[i] > 0]
        got = [(float(v), int(i)) for v, i in zip(sk.top_val[:, f], sk.top_idx[:, f], strict=True) if v > -float("inf")]
        assert got == expected, f"feature {f}"
        for j, (_, gid) in enumerate(got):  # the context window: tokens and this feature's activations
            row, pos = divmod(gid, 16)
            for w in range(CFG.width):
                p = pos - CFG.left + w
                inside = 0 <= p < 16
                assert int(sk.top_tok[j, f, w]) == (int(rows[row, p]) if inside else -1)
                if 1 <= p < 16:
                    assert float(sk.top_act[j, f, w]) == pytest.approx(float(acts[row, p - 1, f]), abs=1e-6)
            checked += 1
        # histogram counts are exact on their own edges
        top = 2.0 ** int(sk.hist_exp[f])
        firing = col[col > 0].double()
        if len(firing):
            bins = (firing / top * 64).long().clamp(max=63)
            assert sk.hist[f].tolist() == torch.bincount(bins, minlength=64).tolist()
            assert float(firing.max()) <= top < 2 * float(firing.max()) + 1e-12
        # the pool is a sample of firing tokens, with their true activations
        for v, i in zip(sk.pool_val[:, f], sk.pool_idx[:, f], strict=True):
            if v > -float("inf"):
                row, pos = divmod(int(i), 16)
                assert float(v) == pytest.approx(float(acts[row, pos - 1, f]), abs=1e-6) and v > 0
        assert int((sk.pool_val[:, f] > -float("inf")).sum()) == min(12, len(firing))
    assert checked > 50


def test_one_forward_serves_every_source(text_model, corpus_tokens):
    calls = []
    handle = text_model.add_hook("hook_embed", lambda act, *, hook: calls.append(act.shape[0]))
    try:
        sources = [topk_sae(), topk_sae(hook="blocks.1.hook_resid_pre", seed=2), NeuronSource(text_model, 1),
                   DirectionSource("blocks.0.hook_resid_post", torch.randn(3, 32), name="probes")]  # fmt: skip
        result = harvest(text_model, sources, corpus_tokens, CFG, progress=False)
    finally:
        for h in handle:
            h.remove()
    n_rows = token_rows(text_model, corpus_tokens, CFG).shape[0]
    assert sum(calls) == n_rows and len(calls) == -(-n_rows // CFG.batch_size)
    assert sorted(result.sketches) == sorted(["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre",
                                              "blocks.1.mlp.hook_post", "probes"])  # fmt: skip


def test_interrupted_harvest_resumes_with_no_token_lost_or_counted_twice(text_model, corpus_tokens, tmp_path):
    sources = [topk_sae(), NeuronSource(text_model, 0)]
    cfg = HarvestConfig(**{**vars(CFG), "checkpoint_every": 2})
    reference = harvest(text_model, sources, corpus_tokens, cfg, progress=False)
    ckpt = tmp_path / "harvest.ckpt"
    seen = []

    def interrupt(rows_done):
        seen.append(rows_done)
        if len(seen) == 5:  # after batch 5; the last checkpoint holds batch 4, batch 5 is redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harvest(text_model, sources, corpus_tokens, cfg, checkpoint=ckpt, progress=False, on_batch=interrupt)
    assert ckpt.is_file()
    resumed_at = []
    result = harvest(text_model, sources, corpus_tokens, cfg, checkpoint=ckpt, progress=False,
                     on_batch=resumed_at.append)  # fmt: skip
    assert resumed_at[0] == 5 * cfg.batch_size  # batch 5 again, then the rest
    assert result.rows_done == reference.rows_done
    for name, sk in reference.sketches.items():
        for key, value in sk.state_dict().items():
            assert torch.equal(result.sketches[name].state_dict()[key], value), (name, key)
    with pytest.raises(ConfigError, match="another harvest"):
        harvest(text_model, sources[:1], corpus_tokens, cfg, checkpoint=ckpt, progress=False)


def test_hook_z_source_attribution_sums_to_the_pre_activation(text_model, corpus_tokens):
    sae = make_sae(SAEConfig(d_in=32, d_sae=24, hook_name="blocks.1.attn.hook_z", n_heads=4), seed=3)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    cfg = HarvestConfig(context_size=16, batch_size=4, top_k=3, pool=4, left=15, right=0, hist_bins=64)
    result = harvest(text_model, sae, corpus_tokens, cfg, progress=False)
    sk = result.sketches["blocks.1.attn.hook_z"]
    bias = sae.b_enc - sae.b_dec @ sae.W_enc
    valid = sk.top_val > -float("inf")
    assert int(valid.sum()) > 20
    # the window covers the whole row before the token: attributions + bias = the pre-activation (ReLU: the act)
    torch.testing.assert_close((sk.top_dfa.sum(-1) + bias)[valid], sk.top_val[valid], atol=1e-4, rtol=1e-4)
    shares = result.sources["blocks.1.attn.hook_z"].head_shares()
    torch.testing.assert_close(shares.sum(-1), torch.ones(24))


def test_logit_effects_and_neighbours_match_the_naive_formula(text_model):
    dirs = torch.randn(5, 32)
    up, up_ids, down, down_ids = logit_effects(text_model, dirs, k=4)
    ln = text_model.ln_final
    naive = ((dirs - dirs.mean(-1, keepdim=True)) * ln.w) @ text_model.W_U
    torch.testing.assert_close(up, naive.topk(4, -1).values)
    torch.testing.assert_close(down_ids, naive.topk(4, -1, largest=False).indices)
    cos, ids = nearest_features(dirs, k=2)
    unit = dirs / dirs.norm(dim=-1, keepdim=True)
    sims = unit @ unit.T - 3 * torch.eye(5)
    torch.testing.assert_close(cos, sims.topk(2, -1).values)
