"""The `SAE` base class and the typed output of a training step.

An SAE is itself hooked: ``hook_sae_input``, ``hook_sae_acts_pre``, ``hook_sae_acts_post``,
``hook_sae_recons``, ``hook_sae_error`` and ``hook_sae_output``, named after the model hook
when spliced (e.g. ``blocks.6.hook_resid_post.hook_sae_acts_post``).

An architecture is a subclass registered with `register_sae` (`mechscope.sae.registry`): it
defines `SAE.encode_pre_and_acts` and `SAE.sparsity_losses`, its ``config_class`` (the
architecture's knobs), and, where its parameters differ from the SAELens layout,
`SAE.to_saelens` and `SAE.from_saelens`.

Shapes: an SAE reads ``[*batch, d_in]`` (``[*batch, head, d_head]`` for an SAE on ``hook_z``,
flattened to ``d_in``), has ``d_sae`` latents and writes ``[*batch, d_out]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from mechscope.errors import ConfigError, InputError
from mechscope.hooks import HookedRootModule, HookPoint
from mechscope.sae.config import SAEConfig
from mechscope.sae.registry import SAE_REGISTRY, register_sae, sae_class

__all__ = ["SAE", "SAE_REGISTRY", "TrainStepOutput", "make_sae", "register_sae"]


def make_sae(cfg: SAEConfig, seed: int | None = 0) -> SAE:
    """Build the SAE that ``cfg.architecture`` names, initialised with ``seed``.

    Example:
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=32, architecture="topk", k=4))
        >>> sae(torch.randn(5, 8)).shape
        torch.Size([5, 8])
    """
    return sae_class(cfg.architecture)(cfg).init_weights(seed)


@dataclass
class TrainStepOutput:
    """What one training forward returns: the total loss, its named parts, and the activations.

    Example:
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=32, architecture="topk", k=4))
        >>> out = sae.training_loss(torch.randn(16, 8))
        >>> list(out.losses), out.acts.shape, out.recons.shape
        (['mse'], torch.Size([16, 32]), torch.Size([16, 8]))
        >>> bool(out.loss == sum(out.losses.values())), int((out.acts != 0).sum(-1).max())
        (True, 4)
    """

    loss: Float[Tensor, ""]
    losses: dict[str, Tensor]
    acts: Float[Tensor, "batch d_sae"]
    recons: Float[Tensor, "batch d_out"]
    metrics: dict[str, Tensor] = field(default_factory=dict)


class SAE(HookedRootModule):
    """Base sparse autoencoder: ``recons = decode(encode(x))``.

    Weights use the SAELens layout: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
    ``W_dec [d_sae, d_out]``, ``b_dec [d_out]`` and, with a skip connection, ``W_skip [d_out, d_in]``.
    Subclasses define `encode_pre_and_acts` and the sparsity part of `training_loss`
    (`sparsity_losses`).

    Example:
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=32))
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(sae(x), sae.decode(sae.encode(x)))
        True
    """

    architecture: ClassVar[str] = ""
    """The registered name (set by `register_sae`)."""
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    """The architecture's config: a dataclass subclass of `SAEConfig` whose extra fields are its
    knobs, validated in its ``__post_init__``."""
    saelens_architectures: ClassVar[dict[str, tuple[bool, bool]] | None] = None
    """The SAELens ``architecture`` names this class reads and writes, each with
    ``(is_transcoder, skip_connection)``. ``None``: the architecture's own name for an SAE (and
    ``mechscope_<name>_transcoder`` for a transcoder); ``{}``: none (saved as `for_inference`)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_out, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, dtype=dtype))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, dtype=dtype)) if cfg.skip_connection else None
        self.hook_sae_input = HookPoint()
        self.hook_sae_acts_pre = HookPoint()
        self.hook_sae_acts_post = HookPoint()
        self.hook_sae_recons = HookPoint()
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()
        self.setup()

    # ------------------------------------------------------------------ weights
    def init_weights(self, seed: int | None = 0) -> SAE:
        """Unit-norm random decoder rows; encoder the decoder's transpose (random for transcoders)."""
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
        cfg = self.cfg
        with torch.no_grad():
            w_dec = torch.randn(cfg.d_sae, cfg.d_out, generator=gen)
            self.W_dec.copy_(w_dec / w_dec.norm(dim=-1, keepdim=True))
            if cfg.d_out == cfg.d_in:
                self.W_enc.copy_(self.W_dec.T)
            else:
                w_enc = torch.randn(cfg.d_in, cfg.d_sae, generator=gen)
                self.W_enc.copy_(w_enc / w_enc.norm(dim=0, keepdim=True))
            self.b_enc.zero_()
            self.b_dec.zero_()
            if self.W_skip is not None:
                self.W_skip.zero_()
        return self

    @property
    def device(self) -> torch.device:
        """The device of the SAE's weights."""
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the SAE's weights."""
        return self.W_dec.dtype

    def decoder_norms(self) -> Float[Tensor, " d_sae"]:
        """The L2 norm of each latent's decoder row."""
        return self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale each decoder row to unit norm (the trainer's constraint)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of ``W_dec.grad`` the component along each (unit) decoder row."""
        if self.W_dec.grad is None:
            return
        unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        parallel = (self.W_dec.grad * unit).sum(-1, keepdim=True)
        self.W_dec.grad.sub_(parallel * unit)

    @torch.no_grad()
    def fold_activation_scale(self, scale_in: float, scale_out: float) -> None:
        """Fold an input scaling into the weights: afterwards ``sae(x)`` equals ``old_sae(x * scale_in) / scale_out``.

        Latent activations are unchanged, so TopK choices and JumpReLU thresholds still hold.

        Example:
            >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=4)); x = torch.randn(3, 8)
            >>> expected = sae(x * 2.0) / 2.0
            >>> sae.fold_activation_scale(2.0, 2.0)
            >>> torch.allclose(sae(x), expected, atol=1e-6)
            True
        """
        self.W_enc.mul_(scale_in)
        self.W_dec.div_(scale_out)
        self.b_dec.div_(scale_out)
        if self.W_skip is not None:
            self.W_skip.mul_(scale_in / scale_out)
        self._fold_extra_input_scale(scale_in)

    def _fold_extra_input_scale(self, scale_in: float) -> None:
        """Architectures with other input-side parameters rescale them here."""

    def for_inference(self) -> SAE:
        """The SAE to save and run after training (BatchTopK: its JumpReLU form; else itself).

        Example:
            >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16))
            >>> sae.for_inference() is sae
            True
        """
        return self

    # ------------------------------------------------------------------ SAELens layout
    def saelens_architecture(self) -> str:
        """The SAELens ``architecture`` name this SAE is saved under (see `saelens_architectures`).

        Example:
            >>> make_sae(SAEConfig(d_in=8, d_sae=16, d_out=4, hook_name_out="b")).saelens_architecture()
            'transcoder'
        """
        cfg = self.cfg
        flags = (cfg.is_transcoder, cfg.is_transcoder and cfg.skip_connection)
        names = (
            self.saelens_architectures
            if self.saelens_architectures is not None
            else {self.architecture: (False, False)}
        )
        for name, name_flags in names.items():
            if tuple(name_flags) == flags:
                return name
        return f"mechscope_{self.architecture}_transcoder" if cfg.is_transcoder else self.architecture

    def to_saelens(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """This architecture's ``cfg.json`` keys and the weights, in the SAELens layout.

        The base class writes no extra key and every parameter under its own name; an
        architecture whose SAELens form differs (names, parametrisation) overrides this and
        `from_saelens` together.

        Example:
            >>> keys, weights = make_sae(SAEConfig(d_in=8, d_sae=16)).to_saelens()
            >>> keys, sorted(weights)
            ({}, ['W_dec', 'W_enc', 'b_dec', 'b_enc'])
        """
        return {}, {name: p.detach() for name, p in self.named_parameters()}

    @classmethod
    def from_saelens(
        cls, saelens_cfg: dict[str, Any], weights: dict[str, Tensor]
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The inverse of `to_saelens`: the knobs a SAELens ``cfg.json`` sets for this architecture,
        and ``weights`` under this class's parameter names (a `mechscope.errors.LoadError` names a
        bad value).

        Example:
            >>> from mechscope.sae.architectures.standard import StandardSAE
            >>> StandardSAE.from_saelens({"architecture": "standard"}, {"W_enc": torch.zeros(2, 3)})[0]
            {}
        """
        return {}, dict(weights)

    def head_attribution(self) -> Float[Tensor, "d_sae head"]:
        """For SAEs on ``attn.hook_z``: each feature's decoder norm in each head's ``d_head`` block.

        Normalise rows to get the fraction of a feature attributed to each head.

        Example:
            >>> sae = make_sae(SAEConfig(d_in=8, d_sae=6, hook_name="blocks.0.attn.hook_z", n_heads=2))
            >>> sae.head_attribution().shape
            torch.Size([6, 2])
        """
        if self.cfg.n_heads is None:
            raise ConfigError("head_attribution needs an SAE on hook_z with cfg.n_heads set")
        n_heads = self.cfg.n_heads
        # [d_sae, d_out] -> [d_sae, head, d_head]
        blocks = self.W_dec.reshape(self.cfg.d_sae, n_heads, self.cfg.d_out // n_heads)
        return blocks.norm(dim=-1)

    # ------------------------------------------------------------------ forward
    def flatten_input(self, x: Float[Tensor, "..."]) -> Float[Tensor, "*batch d_in"]:
        """``x`` as ``[*batch, d_in]`` in the SAE's dtype (the heads of a ``hook_z`` input concatenated).

        Example:
            >>> sae = make_sae(SAEConfig(d_in=8, d_sae=6, hook_name="blocks.0.attn.hook_z", n_heads=2))
            >>> sae.flatten_input(torch.randn(3, 5, 2, 4)).shape
            torch.Size([3, 5, 8])
        """
        cfg = self.cfg
        if (
            cfg.n_heads is not None
            and x.dim() >= 2
            and x.shape[-2] == cfg.n_heads
            and x.shape[-1] * cfg.n_heads == cfg.d_in
        ):
            # [..., head, d_head] -> [..., head * d_head]
            x = x.flatten(-2)
        if x.shape[-1] != cfg.d_in:
            raise InputError(f"SAE input has last dimension {x.shape[-1]}, expected d_in={cfg.d_in}")
        return x.to(self.dtype)

    def sae_input(self, x: Float[Tensor, "..."]) -> Float[Tensor, "*batch d_in"]:
        """The input the encoder sees: flattened, cast, and with ``b_dec`` subtracted when configured."""
        x = self.hook_sae_input(self.flatten_input(x))
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def encoder_pre(self, x: Float[Tensor, "..."]) -> Float[Tensor, "*batch d_sae"]:
        """The encoder's affine map ``sae_input(x) @ W_enc + b_enc`` (before the hook and nonlinearity).

        With ``b_dec`` subtracted from the input (and no hook on ``hook_sae_input`` to see it), this
        is computed as ``x @ W_enc + (b_enc - b_dec @ W_enc)``: the same value, but training's
        backward then needs no ``[batch, d_sae] x [d_sae, d_in]`` product for the input gradient
        (``x`` is data; ``b_dec`` gets its encoder-side gradient from a vector product).

        Example:
            >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16)); x = torch.randn(3, 8)
            >>> with torch.no_grad():
            ...     _ = sae.b_dec.normal_()
            >>> torch.allclose(sae.encoder_pre(x), (x - sae.b_dec) @ sae.W_enc + sae.b_enc, atol=1e-5)
            True
        """
        if self.cfg.apply_b_dec_to_input and not self.hook_sae_input.has_hooks():
            return self.flatten_input(x) @ self.W_enc + (self.b_enc - self.b_dec @ self.W_enc)
        return self.sae_input(x) @ self.W_enc + self.b_enc

    def encode_pre_and_acts(
        self, x: Float[Tensor, "*batch d_in"]
    ) -> tuple[Float[Tensor, "*batch d_sae"], Float[Tensor, "*batch d_sae"]]:
        """Pre-activations (the values a sparsity penalty or aux loss reads) and latent activations
        for a flattened input."""
        raise NotImplementedError(f"{type(self).__name__} must define encode_pre_and_acts")

    def encode(self, x: Float[Tensor, "..."]) -> Float[Tensor, "*batch d_sae"]:
        """Latent activations ``[..., d_sae]`` (inference behaviour).

        Example:
            >>> sae = make_sae(SAEConfig(d_in=8, d_sae=32, architecture="topk", k=3))
            >>> int((sae.encode(torch.randn(8)) != 0).sum()) <= 3
            True
        """
        return self.encode_pre_and_acts(self.flatten_input(x))[1]

    def decode(
        self, acts: Float[Tensor, "*batch d_sae"], x: Float[Tensor, "..."] | None = None
    ) -> Float[Tensor, "*batch d_out"]:
        """Reconstruction ``acts @ W_dec + b_dec`` (plus ``x @ W_skip.T`` with a skip connection)."""
        recons = acts @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise InputError("an SAE with a skip connection needs the input to decode: decode(acts, x)")
            recons = recons + self.flatten_input(x) @ self.W_skip.T
        return self.hook_sae_recons(recons)

    def forward(self, x: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
        """Reconstruct (or, for a transcoder, predict) ``x``; ``hook_z`` input keeps its head shape."""
        recons = self.decode(self.encode(x), x if self.W_skip is not None else None)
        if self.cfg.n_heads is not None and not self.cfg.is_transcoder and x.shape[-1] != self.cfg.d_in:
            recons = recons.reshape(x.shape)
        return recons.to(x.dtype)

    # ------------------------------------------------------------------ training
    def training_loss(
        self,
        x: Float[Tensor, "batch ..."],
        target: Float[Tensor, "batch d_out"] | None = None,
        *,
        coefficient_scale: float = 1.0,
        dead_mask: Bool[Tensor, " d_sae"] | None = None,
    ) -> TrainStepOutput:
        """Loss on a batch ``x [batch, d_in]`` (``target`` defaults to ``x``; transcoders pass the output hook).

        ``coefficient_scale`` multiplies the sparsity coefficient (warm-up); ``dead_mask [d_sae]``
        marks latents that the aux-K loss may use.
        """
        x = self.flatten_input(x)
        target = x if target is None else target.to(self.dtype)
        pre, acts = self.training_acts(x)
        recons = self.decode(acts, x if self.W_skip is not None else None)
        mse = (recons - target).pow(2).sum(-1).mean()
        losses = {"mse": mse}
        losses.update(self.sparsity_losses(x, target, pre, acts, recons, coefficient_scale, dead_mask))
        return TrainStepOutput(loss=sum(losses.values()), losses=losses, acts=acts, recons=recons)

    def training_acts(
        self, x: Float[Tensor, "batch d_in"]
    ) -> tuple[Float[Tensor, "batch d_sae"], Float[Tensor, "batch d_sae"]]:
        """Pre-activations and activations used in training (BatchTopK differs from inference)."""
        return self.encode_pre_and_acts(x)

    def sparsity_losses(
        self,
        x: Float[Tensor, "batch d_in"],
        target: Float[Tensor, "batch d_out"],
        pre: Float[Tensor, "batch d_sae"],
        acts: Float[Tensor, "batch d_sae"],
        recons: Float[Tensor, "batch d_out"],
        coefficient_scale: float,
        dead_mask: Bool[Tensor, " d_sae"] | None,
    ) -> dict[str, Tensor]:
        """The architecture's extra loss terms (penalties, auxiliary losses)."""
        return {}

    def extra_repr(self) -> str:
        """The architecture, sizes and hook shown in the module's ``repr``."""
        cfg = self.cfg
        return f"architecture={self.architecture!r}, d_in={cfg.d_in}, d_sae={cfg.d_sae}, hook_name={cfg.hook_name!r}"
