"""Random legal Othello games, their move tokens, and the labels of every position.

`random_games` plays uniformly random legal moves for a batch of games at once (seeded,
passes handled: a pass is not a move, and the sequence simply continues with the other
player). `game_states` replays move sequences and returns, after every move, the board as
black/white/empty and as mine/theirs/empty (relative to the player to move next), the legal
next moves, the discs the move turned, and who moves next. `to_tokens`/`from_tokens` map moves
to the token ids an Othello-GPT reads (0 is padding; the four centre squares, never played,
have no token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.errors import InputError
from mechscope.toys.othello.engine import check_size, initial_boards, legal_moves, next_player, play

PAD = 0
"""Token id of padding after a game's last move."""
BOARD_CLASSES = ["empty", "black", "white"]
RELATIVE_CLASSES = ["empty", "mine", "theirs"]


def playable_squares(size: int) -> Int[Tensor, " d_vocab"]:
    """Squares that can be played (every square but the four centre ones), in order.

    Example:
        >>> len(playable_squares(6)), len(playable_squares(8))
        (32, 60)
    """
    return (initial_boards(1, size)[0] == 0).nonzero()[:, 0]


def vocab_size(size: int) -> int:
    """Tokens of an Othello-GPT: padding plus one per playable square.

    Example:
        >>> vocab_size(6)
        33
    """
    return len(playable_squares(check_size(size))) + 1


def _check_moves(moves: Tensor, size: int, what: str = "moves", low: int = -1, high: int | None = None) -> None:
    """A ``[game, pos]`` integer tensor with values in ``[low, high)`` (default: the board's squares)."""
    high = size * size if high is None else high
    if moves.dim() != 2 or moves.is_floating_point() or moves.dtype == torch.bool:
        raise InputError(f"{what} must be an integer tensor [game, pos], "
                         f"got {moves.dtype} of shape {tuple(moves.shape)}")  # fmt: skip
    if moves.numel() and (int(moves.min()) < low or int(moves.max()) >= high):
        raise InputError(f"{what} must lie in [{low}, {high - 1}] on a {size}x{size} board, "
                         f"found {int(moves.min())}..{int(moves.max())}")  # fmt: skip


def to_tokens(moves: Int[Tensor, "game pos"], size: int) -> Int[Tensor, "game pos"]:
    """Token ids of square indices (``-1`` -> padding).

    Example:
        >>> to_tokens(torch.tensor([[0, 35, -1]]), 6).tolist()
        [[1, 32, 0]]
    """
    _check_moves(moves, check_size(size))
    table = torch.full((size * size,), -1, dtype=torch.long)
    table[playable_squares(size)] = torch.arange(1, vocab_size(size))
    tokens = torch.where(moves >= 0, table.to(moves.device)[moves.clamp_min(0)], PAD)
    if bool((tokens < 0).any()):
        raise InputError("a centre square is never played and has no token")
    return tokens


def from_tokens(tokens: Int[Tensor, "game pos"], size: int) -> Int[Tensor, "game pos"]:
    """Square indices of token ids (padding -> ``-1``).

    Example:
        >>> from_tokens(torch.tensor([[1, 32, 0]]), 6).tolist()
        [[0, 35, -1]]
    """
    _check_moves(tokens, check_size(size), "tokens", 0, vocab_size(size))
    table = torch.cat([torch.tensor([-1]), playable_squares(size)]).to(tokens.device)
    return table[tokens]


@torch.no_grad()
def random_games(
    n_games: int, size: int = 6, seed: int = 0, *, device: torch.device | str = "cpu", chunk: int = 65536,
    progress: bool = False,
) -> Int[Tensor, "game pos"]:  # fmt: skip
    """``n_games`` games of uniformly random legal moves: square indices ``[game, size * size - 4]``,
    ``-1`` after the game's end. Games are generated ``chunk`` at a time from one seeded generator.

    Example:
        >>> games = random_games(3, 6, seed=1)
        >>> games.shape, bool((games[:, :4] >= 0).all())
        (torch.Size([3, 32]), True)
    """
    check_size(size)
    if n_games < 0 or chunk < 1:
        raise InputError(f"n_games must be >= 0 and chunk >= 1, got n_games={n_games}, chunk={chunk}")
    generator = torch.Generator(device=device).manual_seed(seed)
    max_moves = size * size - 4
    out = torch.full((n_games, max_moves), -1, dtype=torch.long, device=device)
    for start in tqdm(range(0, n_games, chunk), desc="games", disable=not progress, leave=False):
        g = min(chunk, n_games - start)
        boards = initial_boards(g, size, device)
        player = torch.ones(g, dtype=torch.int8, device=device)  # black starts
        moves = out[start : start + g]  # filled in place: no second copy of all games
        for t in range(max_moves):
            legal = legal_moves(boards, player)
            active = legal.any(1)
            if not bool(active.any()):
                break
            weights = torch.where(active[:, None], legal.float(), 1.0)
            move = torch.multinomial(weights, 1, generator=generator)[:, 0]
            move = torch.where(active, move, -1)
            boards, _ = play(boards, player, move)
            moves[:, t] = move
            player = torch.where(active, next_player(boards, player), player)
    return out


