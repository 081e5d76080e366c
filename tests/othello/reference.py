"""A plain, one-square-at-a-time Othello engine: the oracle for the vectorised one."""

from __future__ import annotations

import random

DIRECTIONS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def start(size: int) -> list[int]:
    board = [0] * (size * size)
    h = size // 2
    board[(h - 1) * size + h - 1] = board[h * size + h] = -1
    board[(h - 1) * size + h] = board[h * size + h - 1] = 1
    return board


def flips(board: list[int], size: int, player: int, square: int) -> list[int]:
    if board[square] != 0:
        return []
    r, c = divmod(square, size)
    out = []
    for dr, dc in DIRECTIONS:
        run, rr, cc = [], r + dr, c + dc
        while 0 <= rr < size and 0 <= cc < size and board[rr * size + cc] == -player:
            run.append(rr * size + cc)
            rr, cc = rr + dr, cc + dc
        if run and 0 <= rr < size and 0 <= cc < size and board[rr * size + cc] == player:
            out.extend(run)
    return sorted(out)


def legal(board: list[int], size: int, player: int) -> list[int]:
    return [s for s in range(size * size) if flips(board, size, player, s)]


def play(board: list[int], size: int, player: int, square: int) -> tuple[list[int], list[int]]:
    turned = flips(board, size, player, square)
    assert turned, "illegal move"
    board = list(board)
    for s in turned + [square]:
        board[s] = player
    return board, turned


def random_game(size: int, rng: random.Random) -> list[int]:
    board, player, moves = start(size), 1, []
    while True:
        options = legal(board, size, player)
        if not options:
            player = -player
            options = legal(board, size, player)
            if not options:
                return moves
        move = rng.choice(options)
        board, _ = play(board, size, player, move)
        moves.append(move)
        player = -player
