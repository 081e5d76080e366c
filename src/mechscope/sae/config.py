"""`SAEConfig`: what an SAE is (architecture, sizes, hooks) plus its architecture's knobs.

The settings every SAE has are the fields of `SAEConfig`. Each architecture's own knobs (``k``
for TopK, the threshold settings of JumpReLU, sparsity coefficients, ...) are the fields of its
config class, a dataclass subclass of `SAEConfig` defined next to the architecture and
registered with it (`mechscope.sae.registry`). ``SAEConfig(architecture=..., ...)`` builds the
config class of the named architecture, as ``pathlib.Path(...)`` builds a ``PosixPath``, and
that class validates its knobs in ``__post_init__``.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mechscope.errors import ConfigError, HookNameError
from mechscope.names import parse_act_name
from mechscope.sae.registry import SAE_REGISTRY, sae_class


@dataclass
class SAEConfig:
    """Configuration of one sparse autoencoder (or transcoder).

    Every coefficient of the loss lives here, so a saved SAE says how it was trained.
    Constructing ``SAEConfig`` returns the config class of ``architecture``, whose extra fields
    are that architecture's knobs; a knob of another architecture is an error.

    Example:
        >>> cfg = SAEConfig(architecture="topk", d_in=32, d_sae=128, k=8, hook_name="blocks.1.hook_resid_post")
        >>> type(cfg).__name__, cfg.k, cfg.d_out, cfg.is_transcoder
        ('TopKConfig', 8, 32, False)
        >>> SAEConfig(d_in=32, d_sae=128, k=8)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        mechscope.errors.ConfigError: 'k' is not a setting of SAE architecture 'standard' (it is one of [...]); ...
    """

    d_in: int
    """Width of the input activation (for ``hook_z``: ``n_heads * d_head``, the heads concatenated)."""
    d_sae: int
    """Number of latents (dictionary size)."""
    architecture: str = "standard"
    """A registered architecture (`registered_architectures`); built in: ``standard`` (ReLU + Lp
    penalty), ``gated``, ``topk``, ``batchtopk`` and ``jumprelu``."""
    d_out: int | None = None
    """Width of the output; defaults to ``d_in``. Differs from ``d_in`` for transcoders."""
    hook_name: str = ""
    """Model hook the SAE reads (and, unless ``hook_name_out`` is set, reconstructs)."""
    hook_name_out: str | None = None
    """Transcoders: the hook whose activation the SAE predicts (e.g. ``blocks.6.hook_mlp_out``)."""
    n_heads: int | None = None
    """For SAEs on ``attn.hook_z``: the number of heads, so the input ``[..., head, d_head]`` is flattened."""
    skip_connection: bool = False
    """Add a learned linear skip ``W_skip [d_out, d_in]`` from input to output (skip transcoders)."""
    apply_b_dec_to_input: bool | None = None
    """Subtract ``b_dec`` from the input before encoding. Default: when ``d_out == d_in`` (``True``
    with ``d_out != d_in`` is an error: ``b_dec`` has the output's width)."""
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form information kept in saved files (model name, context size, dataset, ...)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> SAEConfig:
        if cls is SAEConfig:
            architecture = args[2] if len(args) > 2 else kwargs.get("architecture", "standard")
            cls = sae_class(architecture).config_class
        _check_keys(cls, kwargs)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        expected = sae_class(self.architecture).config_class
        if type(self) is not expected:
            raise ConfigError(
                f"{type(self).__name__} is not the config of architecture {self.architecture!r} "
                f"({expected.__name__} is); "
                f"build it as SAEConfig(architecture={self.architecture!r}, ...) or use cfg.with_architecture(...)"
            )
        for name in ("d_in", "d_sae"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.d_out is None:
            self.d_out = self.d_in
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = self.d_out == self.d_in
        elif self.apply_b_dec_to_input and self.d_out != self.d_in:
            raise ConfigError(
                f"apply_b_dec_to_input=True needs d_out == d_in, got d_out={self.d_out}, d_in={self.d_in} "
                "(b_dec has the output's width); pass apply_b_dec_to_input=False or leave it unset"
            )
        if self.n_heads is not None and self.d_in % self.n_heads:
            raise ConfigError(f"d_in={self.d_in} is not divisible by n_heads={self.n_heads}")
        if reads_hook_z(self.hook_name) and self.n_heads is None:
            raise ConfigError("an SAE on hook_z needs n_heads (the input is [..., head, d_head], flattened)")

    @property
    def is_transcoder(self) -> bool:
        """Whether the output is another hook than the input."""
        return self.hook_name_out is not None and self.hook_name_out != self.hook_name

    @property
    def output_hook(self) -> str:
        """The hook the reconstruction replaces when spliced."""
        return self.hook_name_out or self.hook_name

    def with_architecture(self, architecture: str, **knobs: Any) -> SAEConfig:
        """The same SAE settings (sizes, hooks, metadata) for another architecture, with its
        default knobs unless given.

        Example:
            >>> cfg = SAEConfig(d_in=8, d_sae=16, architecture="batchtopk", k=2, hook_name="blocks.0.hook_resid_post")
            >>> jump = cfg.with_architecture("jumprelu")
            >>> jump.architecture, jump.hook_name, hasattr(jump, "k")
            ('jumprelu', 'blocks.0.hook_resid_post', False)
        """
        shared = {f.name: getattr(self, f.name) for f in fields(SAEConfig)}
        return SAEConfig(**{**shared, "metadata": dict(self.metadata), "architecture": architecture, **knobs})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dictionary.

        Example:
            >>> SAEConfig(d_in=4, d_sae=8).to_dict()["architecture"]
            'standard'
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Build from a dictionary, rejecting unknown keys with the nearest valid one.

        Example:
            >>> SAEConfig.from_dict({"d_in": 4, "d_sae": 8, "architecture": "topk", "k": 2}).k
            2
        """
        return cls(**data)


def config_keys(architecture: str) -> tuple[str, ...]:
    """Every setting of an architecture's config: the shared fields, then its knobs.

    Example:
        >>> config_keys("topk")[-3:]
        ('k', 'aux_k', 'aux_k_coefficient')
    """
    return tuple(f.name for f in fields(sae_class(architecture).config_class))


def reads_hook_z(hook_name: str) -> bool:
    """Whether ``hook_name`` is an attention ``hook_z`` (whose input is ``[..., head, d_head]``).

    Example:
        >>> reads_hook_z("blocks.0.attn.hook_z"), reads_hook_z("blocks.0.hook_resid_pre"), reads_hook_z("x")
        (True, False, False)
    """
    try:
        return parse_act_name(hook_name).kind == "z"
    except HookNameError:
        return False


def _check_keys(cls: type, keys: Any) -> None:
    """Reject a key ``cls`` has no field for, naming its owner architectures or the nearest field."""
    valid = [f.name for f in fields(cls)]
    for key in keys:
        if key in valid:
            continue
        owners = sorted(name for name, sae in SAE_REGISTRY.items() if key in {f.name for f in fields(sae.config_class)})
        own = next((name for name, sae in SAE_REGISTRY.items() if sae.config_class is cls), cls.__name__)
        if owners:
            raise ConfigError(
                f"{key!r} is not a setting of SAE architecture {own!r} (it is one of {owners}); "
                f"the settings of {own!r} are {valid}"
            )
        near = difflib.get_close_matches(str(key), valid, n=1)
        raise ConfigError(f"unknown SAE config key {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
