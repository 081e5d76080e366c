"""The heads section of ``mechscope tour``: the model's top heads by detector, and an attention view."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mechscope.analysis.heads import (
    attention_patterns,
    copy_suppression_scores,
    duplicate_token_target,
    induction_target,
    previous_token_target,
    repeated_random_tokens,
    score_patterns,
    top_heads,
)

if TYPE_CHECKING:
    from mechscope.model.transformer import HookedTransformer


def heads_tour(
    model: HookedTransformer, out_dir: str | Path | None = None, k: int = 5, seq_len: int = 40, batch: int = 4
) -> dict[str, list[tuple[str, float]]]:
    """Print the top ``k`` previous-token, duplicate-token, induction and copy-suppression heads.

    Pattern detectors run on ``batch`` repeated random sequences of ``seq_len`` tokens (one
    forward pass). With ``out_dir``, an attention view of the top induction head on the first
    sequence is written to ``out_dir/induction_head.html``. Returns the top heads per detector.

    Example:
        >>> top = heads_tour(model, k=2, seq_len=6, batch=2)  # doctest: +ELLIPSIS
        <BLANKLINE>
        == heads ...
        >>> sorted(top)
        ['copy suppression', 'duplicate token', 'induction', 'previous token']
    """
    from mechscope.viz import attention_heads_html, save_html

    start = time.perf_counter()
    tokens = repeated_random_tokens(model, seq_len=seq_len, batch=batch)
    patterns = attention_patterns(model, tokens)
    scores = {
        "previous token": score_patterns(patterns, previous_token_target(tokens)),
        "duplicate token": score_patterns(patterns, duplicate_token_target(tokens)),
        "induction": score_patterns(patterns, induction_target(tokens)),
        "copy suppression": copy_suppression_scores(model, None if model.tokenizer is not None else tokens),
    }
    print(f"\n== heads (repeated random tokens, {batch} x 2 x {seq_len}; {time.perf_counter() - start:.1f}s) ==")
    top = {name: top_heads(s, k) for name, s in scores.items()}
    width = max(len(name) for name in top)
    for name, heads in top.items():
        print(f"  {name:<{width}}  " + "  ".join(f"{label} {score:.2f}" for label, score in heads))
    if out_dir is not None:
        label = top["induction"][0][0]
        layer, head = (int(x) for x in label[1:].split("H"))
        row = tokens[0]
        str_tokens = model.to_str_tokens(row) if model.tokenizer is not None else [str(int(t)) for t in row]
        with torch.no_grad():
            view = attention_heads_html(
                patterns[layer, 0, head], str_tokens, [label], title=f"{model.cfg.model_name}: induction head {label}"
            )
        path = save_html(view, Path(out_dir) / "induction_head.html")
        print(f"  attention view of {label}: {path}")
    return top
