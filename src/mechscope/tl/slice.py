"""TransformerLens' `Slice`: one object for "an int, a range or a list of indices" along an axis."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from mechscope.errors import InputError

SliceInput = int | tuple | list | Tensor | np.ndarray | slice | None


class Slice:
    """Index one axis with an int (the axis goes), a tuple (``slice(*t)``), a slice, a list /
    tensor / array of indices, or ``None`` (everything).

    Example:
        >>> x = torch.arange(10)
        >>> Slice(3).apply(x), Slice((1, 5, 2)).apply(x), Slice([0, 9]).apply(x), Slice().apply(x).shape
        (tensor(3), tensor([1, 3]), tensor([0, 9]), torch.Size([10]))
        >>> Slice(-1).indices(), Slice((2, None)).indices(5)
        (array([-1]), array([2, 3, 4]))
    """

    def __init__(self, input_slice: SliceInput = None) -> None:
        if isinstance(input_slice, tuple):
            self.slice, self.mode = slice(*input_slice), "slice"
        elif isinstance(input_slice, int):
            self.slice, self.mode = input_slice, "int"
        elif isinstance(input_slice, slice):
            self.slice, self.mode = input_slice, "slice"
        elif isinstance(input_slice, (list, Tensor, np.ndarray)):
            array = input_slice.detach().cpu().numpy() if isinstance(input_slice, Tensor) else np.asarray(input_slice)
            self.slice, self.mode = array, "array"
        elif input_slice is None:
            self.slice, self.mode = slice(None), "identity"
        else:
            raise InputError(
                f"invalid input_slice {input_slice!r}: use an int, tuple, slice, list, tensor, array or None"
            )

    def apply(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """``tensor`` indexed along ``dim``."""
        index = [slice(None)] * tensor.ndim
        index[dim] = self.slice
        return tensor[tuple(index)]

    def indices(self, max_ctx: int | None = None) -> np.ndarray:
        """The indices selected along an axis of size ``max_ctx`` (an int slice needs none)."""
        if self.mode == "int":
            return np.array([self.slice], dtype=np.int64)
        if max_ctx is None:
            raise InputError("max_ctx must be given when the slice is not an int")
        return np.arange(max_ctx, dtype=np.int64)[self.slice]

    def __repr__(self) -> str:
        return f"Slice: {self.slice} Mode: {self.mode} "

    @classmethod
    def unwrap(cls, slice_input: Slice | SliceInput) -> Slice:
        """A `Slice` from a slice input; an int becomes ``[int]`` so that the axis stays."""
        if isinstance(slice_input, Slice):
            return slice_input
        if isinstance(slice_input, int):
            slice_input = [slice_input]
        return Slice(slice_input)
