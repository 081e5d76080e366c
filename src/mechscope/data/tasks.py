"""Task datasets for patching: IOI, induction, greater-than and factual recall.

Each builder returns a `TaskDataset`: clean and corrupted token ids of equal shape, the
correct and wrong answer ids of every prompt, and the position where the answer is read.
Prompt pairs of unequal token length raise `InputError`; ``align=True`` left-pads prompts of
different lengths to a common length instead (clean and corrupted prompts of one pair must
still match) and records the attention mask.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.errors import InputError
from mechscope.patching.metrics import LogitDiff, ProbDiff

NAMES = (
    "Mary John Alice Bob Tom James Sarah Michael David Emma Anna Paul Mark Lisa Kate Daniel Laura Peter "
    "Jessica Chris Robert Linda Steve Susan Kevin Karen Brian Amy Jason Rachel Eric Nancy Adam Julia Ryan "
    "Grace Jack Helen Sam Emily Henry Lucy George Sophie Frank Rose Martin Claire Andrew Jane"
).split()
PLACES = "store park school office beach station garden market library hospital restaurant church".split()
OBJECTS = "drink book ring bone kiss basketball computer necklace snack bag apple letter".split()

# {N1} and {N2} are introduced, {S2} acts; ABBA puts the indirect object first, BABA second.
IOI_TEMPLATES = (
    "Then, {N1} and {N2} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {S2} decided to give it to",
    "After {N1} and {N2} went to the {PLACE}, {S2} gave a {OBJECT} to",
    "While {N1} and {N2} were working at the {PLACE}, {S2} gave a {OBJECT} to",
    "Friends {N1} and {N2} found a {OBJECT} at the {PLACE}. {S2} gave it to",
)

NOUNS = "war dynasty siege drought project expedition reign journey".split()
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Canada": "Ottawa",
    "China": "Beijing",
    "England": "London",
    "Austria": "Vienna",
    "Portugal": "Lisbon",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Cuba": "Havana",
    "Turkey": "Ankara",
    "Hungary": "Budapest",
    "Belgium": "Brussels",
    "Denmark": "Copenhagen",
}
FACT_TEMPLATES = ("The capital of {X} is", "{X}'s capital city is called", "The largest city of {X} is")


@dataclass
class TaskDataset:
    """Clean and corrupted prompts with their answers, ready for `mechscope.patching`.

    ``correct``/``wrong`` are ``[n]`` ids or ``[n, k]`` id sets (``-1`` pads); the answer is
    predicted at the last position (prompts are left-padded when aligned); ``attention_mask``
    is set only when prompts were aligned by padding.

    Example:
        >>> data = induction_dataset(n=2, seq_len=5, d_vocab=50)
        >>> data.clean_tokens.shape, data.metric()(model(data.clean_tokens)).shape
        (torch.Size([2, 9]), torch.Size([2]))
    """

    clean_tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    correct: Tensor
    wrong: Tensor
    clean_prompts: list[str] = field(default_factory=list)
    corrupted_prompts: list[str] = field(default_factory=list)
    attention_mask: Tensor | None = None

    def __len__(self) -> int:
        return self.clean_tokens.shape[0]

    def metric(self, kind: str = "logit_diff"):
        """``"logit_diff"`` (`LogitDiff`) or ``"prob_diff"`` (`ProbDiff`) of correct vs wrong answers."""
        if kind == "logit_diff":
            return LogitDiff(self.correct, self.wrong)
        if kind == "prob_diff":
            return ProbDiff(self.correct, self.wrong)
        raise InputError(f"kind must be 'logit_diff' or 'prob_diff', got {kind!r}")

    def to(self, device: torch.device | str) -> TaskDataset:
        """The same dataset with every tensor on ``device``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return TaskDataset(
            move(self.clean_tokens),
            move(self.corrupted_tokens),
            move(self.correct),
            move(self.wrong),
            self.clean_prompts,
            self.corrupted_prompts,
            move(self.attention_mask),
        )


def _tokenizer(model):
    if getattr(model, "codec", None) is None:
        raise InputError("this dataset needs the model's tokenizer; load the model with mechscope.load")
    return model.codec


def single_token_words(model, words, prefix: str = " ") -> list[str]:
    """The words of ``words`` that are one token (with ``prefix``) for the model's tokenizer.

    Example:
        >>> single_token_words(ms.load("smollm2-135m"), ["Mary", "Xylophonia"])  # doctest: +SKIP
        ['Mary']
    """
    tok = _tokenizer(model)
    return [w for w in words if tok.encode(prefix + w, prepend_bos=False)[0].shape[-1] == 1]


def _single_token(model, text: str) -> int:
    tokens = _tokenizer(model).encode(text, prepend_bos=False)[0][0]
    return int(tokens[0])


