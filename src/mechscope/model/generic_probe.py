"""How `GenericModel` finds and verifies its hook points in a Hugging Face model's module tree.

`find_layout` locates the block list, each block's attention and MLP children, the final norm and
the head; `probe` runs one forward on random ids and keeps the block-level hook points whose
values add up (see `mechscope.model.generic`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mechscope.errors import InputError

_ATTN_NAMES = ("self_attn", "self_attention", "attn", "attention")
_MLP_NAMES = ("mlp", "ffn", "feed_forward")


@dataclass(frozen=True)
class NormForm:
    """The final norm as ``weight * centre(x) / scale(x) + bias`` (``centre`` only for LayerNorm),
    with ``scale(x) = sqrt(mean(centre(x)**2) + eps)``: linear once the scale is fixed."""

    centre: bool
    weight: Tensor
    bias: Tensor | None
    eps: float

    def scale(self, x: Tensor) -> Tensor:
        """``[..., 1]``: the norm's divisor for the residual stream ``x``."""
        x = x.float()
        if self.centre:
            x = x - x.mean(-1, keepdim=True)
        return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def __call__(self, x: Tensor) -> Tensor:
        centred = x.float() - x.float().mean(-1, keepdim=True) if self.centre else x.float()
        out = self.weight.float() * centred / self.scale(x)
        return (out if self.bias is None else out + self.bias.float()).to(x.dtype)


