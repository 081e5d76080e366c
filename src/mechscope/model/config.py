"""`ModelConfig`: every architectural choice of a hooked transformer, as data.

Family adapters (``mechscope.loading.families``) translate a Hugging Face config into
this class; the shared components read only these fields, never a family name.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from mechscope.errors import ConfigError

NormType = Literal["LN", "LNPre", "RMS", "RMSPre"]
PositionalType = Literal["standard", "rotary", "none"]
ActFn = Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu"]
LayerType = Literal["full_attention", "sliding_attention"]
QKNorm = Literal["head", "full"]

_ACT_FNS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu")
_ROPE_TYPES = ("default", "linear", "llama3")
NORM_TYPES = ("LN", "LNPre", "RMS", "RMSPre", None)
POSITIONAL_TYPES = ("standard", "rotary", "none")
CONFIG_VERSION = 2
"""Written by `ModelConfig.to_dict` as ``config_version``. Version 1 (dicts without the key) spelt
``normalization_type`` ``"layernorm"``/``"rmsnorm"`` and ``positional_embedding_type``
``"learned"``, and stored ``attn_scale`` as the factor on the scores; `ModelConfig.from_dict`
reads both."""
_LEGACY_VALUES = {
    "normalization_type": {"layernorm": "LN", "rmsnorm": "RMS"},
    "positional_embedding_type": {"learned": "standard"},
}
"""Version-1 spellings -> TransformerLens' values."""


