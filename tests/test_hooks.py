"""Hook points: each fires once, edits propagate, bad hooks and names fail loudly, cleanup is guaranteed."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import mechscope as ms
from tests.conftest import tiny_model

TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5, 35], [8, 9, 7, 9, 3, 2, 38]])


def test_every_hook_fires_exactly_once(small_model):
    counts: Counter[str] = Counter()

    def count(x, *, hook):
        counts[hook.name] += 1

    default = small_model.hook_names()
    small_model.run_with_hooks(TOKENS, fwd_hooks=[(lambda name: True, count)])
    assert set(counts) == set(small_model.hook_dict)  # opt-in points run once hooked
    assert all(c == 1 for c in counts.values()), counts
    assert not any(small_model.hook_dict[n].opt_in for n in default)


def test_cache_shapes_follow_the_design(small_model):
    cfg = small_model.cfg
    b, p = TOKENS.shape
    h, kv, dh, d, m = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_model, cfg.d_mlp
    _, cache = small_model.run_with_cache(TOKENS, names_filter=lambda n: True)
    expected = {
        "hook_embed": (b, p, d),
        "blocks.1.hook_resid_pre": (b, p, d),
        # With the per-head q/k/v inputs running, ln1 normalises all of them in one call.
        "blocks.1.ln1.hook_scale": (b, p, h + 2 * kv, 1),
        "blocks.1.ln2.hook_scale": (b, p, 1),
        "blocks.1.ln2.hook_normalized": (b, p, d),
        "blocks.1.attn.hook_q": (b, p, h, dh),
        "blocks.1.attn.hook_k": (b, p, kv, dh),
        "blocks.1.attn.hook_v": (b, p, kv, dh),
        "blocks.1.attn.hook_attn_scores": (b, h, p, p),
        "blocks.1.attn.hook_pattern": (b, h, p, p),
        "blocks.1.attn.hook_z": (b, p, h, dh),
        "blocks.1.attn.hook_result": (b, p, h, d),
        "blocks.1.hook_attn_out": (b, p, d),
        "blocks.1.hook_resid_mid": (b, p, d),
        "blocks.1.mlp.hook_pre": (b, p, m),
        "blocks.1.mlp.hook_post": (b, p, m),
        "blocks.1.hook_mlp_out": (b, p, d),
        "blocks.1.hook_resid_post": (b, p, d),
        "blocks.1.hook_q_input": (b, p, h, d),
        "blocks.1.hook_k_input": (b, p, kv, d),
        "blocks.1.hook_v_input": (b, p, kv, d),
        "blocks.1.hook_attn_in": (b, p, d),
        "blocks.1.hook_mlp_in": (b, p, d),
        "ln_final.hook_scale": (b, p, 1),
        "ln_final.hook_normalized": (b, p, d),
    }
    if cfg.positional_embedding_type == "standard":
        expected["hook_pos_embed"] = (b, p, d)
    else:
        expected["blocks.1.attn.hook_rot_q"] = (b, p, h, dh)
        expected["blocks.1.attn.hook_rot_k"] = (b, p, kv, dh)
    if cfg.gated_mlp:
        expected["blocks.1.mlp.hook_pre_linear"] = (b, p, m)
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name


def test_opt_in_hooks_do_not_change_the_output(small_model):
    plain = small_model(TOKENS)
    logits, cache = small_model.run_with_cache(
        TOKENS, names_filter=lambda n: n.endswith(("_input", "hook_result", "hook_attn_in", "hook_mlp_in"))
    )
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)
    _, full = small_model.run_with_cache(TOKENS)
    b_o = small_model.blocks[2].attn.b_o
    result = cache["blocks.2.attn.hook_result"].sum(-2) + (0 if b_o is None else b_o)
    torch.testing.assert_close(result, full["blocks.2.hook_attn_out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache["blocks.0.hook_q_input"][:, :, 1], full["blocks.0.hook_resid_pre"])


def test_default_cache_skips_opt_in_points(small_model):
    _, cache = small_model.run_with_cache(TOKENS)
    assert "blocks.0.attn.hook_result" not in cache
    small_model.set_use_attn_result(True)
    try:
        _, cache = small_model.run_with_cache(TOKENS)
    finally:
        small_model.set_use_attn_result(False)
    assert "blocks.0.attn.hook_result" in cache


def test_split_qkv_input_edits_reach_only_their_head():
    model = tiny_model(n_key_value_heads=2, normalization_type="RMS", positional_embedding_type="rotary")

    def bump_head_1(x, *, hook):
        x = x.clone()
        x[:, :, 1] += 1.0
        return x

    with model.hooks(fwd_hooks=[("blocks.1.hook_q_input", lambda x, *, hook: None)]):
        _, clean = model.run_with_cache(TOKENS, names_filter="blocks.1.attn.hook_q")
    torch.testing.assert_close(clean["blocks.1.attn.hook_q"], model.run_with_cache(TOKENS)[1]["blocks.1.attn.hook_q"])
    with model.hooks(fwd_hooks=[("blocks.1.hook_q_input", bump_head_1)]):
        _, edited = model.run_with_cache(TOKENS, names_filter="blocks.1.attn.hook_q")
    diff = (edited["blocks.1.attn.hook_q"] - clean["blocks.1.attn.hook_q"]).abs().amax(dim=(0, 1, 3))
    assert diff[1] > 1e-3
    assert torch.all(diff[[0, 2, 3]] == 0)


def test_replacing_an_activation_changes_downstream(small_model):
    def zero(x, *, hook):
        return torch.zeros_like(x)

    logits = small_model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.hook_attn_out", zero)])
    _, cache = small_model.run_with_cache(TOKENS)
    with small_model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", zero)]):
        _, ablated = small_model.run_with_cache(TOKENS, names_filter=["blocks.0.hook_resid_mid"])
    torch.testing.assert_close(ablated["blocks.0.hook_resid_mid"], cache["blocks.0.hook_resid_pre"])
    assert not torch.allclose(logits, small_model(TOKENS))


def test_wrong_replacement_shape_names_hook_and_shapes(small_model):
    with pytest.raises(ms.HookError, match=r"blocks\.1\.attn\.hook_z.*\(2, 7\).*\(2, 7, 4, 8\)"):
        small_model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.attn.hook_z", lambda z, *, hook: z[..., 0, 0])])
    with pytest.raises(ms.HookError, match="dtype"):
        small_model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, *, hook: x.double())])


def test_unknown_hook_name_suggests_closest(small_model):
    with pytest.raises(ms.HookNameError, match=r"blocks\.1\.attn\.hook_z"):
        small_model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.attn.hook_zz", lambda x, *, hook: x)])
    with pytest.raises(ms.HookNameError, match=r"blocks\.0\.hook_resid_pre"):
        small_model.run_with_cache(TOKENS, names_filter=["blocks.0.resid_pre"])
    with pytest.raises(ms.HookNameError, match="matched no hook point"):
        small_model.run_with_hooks(TOKENS, fwd_hooks=[(lambda n: n.endswith("nothing"), lambda x, *, hook: x)])


def test_hooks_are_removed_when_the_body_raises(small_model):
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with small_model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, *, hook: x * 0)]):
            raise Boom
    with pytest.raises(ms.HookError):
        small_model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, *, hook: x[0])])
    assert not any(p.has_hooks() for p in small_model.hook_dict.values())


def test_persistent_hooks_survive_reset_unless_asked(small_model):
    calls = []
    small_model.add_hook("blocks.0.hook_resid_post", lambda x, *, hook: calls.append(1), is_permanent=True)
    small_model.reset_hooks()
    small_model(TOKENS)
    assert calls == [1]
    small_model.reset_hooks(including_permanent=True)
    small_model(TOKENS)
    assert calls == [1]


def test_transformer_lens_hook_point_api(small_model):
    point = small_model.hook_dict["blocks.1.hook_resid_pre"]
    order = []
    point.add_hook(lambda x, *, hook: order.append("first"))
    point.add_hook(lambda x, *, hook: order.append("prepended"), prepend=True)
    point.add_perma_hook(lambda x, *, hook: order.append("permanent"))
    assert [h.user_hook for h in point.fwd_hooks][0] is point.fwd_hooks[0].user_hook and not point.bwd_hooks
    small_model(TOKENS)
    assert order == ["prepended", "first", "permanent"] and point.layer() == 1
    assert point.has_hooks() and point.has_hooks(including_permanent=False) and not point.has_hooks("bwd")
    point.remove_hooks()  # TransformerLens' default: the temporary forward hooks
    assert len(point.fwd_hooks) == 1 and point.fwd_hooks[0].is_permanent
    point.fwd_hooks[0].hook.remove()
    assert not point.has_hooks()
    with pytest.raises(ms.HookNameError, match="no name"):
        ms.hooks.HookPoint().layer()


def test_context_levels_and_reset_hooks_end(small_model):
    outer = small_model.hook_dict["blocks.0.hook_resid_post"]
    with small_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, *, hook: None)]):
        assert outer.fwd_hooks[0].context_level == 1
        with small_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, *, hook: None)]):
            assert [h.context_level for h in outer.fwd_hooks] == [1, 2]
        assert [h.context_level for h in outer.fwd_hooks] == [1]
    assert not outer.has_hooks() and small_model.context_level == 0
    small_model.run_with_hooks(
        TOKENS, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, *, hook: None)], reset_hooks_end=False
    )
    assert outer.has_hooks()
    outer.ctx["seen"] = 1
    small_model.reset_hooks()  # clears contexts by default
    assert not outer.has_hooks() and outer.ctx == {}


def test_backward_hooks_may_return_a_one_tuple(small_model):
    name = "blocks.1.hook_resid_pre"
    resid = small_model(TOKENS, stop_at_layer=1).detach().requires_grad_(True)
    small_model(resid, start_at_layer=1, return_type="loss", tokens=TOKENS).backward()
    plain = resid.grad.clone()
    resid.grad = None
    with small_model.hooks(bwd_hooks=[(name, lambda g, *, hook: (2 * g,))]):
        small_model(resid, start_at_layer=1, return_type="loss", tokens=TOKENS).backward()
    torch.testing.assert_close(resid.grad, 2 * plain)
    small_model.zero_grad()


def test_run_with_cache_pos_slice_and_batch(small_model):
    _, full = small_model.run_with_cache(TOKENS)
    _, last = small_model.run_with_cache(TOKENS, pos_slice=-1)
    for name in (
        "blocks.0.attn.hook_z",
        "blocks.0.hook_resid_pre",
        "blocks.0.attn.hook_pattern",
        "ln_final.hook_scale",
    ):
        dim = -3 if name.endswith("hook_z") else -2
        torch.testing.assert_close(last[name], full[name].narrow(dim, full[name].shape[dim] - 1, 1))
    _, single = small_model.run_with_cache(TOKENS[:1], remove_batch_dim=True)
    assert not single.has_batch_dim
    torch.testing.assert_close(single["blocks.1.hook_mlp_out"], full["blocks.1.hook_mlp_out"][0])
    _, plain = small_model.run_with_cache(TOKENS, names_filter="hook_embed", return_cache_object=False)
    assert type(plain) is dict and list(plain) == ["hook_embed"]


def test_custom_hooked_root_module():
    class Tiny(ms.hooks.HookedRootModule):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 3)
            self.hook_in, self.hook_out = ms.hooks.HookPoint(), ms.hooks.HookPoint()
            self.setup()

        def forward(self, x):
            return self.hook_out(self.linear(self.hook_in(x)))

    tiny = Tiny()
    assert list(tiny.hook_dict) == ["hook_in", "hook_out"] and tiny.mod_dict["linear"] is tiny.linear
    x = torch.randn(2, 3)
    out, cache = tiny.run_with_cache(x)
    torch.testing.assert_close(cache["hook_out"], out.detach())
    zeroed = tiny.run_with_hooks(x, fwd_hooks=[("hook_in", lambda t, *, hook: torch.zeros_like(t))])
    torch.testing.assert_close(zeroed, tiny.linear.bias.expand(2, 3))
    assert not tiny.hook_dict["hook_in"].has_hooks()


def test_backward_hooks_and_gradient_cache(small_model):
    small_model.zero_grad()
    loss, cache = small_model.run_with_cache(
        TOKENS,
        return_type="loss",
        incl_bwd=True,
        names_filter=["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.attn.hook_z"],
    )
    grad_pre = cache["blocks.1.hook_resid_pre_grad"]
    torch.testing.assert_close(grad_pre, cache["blocks.0.hook_resid_post_grad"])

    # Compare with autograd on a leaf residual stream fed in at layer 1.
    resid = small_model(TOKENS, stop_at_layer=1).detach().requires_grad_(True)
    small_model(resid, start_at_layer=1, return_type="loss", tokens=TOKENS).backward()
    torch.testing.assert_close(grad_pre, resid.grad, atol=1e-6, rtol=1e-5)

    seen = []
    small_model.run_with_hooks(
        TOKENS, return_type="loss", bwd_hooks=[("blocks.1.attn.hook_z", lambda g, *, hook: seen.append(g.shape))]
    ).backward()
    assert seen == [cache["blocks.1.attn.hook_z"].shape]
    small_model.zero_grad()


def test_incl_bwd_needs_a_scalar(small_model):
    with pytest.raises(ms.InputError, match="scalar"):
        small_model.run_with_cache(TOKENS, incl_bwd=True)


def test_cached_run_gives_exactly_the_plain_logits(small_model):
    plain = small_model(TOKENS)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            logits, _ = small_model.run_with_cache(TOKENS, names_filter=lambda n: True)
        assert torch.equal(logits, plain)
    loss = small_model(TOKENS, return_type="loss")
    cached_loss, _ = small_model.run_with_cache(TOKENS, return_type="loss", incl_bwd=True)
    assert torch.equal(cached_loss, loss)
    with torch.inference_mode():  # no in-place edit counts: the explicit path, same function
        logits, _ = small_model.run_with_cache(TOKENS)
    torch.testing.assert_close(logits, plain)


@pytest.mark.parametrize(
    "name",
    [
        "blocks.1.attn.hook_pattern",
        "blocks.1.ln2.hook_scale",
        "blocks.1.ln2.hook_normalized",
        "blocks.1.attn.hook_result",
    ],
)
def test_in_place_edits_of_read_points_take_effect(small_model, name):
    def halve_in_place(x, *, hook):
        x.mul_(0.5)

    def halve(x, *, hook):
        return x * 0.5

    with torch.no_grad():
        in_place = small_model.run_with_hooks(TOKENS, fwd_hooks=[(name, halve_in_place)])
        returned = small_model.run_with_hooks(TOKENS, fwd_hooks=[(name, halve)])
    assert torch.equal(in_place, returned)
    assert not torch.allclose(in_place, small_model(TOKENS))


@pytest.mark.parametrize(
    "name",
    [
        "blocks.1.attn.hook_pattern",
        "blocks.1.attn.hook_attn_scores",
        "blocks.1.ln1.hook_scale",
        "blocks.1.ln2.hook_normalized",
    ],
)
def test_gradients_reach_activations_that_hooks_only_read(small_model, name):
    def grad_of_saved(replace: bool):
        saved = {}

        def save(x, *, hook):
            saved["x"] = x.clone() if replace else x  # a replacement forces the explicit path
            return saved["x"] if replace else None

        logits = small_model.run_with_hooks(TOKENS, fwd_hooks=[(name, save)])
        return torch.autograd.grad(logits[:, -1].logsumexp(-1).sum(), saved["x"])[0]

    read_only, explicit = grad_of_saved(False), grad_of_saved(True)
    assert explicit.abs().max() > 0
    torch.testing.assert_close(read_only, explicit)


def test_hook_normalized_comes_before_the_norm_weights(small_model):
    """As in TransformerLens: ``hook_normalized`` is ``x / scale`` (``x`` centred for LayerNorm),
    the norm's output (the opt-in ``hook_out``) is ``hook_normalized * w + b``, and an edit of
    ``hook_normalized`` goes through the weights."""
    ln = small_model.blocks[1].ln2
    bias = 0 if getattr(ln, "b", None) is None else ln.b
    names = ["blocks.1.hook_resid_mid", "blocks.1.ln2.hook_scale", "blocks.1.ln2.hook_normalized"]
    _, cache = small_model.run_with_cache(TOKENS, names_filter=[*names, "blocks.1.ln2.hook_out"])
    x = cache["blocks.1.hook_resid_mid"]
    x = x - x.mean(-1, keepdim=True) if small_model.cfg.normalization_type == "LN" else x
    normalized = cache["blocks.1.ln2.hook_normalized"]
    torch.testing.assert_close(normalized, x / cache["blocks.1.ln2.hook_scale"])
    torch.testing.assert_close(cache["blocks.1.ln2.hook_out"], normalized * ln.w + bias)
    _, alone = small_model.run_with_cache(TOKENS, names_filter="blocks.1.ln2.hook_normalized")
    torch.testing.assert_close(alone["blocks.1.ln2.hook_normalized"], normalized)

    seen = {}

    def double(x, *, hook):
        return 2 * x

    def record(x, *, hook):
        seen[hook.name] = x

    hooks = [("blocks.1.ln2.hook_normalized", double), ("blocks.1.ln2.hook_out", record)]
    small_model.run_with_hooks(TOKENS, fwd_hooks=hooks)
    torch.testing.assert_close(seen["blocks.1.ln2.hook_out"], 2 * normalized * ln.w + bias)


def test_cached_gradients_match_the_explicit_path(small_model):
    names = ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_attn_scores", "blocks.1.ln2.hook_scale"]
    _, fast = small_model.run_with_cache(TOKENS, return_type="loss", incl_bwd=True, names_filter=names)
    small_model.cfg.attn_implementation = "eager"
    try:
        _, explicit = small_model.run_with_cache(TOKENS, return_type="loss", incl_bwd=True, names_filter=names)
    finally:
        small_model.cfg.attn_implementation = "auto"
    for name in names:
        assert fast[name + "_grad"].abs().max() > 0
        torch.testing.assert_close(fast[name + "_grad"], explicit[name + "_grad"])
