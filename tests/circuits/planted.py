"""A hand-set induction circuit: exactly one path carries the answer.

Residual blocks: ``TOK`` (one-hot token), ``POS`` (one-hot position), ``PREV`` (the previous
token, written by head ``a0.h0``) and ``OUT`` (the copied token, read by the unembedding).
``a0.h0`` attends from each position to the one before it and copies its token into ``PREV``;
``a1.h1`` attends from the last position to where ``PREV`` equals the current token and copies
that position's token into ``OUT``. Heads ``a0.h1`` and ``a1.h0`` are zero. With the first half
of the corrupted prompts replaced (the earlier occurrence gone), the circuit is exactly
``input->a0.h0<v>``, ``a0.h0->a1.h1<k>``, ``input->a1.h1<v>`` and ``a1.h1->logits``.
"""

from __future__ import annotations

import torch

import mechscope as ms

VOCAB, N_CTX, SHARPNESS = 12, 12, 4.0
CIRCUIT = {"input->a0.h0<v>", "a0.h0->a1.h1<k>", "input->a1.h1<v>", "a1.h1->logits"}


def planted_model() -> ms.HookedTransformer:
    d_head = max(VOCAB, N_CTX)
    tok, pos, prev, out = (slice(i * VOCAB, (i + 1) * VOCAB) for i in range(4))
    cfg = ms.ModelConfig(
        d_model=4 * VOCAB,
        n_layers=2,
        n_heads=2,
        d_head=d_head,
        d_mlp=1,
        d_vocab=VOCAB,
        n_ctx=N_CTX,
        attn_only=True,
        normalization_type=None,
        attn_scale=1.0,
        model_name="planted-induction",
    )
    model = ms.HookedTransformer(cfg)
    eye = torch.eye(VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[:, tok] = eye
        model.pos_embed.W_pos[:, pos] = torch.eye(N_CTX)
        first, second = model.blocks[0].attn, model.blocks[1].attn
        first.W_Q[0][pos, :N_CTX] = SHARPNESS * torch.eye(N_CTX)  # query: my position p
        first.W_K[0][pos, :N_CTX] = torch.eye(N_CTX).roll(1, dims=1)  # key: position p' matches p' + 1
        first.W_K[0][pos.start + N_CTX - 1, 0] = 0.0  # no wrap-around
        first.W_V[0][tok, :VOCAB] = eye
        first.W_O[0][:VOCAB, prev] = eye
        second.W_Q[1][tok, :VOCAB] = SHARPNESS * eye  # query: my token
        second.W_K[1][prev, :VOCAB] = eye  # key: the token before that position
        second.W_V[1][tok, :VOCAB] = eye
        second.W_O[1][:VOCAB, out] = eye
        model.unembed.W_U[out, :] = 10.0 * eye
    return model.eval()


def planted_prompts(n: int = 4, half: int = 5, seed: int = 0):
    """Clean ``A A[:-1]``, corrupted ``B A[:-1]`` (A and B disjoint), answers ``A[-1]`` / ``B[-1]``."""
    gen = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(VOCAB, generator=gen)[: 2 * half] for _ in range(n)])
    first, other = perms[:, :half], perms[:, half:]
    clean = torch.cat((first, first[:, :-1]), dim=1)
    corrupted = torch.cat((other, first[:, :-1]), dim=1)
    return clean, corrupted, first[:, -1], other[:, -1]
