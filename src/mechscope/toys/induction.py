"""Induction heads in a two-layer attention-only transformer.

Trained on sequences of random tokens in which a random span repeats, the model learns to copy:
a *previous-token head* in layer 0 writes each token's predecessor into its residual stream, and
an *induction head* in layer 1 uses that (K-composition) to attend from a token to the token
after its previous occurrence, and copies it. This module trains the model and finds both heads
with simple attention scores and the weight-based composition scores of Elhage et al. (2021).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.errors import ConfigError, InputError, LoadError
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
    steps: int = 2000
    """Training steps."""
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
    """``batch`` sequences of ``half`` random tokens repeated twice (``[batch, 2 * half]``), for scoring.

    Example:
        >>> repeated_tokens(10, 4, 2)[0, :4].tolist() == repeated_tokens(10, 4, 2)[0, 4:].tolist()
        True
    """
    first = torch.randint(d_vocab, (batch_size, half), generator=torch.Generator().manual_seed(seed))
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
    history: list[dict] = []
    start = 0
    state = checkpoint.load_state(out_dir, dataclasses.asdict(cfg), _RESUMABLE) if out_dir is not None else None
    if state is not None:
        if state["step"] > cfg.steps:
            raise LoadError(
                f"{out_dir} holds a run trained for {state['step']} steps, more than steps={cfg.steps}; "
                f"pass steps >= {state['step']} or another directory"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        history, start = state["history"], state["step"]
    log_every = max(1, cfg.steps // 100)
    model.train()
    bar = tqdm(range(start, cfg.steps), desc="induction", disable=not progress, leave=False, initial=start,
               total=cfg.steps)
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
            checkpoint.save_state(out_dir, dataclasses.asdict(cfg), done, model=model.state_dict(),
                                  optimizer=optimizer.state_dict(), generator=generator.get_state(), history=history)
    model.eval()
    return InductionRun(cfg, model, history)


@torch.no_grad()
def attention_scores(model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> dict[str, Tensor]:
    """Previous-token and induction scores of every head on sequences repeated twice.

    ``tokens`` must be a random half repeated (see `repeated_tokens`). The previous-token score
    is the mean attention from each position to the one before; the induction score is the mean
    attention from each position of the second half to the position after the same token's
    first occurrence. Both are ``[layer, head]``.

    Example:
        >>> scores = attention_scores(model, repeated_tokens(50, 5, 2))
        >>> scores["previous_token"].shape, scores["induction"].shape
        (torch.Size([3, 4]), torch.Size([3, 4]))
    """
    seq = tokens.shape[1]
    if seq % 2 or not torch.equal(tokens[:, : seq // 2], tokens[:, seq // 2 :]):
        raise InputError("attention_scores needs sequences made of one half repeated twice; use repeated_tokens")
    half = seq // 2
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    patterns = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)])
    # patterns: [layer, batch, head, query_pos, key_pos]
    previous = patterns.diagonal(offset=-1, dim1=-2, dim2=-1).mean((1, -1))
    induction = patterns.diagonal(offset=1 - half, dim1=-2, dim2=-1)[..., 1:].mean((1, -1))
    return {"previous_token": previous, "induction": induction}


def ov_matrices(model: HookedTransformer, layer: int) -> Float[Tensor, "head d_model d_model"]:
    """``W_V W_O`` of each head (residual in, residual out, row-vector convention)."""
    attn = model.blocks[layer].attn
    W_V = attn.W_V.repeat_interleave(model.cfg.n_kv_groups, dim=0)
    return W_V @ attn.W_O


def qk_matrices(model: HookedTransformer, layer: int) -> Float[Tensor, "head d_model d_model"]:
    """``W_Q W_Kᵀ`` of each head (query residual on the left, key residual on the right)."""
    attn = model.blocks[layer].attn
    W_K = attn.W_K.repeat_interleave(model.cfg.n_kv_groups, dim=0)
    return attn.W_Q @ W_K.transpose(-1, -2)


def composition_scores(
    model: HookedTransformer, mode: str = "K", first_layer: int = 0, second_layer: int = 1
) -> Float[Tensor, "head head"]:
    """Q-, K- or V-composition of each head of ``first_layer`` into each head of ``second_layer``.

    ``score[i, j] = ‖A_i B_j‖_F / (‖A_i‖_F ‖B_j‖_F)`` with ``A = W_OV`` of the earlier head and
    ``B`` the later head's ``W_QKᵀ`` (K), ``W_QK`` (Q) or ``W_OV`` (V), as in Elhage et al. (2021).

    Example:
        >>> composition_scores(model, "K").shape
        torch.Size([4, 4])
    """
    if mode not in ("Q", "K", "V"):
        raise InputError(f"composition mode must be 'Q', 'K' or 'V', got {mode!r}")
    if not 0 <= first_layer < second_layer < model.cfg.n_layers:
        raise InputError(
            f"need 0 <= first_layer < second_layer < {model.cfg.n_layers}, got {first_layer}, {second_layer}"
        )
    with torch.no_grad():
        left = ov_matrices(model, first_layer)  # [head, d_model, d_model]
        right = {"Q": qk_matrices(model, second_layer), "K": qk_matrices(model, second_layer).transpose(-1, -2),
                 "V": ov_matrices(model, second_layer)}[mode]
        product = torch.einsum("iab,jbc->ijac", left, right).flatten(-2).norm(dim=-1)
        return product / (left.flatten(-2).norm(dim=-1)[:, None] * right.flatten(-2).norm(dim=-1)[None, :])


@torch.no_grad()
def induction_summary(run: InductionRun, n_sequences: int = 64, seed: int = 1234) -> dict:
    """The numbers the report shows: losses, both heads, their scores and the K-composition table.

    On fresh random halves repeated twice: the loss on the second half (and chance, ``log
    d_vocab``), the head of layer 0 with the highest previous-token score, the head of the last
    layer with the highest induction score, the layer-1 *induction heads* (score at least half
    the best), and whether the highest K-composition of all layer-0 → layer-1 pairs is the
    detected pair (``detected_pair_has_highest_k_composition``) or at least goes from the
    previous-token head into an induction head
    (``highest_k_composition_is_previous_token_to_induction``).

    Example:
        >>> run = train_induction(InductionConfig(d_vocab=16, seq_len=12, d_model=16, steps=5), progress=False)
        >>> round(induction_summary(run, n_sequences=4)["chance_loss"], 3)  # log(d_vocab)
        2.773
    """
    cfg, model = run.config, run.model
    half = cfg.seq_len // 2
    tokens = repeated_tokens(cfg.d_vocab, half, n_sequences, seed)
    per_token = model(tokens, return_type="loss", loss_per_token=True)  # [batch, pos - 1]
    scores = attention_scores(model, tokens)
    prev_head = int(scores["previous_token"][0].argmax())
    last = cfg.n_layers - 1
    ind_head = int(scores["induction"][last].argmax())
    k_comp = composition_scores(model, "K", 0, 1)
    best_pair = divmod(int(k_comp.argmax()), k_comp.shape[1])
    layer1_induction = scores["induction"][1]
    induction_heads = [h for h, v in enumerate(layer1_induction.tolist()) if v >= 0.5 * float(layer1_induction.max())]
    return {
        "config": dataclasses.asdict(cfg),
        "chance_loss": float(torch.log(torch.tensor(float(cfg.d_vocab)))),
        "first_half_loss": per_token[:, : half - 1].mean().item(),
        "second_half_loss": per_token[:, half:].mean().item(),
        "previous_token_head": [0, prev_head],
        "induction_head": [last, ind_head],
        "previous_token_scores": scores["previous_token"].tolist(),
        "induction_scores": scores["induction"].tolist(),
        "k_composition": k_comp.tolist(),
        "k_composition_best_pair": list(best_pair),
        "layer1_induction_heads": induction_heads,
        "k_composition_of_detected_pair": k_comp[prev_head, ind_head].item() if last == 1 else None,
        "detected_pair_has_highest_k_composition": last == 1 and best_pair == (prev_head, ind_head),
        "highest_k_composition_is_previous_token_to_induction": best_pair[0] == prev_head
        and best_pair[1] in induction_heads,
        "final_train_loss": run.history[-1]["loss"],
        "final_induction_loss": run.history[-1]["induction_loss"],
    }
