"""Induction heads in a two-layer attention-only transformer.

Trained on sequences of random tokens in which a random span repeats, the model learns to copy:
a *previous-token head* in layer 0 writes each token's predecessor into its residual stream, and
an *induction head* in layer 1 uses that (K-composition) to attend from a token to the token
after its previous occurrence, and copies it. This module trains the model and finds both heads
with the detectors of `mechscope.analysis.heads`, the weight-based composition scores of
Elhage et al. (2021) (`mechscope.analysis.weights`) and a causal check of them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.analysis import heads, weights
from mechscope.errors import ConfigError, InputError
from mechscope.model.config import ModelConfig
from mechscope.model.transformer import HookedTransformer
from mechscope.toys import checkpoint


@dataclass
class InductionConfig:
    """Task, model and optimiser of the induction-head toy.

    Example:
        >>> InductionConfig(d_vocab=20, seq_len=16).model_config().attn_only
        True
    """

    d_vocab: int = 64
    """Number of token ids."""
    seq_len: int = 32
    """Length of each training sequence."""
    min_span: int = 4
    """Shortest repeated span."""
    max_span: int | None = None
    """Longest repeated span; ``None`` means ``seq_len // 2``."""
    d_model: int = 64
    """Residual stream width."""
    n_heads: int = 4
    """Heads per layer."""
    d_head: int | None = None
    """Width of each head; ``None`` means ``d_model // n_heads``."""
    n_layers: int = 2
    """Number of attention-only layers."""
    lr: float = 3e-3
    """AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    batch_size: int = 64
    """Sequences per step."""
    steps: int = 6000
    """Training steps (the layer-1 heads are still alike at 2000; see docs/toys.md)."""
    seed: int = 0
    """Seed of the initialisation and of the data."""
    save_every: int = 500
    """With an output directory, write the resumable training state every this many steps."""

    def __post_init__(self) -> None:
        if self.max_span is None:
            self.max_span = self.seq_len // 2
        if not 1 <= self.min_span <= self.max_span <= self.seq_len // 2:
            raise ConfigError(
                f"need 1 <= min_span ({self.min_span}) <= max_span ({self.max_span}) <= seq_len // 2 "
                f"({self.seq_len // 2}) so the span fits twice"
            )
        for name in ("d_vocab", "steps", "batch_size", "save_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seq_len // 2 > self.d_vocab:
            raise ConfigError(
                f"seq_len // 2 = {self.seq_len // 2} exceeds d_vocab = {self.d_vocab}: the scoring sequences repeat a "
                f"half of distinct tokens; use seq_len <= {2 * self.d_vocab + 1}"
            )
        self.model_config()

    def model_config(self) -> ModelConfig:
        """Attention-only, learned positions, no LayerNorm."""
        return ModelConfig(
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            d_head=self.d_head,
            d_mlp=4 * self.d_model,
            d_vocab=self.d_vocab,
            n_ctx=self.seq_len,
            attn_only=True,
            normalization_type=None,
            model_name="induction-toy",
        )


def repeated_span_batch(
    cfg: InductionConfig, batch_size: int, generator: torch.Generator | None = None
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Random tokens where a random span of ``min_span ... max_span`` tokens occurs twice.

    Returns the tokens and a 0/1 mask of the positions whose *next* token is predictable by
    induction (inside the second copy, after its first token).

    Example:
        >>> tokens, mask = repeated_span_batch(InductionConfig(d_vocab=20, seq_len=16), 3)
        >>> tokens.shape, mask.shape, bool(mask.any(1).all())
        (torch.Size([3, 16]), torch.Size([3, 16]), True)
    """
    tokens = torch.randint(cfg.d_vocab, (batch_size, cfg.seq_len), generator=generator)
    mask = torch.zeros(batch_size, cfg.seq_len, dtype=torch.long)
    spans = torch.randint(cfg.min_span, cfg.max_span + 1, (batch_size,), generator=generator)
    for i, span in enumerate(spans.tolist()):
        first = int(torch.randint(cfg.seq_len - 2 * span + 1, (1,), generator=generator))
        second = first + span + int(torch.randint(cfg.seq_len - first - 2 * span + 1, (1,), generator=generator))
        tokens[i, second : second + span] = tokens[i, first : first + span]
        mask[i, second : second + span - 1] = 1  # predicting tokens second+1 ... second+span-1
    return tokens, mask