@dataclass
class ModelConfig:
    """Architecture of a `HookedTransformer`.

    Example:
        >>> cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, d_mlp=128, d_vocab=100, n_ctx=32)
        >>> cfg.d_head, cfg.n_key_value_heads
        (16, 4)
    """

    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Number of attention (query) heads per layer."""
    d_mlp: int
    """Hidden width of each MLP."""
    d_vocab: int
    """Vocabulary size (rows of the embedding, columns of the unembedding)."""
    n_ctx: int
    """Maximum context length (size of learned position tables; informative for rotary models)."""
    d_head: int | None = None
    """Width of one attention head; ``None`` means ``d_model // n_heads``."""
    n_key_value_heads: int | None = None
    """Key/value heads per layer (grouped-query attention); ``None`` means ``n_heads``.
    ``1`` is multi-query attention. Must divide ``n_heads``."""
    act_fn: ActFn = "gelu_new"
    """MLP non-linearity: ``gelu`` (exact erf), ``gelu_new``/``gelu_pytorch_tanh`` (tanh
    approximation), ``quick_gelu`` (``x * sigmoid(1.702 x)``, CLIP), ``relu`` or ``silu``."""
    gated_mlp: bool = False
    """If true the MLP is ``W_out(act(W_gate x) * W_in x)`` (SwiGLU/GeGLU); otherwise ``W_out(act(W_in x))``."""
    normalization_type: NormType | None = "LN"
    """The pre-norms (``ln1``, ``ln2``, ``ln_final``), with TransformerLens' values: ``"LN"``
    (LayerNorm: centre, scale, weight and bias), ``"RMS"`` (RMSNorm: scale and weight), their
    weightless forms ``"LNPre"``/``"RMSPre"`` (what ``fold_ln`` leaves after folding the weights
    into the readers) or ``None`` (no norms). Post-norms, QK-norms and ``ln_pre`` always carry weights."""
    norm_eps: float = 1e-5
    """Epsilon added to the variance inside every norm."""
    positional_embedding_type: PositionalType = "standard"
    """TransformerLens' values: ``"standard"`` (a learned position table ``W_pos`` added to the
    embedding) or ``"rotary"`` (RoPE on queries and keys); mechscope adds ``"none"`` (no position
    information in the transformer: vision towers, whose patch embedding holds the table, and toys)."""
    rotary_dim: int | None = None
    """Number of dimensions of each head that rotate; ``None`` means all of ``d_head``. Checked
    (even, at most ``d_head``) only for rotary models; others may have any head width."""
    rotary_base: float = 10000.0
    """RoPE base frequency (``rope_theta``)."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE frequency scaling: ``{"rope_type": "linear", "factor": f}`` or ``{"rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}``;
    ``None`` for none."""
    attn_scale: float | None = None
    """Attention scores are ``q . k / attn_scale`` (TransformerLens' divisor); ``None`` means
    ``sqrt(d_head)``, filled in on construction. `attn_score_factor` is its reciprocal."""
    attn_qkv_bias: bool = False
    """Whether the query, key and value projections have biases."""
    attn_out_bias: bool = False
    """Whether the attention output projection has a bias."""
    mlp_bias: bool = False
    """Whether the MLP projections have biases."""
    unembed_bias: bool = False
    """Whether the unembedding has a bias."""
    tie_word_embeddings: bool = False
    """If true the unembedding is the transposed embedding (one shared tensor)."""
    sliding_window: int | None = None
    """If set, each query attends only to the last ``sliding_window`` positions (itself included)."""
    layer_types: list[LayerType] | None = None
    """Per layer, ``"full_attention"`` or ``"sliding_attention"`` (only the latter use
    ``sliding_window``); ``None`` means every layer uses ``sliding_window`` when it is set."""
    rotary_base_local: float | None = None
    """RoPE base of the ``"sliding_attention"`` layers (Gemma 3), which then use no
    ``rope_scaling``; ``None`` means every layer uses ``rotary_base``."""
    rotary_interleaved: bool = False
    """RoPE pairs dimensions ``(2i, 2i + 1)`` (GPT-J) instead of ``(i, i + rotary_dim / 2)``."""
    qk_norm: QKNorm | None = None
    """RMSNorm on queries and keys before RoPE: ``"head"`` normalises each head over ``d_head``
    (Qwen3, Gemma 3), ``"full"`` normalises all heads together (OLMo-2); ``None`` for none."""
    pre_norm: bool = True
    """Normalise each sublayer's input (``ln1``, ``ln2``)."""
    post_norm: bool = False
    """Normalise each sublayer's output before it joins the residual stream (``ln1_post``,
    ``ln2_post``; Gemma 2/3 use both pre- and post-norms, OLMo-2 only post-norms)."""
    embed_scale: float | None = None
    """Token embeddings are multiplied by this, rounded to the model dtype (Gemma: ``sqrt(d_model)``)."""
    attn_scores_soft_cap: float | None = None
    """If set, attention scores become ``cap * tanh(scores / cap)`` before masking (Gemma 2)."""
    output_logits_soft_cap: float | None = None
    """If set, logits become ``cap * tanh(logits / cap)`` (Gemma 2)."""
    attn_only: bool = False
    """If true blocks have attention but no MLP (and no ``ln2``, ``hook_resid_mid`` or MLP hooks)."""
    parallel_attn_mlp: bool = False
    """If true attention and MLP both read ``resid_pre`` and their outputs are added together
    (GPT-J / GPT-NeoX); there is then no ``hook_resid_mid``."""
    causal: bool = True
    """Each query attends only to itself and earlier positions (decoders, CLIP's text tower);
    ``False`` is bidirectional attention (vision towers, SigLIP's text tower), where padding keys
    are still masked. Bidirectional models have no sliding window and no key/value cache."""
    d_unembed: int | None = None
    """Rows of the unembedding (width of the logits) when they differ from ``d_vocab``: an
    encoder's projection into a shared embedding space (CLIP's ``projection_dim``); ``None``
    means ``d_vocab``."""
    image_size: int | None = None
    """Side of the square input image in pixels; set (with ``patch_size``) for vision models,
    whose input is ``[batch, n_channels, image_size, image_size]`` pixels instead of tokens."""
    patch_size: int | None = None
    """Side of one square image patch in pixels; position ``n_prefix_tokens + row * (image_size //
    patch_size) + col`` is the patch at grid ``(row, col)``."""
    n_channels: int = 3
    """Colour channels of the input image."""
    class_token: bool = False
    """Prepend a learned class embedding at position 0 (ViT's ``[CLS]``, CLIP's class embedding)."""
    patch_bias: bool = False
    """Whether the patch embedding (a linear map of each patch's pixels) has a bias."""
    embed_norm: bool = False
    """Normalise the summed patch and position embeddings before the first block (CLIP's
    pre-LayerNorm, ``ln_pre``); ``hook_embed`` then sees the normalised sum."""
    attention_pool: bool = False
    """The model has a multi-head attention-pooling head (SigLIP's ``head``: a learned probe
    attending over the final normalised residual stream), run by ``model.pool_head``."""
    default_prepend_bos: bool = True
    """Whether ``to_tokens`` prepends the BOS token unless told otherwise (see the README's
    table of tokenizer conventions)."""
    model_name: str = "custom"
    """A display name (the hub id, file name or bundled name the model came from)."""
    family: str = "custom"
    """The adapter that produced this config (informative only; components never read it)."""
    attn_implementation: Literal["auto", "eager"] = "auto"
    """``auto`` runs ``scaled_dot_product_attention`` unless a hook needs the attention scores or
    pattern; ``eager`` always runs the explicit path. Both compute the same function."""
    use_attn_result: bool = False
    """Always run the opt-in ``attn.hook_result`` (per-head outputs). Attaching a hook to it
    enables it too."""
    use_split_qkv_input: bool = False
    """Always run the opt-in ``hook_q_input``/``hook_k_input``/``hook_v_input``."""
    use_attn_in: bool = False
    """Always run the opt-in ``hook_attn_in``."""
    use_hook_mlp_in: bool = False
    """Always run the opt-in ``hook_mlp_in``."""
    device: str | None = None
    """The device the weights are on, as TransformerLens' ``cfg.device`` (informative: the model
    never reads it; ``None`` when no loader set it)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Source metadata that does not change the computation (e.g. the HF ``model_type``)."""

    def __post_init__(self) -> None:
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set d_head explicitly"
                )
            self.d_head = self.d_model // self.n_heads
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.n_heads % self.n_key_value_heads:
            raise ConfigError(f"n_key_value_heads={self.n_key_value_heads} must divide n_heads={self.n_heads}")
        for name in ("d_model", "n_layers", "n_heads", "d_mlp", "d_vocab", "n_ctx", "d_head"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.act_fn not in _ACT_FNS:
            raise ConfigError(f"unknown act_fn {self.act_fn!r}; choose one of {_ACT_FNS}")
        for name, valid in (("normalization_type", NORM_TYPES), ("positional_embedding_type", POSITIONAL_TYPES)):
            value = getattr(self, name)
            if value not in valid:
                legacy = _LEGACY_VALUES[name].get(value)
                hint = f" ({value!r} is the old spelling of {legacy!r})" if legacy else ""
                raise ConfigError(f"unknown {name} {value!r}{hint}; choose one of {list(valid)}")
        if self.attn_scale is None:
            self.attn_scale = math.sqrt(self.d_head)
        if not self.attn_scale > 0:
            raise ConfigError(f"attn_scale must be positive (the divisor of q . k), got {self.attn_scale}")
        if self.rotary_dim is None:
            self.rotary_dim = self.d_head
        if self.positional_embedding_type == "rotary" and (
            self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.d_head
        ):
            raise ConfigError(
                f"rotary_dim={self.rotary_dim} must be even and in (0, d_head={self.d_head}] for rotary embeddings"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in _ROPE_TYPES:
                raise ConfigError(f"unsupported rope_scaling type {rope_type!r}; supported: {_ROPE_TYPES}")
        if self.attn_implementation not in ("auto", "eager"):
            raise ConfigError(f"attn_implementation must be 'auto' or 'eager', got {self.attn_implementation!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if len(self.layer_types) != self.n_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}")
            bad = sorted({t for t in self.layer_types if t not in ("full_attention", "sliding_attention")})
            if bad:
                raise ConfigError(f"unknown layer_types {bad}; choose 'full_attention' or 'sliding_attention'")
        if self.qk_norm not in (None, "head", "full"):
            raise ConfigError(f"qk_norm must be 'head', 'full' or None, got {self.qk_norm!r}")
        if (self.qk_norm or self.post_norm) and self.normalization_type is None:
            raise ConfigError("qk_norm and post_norm need a normalization_type ('RMS' or 'LN')")
        if not self.causal and self.sliding_window is not None:
            raise ConfigError("a sliding window needs causal attention; set causal=True or sliding_window=None")
        if (self.image_size is None) != (self.patch_size is None):
            raise ConfigError("vision models set both image_size and patch_size; text models set neither")
        if self.image_size is not None and (self.patch_size <= 0 or self.image_size % self.patch_size):
            raise ConfigError(f"patch_size={self.patch_size} must be positive and divide image_size={self.image_size}")
        if self.image_size is not None and self.positional_embedding_type != "none":
            raise ConfigError(
                "vision models keep their position table in the patch embedding: set positional_embedding_type='none'"
            )
        if self.image_size is not None and self.n_ctx != self.n_prefix_tokens + self.n_patches:
            raise ConfigError(
                f"n_ctx={self.n_ctx} must be the {self.n_patches} patches plus {self.n_prefix_tokens} class token(s)"
            )
        for name in ("attn_scores_soft_cap", "output_logits_soft_cap", "embed_scale"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive or None, got {value}")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (``None``: full causal attention)."""
        if self.layer_types is not None and self.layer_types[layer] == "full_attention":
            return None
        return self.sliding_window

    def layer_rope(self, layer: int) -> tuple[float, dict[str, Any] | None]:
        """``(base, scaling)`` of the RoPE of ``layer``."""
        local = self.layer_types is not None and self.layer_types[layer] == "sliding_attention"
        if local and self.rotary_base_local is not None:
            return self.rotary_base_local, None
        return self.rotary_base, self.rope_scaling

    @property
    def attn_score_factor(self) -> float:
        """The factor on ``q . k``: ``1 / attn_scale``. When ``attn_scale`` is the square root of an
        integer ``n`` (``d_head``, Gemma's ``query_pre_attn_scalar``) it is ``n ** -0.5``, the float
        ``transformers`` multiplies by.

        Example:
            >>> cfg = ModelConfig(d_model=64, n_layers=1, n_heads=4, d_mlp=8, d_vocab=8, n_ctx=4)
            >>> cfg.attn_scale, cfg.attn_score_factor
            (4.0, 0.25)
        """
        return _reciprocal_of_root(self.attn_scale)

    @property
    def d_vocab_out(self) -> int:
        """Width of the logits (TransformerLens' name): ``d_unembed``, else ``d_vocab``."""
        return self.d_vocab if self.d_unembed is None else self.d_unembed

    @property
    def n_patches(self) -> int:
        """Image patches per input of a vision model (``0`` for text models).

        Example:
            >>> ModelConfig(d_model=8, n_layers=1, n_heads=2, d_mlp=8, d_vocab=8, n_ctx=17, image_size=32,
            ...             patch_size=8, class_token=True, positional_embedding_type="none").n_patches
            16
        """
        return 0 if self.image_size is None else (self.image_size // self.patch_size) ** 2

    @property
    def n_prefix_tokens(self) -> int:
        """Positions before the first image patch (the class token, when there is one)."""
        return int(self.class_token)

    @property
    def n_params(self) -> int:
        """TransformerLens' ``cfg.n_params``: the attention and MLP weight matrices only (no
        embeddings, biases or norms), as counted in scaling-law papers.

        Example:
            >>> ModelConfig(d_model=8, n_layers=2, n_heads=2, d_mlp=16, d_vocab=5, n_ctx=4).n_params
            1024
        """
        attn = self.d_model * self.d_head * self.n_heads * 4
        mlp = 0 if self.attn_only else self.d_model * self.d_mlp * (2 + self.gated_mlp)
        return self.n_layers * (attn + mlp)

    @property
    def n_kv_groups(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.n_heads // self.n_key_value_heads

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict with ``config_version`` (`CONFIG_VERSION`); `ModelConfig.from_dict` inverts it."""
        return {**dataclasses.asdict(self), "config_version": CONFIG_VERSION}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build a config from `to_dict` output, rejecting unknown fields by name.

        A dict without ``config_version`` was written by version 1: its ``"layernorm"``,
        ``"rmsnorm"`` and ``"learned"`` become ``"LN"``, ``"RMS"`` and ``"standard"``, and its
        ``attn_scale`` (then the factor on the scores) becomes the divisor, so the model computes
        what it computed when it was saved.

        Example:
            >>> old = {"d_model": 64, "n_layers": 1, "n_heads": 4, "d_mlp": 8, "d_vocab": 8, "n_ctx": 4,
            ...        "normalization_type": "rmsnorm", "positional_embedding_type": "learned", "attn_scale": 0.5}
            >>> cfg = ModelConfig.from_dict(old)
            >>> cfg.normalization_type, cfg.positional_embedding_type, cfg.attn_scale
            ('RMS', 'standard', 2.0)
        """
        data = dict(data)
        version = data.pop("config_version", 1)
        if version not in (1, CONFIG_VERSION):
            raise ConfigError(
                f"config_version {version!r} is not one this mechscope reads (1 or {CONFIG_VERSION}); "
                "upgrade mechscope or rebuild the file"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        if version == 1:
            for name, spellings in _LEGACY_VALUES.items():
                if name in data:
                    data[name] = spellings.get(data[name], data[name])
            if data.get("attn_scale") is not None:
                data["attn_scale"] = _reciprocal_of_root(data["attn_scale"])
        return cls(**data)

    def to_json(self) -> str:
        """`to_dict` as indented JSON text with sorted keys (what the model cache stores).

        Example:
            >>> cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, d_mlp=64, d_vocab=50, n_ctx=16)
            >>> ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
            True
        """
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _reciprocal_of_root(x: float) -> float:
    """``1 / x``; ``n ** -0.5`` (or ``sqrt(n)``) exactly when ``x`` is ``sqrt(n)`` (or ``n ** -0.5``)
    for an integer ``n``, so that a scale and its reciprocal round as ``transformers`` writes them."""
    n = round(x * x)
    if n > 0 and math.sqrt(n) == x:
        return n**-0.5
    n = round(1 / (x * x))
    if n > 0 and n**-0.5 == x:
        return math.sqrt(n)
    return 1.0 / x
