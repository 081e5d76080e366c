"""Tokenisation with an explicit BOS convention.

Strings are encoded without the tokenizer's own special tokens; the BOS token is then
prepended when ``prepend_bos`` is true (default: the model's ``cfg.default_prepend_bos``), so
the same call behaves the same for every tokenizer.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from mechscope.errors import InputError

PaddingSide = Literal["left", "right"]


class Tokenizer:
    """Wraps a Hugging Face tokenizer with mechscope's BOS and padding rules.

    Example:
        >>> tok = Tokenizer(hf_tokenizer, default_prepend_bos=False)  # doctest: +SKIP
        >>> tokens, mask = tok.encode(["Hello world", "Hi"], padding_side="left")  # doctest: +SKIP
    """

    def __init__(self, hf_tokenizer: Any, default_prepend_bos: bool) -> None:
        self.hf = hf_tokenizer
        self.default_prepend_bos = default_prepend_bos

    @property
    def bos_token_id(self) -> int | None:
        tok = self.hf
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def pad_token_id(self) -> int:
        tok = self.hf
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
            if candidate is not None:
                return candidate
        return 0

    def encode(
        self,
        text: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: PaddingSide = "right",
        max_length: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Token ids ``[batch, pos]`` and the attention mask (``None`` when nothing is padded)."""
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, (list, tuple)) or not text or not all(isinstance(t, str) for t in text):
            raise InputError("expected a string or a non-empty list of strings")
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        prepend_bos = self.default_prepend_bos if prepend_bos is None else prepend_bos
        ids = self.hf(list(text), add_special_tokens=False)["input_ids"]
        if prepend_bos:
            bos = self.bos_token_id
            if bos is None:
                raise InputError("this tokenizer has no BOS or EOS token; call with prepend_bos=False")
            ids = [[bos, *row] for row in ids]
        if max_length is not None:
            ids = [row[:max_length] for row in ids]
        if any(len(row) == 0 for row in ids):
            raise InputError("an input string encodes to zero tokens; pass non-empty text or prepend_bos=True")
        width = max(len(row) for row in ids)
        tokens = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.bool)
        for i, row in enumerate(ids):
            span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            tokens[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = True
        return tokens, (None if bool(mask.all()) else mask)

    def decode_each(self, tokens: Tensor) -> list[str]:
        """One string per token id of a 1-D tensor."""
        return self.hf.batch_decode(tokens.reshape(-1, 1).tolist(), clean_up_tokenization_spaces=False)

    def decode(self, tokens: Tensor) -> str:
        return self.hf.decode(tokens.tolist(), clean_up_tokenization_spaces=False)


def tokenizer_adds_bos(hf_tokenizer: Any) -> bool:
    """Whether ``hf_tokenizer`` itself prepends BOS (the convention its model was trained with)."""
    bos = hf_tokenizer.bos_token_id
    if bos is None:
        return False
    ids = hf_tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos
