"""Labelled token datasets for probing, built offline from the default corpus.

Each dataset is a batch of equal-length token windows with a label and a selection mask per
token (`TokenDataset`):

- ``prose_vs_code``: windows from Shakespeare (label 0) or from the Django documentation
  (label 1) -- the part a text comes from (`mechscope.data.corpus`); every position is labelled.
- ``code_block``: windows of the Django documentation; label 1 where the token lies inside a
  literal code block of the reStructuredText (the indented lines after a paragraph ending in
  ``::`` or after a ``.. code-block::`` directive), 0 elsewhere.
- ``capitalized``: windows of both parts; only tokens that start a word (a letter after a space
  or a line start) are selected, labelled 1 when that letter is upper case.

Labels come from character offsets of a fast tokenizer (``return_offsets_mapping``), so they
do not depend on how the tokenizer splits words.

`load_dataset_file` reads a researcher's own labelled texts (JSON lines, one text per line,
labelled as a whole or by character spans) into the same `TokenDataset`.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechscope.data.corpus import DJANGO_DOCS, SHAKESPEARE, corpus_documents, split_sections
from mechscope.errors import InputError

DATASETS = ("prose_vs_code", "code_block", "capitalized")


@dataclass
class TokenDataset:
    """Token windows with per-token labels and the positions that carry one."""

    name: str
    tokens: Int[Tensor, "batch pos"]
    labels: Int[Tensor, "batch pos"]
    selected: Bool[Tensor, "batch pos"]
    """Positions that are probed (labelled)."""
    description: str


def code_block_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of reStructuredText literal blocks (after ``::`` or a code directive).

    Example:
        >>> text = "Run this::\\n\\n    $ python manage.py\\n\\nDone."
        >>> [text[a:b] for a, b in code_block_spans(text)]
        ['    $ python manage.py\\n\\n']
    """
    spans, pos, lines = [], 0, text.splitlines(keepends=True)
    opener_indent, block_start, in_block = None, None, False
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if in_block and stripped and indent <= opener_indent:
            spans.append((block_start, pos))
            in_block, opener_indent = False, None
        if not in_block and opener_indent is not None and stripped:
            if indent > opener_indent:
                in_block, block_start = True, pos
            elif not stripped.startswith(":"):  # directive options (":linenos:") come before the block
                opener_indent = None
        if not in_block and (stripped.endswith("::") or re.match(r"\.\. (code-block|code|sourcecode)::", stripped)):
            opener_indent = indent
        pos += len(line)
    if in_block:
        spans.append((block_start, pos))
    return spans


def _windows(texts: list[str], tokenizer, seq_len: int, n: int, rng: random.Random, char_label: Callable):
    """``n`` random windows of ``seq_len`` tokens from ``texts`` with per-token labels and selection."""
    hf = getattr(tokenizer, "hf", tokenizer)
    tokens, labels, selected = [], [], []
    order = list(range(len(texts)))
    rng.shuffle(order)
    for i in order:
        text = texts[i]
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if len(ids) < seq_len:
            continue
        start = rng.randrange(len(ids) - seq_len + 1)
        window = range(start, start + seq_len)
        lab, sel = zip(*(char_label(text, *offsets[j]) for j in window), strict=True)
        tokens.append([ids[j] for j in window])
        labels.append(lab)
        selected.append(sel)
        if len(tokens) == n:
            break
    if len(tokens) < n:
        raise InputError(f"only {len(tokens)} texts hold {seq_len} tokens; ask for fewer windows or shorter ones")
    return torch.tensor(tokens), torch.tensor(labels), torch.tensor(selected)


def _in_spans(spans: list[tuple[int, int]], a: int, b: int) -> int:
    """1 when the middle character of the token at ``[a, b)`` lies inside one of ``spans``."""
    mid = (a + b - 1) // 2 if b > a else a
    return int(any(s <= mid < e for s, e in spans))