@dataclass
class GameStates:
    """Everything about each position of a batch of games, after each move (``[game, pos, ...]``).

    Rows past a game's end repeat its final board, with ``valid`` false.
    """

    moves: Int[Tensor, "game pos"]
    """Square of each move (``-1`` past the end)."""
    boards: Int[Tensor, "game pos square"]
    """After the move: +1 black, -1 white, 0 empty."""
    mover: Int[Tensor, "game pos"]
    """Who made the move: +1 black, -1 white (0 past the end)."""
    player: Int[Tensor, "game pos"]
    """Who moves next: +1, -1, or 0 when the game is over."""
    legal: Bool[Tensor, "game pos square"]
    """Legal moves of the next player."""
    flipped: Bool[Tensor, "game pos square"]
    """Discs the move turned."""
    valid: Bool[Tensor, "game pos"]
    """Whether the position is a real move."""

    @property
    def size(self) -> int:
        return int(round(self.boards.shape[-1] ** 0.5))

    def board_labels(self) -> Int[Tensor, "game pos square"]:
        """Black/white/empty as classes ``0 empty, 1 black, 2 white`` (`BOARD_CLASSES`).

        Example:
            >>> game_states(random_games(1, 6), 6).board_labels()[0, 0].unique().tolist()
            [0, 1, 2]
        """
        return torch.where(self.boards == 1, 1, torch.where(self.boards == -1, 2, 0))

    def relative_labels(self, relative_to: str = "next") -> Int[Tensor, "game pos square"]:
        """Mine/theirs/empty as classes ``0 empty, 1 mine, 2 theirs`` (`RELATIVE_CLASSES`),
        relative to the player to move next (``"next"``) or to the player who just moved (``"mover"``).
        At the end of a game (no next player) the next player counts as the mover's opponent.

        Example:
            >>> states = game_states(torch.tensor([[19]]), 8)  # black plays C4
            >>> int(states.relative_labels()[0, 0, 19]), int(states.relative_labels("mover")[0, 0, 19])
            (2, 1)
        """
        if relative_to not in ("next", "mover"):
            raise InputError(f"relative_to must be 'next' or 'mover', got {relative_to!r}")
        who = self.mover if relative_to == "mover" else torch.where(self.player == 0, -self.mover, self.player)
        signed = self.boards * who[..., None].to(self.boards.dtype)
        return torch.where(signed == 1, 1, torch.where(signed == -1, 2, 0))


@torch.no_grad()
def game_states(moves: Int[Tensor, "game pos"], size: int) -> GameStates:
    """Replay games on a ``size x size`` board (square indices, ``-1`` after the end) and label
    every position. An illegal move raises an `InputError`.

    Example:
        >>> states = game_states(torch.tensor([[19, 18]]), size=8)  # C4 (black), C3 (white)
        >>> states.player.tolist(), int(states.legal[0, 1].sum())
        ([[-1, 1]], 4)
    """
    _check_moves(moves, check_size(size))
    n_games, n_moves = moves.shape
    after_padding = ((moves[:, 1:] >= 0) & (moves[:, :-1] < 0)).any(1)
    if bool(after_padding.any()):
        game = int(after_padding.nonzero()[0])
        raise InputError(f"game {game}: a move follows padding (-1); a pass is not a move, and -1 only ends a game")
    if n_moves > size * size - 4:
        raise InputError(f"{n_moves} moves do not fit a {size}x{size} board; pass size=8")
    boards = initial_boards(n_games, size, moves.device)
    player = torch.ones(n_games, dtype=torch.int8, device=moves.device)
    out = {k: [] for k in ("boards", "mover", "player", "legal", "flipped", "valid")}
    for t in range(n_moves):
        move = moves[:, t]
        valid = move >= 0
        if bool((valid & (player == 0)).any()):
            raise InputError(f"a game continues after its end (move {t})")
        mover = torch.where(valid, player, 0)
        boards, flipped = play(boards, torch.where(valid, player, 1).to(torch.int8), move)
        after = next_player(boards, torch.where(valid, player, 1).to(torch.int8))
        player = torch.where(valid, after, player)
        out["boards"].append(boards)
        out["mover"].append(mover)
        out["player"].append(torch.where(valid, after, 0))
        out["legal"].append(legal_moves(boards, player) & (player != 0)[:, None])
        out["flipped"].append(flipped)
        out["valid"].append(valid)
    stacked = {k: torch.stack(v, 1) for k, v in out.items()}
    return GameStates(moves=moves, **stacked)
