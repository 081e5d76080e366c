"""Reading and writing the SAE files people share.

* SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (v6 configs with ``metadata``, and
  the older flat configs) — `save_sae` writes this layout, `load_sae` reads it;
* EleutherAI sparsify folders: ``cfg.json`` + ``sae.safetensors`` (TopK, optional skip, transcoders);
* Gemma Scope ``params.npz`` (JumpReLU);
* dictionary_learning ``ae.pt`` (ReLU, TopK/BatchTopK, JumpReLU and gated autoencoders),
  read with ``torch.load(weights_only=True)``.

`load_sae` detects the format from the files present. Every error names the file and the problem.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechscope.errors import ConfigError, LoadError
from mechscope.names import act_name
from mechscope.sae.base import SAE, make_sae
from mechscope.sae.config import SAEConfig, config_keys, reads_hook_z
from mechscope.sae.registry import registered_architectures, sae_class

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"
_SAELENS_METADATA_KEYS = (
    "model_name", "hook_name", "hook_head_index", "prepend_bos", "context_size", "dataset_path",
    "model_class_name", "model_from_pretrained_kwargs", "exclude_special_tokens", "seqpos_slice", "neuronpedia_id",
    "hook_name_out",
)  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise LoadError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated headers/data
        raise LoadError(f"{path}: unreadable or truncated safetensors file ({exc})") from None


def _fill(sae: SAE, weights: dict[str, Tensor], source: Path) -> SAE:
    """Copy ``weights`` into ``sae``: every parameter present with its exact shape, no extras."""
    params = dict(sae.named_parameters())
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(weights) - set(params))
    if missing or extra:
        raise LoadError(
            f"{source}: weight names do not match a {sae.architecture} SAE (missing {missing}, unexpected {extra})"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = weights[name]
            if tuple(value.shape) != tuple(param.shape):
                raise LoadError(f"{source}: {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            if not torch.isfinite(value).all():
                raise LoadError(f"{source}: {name} contains NaN or infinite values")
            param.copy_(value.to(param.dtype))
    return sae.eval()


def _config(cfg_kwargs: dict[str, Any], source: Path) -> SAEConfig:
    try:
        return SAEConfig(**cfg_kwargs)
    except (ConfigError, TypeError) as exc:
        raise LoadError(f"{source}: invalid SAE configuration ({exc})") from None


def _from_saelens_layout(
    cfg_kwargs: dict[str, Any],
    weights: dict[str, Tensor],
    source: Path,
    saelens_cfg: dict[str, Any] | None = None,
    cfg_source: Path | None = None,
) -> SAE:
    """The SAE of ``cfg_kwargs`` holding ``weights`` (read from ``source``) given in the SAELens
    layout of its architecture (`SAE.from_saelens`); ``saelens_cfg``, a SAELens ``cfg.json`` read
    from ``cfg_source``, supplies the knobs ``cfg_kwargs`` leaves out."""
    cfg_source = cfg_source or source
    try:
        cls = sae_class(cfg_kwargs.get("architecture", "standard"))
    except ConfigError as exc:
        raise LoadError(f"{cfg_source}: {exc}") from None
    try:
        knobs, weights = cls.from_saelens(saelens_cfg or {}, weights)
    except LoadError as exc:
        raise LoadError(f"{source}: {exc}") from None
    sae = make_sae(_config({**knobs, **cfg_kwargs}, cfg_source))
    return _fill(sae, weights, source)


# ---------------------------------------------------------------------- SAELens
def save_sae(sae: SAE, path: str | os.PathLike) -> Path:
    """Save in the SAELens v6 layout: ``cfg.json`` + ``sae_weights.safetensors`` (atomically).

    The SAE is saved as `SAE.for_inference` (BatchTopK as the JumpReLU SAE it is at inference),
    with its architecture's keys and weights from `SAE.to_saelens`. The full mechscope config is
    kept under ``metadata.mechscope_config`` so `load_sae` restores it exactly.

    Example:
        >>> import tempfile
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=4, hook_name="blocks.0.hook_resid_post"))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     torch.equal(load_sae(save_sae(sae, d)).W_dec, sae.W_dec)
        True
    """
    from safetensors.torch import save_file

    sae = sae.for_inference()
    cfg = sae.cfg
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    metadata = {key: cfg.metadata[key] for key in _SAELENS_METADATA_KEYS if key in cfg.metadata}
    metadata.update(
        hook_name=cfg.hook_name, sae_lens_version=SAELENS_VERSION, sae_lens_training_version=SAELENS_VERSION
    )
    if cfg.is_transcoder:
        metadata["hook_name_out"] = cfg.hook_name_out
    metadata["mechscope_config"] = cfg.to_dict()
    out: dict[str, Any] = {
        "architecture": sae.saelens_architecture(),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if cfg.n_heads is not None else "none",
        "metadata": metadata,
    }
    if cfg.d_out != cfg.d_in or cfg.is_transcoder:
        out["d_out"] = cfg.d_out
    keys, weights = sae.to_saelens()
    out.update(keys)
    weights = {name: w.detach().contiguous().cpu() for name, w in weights.items()}
    for name, write in (
        (SAELENS_WEIGHTS, lambda p: save_file(weights, str(p))),
        (SAELENS_CFG, lambda p: p.write_text(json.dumps(out, indent=2))),
    ):
        tmp = path / (name + ".tmp")
        write(tmp)
        os.replace(tmp, path / name)
    return path


def saelens_architectures() -> dict[str, tuple[str, bool, bool]]:
    """Every SAELens ``architecture`` name a registered class reads: name -> ``(architecture,
    is_transcoder, skip_connection)``.

    Example:
        >>> saelens_architectures()["skip_transcoder"], saelens_architectures()["jumprelu"]
        (('standard', True, True), ('jumprelu', False, False))
    """
    table = {}
    for name in registered_architectures():
        cls = sae_class(name)
        names = cls.saelens_architectures if cls.saelens_architectures is not None else {name: (False, False)}
        for saelens_name, (transcoder, skip) in names.items():
            table[saelens_name] = (name, transcoder, skip)
    return table


def _flat_to_v6(cfg: dict[str, Any]) -> dict[str, Any]:
    """An older flat SAELens config as the v6 shape (``metadata`` split out, ``activation_fn_str`` read:
    an activation that names an architecture, e.g. ``topk``, is that architecture, with its kwargs)."""
    renames = {
        "hook_point": "hook_name",
        "hook_point_head_index": "hook_head_index",
        "activation_fn_str": "activation_fn",
    }
    cfg = {renames.get(k, k): v for k, v in cfg.items()}
    architecture = cfg.get("architecture", "standard")
    if cfg.get("activation_fn") in saelens_architectures():
        architecture = cfg["activation_fn"]
        cfg.update(cfg.get("activation_fn_kwargs") or {})
    normalize = cfg.get("normalize_activations")
    cfg["normalize_activations"] = (
        "none"
        if normalize in (None, False, "none")
        else ("expected_average_only_in" if normalize is True else normalize)
    )
    cfg["architecture"] = architecture
    cfg["metadata"] = {k: cfg[k] for k in (*_SAELENS_METADATA_KEYS, "hook_layer") if k in cfg}
    return cfg


def _saved_config(saved: dict[str, Any], source: Path) -> dict[str, Any]:
    """A ``metadata.mechscope_config`` without the keys of other architectures (files written
    before knobs were per architecture hold every knob)."""
    try:
        keys = set(config_keys(saved.get("architecture", "standard")))
    except ConfigError as exc:
        raise LoadError(f"{source}: {exc}") from None
    return {k: v for k, v in saved.items() if k in keys}


def load_saelens(path: str | os.PathLike, n_heads: int | None = None) -> SAE:
    """Load a SAELens folder (v6 or older flat ``cfg.json`` + ``sae_weights.safetensors``).

    ``n_heads`` is needed for ``hook_z`` SAEs whose config does not record it.

    Example:
        >>> sae = load_saelens("path/to/sae")  # doctest: +SKIP
    """
    path = Path(path)
    raw = _read_json(path / SAELENS_CFG)
    cfg = raw if "metadata" in raw else _flat_to_v6(raw)
    metadata = dict(cfg.get("metadata") or {})
    saved = metadata.pop("mechscope_config", None)
    weights = _read_safetensors(path / SAELENS_WEIGHTS)
    if saved is not None:
        saved = _saved_config(saved, path / SAELENS_CFG)
        return _from_saelens_layout(saved, weights, path / SAELENS_WEIGHTS, cfg, path / SAELENS_CFG)
    table = saelens_architectures()
    architecture = cfg.get("architecture", "standard")
    if architecture not in table:
        raise LoadError(
            f"{path / SAELENS_CFG}: SAELens architecture {architecture!r} is not supported; supported: {sorted(table)}"
        )
    arch, transcoder, skip = table[architecture]
    normalize = cfg.get("normalize_activations", "none")
    if normalize not in ("none", "expected_average_only_in"):
        raise LoadError(f"{path / SAELENS_CFG}: normalize_activations={normalize!r} is not supported; use 'none'")
    for key in ("d_in", "d_sae"):
        if key not in cfg:
            raise LoadError(f"{path / SAELENS_CFG}: missing required key {key!r}")
    hook_name = metadata.get("hook_name") or ""
    if cfg.get("hook_head_index") is not None or metadata.get("hook_head_index") is not None:
        raise LoadError(f"{path / SAELENS_CFG}: SAEs on a single head (hook_head_index) are not supported")
    if cfg.get("reshape_activations") == "hook_z" or reads_hook_z(hook_name):
        n_heads = n_heads or metadata.get("n_heads")
        if n_heads is None:
            raise LoadError(f"{path / SAELENS_CFG}: a hook_z SAE needs the head count: load_sae(path, n_heads=...)")
    else:
        n_heads = None
    if "finetuning_scaling_factor" in weights:
        weights["W_dec"] = weights["W_dec"] * weights.pop("finetuning_scaling_factor")[:, None]
    kwargs = dict(
        architecture=arch,
        d_in=cfg["d_in"],
        d_sae=cfg["d_sae"],
        d_out=cfg.get("d_out"),
        hook_name=hook_name,
        hook_name_out=metadata.get("hook_name_out") if transcoder else None,
        skip_connection=skip,
        n_heads=n_heads,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder,
        metadata={k: v for k, v in metadata.items() if k not in ("hook_name", "hook_name_out")},
    )
    if transcoder and not kwargs["hook_name_out"]:
        kwargs["hook_name_out"] = hook_name + ".out"
    return _from_saelens_layout(kwargs, weights, path / SAELENS_WEIGHTS, cfg, path / SAELENS_CFG)


# ---------------------------------------------------------------------- sparsify
def sparsify_hook_name(hookpoint: str) -> tuple[str, str | None]:
    """Map a sparsify hookpoint (a Hugging Face module name) to mechscope hook names ``(input, output)``.

    A sublayer's input is what the module reads: its pre-norm's output, weights applied
    (``ln2.hook_out``, not ``hook_normalized``, which comes before the weights).

    Example:
        >>> sparsify_hook_name("layers.6"), sparsify_hook_name("layers.3.mlp")
        (('blocks.6.hook_resid_post', None), ('blocks.3.ln2.hook_out', 'blocks.3.hook_mlp_out'))
    """
    parts = hookpoint.split(".")
    if parts[-1].isdigit():
        return act_name("resid_post", int(parts[-1])), None
    if len(parts) >= 2 and parts[-2].isdigit():
        layer, module = int(parts[-2]), parts[-1]
        if module == "mlp":
            return f"blocks.{layer}.ln2.hook_out", act_name("mlp_out", layer)
        if module in ("self_attn", "attn", "attention"):
            return f"blocks.{layer}.ln1.hook_out", act_name("attn_out", layer)
    return hookpoint, None


def load_sparsify(path: str | os.PathLike, hook_name: str | None = None) -> SAE:
    """Load one EleutherAI sparsify folder (``cfg.json`` + ``sae.safetensors``) as a TopK SAE/transcoder.

    The folder name is the hookpoint (``layers.6``); pass ``hook_name`` to override the mapping. As
    in sparsify, a plain SAE reads the module's output (``layers.3.mlp``: ``blocks.3.hook_mlp_out``)
    and a transcoder maps the module's input to its output.

    Example:
        >>> sae = load_sparsify("sae-smollm2/layers.6")  # doctest: +SKIP
    """
    path = Path(path)
    cfg = _read_json(path / "cfg.json")
    if cfg.get("activation", "topk") != "topk":
        raise LoadError(f"{path / 'cfg.json'}: sparsify activation {cfg['activation']!r} is not supported; only 'topk'")
    if "d_in" not in cfg or "k" not in cfg:
        raise LoadError(f"{path / 'cfg.json'}: missing 'd_in' or 'k'")
    weights = _read_safetensors(path / "sae.safetensors")
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32)))
    transcode = bool(cfg.get("transcode", False))
    if "encoder.weight" not in weights or "W_dec" not in weights:
        raise LoadError(f"{path / 'sae.safetensors'}: expected 'encoder.weight' and 'W_dec', found {sorted(weights)}")
    renamed = {
        "W_enc": weights.pop("encoder.weight").T.contiguous(),
        "b_enc": weights.pop("encoder.bias", torch.zeros(d_sae)),
        "W_dec": weights.pop("W_dec"),
        "b_dec": weights.pop("b_dec", torch.zeros(d_in)),
    }
    if "W_skip" in weights:
        renamed["W_skip"] = weights.pop("W_skip")
    renamed.update(weights)
    mapped_in, mapped_out = sparsify_hook_name(path.name)
    # sparsify trains a plain SAE on the module's output and a transcoder from its input to its output
    hook_in = hook_name or (mapped_in if transcode or mapped_out is None else mapped_out)
    hook_out = (mapped_out or hook_in + ".out") if transcode else None
    kwargs = dict(
        architecture="topk",
        d_in=d_in,
        d_sae=d_sae,
        d_out=renamed["W_dec"].shape[-1],
        k=int(cfg["k"]),
        hook_name=hook_in,
        hook_name_out=hook_out,
        skip_connection="W_skip" in renamed,
        apply_b_dec_to_input=not transcode,
        metadata={"sparsify_hookpoint": path.name},
    )
    return _from_saelens_layout(kwargs, renamed, path / "sae.safetensors", cfg_source=path / "cfg.json")


# ---------------------------------------------------------------------- Gemma Scope
def load_gemma_scope(path: str | os.PathLike, hook_name: str = "") -> SAE:
    """Load a Gemma Scope ``params.npz`` (JumpReLU: ``W_enc, b_enc, W_dec, b_dec, threshold``).

    Gemma Scope encodes ``x @ W_enc + b_enc`` without subtracting ``b_dec``.

    Example:
        >>> sae = load_gemma_scope("layer_12/width_16k/average_l0_82/params.npz",
        ...                        hook_name="blocks.12.hook_resid_post")  # doctest: +SKIP
    """
    import zipfile

    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: torch.from_numpy(np.array(data[key], dtype=np.float32)) for key in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise LoadError(f"{path}: unreadable or truncated .npz file ({exc})") from None
    expected = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    if set(arrays) != expected:
        raise LoadError(f"{path}: expected arrays {sorted(expected)}, found {sorted(arrays)}")
    d_in, d_sae = arrays["W_enc"].shape
    # the arrays are a SAELens JumpReLU SAE's weights
    kwargs = dict(architecture="jumprelu", d_in=d_in, d_sae=d_sae, hook_name=hook_name, apply_b_dec_to_input=False)
    return _from_saelens_layout(kwargs, arrays, path)


# ---------------------------------------------------------------------- dictionary_learning
def load_dictionary_learning(path: str | os.PathLike, hook_name: str = "") -> SAE:
    """Load a dictionary_learning ``ae.pt`` (``weights_only=True``): AutoEncoder (ReLU),
    AutoEncoderTopK / BatchTopKSAE, JumpReluAutoEncoder or GatedAutoEncoder, told apart by their keys.

    Example:
        >>> sae = load_dictionary_learning("trainer_0/ae.pt", hook_name="blocks.3.hook_resid_post")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LoadError(f"{path}: unreadable or truncated checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise LoadError(f"{path}: expected a state dict of tensors")
    keys = set(state)

    def build(arch: str, weights: dict[str, Tensor], **extra) -> SAE:
        """The ``arch`` SAE of ``weights``, renamed to that architecture's SAELens layout."""
        d_sae, d_in = weights["W_dec"].shape
        kwargs = dict(architecture=arch, d_in=d_in, d_sae=d_sae, hook_name=hook_name, **extra)
        return _from_saelens_layout(kwargs, weights, path)

    try:
        if keys == {"encoder.weight", "encoder.bias", "decoder.weight", "bias"}:
            return build(
                "standard",
                {
                    "W_enc": state["encoder.weight"].T,
                    "b_enc": state["encoder.bias"],
                    "W_dec": state["decoder.weight"].T,
                    "b_dec": state["bias"],
                },
            )
        if {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k"} <= keys:
            weights = {
                "W_enc": state["encoder.weight"].T,
                "b_enc": state["encoder.bias"],
                "W_dec": state["decoder.weight"].T,
                "b_dec": state["b_dec"],
            }
            threshold = state.get("threshold")
            if threshold is not None and float(threshold) > 0:
                # BatchTopK: inference keeps activations above the learned threshold
                weights["threshold"] = threshold.reshape(()).expand(weights["b_enc"].shape)
                return build("jumprelu", weights)
            return build("topk", weights, k=int(state["k"]))
        if keys == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}:
            return build("jumprelu", dict(state), apply_b_dec_to_input=False)
        if keys == {"encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias"}:
            return build(
                "gated",
                {
                    "W_enc": state["encoder.weight"].T,
                    "W_dec": state["decoder.weight"].T,
                    "b_dec": state["decoder_bias"],
                    "r_mag": state["r_mag"],
                    "b_gate": state["gate_bias"],
                    "b_mag": state["mag_bias"],
                },
            )
    except KeyError as exc:
        raise LoadError(f"{path}: missing tensor {exc}") from None
    raise LoadError(
        f"{path}: keys {sorted(keys)} match no dictionary_learning autoencoder (AutoEncoder, TopK, JumpReLU, Gated)"
    )


# ---------------------------------------------------------------------- dispatch
def load_sae(path: str | os.PathLike, **kwargs) -> SAE:
    """Load an SAE from any supported layout, detected from the files:
    ``sae_weights.safetensors`` (SAELens), ``sae.safetensors`` (sparsify), ``*.npz`` (Gemma Scope),
    ``*.pt`` (dictionary_learning). Keyword arguments go to the format's loader.

    Example:
        >>> sae = load_sae("checkpoints/my_sae")  # doctest: +SKIP
    """
    path = Path(path)
    loaders: list[tuple[Callable[[Path], bool], Callable[..., SAE], Callable[[Path], Path]]] = [
        (lambda p: p.suffix == ".npz", load_gemma_scope, lambda p: p),
        (lambda p: p.suffix == ".pt", load_dictionary_learning, lambda p: p),
        (lambda p: (p / "params.npz").is_file(), load_gemma_scope, lambda p: p / "params.npz"),
        (lambda p: (p / "ae.pt").is_file(), load_dictionary_learning, lambda p: p / "ae.pt"),
        (
            lambda p: (
                (p / SAELENS_WEIGHTS).is_file() or (p / SAELENS_CFG).is_file() and not (p / "sae.safetensors").is_file()
            ),
            load_saelens,
            lambda p: p,
        ),
        (lambda p: (p / "sae.safetensors").is_file(), load_sparsify, lambda p: p),
    ]
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory")
    for matches, loader, target in loaders:
        if matches(path):
            return loader(target(path), **kwargs)
    raise LoadError(
        f"{path}: no SAE files found; expected cfg.json + sae_weights.safetensors (SAELens), "
        "cfg.json + sae.safetensors (sparsify), params.npz (Gemma Scope) or ae.pt (dictionary_learning)"
    )


def sae_config_from_file(path: str | os.PathLike) -> SAEConfig:
    """The `SAEConfig` stored by `save_sae` in ``cfg.json`` (without loading weights)."""
    cfg = _read_json(Path(path) / SAELENS_CFG)
    saved = (cfg.get("metadata") or {}).get("mechscope_config")
    if saved is None:
        raise ConfigError(f"{Path(path) / SAELENS_CFG}: not written by mechscope (no metadata.mechscope_config)")
    return SAEConfig(**_saved_config(saved, Path(path) / SAELENS_CFG))
