"""What the worker and the tests share: the model-loading context handed to the cases, and the
exchange of results through a safetensors file (tensors) and a JSON file (everything else).

Imports only the standard library, torch, safetensors and transformers (present in both environments).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class Context:
    """Loads each tiny checkpoint once through ``lib`` and the same Hugging Face objects on both sides."""

    def __init__(self, lib, checkpoints: dict[str, str]) -> None:
        self.lib = lib
        self.checkpoints = checkpoints
        self.loaded: dict = {}

    def tokenizer(self, name: str = "gpt2"):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.checkpoints[name])

    def model(self, name: str, processed: bool = False):
        key = (name, processed)
        if key not in self.loaded:
            from transformers import AutoModelForCausalLM

            path = self.checkpoints[name]
            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            load = self.lib.HookedTransformer.from_pretrained
            if not processed:
                load = self.lib.HookedTransformer.from_pretrained_no_processing
            self.loaded[key] = load(path, hf_model=hf_model, tokenizer=self.tokenizer(name), device="cpu")
        return self.loaded[key]

    @staticmethod
    def raises(fn) -> str:
        try:
            fn()
        except Exception:
            return "raised"
        return "no error"


def _plain(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return repr(value)


def save_results(results: dict[str, dict], folder: Path) -> None:
    tensors, plain = {}, {}
    for case_id, values in results.items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                tensors[f"{case_id}/{key}"] = value.detach().float().cpu().clone(memory_format=torch.contiguous_format)
            else:
                plain[f"{case_id}/{key}"] = _plain(value)
    save_file(tensors, str(folder / "results.safetensors"))
    (folder / "results.json").write_text(json.dumps(plain, indent=1))


def load_results(folder: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key, value in {
        **json.loads((folder / "results.json").read_text()),
        **load_file(str(folder / "results.safetensors")),
    }.items():
        case_id, name = key.split("/", 1)
        out.setdefault(case_id, {})[name] = value
    return out
