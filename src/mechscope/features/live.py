"""Features on a prompt, live: which features fire on each token, and steering with one feature.

`prompt_features` runs a prompt to the source's hook and encodes it (for an SAE, exactly
``sae.encode`` of the hook's activation); `steer` adds a multiple of a feature's decoder
direction at the source's output hook, or ablates the feature (an SAE spliced with its error
term and the latent zeroed, so everything else stays exact), and returns the next-token
distribution before and after.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError, InputError
from mechscope.features.sources import FeatureSource, NeuronSource, SAESource
from mechscope.names import layer_of
from mechscope.sae.splice import run_with_saes


@dataclass
class PromptFeatures:
    """The tokens of a prompt and every feature's activation on each: ``acts [pos, d_sae]``."""

    str_tokens: list[str]
    acts: Float[Tensor, "pos d_sae"]

    def top(self, k: int = 5) -> list[list[tuple[int, float]]]:
        """The ``k`` strongest firing features of each token, as ``(feature, activation)``."""
        values, ids = self.acts.topk(min(k, self.acts.shape[1]), dim=-1)
        return [
            [(int(i), float(v)) for v, i in zip(vs, is_, strict=True) if v > 0]
            for vs, is_ in zip(values, ids, strict=True)
        ]


@torch.no_grad()
def prompt_features(model, source: FeatureSource, text: str) -> PromptFeatures:
    """Encode ``text`` (tokenised as ``model.to_tokens``) with ``source``.

    Example:
        >>> from mechscope.features.sources import NeuronSource
        >>> out = prompt_features(model, NeuronSource(model, 0), torch.tensor([[1, 2, 3]]))
        >>> out.acts.shape
        torch.Size([3, 64])
    """
    tokens = model.to_tokens(text) if isinstance(text, str) else torch.as_tensor(text).reshape(1, -1)
    store: dict[str, Tensor] = {}

    def save(act: Tensor, *, hook) -> None:
        store["act"] = act

    layer = layer_of(source.hook_name)
    stop = None if layer is None or layer + 1 >= model.cfg.n_layers else layer + 1
    with model.hooks(fwd_hooks=[(source.hook_name, save)]):
        model(tokens.to(model.device), stop_at_layer=stop)
    acts = source.encode(store["act"])[0].float().cpu()
    str_tokens = model.to_str_tokens(tokens[0]) if model.tokenizer is not None else [str(int(t)) for t in tokens[0]]
    return PromptFeatures(list(str_tokens), acts)


def _distribution(logits: Tensor, k: int, strings) -> list[tuple[int, str, float]]:
    probs = logits[0, -1].float().softmax(-1)
    top = probs.topk(min(k, probs.shape[-1]))
    return [(int(i), strings(int(i)), float(p)) for p, i in zip(top.values, top.indices, strict=True)]


@torch.no_grad()
def steer(
    model, source: FeatureSource, text: str, feature: int, *, mode: str = "add", coefficient: float = 4.0, k: int = 10
) -> dict:
    """The next-token distribution of ``text`` before and after steering with ``feature``.

    ``mode="add"`` adds ``coefficient`` times the feature's unit decoder direction at every
    position of the source's output hook (for neurons: ``coefficient`` added to the neuron);
    ``mode="ablate"`` sets the feature to zero. Returns ``{"before": [...], "after": [...],
    "kl": KL(before || after)}`` with ``(token id, text, probability)`` triples.

    Example:
        >>> from mechscope.features.sources import NeuronSource
        >>> out = steer(model, NeuronSource(model, 0), torch.tensor([[1, 2, 3]]), 5, coefficient=10.0)
        >>> len(out["before"]), out["kl"] > 0
        (10, True)
    """
    if mode not in ("add", "ablate"):
        raise InputError(f"mode must be 'add' or 'ablate', got {mode!r}")
    if not 0 <= feature < source.n_features:
        raise InputError(f"feature {feature} is out of range: {source.name} has features 0..{source.n_features - 1}")
    tokens = model.to_tokens(text) if isinstance(text, str) else torch.as_tensor(text).reshape(1, -1)
    tokens = tokens.to(model.device)
    strings = (lambda i: model.to_str_tokens(torch.tensor([i]))[0]) if model.tokenizer is not None else str
    clean = model(tokens)
    if isinstance(source, NeuronSource):

        def edit(act: Tensor, *, hook) -> Tensor:
            act = act.clone()
            act[..., feature] = 0.0 if mode == "ablate" else act[..., feature] + coefficient
            return act

        steered = model.run_with_hooks(tokens, fwd_hooks=[(source.hook_name, edit)])
    elif isinstance(source, SAESource) and mode == "ablate":

        def zero(acts: Tensor, *, hook) -> Tensor:
            acts = acts.clone()
            acts[..., feature] = 0.0
            return acts

        out = source.sae.cfg.output_hook
        steered = run_with_saes(model, tokens, saes=source.sae, use_error_term=True,
                                fwd_hooks=[(f"{out}.hook_sae_acts_post", zero)])  # fmt: skip
    else:
        if isinstance(source, SAESource):
            direction, hook_name = source.sae.W_dec[feature].detach().float(), source.sae.cfg.output_hook
        else:
            direction, hook_name = source.directions[feature], source.hook_name
            if mode == "ablate":  # the projection on this direction removed
                unit = direction / direction.norm().clamp_min(1e-12)
        if mode == "add":
            unit = direction / direction.norm().clamp_min(1e-12)

        def shift(act: Tensor, *, hook) -> Tensor:
            flat = act.flatten(2) if act.dim() == 4 else act
            u = unit.to(flat.device, flat.dtype)
            flat = flat + coefficient * u if mode == "add" else flat - (flat @ u)[..., None] * u
            return flat.reshape(act.shape)

        if hook_name not in model.hook_dict:
            raise ConfigError(f"cannot steer at {hook_name!r}: not a hook of this model")
        steered = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, shift)])
    p, q = clean[0, -1].float().log_softmax(-1), steered[0, -1].float().log_softmax(-1)
    return {
        "before": _distribution(clean, k, strings),
        "after": _distribution(steered, k, strings),
        "kl": float((p.exp() * (p - q)).sum()),
    }