def _file_record(line: str, where: str) -> tuple[str, int | None, list[tuple[int, int]] | None]:
    """``(text, label, spans)`` of one JSON line, checked."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"]:
        raise InputError(f'{where}: each line must be an object with a non-empty "text" string')
    text, label, spans = record["text"], record.get("label"), record.get("spans")
    if (label is None) == (spans is None):
        raise InputError(f'{where}: give either "label" (0 or 1, the whole text) '
                         'or "spans" (character ranges of label 1)')  # fmt: skip
    if label is not None and (isinstance(label, bool) or label not in (0, 1)):
        raise InputError(f'{where}: "label" must be 0 or 1, got {label!r}')
    if spans is not None:
        ok = isinstance(spans, list) and all(
            isinstance(sp, list) and len(sp) == 2 and all(type(v) is int for v in sp) and 0 <= sp[0] < sp[1]
            and sp[1] <= len(text)
            for sp in spans
        )  # fmt: skip
        if not ok:
            raise InputError(f'{where}: "spans" must be a list of [start, end] character offsets with '
                             f"0 <= start < end <= {len(text)} (the text's length)")  # fmt: skip
        spans = [(a, b) for a, b in spans]
    return text, label, spans


def load_dataset_file(path: str | os.PathLike, tokenizer, seq_len: int = 128) -> TokenDataset:
    """A labelled dataset from a JSON-lines file, one text per line.

    A line is ``{"text": ..., "label": 0 or 1}`` (every token of the text gets the label) or
    ``{"text": ..., "spans": [[start, end], ...]}`` (a token is labelled 1 when its middle
    character falls in a span of character offsets, 0 otherwise). Each text keeps its first
    ``seq_len`` tokens; shorter texts are padded, and padding is never probed.

    Example:
        >>> import tempfile, pathlib
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import PreTrainedTokenizerFast
        >>> words = Tokenizer(models.WordLevel({w: i for i, w in enumerate("[UNK] Hello there see x = 1".split())},
        ...                                    unk_token="[UNK]"))
        >>> words.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
        >>> _ = f.write_text('{"text": "Hello there", "label": 1}\\n{"text": "see x = 1", "spans": [[4, 9]]}\\n')
        >>> data = load_dataset_file(f, tokenizer, 6)
        >>> data.labels.tolist(), data.selected.sum(1).tolist()  # "see" is outside the span; padding is not probed
        ([[1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0]], [2, 4])
    """
    path = Path(path)
    if seq_len < 1:
        raise InputError(f"seq_len must be >= 1, got {seq_len}")
    if not path.is_file():
        raise InputError(f"no dataset file at {path}; write one JSON object per line with a text and its label")
    records = [_file_record(line, f"{path.name}, line {i}")
               for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]  # fmt: skip
    if len(records) < 2:
        raise InputError(f"{path} holds {len(records)} labelled text(s); the split by text needs at least 2")
    hf = getattr(tokenizer, "hf", tokenizer)
    if any(spans is not None for _, _, spans in records) and not getattr(hf, "is_fast", False):
        raise InputError('"spans" need a fast tokenizer (character offsets); label whole texts instead')
    pad = getattr(hf, "pad_token_id", None)
    pad = pad if pad is not None else (getattr(hf, "eos_token_id", None) or 0)
    tokens = torch.full((len(records), seq_len), pad, dtype=torch.long)
    labels = torch.zeros(len(records), seq_len, dtype=torch.long)
    selected = torch.zeros(len(records), seq_len, dtype=torch.bool)
    for row, (text, label, spans) in enumerate(records):
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=spans is not None)
        ids = enc["input_ids"][:seq_len]
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        selected[row, : len(ids)] = True
        if spans is None:
            labels[row, : len(ids)] = label
        else:
            labels[row, : len(ids)] = torch.tensor([_in_spans(spans, a, b) for a, b in enc["offset_mapping"][:seq_len]])
    present = labels[selected]
    if present.numel() == 0 or bool((present == present[0]).all()):
        raise InputError(f"{path}: every probed token has the same label; the probes need both 0 and 1")
    return TokenDataset(path.stem, tokens, labels, selected, f"labels from {path.name} ({len(records)} texts)")


def _sections(part) -> list[str]:
    return [s for doc in corpus_documents(part) for s in split_sections(doc)]


def build_dataset(name: str, tokenizer, n_sequences: int = 256, seq_len: int = 128, seed: int = 0) -> TokenDataset:
    """One of `DATASETS`, as ``n_sequences`` windows of ``seq_len`` tokens (seeded).

    Example:
        >>> data = build_dataset("capitalized", model.tokenizer, 64)  # doctest: +SKIP
        >>> data.tokens.shape  # doctest: +SKIP
        torch.Size([64, 128])
    """
    rng = random.Random(seed)
    if name == "prose_vs_code":
        half = n_sequences // 2
        parts = []
        for part, label in ((SHAKESPEARE, 0), (DJANGO_DOCS, 1)):
            count = half if label == 0 else n_sequences - half
            parts.append(_windows(_sections(part), tokenizer, seq_len, count, rng, lambda t, a, b, y=label: (y, True)))
        tokens, labels, selected = (torch.cat(x) for x in zip(*parts, strict=True))
        return TokenDataset(name, tokens, labels, selected, "1: the text is Django documentation, 0: Shakespeare")
    if name == "code_block":
        texts = _sections(DJANGO_DOCS)
        texts = [t for t in texts if code_block_spans(t)]
        spans = {t: code_block_spans(t) for t in texts}

        def inside(text: str, a: int, b: int) -> tuple[int, bool]:
            return _in_spans(spans[text], a, b), True

        tokens, labels, selected = _windows(texts, tokenizer, seq_len, n_sequences, rng, inside)
        return TokenDataset(name, tokens, labels, selected, "1: the token is inside a reST literal code block")
    if name == "capitalized":
        texts = _sections(SHAKESPEARE)[::2] + _sections(DJANGO_DOCS)[::2]

        def word_start(text: str, a: int, b: int) -> tuple[int, bool]:
            piece = text[a:b]
            k = len(piece) - len(piece.lstrip())
            first = a + k
            if first >= b or not text[first].isalpha():
                return 0, False
            starts = first == 0 or text[first - 1].isspace()
            return int(text[first].isupper()), starts

        tokens, labels, selected = _windows(texts, tokenizer, seq_len, n_sequences, rng, word_start)
        return TokenDataset(name, tokens, labels, selected, "word-start tokens; 1: the word is capitalised")
    raise InputError(f"unknown probing dataset {name!r}; choose among {list(DATASETS)}")
