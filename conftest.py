"""Shape checks and the doctest namespace.

Under pytest, the signatures of `mechscope.patching`, `mechscope.sae` and `mechscope.analysis`
are shape-checked at run time: jaxtyping's import hook wraps every function and dataclass of
those packages in ``jaxtyped(typechecker=check_shapes)``, so a tensor whose shape or dtype
contradicts its annotation (in the axis vocabulary of `mechscope.names`) fails the test that
passed it. `check_shapes` hands beartype the tensor annotations only: plain values (``Literal``
choices, integers, strings) are the library's own to validate, with errors that name the fix.
The hook is installed before anything imports those packages. Set
``MECHSCOPE_NO_SHAPE_CHECKS=1`` to run without it (benchmarks, timing).

The doctest namespace holds a tiny random model and tokens, so docstring examples run as written.
"""

import os
import sys
import typing

from beartype import beartype
from jaxtyping import AbstractArray, install_import_hook

SHAPE_CHECKED = ("mechscope.patching", "mechscope.sae", "mechscope.analysis")


def _has_array(hint) -> bool:
    """Whether a type hint is, or contains, a jaxtyping array annotation."""
    if isinstance(hint, type) and issubclass(hint, AbstractArray):
        return True
    return any(_has_array(arg) for arg in typing.get_args(hint))


def check_shapes(fn):
    """beartype on the tensor annotations of ``fn`` (jaxtyping binds the axis names per call)."""
    fn.__annotations__ = {name: hint for name, hint in fn.__annotations__.items() if _has_array(hint)}
    return beartype(fn)


if os.environ.get("MECHSCOPE_NO_SHAPE_CHECKS", "") in ("", "0"):
    already = sorted(name for name in sys.modules if name.startswith(SHAPE_CHECKED))
    if already:
        raise RuntimeError(f"{already} were imported before the shape-check hook; import them lazily")
    install_import_hook(list(SHAPE_CHECKED), f"{__name__}.check_shapes")

import pytest  # noqa: E402
import torch  # noqa: E402

import mechscope as ms  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    cfg = ms.ModelConfig(d_model=32, n_layers=3, n_heads=4, d_mlp=64, d_vocab=50, n_ctx=16)
    doctest_namespace["model"] = ms.HookedTransformer(cfg).init_weights(seed=0)
    doctest_namespace["tokens"] = torch.tensor([[1, 2, 3, 4]])
    doctest_namespace["fn"] = lambda activation, *, hook: None
    doctest_namespace["torch"] = torch
    doctest_namespace["ms"] = ms