def repeated_tokens(d_vocab: int, half: int, batch_size: int, seed: int = 0) -> Int[Tensor, "batch pos"]:
    """``batch`` sequences of ``half`` distinct random tokens repeated twice (``[batch, 2 * half]``), for scoring.

    The tokens of a half are distinct, so the only earlier copies of a token are the planted ones
    and every sequence has the same ``half`` induction targets.

    Example:
        >>> tokens = repeated_tokens(10, 4, 2)
        >>> torch.equal(tokens[:, :4], tokens[:, 4:]), len(set(tokens[0, :4].tolist()))
        (True, 4)
    """
    if not 1 <= half <= d_vocab:
        raise InputError(f"half must be in [1, d_vocab={d_vocab}] to hold distinct tokens, got {half}")
    generator = torch.Generator().manual_seed(seed)
    first = torch.stack([torch.randperm(d_vocab, generator=generator)[:half] for _ in range(batch_size)])
    return torch.cat([first, first], dim=1)


@dataclass
class InductionRun:
    """A trained induction toy and its loss curve."""

    config: InductionConfig
    model: HookedTransformer
    history: list[dict]
    """Every 1% of the steps: ``step``, ``loss`` (all positions), ``induction_loss`` (predictable positions)."""


def _masked_losses(model: HookedTransformer, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    per_token = model(tokens, return_type="loss", loss_per_token=True)  # [batch, pos - 1]
    target_mask = mask[:, :-1].to(per_token.dtype)
    return per_token.mean(), (per_token * target_mask).sum() / target_mask.sum().clamp_min(1)


_RESUMABLE = ("steps", "save_every")
"""Config fields that may change when a run resumes."""


def train_induction(
    cfg: InductionConfig | None = None, out_dir: str | os.PathLike | None = None, *, progress: bool = True
) -> InductionRun:
    """Train the attention-only model on repeated-span sequences (next-token loss on every position).

    With ``out_dir`` the run is resumable: the training state (weights, optimiser, the data
    generator's state, the curve) goes to ``out_dir/state.pt`` every ``save_every`` steps and
    at the end, atomically, and calling again with the same directory and settings (``steps``
    may grow) continues from it, ending with the same weights as an uninterrupted run.

    Example:
        >>> run = train_induction(InductionConfig(d_vocab=16, seq_len=12, d_model=16, steps=10), progress=False)
        >>> len(run.history) > 1, run.model.cfg.attn_only
        (True, True)
    """
    cfg = cfg or InductionConfig()
    model = HookedTransformer(cfg.model_config()).init_weights(seed=cfg.seed, std=cfg.d_model**-0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    history, start = checkpoint.resume(
        out_dir, dataclasses.asdict(cfg), _RESUMABLE, cfg.steps, model, optimizer, generator
    )
    log_every = max(1, cfg.steps // 100)
    model.train()
    bar = tqdm(
        range(start, cfg.steps), desc="induction", disable=not progress, leave=False, initial=start, total=cfg.steps
    )
    for step in bar:
        tokens, mask = repeated_span_batch(cfg, cfg.batch_size, generator)
        loss, induction_loss = _masked_losses(model, tokens, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": loss.item(), "induction_loss": induction_loss.item()})
        done = step + 1
        if out_dir is not None and (done % cfg.save_every == 0 or done == cfg.steps):
            checkpoint.save_state(
                out_dir,
                dataclasses.asdict(cfg),
                done,
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                generator=generator.get_state(),
                history=history,
            )
    model.eval()
    return InductionRun(cfg, model, history)


def _check_repeated(tokens: Tensor) -> int:
    seq = tokens.shape[1]
    if seq % 2 or not torch.equal(tokens[:, : seq // 2], tokens[:, seq // 2 :]):
        raise InputError("the induction scores need sequences made of one half repeated twice; use repeated_tokens")
    return seq // 2


@torch.no_grad()
def head_scores(model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> dict[str, Tensor]:
    """Previous-token and induction scores of every head, per sequence: ``[batch, layer, head]`` each.

    The scores of `mechscope.analysis.heads` (attention to the previous position; attention to
    the position after an earlier copy of the current token), computed on each sequence alone
    so that their spread over sequences gives a standard error. ``tokens`` must be a half
    repeated twice; on halves of distinct tokens (`repeated_tokens`) every sequence has the same
    targets, and the mean over sequences equals `previous_token_scores` / `induction_scores`.

    Example:
        >>> scores = head_scores(model, repeated_tokens(50, 5, 2))
        >>> scores["previous_token"].shape, scores["induction"].shape
        (torch.Size([2, 3, 4]), torch.Size([2, 3, 4]))
    """
    _check_repeated(tokens)
    patterns = heads.attention_patterns(model, tokens)  # [layer, batch, head, query_pos, key_pos]
    scores = {}
    for name, target_fn in (("previous_token", heads.previous_token_target), ("induction", heads.induction_target)):
        target = target_fn(tokens)
        scores[name] = torch.stack(
            [heads.score_patterns(patterns[:, b : b + 1], target[b : b + 1]) for b in range(tokens.shape[0])]
        )
    return scores


@torch.no_grad()
def k_composition_ablation(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], first_layer: int = 0, second_layer: int = 1
) -> Float[Tensor, "head head"]:
    """Causal K-composition: ``drop[i, j]``, the fall in the induction score of head ``j`` of
    ``second_layer`` when the output of head ``i`` of ``first_layer`` is mean-ablated in its keys only.

    Head ``i``'s output (``z W_O`` at every position) is replaced by its mean over the batch in
    the key input of ``second_layer`` (``hook_k_input``); queries, values and every other path
    are unchanged. A weight-free check of what the K-composition scores claim.

    Example:
        >>> k_composition_ablation(model, repeated_tokens(50, 5, 4)).shape
        torch.Size([4, 4])
    """
    _check_repeated(tokens)
    if not 0 <= first_layer < second_layer < model.cfg.n_layers:
        raise InputError(
            f"need 0 <= first_layer < second_layer < {model.cfg.n_layers}, got {first_layer}, {second_layer}"
        )
    target = heads.induction_target(tokens)
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{first_layer}.attn.hook_z", return_type=None)
    z = cache[f"blocks.{first_layer}.attn.hook_z"]  # [batch, pos, head, d_head]
    outputs = torch.einsum("bphd,hdm->bphm", z, model.blocks[first_layer].attn.W_O)  # [batch, pos, head, d_model]
    deviation = outputs - outputs.mean(0, keepdim=True)
    base = heads.score_patterns(heads.attention_patterns(model, tokens)[second_layer : second_layer + 1], target)[0]
    drops = []
    for i in range(model.cfg.n_heads):

        def remove(k_input: Tensor, *, hook, i: int = i) -> Tensor:  # k_input: [batch, pos, kv_head, d_model]
            return k_input - deviation[:, :, i, None]

        with model.hooks(fwd_hooks=[(f"blocks.{second_layer}.hook_k_input", remove)]):
            patterns = heads.attention_patterns(model, tokens)[second_layer : second_layer + 1]
        drops.append(base - heads.score_patterns(patterns, target)[0])
    return torch.stack(drops)


HEAD_SCORE_THRESHOLD = 0.3
"""The least mean score (attention to the right position) for a head to count as a
previous-token or induction head; attention spread evenly over a 32-token sequence scores
about 0.05."""
LOSS_FRACTION = 0.5
"""An induction circuit has formed only when the loss on the repeated half is below this
fraction of chance (``log d_vocab``)."""


def _top_heads(per_sequence: Float[Tensor, "batch head"]) -> tuple[int, list[int], list[int]]:
    """The best head, the heads within two standard errors of it (paired over sequences), and
    those with at least half its score; only heads scoring at least `HEAD_SCORE_THRESHOLD` are listed."""
    mean = per_sequence.mean(0)
    best = int(mean.argmax())
    gap = per_sequence[:, best, None] - per_sequence  # [batch, head]
    stderr = gap.std(0) / gap.shape[0] ** 0.5 if gap.shape[0] > 1 else torch.zeros_like(mean)
    scoring = [h for h in range(mean.shape[0]) if mean[h] >= HEAD_SCORE_THRESHOLD]
    tied = [h for h in scoring if gap[:, h].mean() <= 2 * stderr[h]]
    strong = [h for h in scoring if mean[h] >= 0.5 * mean[best]]
    return best, tied, strong


def induction_verdict(summary: dict) -> str:
    """One line saying whether an induction circuit formed, from an `induction_summary`.

    Example:
        >>> induction_verdict({"induction_formed": False, "second_half_loss": 4.1, "chance_loss": 4.16,
        ...                    "induction_scores": [[0.1], [0.04]], "induction_heads": []})
        'no induction head formed (best score 0.04, a head needs 0.3; repeated-half loss 4.10 vs chance 4.16)'
    """
    best = max(summary["induction_scores"][-1])
    loss = f"repeated-half loss {summary['second_half_loss']:.2f} vs chance {summary['chance_loss']:.2f}"
    if summary["induction_formed"]:
        return f"induction heads {summary['induction_heads']} in the last layer (best score {best:.2f}; {loss})"
    return f"no induction head formed (best score {best:.2f}, a head needs {HEAD_SCORE_THRESHOLD}; {loss})"


@torch.no_grad()
def induction_summary(run: InductionRun, n_sequences: int = 256, seed: int = 1234) -> dict:
    """The numbers the report shows: losses, the heads, their scores and the K-composition tables.

    On ``n_sequences`` fresh halves repeated twice: the loss on each half (and chance, ``log
    d_vocab``); every head's previous-token and induction score (`head_scores`, with standard
    errors over sequences); in layer 0 the best previous-token head, and in the last layer the
    best induction head, each with the heads within two standard errors of it (``top_...``:
    redundant heads score alike) and the heads with at least half its score, counting only heads
    that score at least `HEAD_SCORE_THRESHOLD`; ``induction_formed`` (an induction head, and a
    repeated-half loss below `LOSS_FRACTION` of chance: otherwise no head is listed as an induction
    head) and a one-line ``verdict`` (`induction_verdict`); the K-composition
    of every layer-0 head into every last-layer head (`mechscope.analysis.weights.composition_scores`)
    and its causal counterpart (`k_composition_ablation`). The checks: whether the highest
    K-composition pair is the detected pair, a pair of top heads, or a previous-token head into
    an induction head; and whether every induction head's most K-composed layer-0 head is a
    previous-token head, by weights and by ablation.

    Example:
        >>> run = train_induction(InductionConfig(d_vocab=16, seq_len=12, d_model=16, steps=5), progress=False)
        >>> round(induction_summary(run, n_sequences=4)["chance_loss"], 3)  # log(d_vocab)
        2.773
    """
    cfg, model = run.config, run.model
    half, last = cfg.seq_len // 2, cfg.n_layers - 1
    tokens = repeated_tokens(cfg.d_vocab, half, n_sequences, seed)
    per_token = model(tokens, return_type="loss", loss_per_token=True)  # [batch, pos - 1]
    per_sequence = head_scores(model, tokens)  # [batch, layer, head] each
    prev_head, top_prev, prev_heads = _top_heads(per_sequence["previous_token"][:, 0])
    ind_head, top_ind, ind_heads = _top_heads(per_sequence["induction"][:, last])
    k_comp = weights.composition_scores(model, "K")[0, :, last]  # [layer-0 head, last-layer head]
    ablation = k_composition_ablation(model, tokens, 0, last)
    best_pair = divmod(int(k_comp.argmax()), cfg.n_heads)
    stderr = {
        name: (v.std(0) / n_sequences**0.5).tolist() if n_sequences > 1 else None for name, v in per_sequence.items()
    }
    chance = float(torch.log(torch.tensor(float(cfg.d_vocab))))
    second_half = per_token[:, half:].mean().item()
    formed = bool(ind_heads) and second_half < LOSS_FRACTION * chance
    if not formed:  # heads scoring at chance are not induction heads, whatever ranks first
        top_ind, ind_heads = [], []

    def each(ok: bool) -> bool | None:
        return ok if ind_heads else None  # no induction heads: nothing to check

    summary = {
        "config": dataclasses.asdict(cfg),
        "n_sequences": n_sequences,
        "chance_loss": chance,
        "first_half_loss": per_token[:, : half - 1].mean().item(),
        "second_half_loss": second_half,
        "induction_formed": formed,
        "head_score_threshold": HEAD_SCORE_THRESHOLD,
        "previous_token_head": [0, prev_head],
        "induction_head": [last, ind_head],
        "previous_token_scores": per_sequence["previous_token"].mean(0).tolist(),
        "previous_token_stderr": stderr["previous_token"],
        "induction_scores": per_sequence["induction"].mean(0).tolist(),
        "induction_stderr": stderr["induction"],
        "top_previous_token_heads": top_prev,
        "previous_token_heads": prev_heads,
        "top_induction_heads": top_ind,
        "induction_heads": ind_heads,
        "k_composition": k_comp.tolist(),
        "k_composition_best_pair": list(best_pair),
        "k_composition_of_detected_pair": k_comp[prev_head, ind_head].item(),
        "k_composition_ablation": ablation.tolist(),
        "k_composition_ablation_best_pair": list(divmod(int(ablation.argmax()), cfg.n_heads)),
        "detected_pair_has_highest_k_composition": best_pair == (prev_head, ind_head),
        "highest_k_composition_is_top_pair": best_pair[0] in top_prev and best_pair[1] in top_ind,
        "highest_k_composition_is_previous_token_to_induction": best_pair[0] in prev_heads
        and best_pair[1] in ind_heads,
        "each_induction_head_composes_most_with_a_previous_token_head": each(
            all(int(k_comp[:, h].argmax()) in prev_heads for h in ind_heads)
        ),
        "each_induction_head_depends_most_on_a_previous_token_head": each(
            all(int(ablation[:, h].argmax()) in prev_heads for h in ind_heads)
        ),
        "final_train_loss": run.history[-1]["loss"],
        "final_induction_loss": run.history[-1]["induction_loss"],
    }
    summary["verdict"] = induction_verdict(summary)
    return summary
