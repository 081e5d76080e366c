"""Interchange pairs for tasks: the IOI name-position swap.

In an IOI prompt ("When Mary and John went to the store, John gave a drink to") the model
answers with the indirect object (Mary), the name that is not repeated. Which of the two first
names is the subject is *position* information: swapping the order of the first two names
(ABB to BAB) keeps every token but moves the subject. Interchanging the position signal of the
swapped prompt into the original one should make the model answer with the subject instead, the
counterfactual of Makelov, Lange and Nanda (2023) for GPT-2 small.
"""

from __future__ import annotations

import random

from mechscope.data.tasks import IOI_TEMPLATES, NAMES, OBJECTS, PLACES, single_token_words, tokenize_pairs
from mechscope.errors import InputError
from mechscope.model.tokenize import require_tokenizer
from mechscope.subspace.intervention import InterchangeData


def ioi_position_pairs(model, n: int = 64, *, templates: list[int] | None = None, seed: int = 0) -> InterchangeData:
    """``n`` IOI prompts (half ABB, half BAB) paired with the same prompt with the first two names
    swapped; the counterfactual answer is the subject, the base answer the indirect object.

    ``templates`` are indices into `mechscope.data.tasks.IOI_TEMPLATES` (default: all); prompts of
    different lengths are left-padded (``attention_mask``), so the answer is read at position -1.

    Example:
        >>> data = ioi_position_pairs(ms.load("smollm2-135m"), n=4)  # doctest: +SKIP
        >>> len(data), data.attention_mask is not None                 # doctest: +SKIP
        (4, True)
    """
    chosen = list(range(len(IOI_TEMPLATES))) if templates is None else list(templates)
    if not chosen or any(not 0 <= t < len(IOI_TEMPLATES) for t in chosen):
        raise InputError(f"templates must be indices in 0..{len(IOI_TEMPLATES) - 1}, got {templates}")
    names = single_token_words(model, NAMES)
    places, objects = single_token_words(model, PLACES), single_token_words(model, OBJECTS)
    if len(names) < 2 or not places or not objects:
        raise InputError(f"too few single-token names ({len(names)}), places or objects for this tokenizer")
    tokenizer = require_tokenizer(model)
    rng = random.Random(seed)
    base, source, io_ids, s_ids = [], [], [], []
    for i in range(n):
        io, s = rng.sample(names, 2)
        fill = {"PLACE": rng.choice(places), "OBJECT": rng.choice(objects)}
        first, second = (io, s) if i % 2 == 0 else (s, io)
        text = IOI_TEMPLATES[rng.choice(chosen)]
        base.append(text.format(N1=first, N2=second, S2=s, **fill))
        source.append(text.format(N1=second, N2=first, S2=s, **fill))
        io_ids.append(int(tokenizer.encode(" " + io, prepend_bos=False)[0][0, 0]))
        s_ids.append(int(tokenizer.encode(" " + s, prepend_bos=False)[0][0, 0]))
    base_tokens, source_tokens, mask = tokenize_pairs(model, base, source, align=True)
    return InterchangeData(base_tokens, source_tokens, labels=s_ids, base_labels=io_ids, attention_mask=mask)
