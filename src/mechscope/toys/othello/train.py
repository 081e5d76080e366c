"""Othello-GPT: a GPT-2-style hooked transformer trained on random legal games to predict legal moves.

The model reads a game's moves as tokens and, after each move, scores the next move. Training
games are uniformly random legal games, so the next move is uniform over the legal moves given
the prefix; the loss is the cross-entropy against that uniform distribution (``target="legal"``),
which equals the expected next-move cross-entropy of Li et al. (2023) up to a constant, with
less noise. ``target="next"`` trains on the sampled next move instead. The metric is
legal-move top-1 accuracy: how often the highest-scoring move is legal, over every position of
held-out games that has a next move.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.errors import ConfigError, InputError, LoadError
from mechscope.model.config import ModelConfig
from mechscope.model.transformer import HookedTransformer
from mechscope.toys import checkpoint
from mechscope.toys.othello.engine import check_size
from mechscope.toys.othello.games import game_states, playable_squares, random_games, to_tokens, vocab_size


@dataclass
class OthelloConfig:
    """Board, model, data and optimiser of an Othello-GPT run.

    Example:
        >>> OthelloConfig(size=6, d_model=32).model_config().d_vocab
        33
    """

    size: int = 6
    """Board size: 6 or 8."""
    n_layers: int = 4
    """Transformer blocks."""
    d_model: int = 128
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads per layer."""
    d_mlp: int | None = None
    """MLP width; ``None`` means ``4 * d_model``."""
    n_games: int = 100_000
    """Training games, generated once from ``seed``."""
    steps: int = 4000
    """Optimiser steps."""
    batch_size: int = 128
    """Games per step."""
    lr: float = 1e-3
    """AdamW peak learning rate (linear warm-up, then cosine decay to a tenth)."""
    warmup: int = 200
    """Warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    target: Literal["legal", "next"] = "legal"
    """Train on the uniform distribution over legal moves, or on the sampled next move."""
    eval_games: int = 2000
    """Held-out games for the accuracy (generated from ``seed + 1``)."""
    seed: int = 0
    """Seed of the initialisation, the training games and the batch order."""
    save_every: int = 500
    """With an output directory, write the resumable state every this many steps."""

    def __post_init__(self) -> None:
        check_size(self.size)
        if self.target not in ("legal", "next"):
            raise ConfigError(f"target must be 'legal' or 'next', got {self.target!r}")
        for name in ("n_layers", "d_model", "n_heads", "n_games", "steps", "batch_size", "eval_games", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup < 0:
            raise ConfigError(f"need lr > 0, weight_decay >= 0 and warmup >= 0; got lr={self.lr}, "
                              f"weight_decay={self.weight_decay}, warmup={self.warmup}")  # fmt: skip
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")

    def model_config(self) -> ModelConfig:
        """GPT-2 style: LayerNorm, learned positions, GELU MLPs; one token per playable square plus padding."""
        n_moves = self.size * self.size - 4
        return ModelConfig(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                           d_mlp=self.d_mlp or 4 * self.d_model, d_vocab=vocab_size(self.size), n_ctx=n_moves,
                           act_fn="gelu", model_name=f"othello-gpt-{self.size}x{self.size}")  # fmt: skip


@dataclass
class OthelloData:
    """Games as model inputs with their targets."""

    tokens: Int[Tensor, "batch pos"]
    """Move tokens (0 after the end)."""
    legal: Bool[Tensor, "batch pos d_vocab"]
    """After each move, the legal next moves as tokens."""
    next_token: Int[Tensor, "batch pos"]
    """The move actually played next (0 where there is none)."""
    has_next: Bool[Tensor, "batch pos"]
    """Positions with a next move (the ones scored)."""


def make_data(moves: Int[Tensor, "batch pos"], size: int, chunk: int = 4096) -> OthelloData:
    """Tokens and targets of games given as square indices, replayed ``chunk`` games at a time.

    Example:
        >>> data = make_data(random_games(2, 6), 6)
        >>> data.tokens.shape, data.legal.shape, bool(data.legal[data.has_next].any(-1).all())
        (torch.Size([2, 32]), torch.Size([2, 32, 33]), True)
    """
    _check_chunk(chunk)
    parts = [_targets(moves[start : start + chunk], size) for start in range(0, max(len(moves), 1), chunk)]
    return OthelloData(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(OthelloData)))


def _targets(moves: Int[Tensor, "batch pos"], size: int) -> OthelloData:
    states = game_states(moves, size)
    squares = playable_squares(size).to(moves.device)
    legal = torch.zeros(*moves.shape, vocab_size(size), dtype=torch.bool, device=moves.device)
    legal[..., 1:] = states.legal[..., squares]
    tokens = to_tokens(moves, size)
    return OthelloData(tokens, legal, _next_tokens(tokens), states.player != 0)


def _check_chunk(chunk: int) -> None:
    if chunk < 1:
        raise InputError(f"chunk must be a positive number of games, got {chunk}")


def _next_tokens(tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    return torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], 1)


class PackedGames:
    """Training games held compactly: tokens as bytes and each position's legal moves as the bits of
    one int64 (d_vocab <= 61), so 2,000,000 8x8 games take about 1.2 GB instead of 9.4 GB as
    `OthelloData`. `batch` unpacks the chosen games to an `OthelloData`, equal to `make_data` of them.

    Example:
        >>> moves = random_games(5, 6, seed=3)
        >>> packed, full = PackedGames(moves, 6), make_data(moves, 6)
        >>> rows = torch.tensor([4, 0, 4])
        >>> bool((packed.batch(rows).legal == full.legal[rows]).all()), len(packed)
        (True, 5)
    """

    def __init__(self, moves: Int[Tensor, "batch pos"], size: int, chunk: int = 4096) -> None:
        _check_chunk(chunk)
        n_vocab = vocab_size(size)
        self.bits = 1 << torch.arange(n_vocab, dtype=torch.int64)
        self.tokens = torch.empty(moves.shape, dtype=torch.uint8)
        self.legal = torch.empty(moves.shape, dtype=torch.int64)
        self.has_next = torch.empty(moves.shape, dtype=torch.bool)
        for start in range(0, len(moves), chunk):
            part = _targets(moves[start : start + chunk].cpu(), size)
            rows = slice(start, start + len(part.tokens))
            self.tokens[rows] = part.tokens.to(torch.uint8)
            self.legal[rows] = (part.legal.to(torch.int64) * self.bits).sum(-1)
            self.has_next[rows] = part.has_next

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, rows: Int[Tensor, " batch"], device: torch.device | str = "cpu") -> OthelloData:
        """The games ``rows`` as model inputs and targets on ``device``."""
        tokens = self.tokens[rows].to(device=device, dtype=torch.long)
        legal = (self.legal[rows].to(device)[..., None] & self.bits.to(device)) != 0
        return OthelloData(tokens, legal, _next_tokens(tokens), self.has_next[rows].to(device))


def legal_move_loss(logits: Float[Tensor, "batch pos d_vocab"], data: OthelloData, target: str = "legal") -> Tensor:
    """Mean cross-entropy over scored positions, against the uniform distribution over legal
    moves (``"legal"``) or the move played next (``"next"``).

    Example:
        >>> data = make_data(random_games(2, 6), 6)
        >>> loss = legal_move_loss(torch.zeros(2, 32, 33), data)  # uniform scores: log(d_vocab)
        >>> torch.testing.assert_close(loss, torch.log(torch.tensor(33.0)))
    """
    logp = logits.log_softmax(-1)
    if target == "legal":
        legal = data.legal.to(logp.dtype)
        per = -(logp * legal).sum(-1) / legal.sum(-1).clamp_min(1)
    else:
        per = -logp.gather(-1, data.next_token[..., None])[..., 0]
    mask = data.has_next.to(logp.dtype)
    return (per * mask).sum() / mask.sum()


@torch.no_grad()
def legal_move_accuracy(model: HookedTransformer, data: OthelloData, batch_size: int = 500) -> dict:
    """Top-1 legal-move accuracy on ``data``: overall and per position, with the count of positions scored.

    Example:
        >>> cfg = OthelloConfig(d_model=16, n_layers=1, n_heads=2)
        >>> untrained = HookedTransformer(cfg.model_config()).init_weights(seed=0)
        >>> acc = legal_move_accuracy(untrained, make_data(random_games(4), 6))
        >>> 0 <= acc["accuracy"] <= 1, len(acc["per_position"])
        (True, 32)
    """
    hits, counts = torch.zeros(data.tokens.shape[1]), torch.zeros(data.tokens.shape[1])
    device = next(model.parameters()).device
    for start in range(0, data.tokens.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        logits = model(data.tokens[rows].to(device)).cpu()
        top = logits.argmax(-1, keepdim=True)
        hit = data.legal[rows].gather(-1, top)[..., 0] & data.has_next[rows]
        hits += hit.sum(0)
        counts += data.has_next[rows].sum(0)
    per_position = (hits / counts.clamp_min(1)).tolist()
    return {"accuracy": float(hits.sum() / counts.sum()), "per_position": per_position, "n_scored": int(counts.sum())}


@dataclass
class OthelloRun:
    """A trained Othello-GPT, its settings and its curves."""

    config: OthelloConfig
    model: HookedTransformer
    history: list[dict]
    """Every 1% of the steps: ``step``, ``loss``."""
    eval: dict
    """`legal_move_accuracy` on the held-out games."""


_RESUMABLE = ("steps", "save_every", "eval_games")


def _lr_factor(cfg: OthelloConfig, step: int) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * min(1.0, progress))).item())


def train_othello(
    cfg: OthelloConfig | None = None, out_dir: str | os.PathLike | None = None, *, progress: bool = True,
    device: torch.device | str = "cpu",
) -> OthelloRun:  # fmt: skip
    """Train an Othello-GPT on ``cfg.n_games`` random games and score it on held-out games.

    With ``out_dir`` the run is resumable (``state.pt``, written atomically every ``save_every``
    steps; calling again with the same settings continues, and ``steps`` may grow), and the
    final weights and settings are written as ``model.safetensors`` and ``config.json``
    (`load_othello`).

    Example:
        >>> cfg = OthelloConfig(d_model=16, n_layers=1, n_heads=2, n_games=64, steps=3, batch_size=8, eval_games=8)
        >>> run = train_othello(cfg, progress=False)
        >>> len(run.history), 0 <= run.eval["accuracy"] <= 1
        (3, True)
    """
    cfg = cfg or OthelloConfig()
    model = HookedTransformer(cfg.model_config()).init_weights(seed=cfg.seed, std=0.02).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    settings = dataclasses.asdict(cfg)
    history, start = checkpoint.resume(out_dir, settings, _RESUMABLE, cfg.steps, model, optimizer, generator)
    train = PackedGames(random_games(cfg.n_games, cfg.size, seed=cfg.seed, progress=progress), cfg.size)
    log_every = max(1, cfg.steps // 100)
    model.train()
    bar = tqdm(range(start, cfg.steps), desc="othello-gpt", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        rows = torch.randint(cfg.n_games, (cfg.batch_size,), generator=generator)
        batch = train.batch(rows, device)
        loss = legal_move_loss(model(batch.tokens), batch, cfg.target)
        loss.backward()
        for group in optimizer.param_groups:  # the schedule is a function of the step alone (resumable)
            group["lr"] = cfg.lr * _lr_factor(cfg, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if out_dir is not None and (done % cfg.save_every == 0 or done == cfg.steps):
            checkpoint.save_state(out_dir, settings, done, model=model.state_dict(), optimizer=optimizer.state_dict(),
                                  generator=generator.get_state(), history=history)  # fmt: skip
    model.eval()
    held_out = make_data(random_games(cfg.eval_games, cfg.size, seed=cfg.seed + 1), cfg.size)
    result = legal_move_accuracy(model, held_out)
    if out_dir is not None:
        save_othello(model, cfg, out_dir, {"eval": result, "history": history})
    return OthelloRun(cfg, model, history, result)


def save_othello(
    model: HookedTransformer, cfg: OthelloConfig, out_dir: str | os.PathLike, extra: dict | None = None
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (the `OthelloConfig` and ``extra``) to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(weights, str(tmp))
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"othello": dataclasses.asdict(cfg), **(extra or {})}, indent=2))
    return out


def load_othello(out_dir: str | os.PathLike) -> tuple[HookedTransformer, OthelloConfig, dict]:
    """The model, settings and extra record written by `train_othello` with an output directory.

    Example:
        >>> import tempfile
        >>> cfg = OthelloConfig(d_model=16, n_layers=1, n_heads=2)
        >>> out = save_othello(HookedTransformer(cfg.model_config()).init_weights(seed=0), cfg, tempfile.mkdtemp())
        >>> load_othello(out)[1].d_model
        16
    """
    from safetensors.torch import load_file

    out = Path(out_dir)
    if not (out / "model.safetensors").is_file() or not (out / "config.json").is_file():
        raise LoadError(f"{out} holds no trained Othello-GPT (model.safetensors and config.json); train one first")
    meta = json.loads((out / "config.json").read_text())
    cfg = OthelloConfig(**meta.pop("othello"))
    model = HookedTransformer(cfg.model_config())
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    return model.eval(), cfg, meta
