"""What a harvest reads: SAE latents, MLP neurons or any set of directions at one hook.

A source names the model hook it reads, turns that activation into ``[batch, pos, d_sae]``
feature activations (``d_sae`` is the number of features, whatever they are), and knows each
feature's write direction in the residual stream (for logit effects and neighbours) where it
has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError, InputError
from mechscope.names import act_name, layer_of, parse_act_name
from mechscope.sae.base import SAE
from mechscope.sae.config import reads_hook_z

RESIDUAL_WIDTH_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "embed", "pos_embed")


def _residual_width(hook_name: str) -> bool:
    try:
        return parse_act_name(hook_name).kind in RESIDUAL_WIDTH_KINDS
    except Exception:
        return False


@dataclass
class FeatureSource:
    """Features read at one hook of the model.

    Attributes:
        name: the source's key in a harvest and a database (e.g. ``"blocks.6.hook_resid_post"``).
        hook_name: the model hook whose activation is encoded.
        kind: ``"sae"``, ``"neurons"`` or ``"directions"``.
        n_features: how many features.

    Example:
        >>> from mechscope.features import NeuronSource
        >>> source = NeuronSource(model, 0)  # the 64 MLP neurons of block 0
        >>> isinstance(source, FeatureSource), source.hook_name, source.n_features
        (True, 'blocks.0.mlp.hook_post', 64)
        >>> source.encode(torch.randn(1, 4, 64)).shape, source.write_directions(model).shape
        (torch.Size([1, 4, 64]), torch.Size([64, 32]))
    """

    name: str
    hook_name: str
    kind: str
    n_features: int

    def encode(self, act: Tensor) -> Float[Tensor, "batch pos d_sae"]:
        """Each feature's activation at every position, from the hook's activation."""
        raise NotImplementedError

    def write_directions(self, model) -> Float[Tensor, "d_sae d_model"] | None:
        """Each feature's direction written into the residual stream, or ``None`` when it has none."""
        return None

    def head_shares(self) -> Float[Tensor, "d_sae head"] | None:
        """For ``hook_z`` SAEs: each head's share of the decoder direction (rows sum to 1)."""
        return None

    def describe(self) -> dict:
        """The source as plain values (stored in a feature database)."""
        return {"name": self.name, "hook_name": self.hook_name, "kind": self.kind, "n_features": self.n_features}


class SAESource(FeatureSource):
    """The latents of an SAE or transcoder (any registered architecture).

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4, hook_name="blocks.1.hook_resid_post"))
        >>> src = SAESource(sae)
        >>> src.name, src.n_features, src.write_directions(model).shape
        ('blocks.1.hook_resid_post', 64, torch.Size([64, 32]))
    """

    def __init__(self, sae: SAE, name: str | None = None) -> None:
        cfg = sae.cfg
        if not cfg.hook_name:
            raise ConfigError("an SAE without cfg.hook_name cannot be harvested; set hook_name")
        super().__init__(name or cfg.output_hook, cfg.hook_name, "sae", cfg.d_sae)
        self.sae = sae
        self.reads_z = reads_hook_z(cfg.hook_name)

    def encode(self, act: Tensor) -> Float[Tensor, "batch pos d_sae"]:
        return self.sae.encode(act.to(self.sae.device)).float()

    @torch.no_grad()
    def write_directions(self, model) -> Float[Tensor, "d_sae d_model"] | None:
        cfg, w_dec = self.sae.cfg, self.sae.W_dec.detach().float()
        out = cfg.output_hook
        if reads_hook_z(out) and cfg.n_heads is not None:
            layer = layer_of(out)
            w_o = model.W_O[layer].detach().float().to(w_dec.device)  # [head, d_head, d_model]
            # [d_sae, head * d_head] -> [d_sae, head, d_head], then through each head's W_O
            return torch.einsum("fhd,hdm->fm", w_dec.reshape(cfg.d_sae, cfg.n_heads, -1), w_o)
        if _residual_width(out) and w_dec.shape[-1] == model.cfg.d_model:
            return w_dec
        return None

    def head_shares(self) -> Float[Tensor, "d_sae head"] | None:
        if not self.reads_z or self.sae.cfg.n_heads is None:
            return None
        norms = self.sae.head_attribution().detach().float().pow(2)
        return norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)


class NeuronSource(FeatureSource):
    """Every MLP neuron of one layer (``blocks.{layer}.mlp.hook_post``).

    Example:
        >>> src = NeuronSource(model, 1)
        >>> src.hook_name, src.n_features, src.write_directions(model).shape
        ('blocks.1.mlp.hook_post', 64, torch.Size([64, 32]))
    """

    def __init__(self, model, layer: int) -> None:
        if not 0 <= layer < model.cfg.n_layers:
            raise InputError(f"layer {layer} is out of range: the model has layers 0..{model.cfg.n_layers - 1}")
        hook = act_name("post", layer)
        super().__init__(hook, hook, "neurons", model.cfg.d_mlp)
        self.layer = layer

    def encode(self, act: Tensor) -> Float[Tensor, "batch pos d_sae"]:
        return act.float()

    @torch.no_grad()
    def write_directions(self, model) -> Float[Tensor, "d_sae d_model"]:
        return model.W_out[self.layer].detach().float()


class DirectionSource(FeatureSource):
    """Projections of one hook's activation on a set of directions (probe directions, means, ...).

    Example:
        >>> src = DirectionSource("blocks.0.hook_resid_post", torch.randn(3, 32), name="probes")
        >>> src.encode(torch.randn(1, 4, 32)).shape
        torch.Size([1, 4, 3])
    """

    def __init__(self, hook_name: str, directions: Float[Tensor, "d_sae ..."], name: str | None = None) -> None:
        directions = torch.as_tensor(directions).detach().float()
        if directions.dim() != 2:
            raise InputError(f"directions must be [n_directions, width], got shape {tuple(directions.shape)}")
        super().__init__(name or f"{hook_name}.directions", hook_name, "directions", directions.shape[0])
        self.directions = directions

    def encode(self, act: Tensor) -> Float[Tensor, "batch pos d_sae"]:
        act = act.flatten(2) if act.dim() == 4 else act
        if act.shape[-1] != self.directions.shape[1]:
            raise InputError(
                f"the activation at {self.hook_name} has width {act.shape[-1]}, "
                f"the directions {self.directions.shape[1]}"
            )
        return act.float() @ self.directions.to(act.device).T

    def write_directions(self, model) -> Float[Tensor, "d_sae d_model"] | None:
        if _residual_width(self.hook_name) and self.directions.shape[1] == model.cfg.d_model:
            return self.directions
        return None


def as_sources(model, sources: SAE | FeatureSource | Sequence[SAE | FeatureSource]) -> list[FeatureSource]:
    """Wrap SAEs as `SAESource` and check that names are unique and hooks exist.

    Example:
        >>> [s.name for s in as_sources(model, [NeuronSource(model, 0), NeuronSource(model, 2)])]
        ['blocks.0.mlp.hook_post', 'blocks.2.mlp.hook_post']
    """
    items = [sources] if isinstance(sources, (SAE, FeatureSource)) else list(sources)
    if not items:
        raise InputError("nothing to harvest: pass at least one SAE or FeatureSource")
    out = [SAESource(s) if isinstance(s, SAE) else s for s in items]
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise InputError(f"two sources share a name: {sorted(n for n in names if names.count(n) > 1)}; pass name=")
    model.hook_names([s.hook_name for s in out])  # an unknown hook raises, naming the nearest valid one
    return out
