"""Neuron-level and full residual-stream decompositions of an `ActivationCache`, with
TransformerLens' names, signatures and results (`NeuronDecompositions` is a base of the cache)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mechscope.hooks import Slice, SliceInput, as_slice


def norm_centres(cfg) -> bool:
    """Whether the model's norms centre their input (LayerNorm), so a residual stack is centred
    before the cached scale applies.

    Example:
        >>> norm_centres(model.cfg)
        True
    """
    return cfg.normalization_type in ("LN", "LNPre")


class NeuronDecompositions:
    """`ActivationCache` methods that split MLP outputs into neurons and the stream into every
    head, neuron, embedding and bias."""

    def get_neuron_results(
        self,
        layer: int,
        neuron_slice: Slice | SliceInput = None,
        pos_slice: Slice | SliceInput = None,
        project_output_onto: Tensor | None = None,
    ) -> Tensor:
        """Each neuron's write to the residual stream at ``layer``: ``[..., d_mlp, d_model]``
        (``hook_post`` times its row of ``W_out``), or projected on ``project_output_onto``
        (``[d_model]``: ``[..., d_mlp]``; ``[d_model, k]``: ``[..., d_mlp, k]``).

        Example:
            >>> _, cache = model.run_with_cache(tokens)
            >>> cache.get_neuron_results(0, pos_slice=-1).shape, cache.get_neuron_results(0, [1, 2]).shape
            (torch.Size([1, 64, 32]), torch.Size([1, 4, 2, 32]))
        """
        neuron_slice, pos_slice = as_slice(neuron_slice), as_slice(pos_slice)
        acts = neuron_slice.apply(pos_slice.apply(self["post", layer], dim=-2), dim=-1)
        W_out = neuron_slice.apply(self.model.blocks[layer].mlp.W_out, dim=0)
        return _neuron_writes(acts, W_out, project_output_onto)

    def stack_neuron_results(
        self,
        layer: int,
        pos_slice: Slice | SliceInput = None,
        neuron_slice: Slice | SliceInput = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        project_output_onto: Tensor | None = None,
    ):
        """Every neuron's write in layers ``[0, layer)`` as ``[layer * d_mlp, ...]`` (labels ``"L{l}N{n}"``).

        With ``project_output_onto`` each write is projected before it is expanded per neuron
        (and, with ``apply_ln``, the cached norm scale is applied analytically), so the
        ``[..., d_mlp, d_model]`` tensor is never built.
        """
        layer = self._end(layer)
        pos_slice, neuron_slice = as_slice(pos_slice), as_slice(neuron_slice)
        cfg = self.model.cfg
        project = project_output_onto
        squeeze = project is not None and project.dim() == 1
        if squeeze:
            project = project[:, None]
        neurons = np.atleast_1d(neuron_slice.apply(torch.arange(cfg.d_mlp), dim=0).numpy())
        labels = [f"L{layer_}N{n}" for layer_ in range(layer) for n in neurons]
        folded = apply_ln and project is not None and cfg.normalization_type is not None
        scale = self._scale(layer, False, pos_slice) if folded else None
        parts = []
        for layer_ in range(layer):
            acts = neuron_slice.apply(pos_slice.apply(self["post", layer_], dim=-2), dim=-1)
            W_out = neuron_slice.apply(self.model.blocks[layer_].mlp.W_out, dim=0)
            if folded:  # LN_s(a W_out) @ p = (a / s) (centred W_out @ p)
                acts = acts / scale.to(acts.dtype)
                W_out = W_out - W_out.mean(-1, keepdim=True) if norm_centres(cfg) else W_out
            parts.append(_neuron_writes(acts, W_out, project))
        embed = pos_slice.apply(self["hook_embed"], dim=-2)
        width = cfg.d_model if project is None else project.shape[-1]
        stack = torch.cat(parts, dim=-2).movedim(-2, 0) if parts else embed.new_zeros(0, *embed.shape[:-1], width)
        if incl_remainder:
            resid = pos_slice.apply(self["resid_post", layer - 1], dim=-2)
            if folded:
                resid = self.apply_ln_to_stack(resid[None], layer, pos_slice=pos_slice)[0]
            remainder = resid if project is None else resid @ project.to(resid.dtype)
            stack = torch.cat([stack, (remainder - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln and not folded:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        stack = stack.squeeze(-1) if squeeze else stack
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: Slice | SliceInput = None,
        return_labels: bool = False,
        project_output_onto: Tensor | None = None,
    ):
        """The stream entering ``layer`` as every head's output, every neuron's (or, without
        ``expand_neurons``, every MLP's) output, ``embed``, ``pos_embed`` and the summed ``bias``.

        Example:
            >>> _, cache = model.run_with_cache(tokens)
            >>> stack, labels = cache.get_full_resid_decomposition(return_labels=True, expand_neurons=False)
            >>> labels[-5:], torch.allclose(stack.sum(0), cache["resid_post", -1], atol=1e-5)
            (['1_mlp_out', '2_mlp_out', 'embed', 'pos_embed', 'bias'], True)
        """
        layer = self._end(layer)
        pos_slice = as_slice(pos_slice)
        project = project_output_onto
        squeeze = project is not None and project.dim() == 1
        if squeeze:
            project = project[:, None]
        folded = apply_ln and project is not None

        def finish(stack: Tensor) -> Tensor:
            if folded:
                stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos_slice)
            return stack if project is None else stack @ project.to(stack.dtype)

        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0), True, pos_slice=pos_slice)
        components = [finish(heads)]
        if not self.model.cfg.attn_only and layer > 0:
            if expand_neurons:
                neurons, more = self.stack_neuron_results(
                    layer, pos_slice, return_labels=True, apply_ln=folded, project_output_onto=project
                )
            else:
                neurons, more = self.decompose_resid(
                    layer, mlp_input, "mlp", pos_slice=pos_slice, incl_embeds=False, return_labels=True
                )
                neurons = finish(neurons)
            components.append(neurons)
            labels.extend(more)
        for key, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
            if key in self.cache_dict:
                components.append(finish(pos_slice.apply(self[key], dim=-2)[None]))
                labels.append(label)
        bias = self.model.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        bias = bias.to(heads.device, heads.dtype).expand((1, *heads.shape[1:]))
        components.append(finish(bias))
        labels.append("bias")
        stack = torch.cat(components)
        if apply_ln and not folded:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos_slice)
        stack = stack.squeeze(-1) if squeeze else stack
        return (stack, labels) if return_labels else stack


def _neuron_writes(acts: Tensor, W_out: Tensor, project: Tensor | None) -> Tensor:
    """``acts [..., d_mlp]`` times each neuron's output row ``W_out [d_mlp, d_model]``, projected."""
    W_out = W_out.to(acts.device, acts.dtype)
    if project is None:
        return acts[..., None] * W_out
    projected = W_out @ project.to(acts.device, acts.dtype)
    return acts * projected if projected.dim() == 1 else acts[..., None] * projected
