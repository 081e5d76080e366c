"""`SAEConfig`: what an SAE is (architecture, sizes, hooks, sparsity coefficients)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from mechscope.errors import ConfigError

Architecture = Literal["standard", "gated", "topk", "batchtopk", "jumprelu"]
ARCHITECTURES = ("standard", "gated", "topk", "batchtopk", "jumprelu")


@dataclass
class SAEConfig:
    """Configuration of one sparse autoencoder (or transcoder).

    Every coefficient of the loss lives here, so a saved SAE says how it was trained.

    Example:
        >>> cfg = SAEConfig(architecture="topk", d_in=32, d_sae=128, k=8, hook_name="blocks.1.hook_resid_post")
        >>> cfg.d_out, cfg.is_transcoder
        (32, False)
    """

    d_in: int
    """Width of the input activation (for ``hook_z``: ``n_heads * d_head``, the heads concatenated)."""
    d_sae: int
    """Number of latents (dictionary size)."""
    architecture: Architecture = "standard"
    """Activation and loss: ``standard`` (ReLU + Lp penalty), ``gated``, ``topk``, ``batchtopk`` or ``jumprelu``."""
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
    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` from the input before encoding (only when ``d_out == d_in``)."""
    k: int = 32
    """TopK / BatchTopK: active latents per token (BatchTopK: on average over the batch)."""
    sparsity_coefficient: float = 1.0
    """Weight of the sparsity penalty: L1/Lp for ``standard`` and ``gated``, L0 for ``jumprelu``."""
    lp_norm: float = 1.0
    """Exponent of the ``standard`` penalty ``sum |f_i|^p * ||d_i||``: 1 is L1, 0.5 the sqrt variant."""
    jumprelu_bandwidth: float = 0.001
    """Width of the rectangle kernel of the straight-through threshold gradient."""
    jumprelu_init_threshold: float = 0.001
    """Initial JumpReLU threshold."""
    aux_k: int | None = None
    """TopK / BatchTopK aux-K loss: latents used to model the residual from dead latents (default ``d_in // 2``)."""
    aux_k_coefficient: float = 1 / 32
    """Weight of the aux-K loss (0 disables it)."""
    topk_threshold_lr: float = 0.01
    """BatchTopK: rate of the moving average that learns the inference threshold."""
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form information kept in saved files (model name, context size, dataset, ...)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            import difflib

            near = difflib.get_close_matches(str(self.architecture), ARCHITECTURES, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown SAE architecture {self.architecture!r}; choose one of {ARCHITECTURES}{hint}")
        for name in ("d_in", "d_sae"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.d_out is None:
            self.d_out = self.d_in
        if self.d_out != self.d_in and self.apply_b_dec_to_input:
            self.apply_b_dec_to_input = False
        if self.architecture in ("topk", "batchtopk") and not 0 < self.k <= self.d_sae:
            raise ConfigError(f"k must lie in [1, d_sae={self.d_sae}], got {self.k}")
        if self.lp_norm <= 0:
            raise ConfigError(f"lp_norm must be positive (1 for L1, 0.5 for sqrt), got {self.lp_norm}")
        if self.n_heads is not None and self.d_in % self.n_heads:
            raise ConfigError(f"d_in={self.d_in} is not divisible by n_heads={self.n_heads}")
        if self.hook_name.endswith("hook_z") and self.n_heads is None:
            raise ConfigError("an SAE on hook_z needs n_heads (the input is [..., head, d_head], flattened)")
        if self.aux_k is None:
            self.aux_k = max(1, min(self.d_sae, self.d_in // 2))

    @property
    def is_transcoder(self) -> bool:
        """Whether the output is another hook than the input."""
        return self.hook_name_out is not None and self.hook_name_out != self.hook_name

    @property
    def output_hook(self) -> str:
        """The hook the reconstruction replaces when spliced."""
        return self.hook_name_out or self.hook_name

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
        valid = {f.name for f in fields(cls)}
        for key in data:
            if key not in valid:
                import difflib

                near = difflib.get_close_matches(key, valid, n=1)
                raise ConfigError(f"unknown SAE config key {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
        return cls(**data)