def tokenize_pairs(
    model, clean: list[str], corrupted: list[str], align: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Token ids of prompt pairs ``(clean [n, pos], corrupted [n, pos], attention_mask | None)``.

    Every clean prompt must have as many tokens as its corrupted partner. Prompts of different
    lengths across pairs raise `InputError` unless ``align=True``, which left-pads them (so the
    last token of every prompt is at position -1) and returns the attention mask.

    Example:
        >>> clean, corrupted, mask = tokenize_pairs(model, ["a b"], ["a c"])  # doctest: +SKIP
    """
    tok = _tokenizer(model)
    if len(clean) != len(corrupted) or not clean:
        raise InputError(f"need equally many clean and corrupted prompts, got {len(clean)} and {len(corrupted)}")
    rows = []
    for a, b in zip(clean, corrupted, strict=False):
        ta, tb = tok.encode(a)[0][0], tok.encode(b)[0][0]
        if ta.shape != tb.shape:
            raise InputError(
                f"clean prompt {a!r} has {ta.shape[0]} tokens but its corrupted partner {b!r} has {tb.shape[0]}; "
                "patching compares them position by position, so choose corruptions of equal token length"
            )
        rows.append((ta, tb))
    lengths = sorted({r[0].shape[0] for r in rows})
    if len(lengths) == 1:
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), None
    if not align:
        raise InputError(
            f"prompts have different token lengths {lengths}; use one template, or pass align=True to left-pad them"
        )
    width = lengths[-1]
    pad = tok.pad_token_id
    clean_t = torch.full((len(rows), width), pad, dtype=torch.long)
    corrupted_t = clean_t.clone()
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (ta, tb) in enumerate(rows):
        n = ta.shape[0]
        clean_t[i, width - n :], corrupted_t[i, width - n :], mask[i, width - n :] = ta, tb, 1
    return clean_t, corrupted_t, mask


def ioi_dataset(
    model,
    n: int = 16,
    *,
    template: int | str | None = 0,
    corruption: str = "third_name",
    seed: int = 0,
    align: bool = False,
) -> TaskDataset:
    """Indirect-object identification prompts, half in ABBA and half in BABA name order.

    ``template``: an index into `IOI_TEMPLATES`, a template string with ``{N1} {N2} {S2} {PLACE}
    {OBJECT}``, or ``None`` for all templates (needs ``align=True`` when their lengths differ).
    Names, places and objects are kept only where they are single tokens for this model, so
    every prompt of one template has the same length. ``corruption``: ``"third_name"`` replaces
    the second subject mention with an unrelated name; ``"flipped"`` replaces it with the
    indirect object, so the expected answer flips. Answers: correct = indirect object,
    wrong = subject.

    Example:
        >>> data = ioi_dataset(ms.load("smollm2-135m"), n=4)  # doctest: +SKIP
        >>> data.clean_prompts[0]                               # doctest: +SKIP
        'Then, Mary and John went to the store. John gave a drink to'
    """
    if corruption not in ("third_name", "flipped"):
        raise InputError(f"corruption must be 'third_name' or 'flipped', got {corruption!r}")
    if template is None:
        templates = list(IOI_TEMPLATES)
    elif isinstance(template, int):
        if not 0 <= template < len(IOI_TEMPLATES):
            raise InputError(f"template index {template} is out of range 0..{len(IOI_TEMPLATES) - 1}")
        templates = [IOI_TEMPLATES[template]]
    else:
        templates = [template]
    names = single_token_words(model, NAMES)
    places, objects = single_token_words(model, PLACES), single_token_words(model, OBJECTS)
    if len(names) < 3 or not places or not objects:
        raise InputError(f"too few single-token names ({len(names)}), places or objects for this tokenizer")
    rng = random.Random(seed)
    clean, corrupted, correct, wrong = [], [], [], []
    for i in range(n):
        io, s, c = rng.sample(names, 3)
        fill = {"PLACE": rng.choice(places), "OBJECT": rng.choice(objects)}
        n1, n2 = (io, s) if i % 2 == 0 else (s, io)
        text = rng.choice(templates)
        clean.append(text.format(N1=n1, N2=n2, S2=s, **fill))
        corrupted.append(text.format(N1=n1, N2=n2, S2=c if corruption == "third_name" else io, **fill))
        correct.append(_single_token(model, " " + io))
        wrong.append(_single_token(model, " " + s))
    return _dataset(model, clean, corrupted, correct, wrong, align)


def _dataset(model, clean, corrupted, correct, wrong, align) -> TaskDataset:
    clean_t, corrupted_t, mask = tokenize_pairs(model, clean, corrupted, align)
    return TaskDataset(
        clean_t,
        corrupted_t,
        torch.as_tensor(correct),
        torch.as_tensor(wrong),
        clean,
        corrupted,
        mask,
    )


def induction_dataset(
    n: int = 8, seq_len: int = 20, d_vocab: int = 50257, *, seed: int = 0, bos_token_id: int | None = None
) -> TaskDataset:
    """Repeated random tokens: clean ``A A[:-1]`` (the answer is ``A[-1]``) vs corrupted ``A B[:-1]``.

    The corrupted second half is fresh random tokens, so no induction is possible; the wrong
    answer is ``B[-1]``. With ``bos_token_id`` every sequence starts with it.

    Example:
        >>> induction_dataset(n=1, seq_len=3, d_vocab=10, seed=1).clean_tokens
        tensor([[5, 9, 4, 5, 9]])
    """
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2, got {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(d_vocab, (n, seq_len), generator=gen)
    other = torch.randint(d_vocab, (n, seq_len), generator=gen)
    other = torch.where(other == first, (other + 1) % d_vocab, other)
    clean = torch.cat((first, first[:, :-1]), dim=1)
    corrupted = torch.cat((first, other[:, :-1]), dim=1)
    if bos_token_id is not None:
        bos = torch.full((n, 1), bos_token_id, dtype=torch.long)
        clean, corrupted = torch.cat((bos, clean), 1), torch.cat((bos, corrupted), 1)
    return TaskDataset(clean, corrupted, first[:, -1], other[:, -1])


def greater_than_dataset(model, n: int = 16, *, century: int = 17, seed: int = 0) -> TaskDataset:
    """ "The war lasted from the year 1732 to the year 17": the answer is a later year.

    Corrupted prompts use the year ``{century}01``. When two-digit numbers are single tokens
    the answers are the sets of years after (correct) and up to (wrong) the start year; when
    the tokenizer splits digits the answer is the tens digit: greater (correct) or smaller
    (wrong) than the start year's. Use ``metric("prob_diff")`` as in Hanna et al. (2023).

    Example:
        >>> data = greater_than_dataset(ms.load("smollm2-135m"), n=4)  # doctest: +SKIP
    """
    tok = _tokenizer(model)
    two_digit = all(tok.encode(f"{y:02d}", prepend_bos=False)[0].shape[-1] == 1 for y in range(100))
    rng = random.Random(seed)
    clean, corrupted, correct, wrong = [], [], [], []
    for _ in range(n):
        noun, yy = rng.choice(NOUNS), rng.randint(20, 89)
        stem = "The {} lasted from the year {}{:02d} to the year {}"
        clean.append(stem.format(noun, century, yy, century))
        corrupted.append(stem.format(noun, century, 1, century))
        if two_digit:
            ids = [_single_token(model, f"{y:02d}") for y in range(100)]
            correct.append(ids[yy + 1 :] + [-1] * (yy + 1))
            wrong.append(ids[: yy + 1] + [-1] * (99 - yy))
        else:
            digits = [_single_token(model, str(d)) for d in range(10)]
            tens = yy // 10
            correct.append(digits[tens + 1 :] + [-1] * (tens + 1))
            wrong.append(digits[:tens] + [-1] * (10 - tens))
    return _dataset(model, clean, corrupted, correct, wrong, align=False)


def factual_recall_dataset(model, n: int = 16, *, template: int = 0, seed: int = 0) -> TaskDataset:
    """Pairs of "The capital of France is" / "The capital of Peru is" prompts (same token length).

    The correct answer is the first token of the clean subject's capital, the wrong one the
    corrupted subject's. Only subjects whose prompts have the most common token length are used.

    Example:
        >>> data = factual_recall_dataset(ms.load("smollm2-135m"), n=4)  # doctest: +SKIP
    """
    if not 0 <= template < len(FACT_TEMPLATES):
        raise InputError(f"template index {template} is out of range 0..{len(FACT_TEMPLATES) - 1}")
    tok = _tokenizer(model)
    text = FACT_TEMPLATES[template]
    by_len: dict[int, list[str]] = {}
    for country in CAPITALS:
        by_len.setdefault(tok.encode(text.format(X=country))[0].shape[-1], []).append(country)
    pool = max(by_len.values(), key=len)
    answers = {c: _single_token(model, " " + CAPITALS[c]) for c in pool}
    if len(set(answers.values())) < 2:
        raise InputError("fewer than two subjects with distinct answers share a token length for this tokenizer")
    rng = random.Random(seed)
    clean, corrupted, correct, wrong = [], [], [], []
    while len(clean) < n:
        a, b = rng.sample(pool, 2)
        if answers[a] == answers[b]:
            continue
        clean.append(text.format(X=a))
        corrupted.append(text.format(X=b))
        correct.append(answers[a])
        wrong.append(answers[b])
    return _dataset(model, clean, corrupted, correct, wrong, align=False)
