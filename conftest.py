"""Doctest namespace: a tiny random model and tokens, so docstring examples run as written."""

import pytest
import torch

import mechscope as ms


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    cfg = ms.ModelConfig(d_model=32, n_layers=3, n_heads=4, d_mlp=64, d_vocab=50, n_ctx=16)
    doctest_namespace["model"] = ms.HookedTransformer(cfg).init_weights(seed=0)
    doctest_namespace["tokens"] = torch.tensor([[1, 2, 3, 4]])
    doctest_namespace["fn"] = lambda activation, *, hook: None
    doctest_namespace["torch"] = torch
    doctest_namespace["ms"] = ms
