"""Copies derived from an N:M weight (a dense weight, a library's packed form), made once and reused.

A copy is kept per `values` tensor (held weakly: it goes with the weight) and remade when the versions of
values or indices, the indices tensor or its storage, or its `kind` (what it was made for, e.g. the dtype)
change. An inference tensor has no
version counter: nothing proves a kept copy current, so it gets a fresh copy every call.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Optional

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..nm_format import tensor_version


class WeightCopies:
    def __init__(self):
        self._by_values = WeakIdKeyDictionary()     # values -> (versions, kind, copy)

    def get(self, values: Tensor, indices: Tensor, kind: Hashable, make: Callable[[], Any]) -> Any:
        """The kept copy for this weight's state and `kind`, else `make()` (kept for the next call)."""
        version = (tensor_version(values), tensor_version(indices), id(indices), indices.data_ptr())
        kept = self._by_values.get(values)
        if kept is not None and kept[0] == version and None not in version[:2] and kept[1] == kind:
            return kept[2]
        copy = make()
        self._by_values[values] = (version, kind, copy)
        return copy

    def kept(self, values: Tensor) -> Optional[Any]:
        """The copy kept for `values`, whatever its state, or None."""
        entry = self._by_values.get(values)
        return None if entry is None else entry[2]

    def forget(self, values: Tensor) -> None:
        self._by_values.pop(values, None)
