"""Othello-GPT's world model: linear board probes per layer, and edits along their directions.

`board_probes` fits, at every layer, one batched logistic probe for all squares twice: on the
board as black/white/empty and as mine/theirs/empty (relative to the player to move). Nanda
et al. (2023) found the second linear and the first much less so. `intervene` edits one
square's mine/theirs direction in the residual stream at one position and asks whether the
model's top moves become the legal moves of the edited board (Li et al. 2023), against the same
edit along a random direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.errors import InputError
from mechscope.model.transformer import HookedTransformer
from mechscope.names import act_name
from mechscope.probing import LinearProbe, ProbeConfig, collect_activations, fit_logistic, split_by_sequence
from mechscope.toys.othello.engine import legal_moves
from mechscope.toys.othello.games import (
    BOARD_CLASSES,
    RELATIVE_CLASSES,
    game_states,
    playable_squares,
    random_games,
    to_tokens,
)

EMPTY, MINE, THEIRS = 0, 1, 2


def layer_hooks(n_layers: int) -> list[str]:
    """The residual stream after the embedding and after every block.

    Example:
        >>> layer_hooks(2)
        ['blocks.0.hook_resid_pre', 'blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
    """
    return [act_name("resid_pre", 0)] + [act_name("resid_post", layer) for layer in range(n_layers)]


@dataclass
class BoardProbes:
    """Per-layer board probes and their held-out accuracy."""

    hooks: list[str]
    relative: dict[str, LinearProbe]
    """Mine/theirs/empty probe per hook (targets: squares)."""
    absolute: dict[str, LinearProbe]
    """Black/white/empty probe per hook."""
    accuracy: dict[str, dict[str, Tensor]]
    """``{"relative"|"absolute": {hook: per-square test accuracy [square]}}``."""

    def table(self) -> list[dict]:
        """One row per hook: mean test accuracy over squares of both probes (and over the
        squares that are ever empty, excluding the four centre squares).

        Example:
            >>> accuracy = {"relative": {"h": torch.ones(36)}, "absolute": {"h": torch.zeros(36)}}
            >>> BoardProbes(["h"], {}, {}, accuracy).table()[0]["mine_theirs"]
            1.0
        """
        rows = []
        for hook in self.hooks:
            rel, ab = self.accuracy["relative"][hook], self.accuracy["absolute"][hook]
            playable = playable_squares(int(round(rel.shape[0] ** 0.5)))
            rows.append({"hook": hook, "mine_theirs": float(rel.mean()), "black_white": float(ab.mean()),
                         "mine_theirs_playable": float(rel[playable].mean()),
                         "black_white_playable": float(ab[playable].mean())})  # fmt: skip
        return rows


def board_probes(
    model: HookedTransformer, size: int, n_games: int = 2000, seed: int = 100, *, cfg: ProbeConfig | None = None,
    test_fraction: float = 0.2, progress: bool = False,
) -> BoardProbes:  # fmt: skip
    """Fit mine/theirs/empty and black/white/empty probes on every layer's residual stream.

    Activations at every move of ``n_games`` fresh random games; a ``test_fraction`` of the
    games is held out (split by game). Each probe is one batched fit of ``size * size`` squares
    x 3 classes.

    Example:
        >>> from mechscope.toys.othello.train import OthelloConfig
        >>> m = HookedTransformer(OthelloConfig(d_model=16, n_layers=1, n_heads=2).model_config()).init_weights(seed=0)
        >>> result = board_probes(m, 6, n_games=10, cfg=ProbeConfig(max_iter=5))
        >>> [row["hook"] for row in result.table()]
        ['blocks.0.hook_resid_pre', 'blocks.0.hook_resid_post']
    """
    cfg = cfg or ProbeConfig(l2=1e-3, batch_size=4096, epochs=15, lr=1e-2)
    moves = random_games(n_games, size, seed=seed)
    states = game_states(moves, size)
    hooks = layer_hooks(model.cfg.n_layers)
    data = collect_activations(model, to_tokens(moves, size), hooks, states.valid, batch_size=256, progress=progress)
    train, test = split_by_sequence(data.sequence, test_fraction, seed)
    labels = {"relative": data.labels_for(states.relative_labels()), "absolute": data.labels_for(states.board_labels())}
    names = [f"{'ABCDEFGH'[s // size]}{s % size + 1}" for s in range(size * size)]
    probes: dict[str, dict[str, LinearProbe]] = {"relative": {}, "absolute": {}}
    accuracy: dict[str, dict[str, Tensor]] = {"relative": {}, "absolute": {}}
    for hook in tqdm(hooks, desc="board probes", disable=not progress, leave=False):
        x = data[hook]
        for kind, classes in (("relative", RELATIVE_CLASSES), ("absolute", BOARD_CLASSES)):
            y = labels[kind]
            probe = fit_logistic(x[train], y[train], cfg, n_classes=3, hook=hook, target_names=names,
                                 class_names=classes, groups=data.sequence[train])  # fmt: skip
            probes[kind][hook] = probe
            accuracy[kind][hook] = probe.evaluate(x[test], y[test])["accuracy"]
    return BoardProbes(hooks, probes["relative"], probes["absolute"], accuracy)


@dataclass
class InterventionResult:
    """How well the model's top moves match a board, after each kind of edit.

    Each entry is a tensor over the edited positions: ``errors`` counts the legal moves of the
    reference board missing from the model's top-N moves (N: the number of legal moves there).
    """

    hook: str
    squares: list[int]
    errors: dict[str, Tensor]
    """``probe`` / ``random`` / ``none`` edit, scored against the edited board; ``none_original``:
    no edit against the original board."""
    flipped_probe: float
    """Fraction of edits after which the probe reads the square as the target class."""

    def summary(self) -> dict[str, float]:
        """Mean errors and the fraction of positions with none, per kind of edit.

        Example:
            >>> InterventionResult("h", [0, 5], {"probe": torch.tensor([0, 2])}, 1.0).summary()
            {'probe_mean_errors': 1.0, 'probe_exact': 0.5, 'n_positions': 2, 'flipped_probe': 1.0}
        """
        out = {}
        for kind, err in self.errors.items():
            out[f"{kind}_mean_errors"] = float(err.float().mean())
            out[f"{kind}_exact"] = float((err == 0).float().mean())
        return {**out, "n_positions": len(self.squares), "flipped_probe": self.flipped_probe}


def _top_n_errors(logits: Float[Tensor, "batch d_vocab"], legal_tokens: Tensor) -> Tensor:
    n = legal_tokens.sum(-1)
    order = logits.argsort(-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(logits.shape[-1]).expand_as(order).contiguous())
    in_top = rank < n[:, None]
    return n - (in_top & legal_tokens).sum(-1)


@torch.no_grad()
def intervene(
    model: HookedTransformer, probe: LinearProbe, size: int, n_positions: int = 500, seed: int = 200,
    scale: float = 1.0,
) -> InterventionResult:  # fmt: skip
    """Flip one square between mine and theirs along ``probe``'s direction and score the model's moves.

    Positions come from fresh random games: at each, one occupied square is chosen whose colour
    change alters the next player's legal moves (and leaves at least one). At ``probe.hook``
    and that position only, the residual stream ``x`` moves along ``k = w_target - w_current``
    (the probe's weights for the square) so that the logit difference ``k . x + c`` becomes
    ``-scale`` times itself; the random control moves by the same distance along a random
    direction. The model's top-N moves are compared with the N legal moves of the edited board.

    Example:
        >>> from mechscope.toys.othello.train import OthelloConfig
        >>> m = HookedTransformer(OthelloConfig(d_model=16, n_layers=1, n_heads=2).model_config()).init_weights(seed=0)
        >>> probes = board_probes(m, 6, n_games=10, cfg=ProbeConfig(max_iter=5))
        >>> result = intervene(m, probes.relative["blocks.0.hook_resid_post"], 6, n_positions=8)
        >>> sorted(result.errors)
        ['none', 'none_original', 'probe', 'random']
    """
    if n_positions < 1:
        raise InputError(f"n_positions must be >= 1, got {n_positions}")
    if probe.hook is None or probe.n_classes != 3 or probe.n_targets != size * size:
        raise InputError(f"need a mine/theirs/empty probe of {size * size} squares with its hook; use board_probes")
    gen = torch.Generator().manual_seed(seed)
    moves = random_games(max(8, n_positions // 4), size, seed=seed)
    states = game_states(moves, size)
    rel = states.relative_labels()
    games, positions = (states.player != 0).nonzero(as_tuple=True)
    picked = {"game": [], "pos": [], "square": [], "legal": []}
    for i in torch.randperm(len(games), generator=gen).tolist():
        g, t = int(games[i]), int(positions[i])
        board, player = states.boards[g, t], states.player[g, t : t + 1]
        occupied = (rel[g, t] != EMPTY).nonzero()[:, 0]
        edited = board[None].repeat(len(occupied), 1)
        edited[torch.arange(len(occupied)), occupied] *= -1
        legal = legal_moves(edited, player.repeat(len(occupied)))
        useful = (legal != states.legal[g, t]).any(1) & legal.any(1)
        if not bool(useful.any()):
            continue
        j = int(useful.nonzero()[torch.randint(int(useful.sum()), (1,), generator=gen), 0])
        for key, value in (("game", g), ("pos", t), ("square", int(occupied[j])), ("legal", legal[j])):
            picked[key].append(value)
        if len(picked["game"]) == n_positions:
            break
    if not picked["game"]:
        raise InputError("no position where flipping one square changes the legal moves; use more positions")
    g, t, sq = (torch.tensor(picked[k]) for k in ("game", "pos", "square"))
    tokens = to_tokens(moves[g], size)
    current = rel[g, t, sq]  # MINE or THEIRS
    target = torch.where(current == MINE, THEIRS, MINE)
    w, b = probe.weight[sq], probe.bias[sq]  # [n, d_model, class], [n, class]
    k = w.gather(2, target[:, None, None].expand(-1, w.shape[1], 1))[..., 0] - w.gather(
        2, current[:, None, None].expand(-1, w.shape[1], 1))[..., 0]  # fmt: skip
    c = b.gather(1, target[:, None])[:, 0] - b.gather(1, current[:, None])[:, 0]
    unit = k / k.norm(dim=-1, keepdim=True)
    random_dir = torch.randn(k.shape, generator=gen)
    random_dir = random_dir / random_dir.norm(dim=-1, keepdim=True)
    rows = torch.arange(len(g))
    record = {}

    def edit(direction: Tensor | None):
        def hook_fn(resid: Tensor, *, hook) -> Tensor:
            x = resid[rows, t]  # [n, d_model]
            diff = (k * x).sum(-1) + c
            step = -(1 + scale) * diff / k.norm(dim=-1)  # along the unit probe direction
            if direction is None:
                return resid
            resid = resid.clone()
            resid[rows, t] = x + step[:, None] * direction
            record["after"] = resid[rows, t]
            return resid

        return hook_fn

    logits = {}
    for name, direction in (("probe", unit), ("random", random_dir), ("none", None)):
        with model.hooks(fwd_hooks=[(probe.hook, edit(direction))]):
            logits[name] = model(tokens)[rows, t]
        if name == "probe":
            flipped = float((probe.predict(record["after"])[rows, sq] == target).float().mean())
    squares = playable_squares(size)
    edited_legal = torch.stack(picked["legal"])[:, squares]
    original_legal = states.legal[g, t][:, squares]
    pad = torch.zeros(len(g), 1, dtype=torch.bool)
    edited_tokens, original_tokens = torch.cat([pad, edited_legal], 1), torch.cat([pad, original_legal], 1)
    errors = {name: _top_n_errors(lg, edited_tokens) for name, lg in logits.items()}
    errors["none_original"] = _top_n_errors(logits["none"], original_tokens)
    return InterventionResult(probe.hook, sq.tolist(), errors, flipped)
