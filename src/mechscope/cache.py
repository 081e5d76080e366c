"""`ActivationCache`: cached activations by hook name, with residual-stream decompositions.

Every method has TransformerLens' name, signature and result: keys resolve through
TransformerLens' ``get_act_name`` (``cache["k6"]``, ``cache["attn", 0]``, ``cache["z", -1]``),
an integer ``pos_slice`` drops the position axis (`Slice`), and `remove_batch_dim` and `to` change
the cache in place. `head_results` is mechscope's own.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.decompose import NeuronDecompositions, norm_centres
from mechscope.errors import HookNameError, InputError
from mechscope.hooks import Slice, SliceInput, as_slice
from mechscope.names import act_name, unknown_name_error

if TYPE_CHECKING:
    from mechscope.model.transformer import HookedTransformer


class ActivationCache(NeuronDecompositions):
    """Activations from `HookedTransformer.run_with_cache`, keyed by hook name.

    Index by full name (``cache["blocks.0.attn.hook_z"]``), by TransformerLens' short names
    (``cache["z", 0]``, ``cache["scale", 2, "ln1"]``, ``cache["k6"]``, ``cache["attn", -1]``).

    Example:
        >>> logits, cache = model.run_with_cache(tokens)
        >>> resid, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
        >>> labels, resid.shape
        (['0_pre', '1_pre', '2_pre', 'final_post'], torch.Size([4, 1, 4, 32]))
        >>> cache.accumulated_resid(pos_slice=-1).shape  # an int position drops the axis
        torch.Size([4, 1, 32])
        >>> attrs = cache.logit_attrs(cache.decompose_resid(pos_slice=-1), tokens=7, pos_slice=-1)
        >>> attrs.shape  # [component, batch]
        torch.Size([8, 1])
    """

    def __init__(self, cache_dict: dict[str, Tensor], model: HookedTransformer, has_batch_dim: bool = True) -> None:
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim
        self.has_embed = "hook_embed" in cache_dict
        self.has_pos_embed = "hook_pos_embed" in cache_dict

    # ------------------------------------------------------------------ mapping
    def _name(self, key: str | tuple) -> str:
        """The full name of ``key``: a cached name as it is, else through `act_name` (TransformerLens'
        ``get_act_name`` grammar: aliases, compact names) with negative layers counted from the end."""
        if isinstance(key, str) and key in self.cache_dict:
            return key
        args = (key,) if isinstance(key, str) else tuple(key)
        if len(args) > 1 and isinstance(args[1], int) and args[1] < 0:
            args = (args[0], self.model.cfg.n_layers + args[1], *args[2:])
        return act_name(*args)

    def __getitem__(self, key: str | tuple) -> Tensor:
        name = self._name(key)
        if name not in self.cache_dict:
            if name in self.model.hook_dict:
                raise HookNameError(f"{name!r} was not cached; include it in names_filter when calling run_with_cache")
            raise unknown_name_error(name, self.cache_dict, "cache entry")
        return self.cache_dict[name]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, (str, tuple)):
            return False
        try:
            return self._name(key) in self.cache_dict
        except HookNameError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def keys(self):
        """The full hook names of the cached activations, in the order they were cached.

        Example:
            >>> _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_post"))
            >>> list(cache.keys())
            ['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post', 'blocks.2.hook_resid_post']
        """
        return self.cache_dict.keys()

    def values(self):
        """The cached activations, in the order of `keys`."""
        return self.cache_dict.values()

    def items(self):
        """``(hook name, activation)`` pairs, in the order of `keys`."""
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

    def _batch_size(self) -> int:
        counts = Counter(v.shape[0] for v in self.cache_dict.values() if v.dim() > 0)
        return counts.most_common(1)[0][0] if counts else 1

    def to(self, device: torch.device | str) -> ActivationCache:
        """Move every tensor to ``device``, in place; returns the cache."""
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        return self

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the batch axis of a batch-of-one cache, in place; returns the cache.

        Example:
            >>> _, cache = model.run_with_cache(tokens)
            >>> cache.remove_batch_dim() is cache, cache["resid_pre", 0].shape, cache.has_batch_dim
            (True, torch.Size([4, 32]), False)
        """
        if not self.has_batch_dim:
            warnings.warn("remove_batch_dim: the batch dimension was already removed", stacklevel=2)
            return self
        batch = self._batch_size()
        if batch != 1:
            raise InputError(f"remove_batch_dim needs a cache of batch size 1, this one has batch size {batch}")
        for key, value in self.cache_dict.items():
            if value.dim() > 0 and value.shape[0] == 1:
                self.cache_dict[key] = value[0]
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice: Slice | SliceInput) -> ActivationCache:
        """A new cache with ``batch_slice`` applied to the batch axis (an int drops it).

        Example:
            >>> _, cache = model.run_with_cache(torch.tensor([[1, 2], [3, 4]]))
            >>> cache.apply_slice_to_batch_dim(1)["resid_pre", 0].shape
            torch.Size([2, 32])
        """
        batch_slice = as_slice(batch_slice)
        if not self.has_batch_dim and batch_slice.mode != "identity":
            raise InputError("this cache has no batch dimension to slice")
        batch = self._batch_size()
        sliced = {
            name: batch_slice.apply(t, dim=0) if t.dim() > 0 and t.shape[0] == batch else t
            for name, t in self.cache_dict.items()
        }
        return ActivationCache(sliced, self.model, has_batch_dim=self.has_batch_dim and batch_slice.mode != "int")

    def toggle_autodiff(self, mode: bool = False) -> None:
        """``torch.set_grad_enabled(mode)`` for the whole process, with a warning (as TransformerLens)."""
        warnings.warn(f"Changed the global state, set autodiff to {mode}", stacklevel=2)
        torch.set_grad_enabled(mode)

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None) -> Tensor:
        """One activation of every layer before ``layer`` (``-1``/``None``: all), as ``[layer, ...]``.

        Example:
            >>> _, cache = model.run_with_cache(tokens)
            >>> cache.stack_activation("pattern").shape
            torch.Size([3, 1, 4, 4, 4])
        """
        layer = self._end(layer)
        return torch.stack([self[activation_name, layer_, sublayer_type] for layer_ in range(layer)])

    # ------------------------------------------------------------------ residual stream
    def _end(self, layer: int | None) -> int:
        return self.model.cfg.n_layers if layer is None or layer == -1 else layer

    def _scale(self, layer: int, mlp_input: bool, pos_slice: Slice, batch_slice: Slice | None = None) -> Tensor:
        n = self.model.cfg.n_layers
        if layer == n:
            scale = self["ln_final.hook_scale"]
        else:
            scale = self[f"blocks.{layer % n}.{'ln2' if mlp_input else 'ln1'}.hook_scale"]
        scale = pos_slice.apply(scale, dim=-2)
        if batch_slice is not None and self.has_batch_dim:
            scale = batch_slice.apply(scale, dim=0)
        return scale

    def apply_ln_to_stack(
        self,
        residual_stack: Float[Tensor, "component ... d_model"],
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: Slice | SliceInput = None,
        batch_slice: Slice | SliceInput = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> Float[Tensor, "component ... d_model"]:
        """Each component of a residual stack as it enters ``layer``'s norm: centred (LayerNorm)
        and divided by the cached ``hook_scale`` of ``ln_final`` (``layer`` None, -1 or
        ``n_layers``), ``blocks.{layer}.ln1`` or, with ``mlp_input``, ``ln2``.

        ``pos_slice``/``batch_slice`` say which positions and rows the stack holds (the scale is
        sliced to match). With ``recompute_ln`` at the final layer each component goes through
        ``ln_final`` itself, with its own statistics (the logit lens). The norm's weight and
        bias are not applied otherwise: on folded models the result feeds ``W_U`` directly.
        """
        cfg = self.model.cfg
        if cfg.normalization_type is None:
            return residual_stack
        layer = self._end(layer)
        batch_slice = as_slice(batch_slice)
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        if recompute_ln and layer == cfg.n_layers and self.model.ln_final is not None:
            return self.model.ln_final(residual_stack)
        if norm_centres(cfg):
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        scale = self._scale(layer, mlp_input, as_slice(pos_slice), batch_slice)
        return residual_stack / scale.to(residual_stack.dtype)

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: Slice | SliceInput = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ):
        """The residual stream entering each layer up to ``layer`` (inclusive), as ``[component, ...]``.

        ``layer`` None or -1 goes to the end and includes the final ``resid_post`` (label
        ``final_post``). Labels are ``"{l}_pre"`` and, with ``incl_mid``, ``"{l}_mid"``;
        ``mlp_input`` adds ``resid_mid`` of ``layer`` itself. ``apply_ln`` applies ``layer``'s
        norm: at the final layer ``ln_final`` with each component's own statistics
        (``recompute_ln``, the logit lens), elsewhere the cached scale.
        """
        n = self.model.cfg.n_layers
        layer = self._end(layer)
        pos_slice = as_slice(pos_slice)
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
        stack = torch.stack([pos_slice.apply(c, dim=-2) for c in components])
        if apply_ln:
            stack = self.apply_ln_to_stack(
                stack, layer, mlp_input, pos_slice, has_batch_dim=self.has_batch_dim, recompute_ln=layer == n
            )
        return (stack, labels) if return_labels else stack

    def logit_attrs(
        self,
        residual_stack: Float[Tensor, "component ... d_model"],
        tokens: str | int | Tensor,
        incorrect_tokens: str | int | Tensor | None = None,
        pos_slice: Slice | SliceInput = None,
        batch_slice: Slice | SliceInput = None,
        has_batch_dim: bool = True,
    ) -> Float[Tensor, "component ..."]:
        """Each component's direct contribution to the logit of ``tokens`` (minus that of
        ``incorrect_tokens``): the final norm's cached scale applied, then projected on the
        unembedding directions (`tokens_to_residual_directions`)."""
        directions = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            wrong = self.model.tokens_to_residual_directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise InputError(
                    f"tokens and incorrect_tokens must have the same shape, got {tuple(directions.shape[:-1])} "
                    f"and {tuple(wrong.shape[:-1])}"
                )
            directions = directions - wrong
        scaled = self.apply_ln_to_stack(
            residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim
        )
        return (scaled * directions).sum(-1)

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: Literal["all", "attn", "mlp"] = "all",
        apply_ln: bool = False,
        pos_slice: Slice | SliceInput = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ):
        """The residual stream entering ``layer`` split into the outputs that wrote it.

        Components: ``embed``, ``pos_embed`` (learned positions), then ``{l}_attn_out`` and
        ``{l}_mlp_out`` for each earlier layer (``mode`` keeps one kind), and ``{layer}_attn_out``
        with ``mlp_input``. With ``mode="all"`` and ``incl_embeds`` they sum to the residual stream.
        """
        cfg = self.model.cfg
        layer = self._end(layer)
        if mode not in ("all", "attn", "mlp"):
            raise InputError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        pos_slice = as_slice(pos_slice)
        components, labels = [], []
        if incl_embeds:
            for key, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
                if key in self.cache_dict:
                    components.append(self[key])
                    labels.append(label)
        for layer_ in range(layer):
            if mode != "mlp":
                components.append(self["attn_out", layer_])
                labels.append(f"{layer_}_attn_out")
            if mode != "attn" and not cfg.attn_only:
                components.append(self["mlp_out", layer_])
                labels.append(f"{layer_}_mlp_out")
        if mlp_input and mode != "mlp":
            components.append(self["attn_out", layer])
            labels.append(f"{layer}_attn_out")
        stack = torch.stack([pos_slice.apply(c, dim=-2) for c in components])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------ heads
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

    def compute_head_results(self) -> None:
        """Add every layer's ``attn.hook_result`` (from ``hook_z`` and ``W_O``) to the cache."""
        if act_name("result", 0) in self.cache_dict:
            warnings.warn("Tried to compute head results when they were already cached", stacklevel=2)
            return
        W_O = self.model.W_O
        for layer in range(self.model.cfg.n_layers):
            self.cache_dict[act_name("result", layer)] = self.head_results(layer, W_O)

    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: Slice | SliceInput = None,
        apply_ln: bool = False,
    ):
        """Every head's output in layers ``[0, layer)`` as ``[layer * head, ...]`` (labels ``"L{l}H{h}"``).

        Computes and caches ``hook_result`` first (`compute_head_results`). ``incl_remainder``
        appends the rest of the stream (embeddings, MLPs, biases), so the stack sums to it.
        """
        layer = self._end(layer)
        pos_slice = as_slice(pos_slice)
        if act_name("result", 0) not in self.cache_dict:
            self.compute_head_results()
        components, labels = [], []
        for layer_ in range(layer):
            components.append(pos_slice.apply(self["result", layer_], dim=-3))
            labels.extend(f"L{layer_}H{h}" for h in range(self.model.cfg.n_heads))
        empty = pos_slice.apply(self["hook_embed"], dim=-2)
        stack = torch.cat(components, dim=-2).movedim(-2, 0) if components else empty.new_zeros(0, *empty.shape)
        if incl_remainder:
            resid = pos_slice.apply(self["resid_post", layer - 1], dim=-2)
            stack = torch.cat([stack, (resid - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack
