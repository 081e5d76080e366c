"""Othello rules on ``size x size`` boards (6 or 8), vectorised over many games.

A board is a row of ``size * size`` squares in row-major order (square ``r * size + c``; row 0
at the top, written ``A``, columns from 1): +1 a black disc, -1 a white disc, 0 empty. Black
moves first; the four centre squares start white on the diagonal (``D4`` and ``E5`` on 8x8) and
black off it. A move must flank at least one line of opponent discs, which turn over; a player
with no legal move passes; the game ends when neither can move.

Every function takes a batch of boards ``[game, square]`` and one player per game, and works
with tensor operations only: inside, each game's discs are two 64-bit integers (bitboards) and
moves and flips are found by shifting them in the eight directions (a Kogge-Stone flood), so a
step for ten thousand games is a few hundred operations on vectors of ten thousand integers.
"""

from __future__ import annotations

from functools import cache

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechscope.errors import InputError

SIZES = (6, 8)
DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
BLACK, WHITE, EMPTY = 1, -1, 0


def check_size(size: int) -> int:
    """``size`` if it is a supported board size.

    Example:
        >>> check_size(6)
        6
    """
    if size not in SIZES:
        raise InputError(f"board size {size} is not supported; choose among {list(SIZES)}")
    return size


def square_name(square: int, size: int) -> str:
    """``"C4"`` for square ``2 * size + 3``: row letter, then column number from 1.

    Example:
        >>> square_name(19, 8), square_name(0, 6)
        ('C4', 'A1')
    """
    r, c = divmod(square, size)
    return f"{'ABCDEFGH'[r]}{c + 1}"


def parse_square(name: str, size: int) -> int:
    """The inverse of `square_name`.

    Example:
        >>> parse_square("C4", 8)
        19
    """
    if len(name) != 2 or name[0].upper() not in "ABCDEFGH"[:size] or not name[1].isdigit():
        raise InputError(
            f"{name!r} is not a square of a {size}x{size} board (e.g. 'A1' ... '{square_name(size * size - 1, size)}')"
        )
    r, c = "ABCDEFGH".index(name[0].upper()), int(name[1]) - 1
    if not 0 <= c < size:
        raise InputError(f"{name!r}: columns run from 1 to {size}")
    return r * size + c


def initial_boards(n_games: int, size: int = 8, device: torch.device | str = "cpu") -> Int[Tensor, "game square"]:
    """``n_games`` starting boards.

    Example:
        >>> initial_boards(1, 6).view(6, 6)[2:4, 2:4].tolist()
        [[-1, 1], [1, -1]]
    """
    check_size(size)
    boards = torch.zeros(n_games, size * size, dtype=torch.int8, device=device)
    h = size // 2
    for (r, c), colour in (((h - 1, h - 1), WHITE), ((h, h), WHITE), ((h - 1, h), BLACK), ((h, h - 1), BLACK)):
        boards[:, r * size + c] = colour
    return boards


@cache
def _masks(size: int) -> tuple[tuple[int, int], ...]:
    """Per direction: the bit shift and the mask of squares a shifted disc may land on."""
    full = (1 << (size * size)) - 1
    first_col = sum(1 << (r * size) for r in range(size))
    last_col = first_col << (size - 1)
    out = []
    for dr, dc in DIRECTIONS:
        mask = full & ~(first_col if dc == 1 else last_col if dc == -1 else 0)
        out.append((dr * size + dc, _signed(mask)))
    return tuple(out)


def _signed(value: int) -> int:
    """An unsigned 64-bit pattern as the int64 that holds it."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift(x: Tensor, amount: int, mask: int) -> Tensor:
    if amount > 0:
        return (x << amount) & mask
    low = (1 << (64 + amount)) - 1  # clear the bits an arithmetic right shift copies from the sign
    return ((x >> -amount) & low) & mask


def to_bitboards(boards: Int[Tensor, "game square"], player: Int[Tensor, " game"]) -> tuple[Tensor, Tensor]:
    """``(mine, theirs)``: one int64 per game, bit ``square`` set where ``player`` (resp. the
    opponent) has a disc.

    Example:
        >>> mine, theirs = to_bitboards(initial_boards(1, 6), torch.tensor([1]))
        >>> [s for s in range(36) if int(mine[0]) >> s & 1]
        [15, 20]
    """
    n = boards.shape[1]
    weights = _bit_weights(n, boards.device)
    relative = boards.long() * player.long()[:, None]
    return ((relative == 1).long() * weights).sum(1), ((relative == -1).long() * weights).sum(1)


def _bit_weights(n: int, device) -> Tensor:
    return torch.tensor([_signed(1 << s) for s in range(n)], dtype=torch.long, device=device)


def from_bitboard(bits: Int[Tensor, " game"], n_squares: int) -> Bool[Tensor, "game square"]:
    """The squares whose bit is set.

    Example:
        >>> from_bitboard(torch.tensor([5]), 36)[0, :4].tolist()
        [True, False, True, False]
    """
    return (bits[:, None] & _bit_weights(n_squares, bits.device)) != 0


def legal_bits(mine: Tensor, theirs: Tensor, size: int) -> Tensor:
    """Bitboard of the legal moves of the player owning ``mine`` (Kogge-Stone flood in 8 directions)."""
    empty = ~(mine | theirs) & _signed((1 << (size * size)) - 1)
    moves = torch.zeros_like(mine)
    for amount, mask in _masks(size):
        run = _shift(mine, amount, mask) & theirs
        for _ in range(size - 3):
            run = run | (_shift(run, amount, mask) & theirs)
        moves = moves | (_shift(run, amount, mask) & empty)
    return moves


def flip_bits(mine: Tensor, theirs: Tensor, move_bit: Tensor, size: int) -> Tensor:
    """Bitboard of the discs turned when the owner of ``mine`` plays ``move_bit`` (0: none)."""
    flips = torch.zeros_like(mine)
    for amount, mask in _masks(size):
        line = torch.zeros_like(mine)  # opponent discs passed so far along this ray
        cursor = _shift(move_bit, amount, mask)
        walking = torch.ones_like(mine, dtype=torch.bool)
        for _ in range(size - 1):
            on_theirs, on_mine = (cursor & theirs) != 0, (cursor & mine) != 0
            flips = torch.where(walking & on_mine, flips | line, flips)  # closed by one of mine
            line = line | cursor
            walking = walking & on_theirs
            cursor = _shift(cursor, amount, mask)
    return flips


def legal_moves(boards: Int[Tensor, "game square"], player: Int[Tensor, " game"]) -> Bool[Tensor, "game square"]:
    """Where ``player`` may play.

    Example:
        >>> [square_name(int(s), 8) for s in legal_moves(initial_boards(1), torch.tensor([1]))[0].nonzero()]
        ['C4', 'D3', 'E6', 'F5']
    """
    n = boards.shape[1]
    mine, theirs = to_bitboards(boards, player)
    return from_bitboard(legal_bits(mine, theirs, int(round(n**0.5))), n)


def play(
    boards: Int[Tensor, "game square"], player: Int[Tensor, " game"], moves: Int[Tensor, " game"]
) -> tuple[Int[Tensor, "game square"], Bool[Tensor, "game square"]]:
    """Boards after ``player`` plays ``moves`` (``-1``: no move, the board is kept), and the turned discs.

    An illegal move raises an `InputError` naming the game and the square.

    Example:
        >>> boards, flipped = play(initial_boards(1, 8), torch.tensor([1]), torch.tensor([19]))
        >>> int(boards[0, 27]), [square_name(int(s), 8) for s in flipped[0].nonzero()]
        (1, ['D4'])
    """
    n = boards.shape[1]
    size = int(round(n**0.5))
    mine, theirs = to_bitboards(boards, player)
    moving = moves >= 0
    move_bit = torch.where(moving, _bit_weights(n, boards.device)[moves.clamp_min(0)], 0)
    flips = flip_bits(mine, theirs, move_bit, size)
    illegal = moving & (flips == 0)
    if bool(illegal.any()):
        g = int(illegal.nonzero()[0, 0])
        raise InputError(f"game {g}: {square_name(int(moves[g]), size)} is not a legal move for "
                         f"{'black' if int(player[g]) == BLACK else 'white'}")  # fmt: skip
    flipped = from_bitboard(flips, n)
    changed = flipped | from_bitboard(move_bit, n)
    return torch.where(changed, player.to(boards.dtype)[:, None], boards), flipped


def next_player(boards: Int[Tensor, "game square"], mover: Int[Tensor, " game"]) -> Int[Tensor, " game"]:
    """Who moves after ``mover``: the opponent, or ``mover`` again when the opponent must pass,
    or 0 when neither can move (game over).

    Example:
        >>> next_player(initial_boards(1, 6), torch.tensor([-1])).tolist()
        [1]
    """
    opponent = -mover
    if_opponent = legal_moves(boards, opponent).any(1)
    if_mover = legal_moves(boards, mover).any(1)
    return torch.where(if_opponent, opponent, torch.where(if_mover, mover, torch.zeros_like(mover)))
