"""The vectorised Othello engine against published move counts, hand-checked positions and a plain engine."""

from __future__ import annotations

import random

import pytest
import torch
from torch.testing import assert_close

from mechscope.errors import InputError
from mechscope.toys.othello import engine, games
from tests.othello import reference


def perft(size: int, depth: int) -> list[int]:
    """Positions reachable after 1 ... depth moves (no pass occurs this early)."""
    boards, player = engine.initial_boards(1, size), torch.ones(1, dtype=torch.int8)
    counts = []
    for _ in range(depth):
        game, square = engine.legal_moves(boards, player).nonzero(as_tuple=True)
        boards, _ = engine.play(boards[game], player[game], square)
        player = engine.next_player(boards, player[game])
        counts.append(len(game))
    return counts


def test_perft_8x8_matches_published_counts():
    assert perft(8, 6) == [4, 12, 56, 244, 1396, 8200]


def test_perft_6x6_matches_the_plain_engine():
    def count(board, player, depth):
        if depth == 0:
            return 1
        return sum(count(reference.play(board, 6, player, m)[0], -player, depth - 1)
                   for m in reference.legal(board, 6, player))  # fmt: skip

    assert perft(6, 4) == [count(reference.start(6), 1, d) for d in range(1, 5)]


def test_hand_checked_positions():
    start = engine.initial_boards(1, 8)
    black = torch.tensor([1], dtype=torch.int8)
    names = lambda mask: [engine.square_name(int(s), 8) for s in mask.nonzero()[:, -1]]  # noqa: E731
    assert names(engine.legal_moves(start, black)) == ["C4", "D3", "E6", "F5"]
    assert names(engine.legal_moves(start, -black)) == ["C5", "D6", "E3", "F4"]
    board, turned = engine.play(start, black, torch.tensor([engine.parse_square("F5", 8)]))
    assert names(turned) == ["E5"]
    assert int((board == 1).sum()) == 4 and int((board == -1).sum()) == 1
    # a line closed at the far end turns every disc between: black A1, white B2 ... G7, black plays H8
    diagonal = torch.zeros(1, 64, dtype=torch.int8)
    diagonal[0, 0] = 1
    diagonal[0, [9, 18, 27, 36, 45, 54]] = -1
    board, turned = engine.play(diagonal, black, torch.tensor([63]))
    assert names(turned) == ["B2", "C3", "D4", "E5", "F6", "G7"]
    # 6x6, black A1 and white A2 only: black may play A3, white has no move and passes
    lone = torch.zeros(1, 36, dtype=torch.int8)
    lone[0, 0], lone[0, 1] = 1, -1
    assert names(engine.legal_moves(lone, black)) == ["A3"]
    assert not engine.legal_moves(lone, -black).any()
    assert engine.next_player(lone, black).tolist() == [1]  # after black's move, white passes
    board, _ = engine.play(lone, black, torch.tensor([2]))
    assert engine.next_player(board, black).tolist() == [0]  # nobody can move: the game is over
    with pytest.raises(InputError, match="not a legal move"):
        engine.play(start, black, torch.tensor([0]))


@pytest.mark.parametrize("size,n_games", [(6, 40), (8, 12)])
def test_random_games_replay_like_the_plain_engine(size, n_games):
    moves = games.random_games(n_games, size, seed=3)
    states = games.game_states(moves, size)
    for g in range(n_games):
        board, player = reference.start(size), 1
        for t, move in enumerate(moves[g].tolist()):
            if move < 0:
                assert not states.valid[g, t]
                continue
            if not reference.legal(board, size, player):
                player = -player  # pass
            board, turned = reference.play(board, size, player, move)
            assert states.boards[g, t].tolist() == board
            assert states.flipped[g, t].nonzero()[:, 0].tolist() == turned
            assert int(states.mover[g, t]) == player
            player = -player
            nxt = (
                player
                if reference.legal(board, size, player)
                else -player
                if reference.legal(board, size, -player)
                else 0
            )
            assert int(states.player[g, t]) == nxt
            assert states.legal[g, t].nonzero()[:, 0].tolist() == (reference.legal(board, size, nxt) if nxt else [])
        assert not reference.legal(board, size, 1) and not reference.legal(board, size, -1)  # played to the end


def test_random_game_statistics_match_the_plain_engine():
    """Game length and branching of the vectorised generator against the plain engine's
    random games (independent generators): equal within four standard errors."""
    n = 300
    moves = games.random_games(n, 6, seed=11)
    states = games.game_states(moves, 6)
    length = states.valid.sum(1).double()
    branching = states.legal.sum(-1)[states.player != 0].double()
    rng = random.Random(5)
    plain = [reference.random_game(6, rng) for _ in range(n)]
    ref_states = games.game_states(torch.tensor([game + [-1] * (32 - len(game)) for game in plain]), 6)
    ref_len = torch.tensor([len(game) for game in plain], dtype=torch.float64)
    ref_branch = ref_states.legal.sum(-1)[ref_states.player != 0].double()
    for ours, theirs in ((length, ref_len), (branching, ref_branch)):
        se = (ours.var() / len(ours) + theirs.var() / len(theirs)).sqrt().item()
        assert_close(ours.mean().item(), theirs.mean().item(), atol=4 * se, rtol=0)
    assert bool((states.mover[states.valid] != 0).all())
    assert torch.equal(games.random_games(n, 6, seed=11), moves)


def test_tokens_round_trip_and_labels():
    moves = games.random_games(4, 6, seed=0)
    tokens = games.to_tokens(moves, 6)
    assert int(tokens.max()) < games.vocab_size(6) and torch.equal(games.from_tokens(tokens, 6), moves)
    states = games.game_states(moves, 6)
    board = states.board_labels()
    rel = states.relative_labels()
    who = torch.where(states.player == 0, -states.mover, states.player)
    # mine is black exactly when black moves next
    black_next = (who == 1)[..., None]
    assert torch.equal(rel == 1, torch.where(black_next, board == 1, board == 2))
    assert torch.equal(rel == 0, board == 0)
    with pytest.raises(InputError, match="not supported"):
        games.random_games(1, 7)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: games.game_states(torch.tensor([[19, -1, 18]]), 8), "follows padding"),
        (lambda: games.game_states(torch.tensor([[64]]), 8), r"lie in \[-1, 63\]"),
        (lambda: games.game_states(torch.tensor([[19.0]]), 8), "integer tensor"),
        (lambda: games.game_states(torch.zeros(1, 2, 2, dtype=torch.long), 6), r"\[game, pos\]"),
        (lambda: games.to_tokens(torch.tensor([[-2]]), 6), r"lie in \[-1, 35\]"),
        (lambda: games.from_tokens(torch.tensor([[33]]), 6), r"lie in \[0, 32\]"),
        (lambda: games.random_games(-1, 6), "n_games must be >= 0"),
    ],
)
def test_bad_moves_and_tokens_are_named(call, match):
    """Out-of-range squares or tokens, a move after the end, a wrong dtype or rank: an InputError
    naming the problem, not an index error (or a silently wrapped negative index)."""
    with pytest.raises(InputError, match=match):
        call()
