"""`FeatureSketch` against a naive reference: the top-k and the quantile pool of many batches."""

from __future__ import annotations

import torch

from mechscope.features.sketch import FeatureSketch


def sparse_batches(n_batches: int, batch: int, seq: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        acts = torch.rand(batch, seq, n, generator=gen)
        out.append(torch.where(torch.rand(batch, seq, n, generator=gen) < 0.3, acts, 0.0))
    return out


def test_pool_holds_the_smallest_keys_and_top_k_the_largest_values_over_all_batches():
    batch, seq, n, pool, top_k = 2, 7, 5, 6, 4
    sk = FeatureSketch(n, top_k=top_k, pool=pool, left=2, right=1, hist_bins=16)
    batches = sparse_batches(9, batch, seq, n)
    tokens = torch.arange(9 * batch * seq).reshape(9 * batch, seq) % 97
    keep = torch.ones(seq, dtype=torch.bool)
    keep[0] = False  # a BOS position: neither counted nor sampled
    keys, values, index = [], [], []
    for i, acts in enumerate(batches):
        sk.update(acts, tokens[i * batch : (i + 1) * batch], first_row=i * batch, keep=keep, seed=100 + i)
        flat = acts.reshape(-1, n)
        firing = (flat > 0) & keep.repeat(batch)[:, None]
        token, feature = firing.nonzero(as_tuple=True)  # token-major, as the sketch draws its keys
        draws = torch.rand(len(token), generator=torch.Generator().manual_seed(100 + i))
        keys.append(torch.stack([feature.double(), draws.double()], 1))
        values.append(flat[token, feature])
        index.append(i * batch * seq + token)
    keys, values, index = torch.cat(keys), torch.cat(values), torch.cat(index)
    for f in range(n):
        mine = keys[:, 0] == f
        smallest = keys[mine, 1].argsort()[:pool]
        expected = sorted(index[mine][smallest].tolist())
        got = sorted(int(i) for i in sk.pool_idx[:, f] if i >= 0)
        assert got == expected, f"feature {f}"
        for slot in range(pool):  # each slot's value, key and context belong to the same token
            i = int(sk.pool_idx[slot, f])
            if i < 0:
                continue
            row, pos = divmod(i, seq)
            assert float(sk.pool_val[slot, f]) == float(batches[row // batch][row % batch, pos, f])
            torch.testing.assert_close(sk.pool_key[slot, f].double(), keys[mine, 1][index[mine] == i][0])
            assert int(sk.pool_tok[slot, f, 2]) == int(tokens[row, pos])
        order = torch.argsort(-values[mine], stable=True)[:top_k]
        assert sk.top_idx[:, f].tolist() == index[mine][order].tolist()
        torch.testing.assert_close(sk.top_val[:, f], values[mine][order])
