"""Interchange interventions: prompt pairs, and differentiable patched runs that start at the site.

An interchange intervention runs a *base* prompt with part of one activation (at one hook and
position) taken from the same activation of a *source* prompt, and asks whether the model then
gives the *counterfactual* answer. `InterchangeRun` caches, once, what every such run reuses:
the base prompts' residual stream entering the site's block, their keys and values before the
intervened position (later positions attend to them unchanged), and the source activations. A
run then computes only the intervened position onward, from the site's block on, and unembeds
only the final position: the forward that DAS differentiates through at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError
from mechscope.model.context import AttentionContext, KVCache
from mechscope.model.tokenize import check_mask, input_tokens
from mechscope.names import act_name, layer_of, parse_act_name, unknown_name_error
from mechscope.patching.engine import PrefixKV, base_run, suffix_context
from mechscope.patching.metrics import LogitDiff

Intervention = Callable[[Tensor, Tensor], Tensor]


@dataclass
class InterchangeData:
    """Base/source prompt pairs: the answer each base prompt gives (``base_labels``) and the
    counterfactual answer it should give after the intervention (``labels``).

    Prompts share one length (or one ``attention_mask`` for base and source alike); answers are
    read at the final position.

    Example:
        >>> data = InterchangeData(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[5, 6], [7, 8]]),
        ...                        torch.tensor([1, 2]), torch.tensor([3, 4]))
        >>> len(data), len(data.subset(torch.tensor([1])))
        (2, 1)
    """

    base_tokens: Int[Tensor, "batch pos"]
    source_tokens: Int[Tensor, "batch pos"]
    labels: Int[Tensor, " batch"]
    base_labels: Int[Tensor, " batch"]
    attention_mask: Int[Tensor, "batch pos"] | None = None

    def __post_init__(self) -> None:
        n = self.base_tokens.shape[0]
        if self.source_tokens.shape != self.base_tokens.shape:
            raise InputError(
                f"base tokens {tuple(self.base_tokens.shape)} and source tokens {tuple(self.source_tokens.shape)} "
                "differ in shape; pair prompts of equal token length"
            )
        for name in ("labels", "base_labels"):
            value = torch.as_tensor(getattr(self, name), dtype=torch.long)
            if value.shape != (n,):
                raise InputError(f"{name} must hold one token id per pair [{n}], got shape {tuple(value.shape)}")
            setattr(self, name, value)

    def __len__(self) -> int:
        return self.base_tokens.shape[0]

    def subset(self, index: Int[Tensor, " n"]) -> InterchangeData:
        """The pairs at ``index``."""
        mask = None if self.attention_mask is None else self.attention_mask[index]
        return InterchangeData(
            self.base_tokens[index], self.source_tokens[index], self.labels[index], self.base_labels[index], mask
        )

    def split(self, n_train: int) -> tuple[InterchangeData, InterchangeData]:
        """The first ``n_train`` pairs and the rest (held out)."""
        if not 0 < n_train < len(self):
            raise InputError(f"n_train must be in 1..{len(self) - 1} for {len(self)} pairs, got {n_train}")
        return self.subset(torch.arange(n_train)), self.subset(torch.arange(n_train, len(self)))

    def metric(self) -> LogitDiff:
        """Logit of the counterfactual answer minus logit of the base answer, at the final position."""
        return LogitDiff(self.labels, self.base_labels)


WIDTH_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "post", "pre", "pre_linear")


def check_hook(model, hook_name: str) -> int:
    """The block of ``hook_name``, after checking it names an activation ``[batch, pos, d_act]``.

    Example:
        >>> check_hook(model, "blocks.1.mlp.hook_post")
        1
    """
    if hook_name not in model.hook_dict:
        raise unknown_name_error(hook_name, model.hook_dict)
    parsed = parse_act_name(hook_name)
    if parsed.kind not in WIDTH_SITES or layer_of(hook_name) is None:
        raise InputError(
            f"interchange interventions act on activations [batch, pos, d_act] inside a block; {hook_name!r} is "
            f"not one; choose among {[act_name(s, 0) for s in WIDTH_SITES]} (any layer)"
        )
    return layer_of(hook_name)


class InterchangeRun:
    """The base runs and source activations reused by every interchange run of ``data`` at
    ``hook_name``/``position`` (see the module docstring).

    Example:
        >>> data = InterchangeData(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 5, 3]]), torch.tensor([7]),
        ...                        torch.tensor([8]))
        >>> run = InterchangeRun(model, data, "blocks.1.hook_resid_pre", position=1)
        >>> logits = run.logits(torch.tensor([0]), lambda base, source: source)  # the whole activation
        >>> _, cache = model.run_with_cache(torch.tensor([[1, 5, 3]]))
        >>> def swap(x, *, hook):
        ...     x = x.clone(); x[:, 1] = cache[hook.name][:, 1]; return x
        >>> full = model.run_with_hooks(torch.tensor([[1, 2, 3]]), fwd_hooks=[("blocks.1.hook_resid_pre", swap)])
        >>> torch.allclose(logits, full[:, -1], atol=1e-5)
        True
    """

    def __init__(self, model, data: InterchangeData, hook_name: str, position: int = -1) -> None:
        self.model, self.data, self.hook_name = model, data, hook_name
        self.layer = check_hook(model, hook_name)
        base_tokens = input_tokens(model, data.base_tokens)[0]
        source_tokens = input_tokens(model, data.source_tokens)[0]
        seq = base_tokens.shape[1]
        if not -seq <= position < seq:
            raise InputError(f"position {position} is outside prompts of {seq} tokens")
        self.position, self.seq = position % seq, seq
        self.mask = check_mask(data.attention_mask, tuple(base_tokens.shape), model.device)
        name = act_name("resid_pre", self.layer)
        base, cache = base_run(model, base_tokens, self.mask, names=[name])
        self.resid = cache[name][:, self.position :]
        self.base_logits = base.logits[:, -1]  # the unpatched runs' final-position logits
        self.kv = KVCache(model.cfg.n_layers)
        for layer in range(self.layer, model.cfg.n_layers):
            self.kv.keys[layer] = base.kv.keys[layer][:, :, : self.position]
            self.kv.values[layer] = base.kv.values[layer][:, :, : self.position]
        with torch.no_grad():
            _, source = model.run_with_cache(
                source_tokens, names_filter=[hook_name], attention_mask=self.mask, stop_at_layer=self.layer + 1
            )
        self.source = source[hook_name][:, self.position]

    @property
    def d_act(self) -> int:
        """The width of the intervened activation (its last axis)."""
        return self.source.shape[-1]

    def logits(self, index: Int[Tensor, " n"], intervene: Intervention) -> Float[Tensor, "n d_vocab"]:
        """Final-position logits of the base prompts at ``index`` with their activation at the site
        and position replaced by ``intervene(base_activation, source_activation)`` (both ``[n, d_act]``).
        Differentiable with respect to whatever ``intervene`` uses."""
        model, device = self.model, self.model.device
        index = index.to(self.resid.device)
        source = self.source[index]
        mask = None if self.mask is None else self.mask[index.to(self.mask.device)]

        def hook(activation: Tensor, *, hook) -> Tensor:
            out = activation.clone()
            out[:, 0] = intervene(activation[:, 0], source.to(activation.device))
            return out

        resid = self.resid[index]
        if self.position:
            prefix = KVCache(model.cfg.n_layers)
            for layer in range(self.layer, model.cfg.n_layers):
                prefix.keys[layer] = self.kv.keys[layer][index.to(self.kv.keys[layer].device)]
                prefix.values[layer] = self.kv.values[layer][index.to(self.kv.values[layer].device)]
            ctx = suffix_context(mask, len(index), self.seq, self.position, PrefixKV(prefix, self.position, 1), device)
        else:
            ctx = AttentionContext.build(mask, len(index), self.seq, device)
        with model.hooks(fwd_hooks=[(self.hook_name, hook)]):
            resid = model.run_blocks(resid, self.layer, model.cfg.n_layers, ctx)
        return model(resid[:, -1:], start_at_layer=model.cfg.n_layers)[:, 0]


class Predicts:
    """1.0 where the final position's top token is the row's label, else 0.0 (a patching metric).

    Example:
        >>> logits = torch.zeros(2, 3, 5); logits[0, -1, 4] = 1.0
        >>> Predicts(torch.tensor([4]))(logits)
        tensor([1., 0.])
    """

    def __init__(self, labels: Int[Tensor, " n_prompts"], pos: int = -1) -> None:
        self.labels, self.pos = torch.as_tensor(labels, dtype=torch.long), pos

    def read_positions(self, seq: int) -> tuple[list[int], Predicts]:
        """Only the final position is read (see `mechscope.patching.metrics.metric_positions`)."""
        return [self.pos % seq], Predicts(self.labels, pos=0)

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        top = logits[:, self.pos].argmax(-1)
        labels = self.labels.to(top.device).repeat(logits.shape[0] // len(self.labels))
        return (top == labels).float()