def norm_form(norm: nn.Module, probe: Tensor) -> NormForm | None:
    """The `NormForm` of ``norm`` (LayerNorm or RMSNorm, weight ``w`` or ``1 + w``), checked on
    ``probe``; ``None`` when no form reproduces the module's output."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        return None
    bias = getattr(norm, "bias", None)
    bias = bias if isinstance(bias, Tensor) else None
    eps = next((getattr(norm, a) for a in ("eps", "variance_epsilon", "epsilon") if hasattr(norm, a)), None)
    if not isinstance(eps, float):
        return None
    with torch.no_grad():
        expected = norm(probe)
        for centre in (True, False):
            for w in (weight, 1 + weight):
                form = NormForm(centre, w.detach(), None if bias is None else bias.detach(), eps)
                if torch.allclose(form(probe).float(), expected.float(), rtol=10 * tolerance(probe.dtype), atol=1e-5):
                    return form
    return None


@dataclass
class Layout:
    embed: nn.Module
    blocks: nn.ModuleList
    attn: list[nn.Module | None]
    mlp: list[nn.Module | None]
    final_norm: nn.Module | None
    head: nn.Module


def child_module(block: nn.Module, candidates: tuple[str, ...]) -> nn.Module | None:
    return next((getattr(block, n) for n in candidates if isinstance(getattr(block, n, None), nn.Module)), None)


def norm_children(module: nn.Module) -> list[nn.Module]:
    return [m for n, m in module.named_children() if "norm" in type(m).__name__.lower() or "ln" in n.split("_")]


def find_layout(hf_model: nn.Module, n_layers: int) -> Layout:
    """The modules hooks attach to, found from ``hf_model``'s module tree."""
    lists = [m for m in hf_model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not lists:
        raise InputError(f"found no list of {n_layers} blocks in {type(hf_model).__name__}; it needs a family adapter")
    blocks = lists[0]
    base = next(m for m in hf_model.modules() if any(c is blocks for c in m.children()))
    children = list(base.children())
    after = children[children.index(blocks) + 1 :]
    final = next((m for m in after if m in norm_children(base)), None)
    return Layout(
        embed=hf_model.get_input_embeddings(),
        blocks=blocks,
        attn=[child_module(b, _ATTN_NAMES) for b in blocks],
        mlp=[child_module(b, _MLP_NAMES) for b in blocks],
        final_norm=final,
        head=hf_model.get_output_embeddings(),
    )


def first_tensor(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


def with_first_tensor(out: Any, x: Tensor) -> Any:
    return x if isinstance(out, Tensor) else (x, *out[1:])


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the probe's checks: 1e-5, or a few rounding steps of a coarser ``dtype``."""
    return max(1e-5, 8 * torch.finfo(dtype).eps)


def sums_match(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` equals ``b`` up to rounding (the sums of one decomposition in another order)."""
    tol = tolerance(b.dtype)
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * float(b.abs().max()))


@dataclass
class GenericConfig:
    """The block-level facts mechscope reads from a wrapped model (its Hugging Face config and the probe)."""

    model_name: str
    """The checkpoint's name or path."""
    model_type: str
    """The Hugging Face ``model_type``."""
    n_layers: int
    """Blocks in the block list."""
    d_model: int
    """Width of the residual stream."""
    d_vocab: int
    """Rows of the output head."""
    n_ctx: int
    """``max_position_embeddings`` (or ``n_positions``): informational, no limit is enforced."""
    n_heads: int
    """Attention heads (used by memory estimates only)."""
    d_mlp: int
    """MLP width (``intermediate_size``, else ``4 * d_model``; memory estimates only)."""
    default_prepend_bos: bool = False
    """Whether tokenising strings prepends BOS (the tokenizer's own behaviour)."""
    parallel_attn_mlp: bool = False
    """Set by the probe: attention and MLP read the same residual stream."""
    attn_only: bool = False
    """Always ``False``: a block's MLP is part of its output even when it cannot be hooked apart."""
    normalization_type: str | None = None
    """Set by the probe: ``"LN"`` or ``"RMS"`` (TransformerLens' values) when the final norm has one of those forms."""
    positional_embedding_type: str = "hf"
    """``"hf"``: positions are the wrapped model's business (no ``n_ctx`` check)."""
    dtype: torch.dtype = torch.float32
    """The wrapped model's parameter dtype."""


@dataclass
class Probe:
    """What the load-time probe found: the hook points offered (``"hook_embed"``, ``"ln_final"``
    and per block ``"blocks.{l}"`` its names), those rejected with the reason, and the final norm."""

    offered: dict[str, list[str]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    parallel: bool = False
    final_norm_form: NormForm | None = None


def capture(lay: Layout, hf_model: nn.Module, ids: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Every candidate activation of one forward on ``ids`` (by plain ``torch`` hooks), and the logits."""
    seen: dict[str, Tensor] = {}

    def keep(key: str):
        return lambda m, a, o: seen.__setitem__(key, first_tensor(o).clone())

    def keep_input(key: str):
        return lambda m, args, kwargs: seen.__setitem__(key, args[0] if args else kwargs["hidden_states"])

    handles = [lay.embed.register_forward_hook(keep("embed"))]
    for layer, block in enumerate(lay.blocks):
        handles.append(block.register_forward_pre_hook(keep_input(f"pre{layer}"), with_kwargs=True))
        handles.append(block.register_forward_hook(keep(f"post{layer}")))
        for kind, module in (("attn", lay.attn[layer]), ("mlp", lay.mlp[layer])):
            if module is not None:
                handles.append(module.register_forward_hook(keep(f"{kind}{layer}")))
        for i, norm in enumerate(norm_children(block)):
            handles.append(norm.register_forward_pre_hook(keep_input(f"norm{layer}.{i}"), with_kwargs=True))
    if lay.final_norm is not None:
        handles.append(lay.final_norm.register_forward_pre_hook(keep_input("final_in"), with_kwargs=True))
        handles.append(lay.final_norm.register_forward_hook(keep("final_out")))
    try:
        with torch.no_grad():
            logits = hf_model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def probe(lay: Layout, hf_model: nn.Module, d_vocab: int) -> Probe:
    """Run `capture` on random ids and keep the hook points whose values check out (see `Probe`)."""
    ids = torch.randint(0, d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    seen, logits = capture(lay, hf_model, ids.to(next(hf_model.parameters()).device))
    n = len(lay.blocks)
    found = Probe()
    if sums_match(seen["embed"], seen["pre0"]):
        found.offered["hook_embed"] = []
    else:
        found.rejected["hook_embed"] = "the embedding output is not the residual stream entering block 0"
    mids, outs = [], []
    for layer in range(n):
        pre, post = seen[f"pre{layer}"], seen[f"post{layer}"]
        attn, mlp = seen.get(f"attn{layer}"), seen.get(f"mlp{layer}")
        norm_inputs = [v for k, v in seen.items() if k.startswith(f"norm{layer}.")]
        mid = None if attn is None else pre + attn
        mids.append(mid is not None and any(sums_match(mid, x) for x in norm_inputs))
        outs.append(attn is not None and mlp is not None and sums_match(pre + attn + mlp, post))
    has_mid, has_out = all(mids), all(outs)
    found.parallel = has_out and not has_mid
    for layer in range(n):
        names = ["hook_resid_pre"]
        names += ["hook_attn_out"] if has_out or has_mid else []
        names += ["hook_resid_mid"] if has_mid else []
        names += ["hook_mlp_out"] if has_out else []
        found.offered[f"blocks.{layer}"] = [*names, "hook_resid_post"]
    why_out = "the attention and MLP outputs do not add up to the block output (scaled or internal residuals)"
    if not has_out:
        found.rejected["blocks.{l}.hook_mlp_out"] = why_out
    if not (has_out or has_mid):
        found.rejected["blocks.{l}.hook_attn_out"] = why_out
    if not has_mid:
        parallel = "attention and MLP read the same residual stream (parallel block)"
        found.rejected["blocks.{l}.hook_resid_mid"] = parallel if has_out else "no norm in the block reads it"
    final_in = seen.get("final_in")
    if final_in is None or not sums_match(final_in, seen[f"post{n - 1}"]):
        found.rejected["ln_final.hook_out"] = "no final norm reading the last block's output was found"
        return found
    found.offered["ln_final"] = []
    form = norm_form(lay.final_norm, final_in)
    with torch.no_grad():
        head_ok = sums_match(lay.head(seen["final_out"]), logits)
    if form is None or not head_ok:
        found.rejected["final norm form"] = "not a LayerNorm/RMSNorm followed by a linear head (no DLA)"
    else:
        found.final_norm_form = form
    return found
