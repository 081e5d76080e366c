"""`ActivationCache`: cached activations by hook name, with residual-stream decompositions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import HookNameError, InputError
from mechscope.names import act_name, unknown_name_error

if TYPE_CHECKING:
    from mechscope.model.transformer import HookedTransformer

PosSlice = None | int | slice | list | Tensor
_POS_DIM = -2  # every residual-stream tensor is [..., pos, d_model]


def _slice_pos(x: Tensor, pos_slice: PosSlice, dim: int) -> Tensor:
    if pos_slice is None:
        return x
    if isinstance(pos_slice, int):
        return x.narrow(dim, pos_slice % x.shape[dim], 1)
    index = [slice(None)] * x.dim()
    index[dim] = pos_slice if isinstance(pos_slice, slice) else torch.as_tensor(pos_slice, device=x.device)
    return x[tuple(index)]


class ActivationCache:
    """Activations from `HookedTransformer.run_with_cache`, keyed by hook name.

    Index by full name (``cache["blocks.0.attn.hook_z"]``) or by a short name and layer
    (``cache["z", 0]``, ``cache["scale", 2, "ln1"]``).

    Example:
        >>> logits, cache = model.run_with_cache(tokens)
        >>> resid, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
        >>> labels
        ['0_pre', '1_pre', '2_pre', 'final_post']
    """

    def __init__(self, cache_dict: dict[str, Tensor], model: HookedTransformer, has_batch_dim: bool = True) -> None:
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    # ------------------------------------------------------------------ mapping
    def __getitem__(self, key: str | tuple) -> Tensor:
        name = act_name(*key) if isinstance(key, tuple) else key
        if name not in self.cache_dict:
            if name in self.model.hook_dict:
                raise HookNameError(f"{name!r} was not cached; include it in names_filter when calling run_with_cache")
            raise unknown_name_error(name, self.cache_dict, "cache entry")
        return self.cache_dict[name]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, tuple):
            key = act_name(*key)
        return key in self.cache_dict

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} entries, {self.nbytes() / 2**20:.1f} MiB)"

    def nbytes(self) -> int:
        """Bytes held, counting tensors that share storage once."""
        seen: dict[int, int] = {}
        for t in self.cache_dict.values():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return sum(seen.values())

    def to(self, device: torch.device | str) -> ActivationCache:
        """A cache with every tensor moved to ``device``."""
        return ActivationCache({k: v.to(device) for k, v in self.items()}, self.model, self.has_batch_dim)

    def remove_batch_dim(self) -> ActivationCache:
        """Drop a batch dimension of size one from every tensor."""
        if not self.has_batch_dim:
            return self
        for name, t in self.items():
            if t.shape[0] != 1:
                raise InputError(f"remove_batch_dim needs batch size 1; {name!r} has shape {tuple(t.shape)}")
        return ActivationCache({k: v[0] for k, v in self.items()}, self.model, has_batch_dim=False)

    def stack_activation(self, name: str, layer: int | None = None) -> Tensor:
        """Stack a per-layer activation (short name, e.g. ``"z"``) over layers ``[0, layer)`` → ``[layer, ...]``."""
        n = self.model.cfg.n_layers if layer is None else layer
        return torch.stack([self[name, layer_] for layer_ in range(n)])

    # ------------------------------------------------------------------ residual stream
    def apply_ln_to_stack(
        self,
        residual_stack: Float[Tensor, "... batch pos d_model"],
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: PosSlice = None,
    ) -> Float[Tensor, "... batch pos d_model"]:
        """Apply the cached norm scale of a layer's input to each component of a residual stack.

        Centres each component (LayerNorm models) and divides by the cached ``hook_scale`` of the
        final norm (``layer=None`` or ``n_layers``), or of ``blocks.{layer}.ln1`` (``ln2`` with
        ``mlp_input``). The norm's weight and bias are not applied: with folded norms
        (``load(..., fold_ln=True)``) the result feeds straight into ``W_U`` or ``W_Q``, ``W_K``, ``W_V``.
        """
        cfg = self.model.cfg
        if cfg.normalization_type is None:
            return residual_stack
        if layer is None or layer == cfg.n_layers or layer == -1:
            scale = self["ln_final.hook_scale"]
        else:
            scale = self[f"blocks.{layer % cfg.n_layers}.{'ln2' if mlp_input else 'ln1'}.hook_scale"]
        scale = _slice_pos(scale, pos_slice, _POS_DIM)
        if cfg.normalization_type == "layernorm":
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        return residual_stack / scale.to(residual_stack.dtype)

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ):
        """The residual stream entering each layer up to ``layer`` (inclusive), as ``[component, ...]``.

        ``layer=None`` goes to the end and includes the final ``resid_post`` (label ``final_post``).
        Labels are ``"{l}_pre"`` and, with ``incl_mid``, ``"{l}_mid"``. ``mlp_input`` adds
        ``resid_mid`` of ``layer`` itself. ``apply_ln`` applies the norm scale of ``layer``'s input.
        """
        n = self.model.cfg.n_layers
        layer = n if layer is None or layer == -1 else layer
        has_mid = not (self.model.cfg.parallel_attn_mlp or self.model.cfg.attn_only)
        components, labels = [], []
        for layer_ in range(layer + 1):
            if layer_ == n:
                components.append(self["resid_post", n - 1])
                labels.append("final_post")
                continue
            components.append(self["resid_pre", layer_])
            labels.append(f"{layer_}_pre")
            if has_mid and ((incl_mid and layer_ < layer) or (mlp_input and layer_ == layer)):
                components.append(self["resid_mid", layer_])
                labels.append(f"{layer_}_mid")
        stack = _slice_pos(torch.stack(components), pos_slice, _POS_DIM)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice)
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: Literal["all", "attn", "mlp"] = "all",
        apply_ln: bool = False,
        incl_embeds: bool = True,
        pos_slice: PosSlice = None,
        return_labels: bool = False,
    ):
        """The residual stream entering ``layer`` split into the outputs that wrote it.

        Components: ``embed``, ``pos_embed`` (learned positions), then ``{l}_attn_out`` and
        ``{l}_mlp_out`` for each earlier layer (``mode`` keeps one kind), and ``{layer}_attn_out``
        with ``mlp_input``. With ``mode="all"`` and ``incl_embeds`` they sum to the residual stream.
        """
        cfg = self.model.cfg
        layer = cfg.n_layers if layer is None or layer == -1 else layer
        if mode not in ("all", "attn", "mlp"):
            raise InputError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        components, labels = [], []
        if incl_embeds:
            components.append(self["hook_embed"])
            labels.append("embed")
            if "hook_pos_embed" in self.model.hook_dict:
                components.append(self["hook_pos_embed"])
                labels.append("pos_embed")
        for layer_ in range(layer + (1 if mlp_input else 0)):
            if mode != "mlp":
                components.append(self["attn_out", layer_])
                labels.append(f"{layer_}_attn_out")
            if mode != "attn" and layer_ < layer and not cfg.attn_only:
                components.append(self["mlp_out", layer_])
                labels.append(f"{layer_}_mlp_out")
        stack = _slice_pos(torch.stack(components), pos_slice, _POS_DIM)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice)
        return (stack, labels) if return_labels else stack

    def head_results(
        self, layer: int, W_O: Float[Tensor, "layer head d_head d_model"] | None = None
    ) -> Float[Tensor, "batch pos head d_model"]:
        """Each head's output at ``layer`` (cached ``hook_result``, or computed from ``hook_z`` and ``W_O``).

        ``W_O``: the model's stacked output weights (``model.W_O``), to pass when calling this for
        many layers (stacking them once); read from the model when ``None``.

        Example:
            >>> _, cache = model.run_with_cache(tokens)
            >>> cache.head_results(1).shape
            torch.Size([1, 4, 4, 32])
        """
        name = act_name("result", layer)
        if name in self.cache_dict:
            return self.cache_dict[name]
        z = self["z", layer]
        w_o = (self.model.W_O if W_O is None else W_O)[layer]
        return torch.einsum("...hk,hkd->...hd", z, w_o.to(z.device, z.dtype))

    def stack_head_results(
        self,
        layer: int | None = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: PosSlice = None,
        apply_ln: bool = False,
    ):
        """Every head's output in layers ``[0, layer)`` as ``[layer * head, batch, pos, d_model]``.

        Labels are ``"L{l}H{h}"``. ``incl_remainder`` appends the rest of the residual stream
        (embeddings, MLPs, attention biases) so the stack sums to the stream entering ``layer``.
        """
        cfg = self.model.cfg
        layer = cfg.n_layers if layer is None or layer == -1 else layer
        components, labels = [], []
        W_O = self.model.W_O if layer else None  # stacked once for every layer
        for layer_ in range(layer):
            results = self.head_results(layer_, W_O)
            components.append(results.movedim(-2, 0))
            labels.extend(f"L{layer_}H{h}" for h in range(cfg.n_heads))
        if components:
            stack = torch.cat(components)
        else:
            stack = torch.zeros(0, *self["hook_embed"].shape, dtype=self["hook_embed"].dtype)
        if incl_remainder:
            resid = self["resid_post", layer - 1] if layer == cfg.n_layers else self["resid_pre", layer]
            stack = torch.cat([stack, (resid - stack.sum(0))[None]])
            labels.append("remainder")
        stack = _slice_pos(stack, pos_slice, _POS_DIM)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, False, pos_slice)
        return (stack, labels) if return_labels else stack
