"""Sums of squares of gradients, taken by a backward pass on the way, for the clipping norm.

The CPU decoder kernel finishes each row of dL/dW_dec in cache; summing its squares there
spares the clipping norm a pass over the decoder's gradients, which are most of a CLT's (at
L=12, d=256, F=2048: 164 of 189 MB, about 20 ms of a 340 ms step on a 2-core CPU).

A training step opens :func:`recording`; the decoder's backward records each gradient it
returns. A record is used only while the parameter's gradient is still that tensor, unchanged:
same address, shape, strides, dtype and version counter. A gradient summed into an existing one
(gradient accumulation), all-reduced or unscaled in place has a new version and is read again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

_Key = tuple[tuple[int, ...], tuple[int, ...], torch.dtype, int]


class GradSquares:
    """The records of one step: gradient address -> (its identity, per-row sums of squares)."""

    def __init__(self) -> None:
        self._records: dict[int, tuple[_Key, Tensor]] = {}

    @staticmethod
    def _key(grad: Tensor) -> _Key:
        return tuple(grad.shape), grad.stride(), grad.dtype, grad._version

    def record(self, grad: Tensor, row_squares: Tensor) -> None:
        """``row_squares`` sums to the sum of squares of ``grad`` as it is now."""
        self._records[grad.data_ptr()] = (self._key(grad), row_squares)

    def sum_of_squares(self, grad: Tensor) -> Tensor | None:
        """The recorded sum of squares of ``grad`` in fp32, or None where there is no record
        of this tensor in this state."""
        entry = self._records.get(grad.data_ptr())
        if entry is None or entry[0] != self._key(grad):
            return None
        return entry[1].sum().float()


_current: GradSquares | None = None


@contextlib.contextmanager
def recording() -> Iterator[GradSquares]:
    """Collect the records of the backward passes run inside; nothing is kept after it."""
    global _current
    previous, _current = _current, GradSquares()
    try:
        yield _current
    finally:
        _current = previous


def current() -> GradSquares | None:
    """The open recording, if any (backward passes outside one record nothing)."""
    return _current
