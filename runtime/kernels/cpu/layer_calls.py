"""Per-layer memo of checked calls: a weight tensor (by identity, held weakly) -> {call key: runner}.

A compiled program calls each layer's kernel with the same constant tensors every step; what a call
needs checked or measured (operand contracts, the path, the kernel's packed arguments) is decided on its
first call for a key and looked up after. A plain dict keyed by id() with a weak reference to confirm
the tensor costs ~0.3 us a lookup where torch's WeakIdKeyDictionary cost ~3 us (2-core Zen 4): at the
example transformer's size a whole layer's GEMV is ~3 us. An entry goes when its tensor is collected.
"""
from __future__ import annotations

import os
import weakref
from typing import Any, Callable, Hashable, Optional, Union

from torch import Tensor

Runner = Callable[..., Any]
# CPython keeps the environment os.environ serves as a dict of encoded names and values
_ENCODED_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None


def environ_value(name: str) -> Union[str, bytes, None]:
    """os.environ.get(name) for a call key: bytes where CPython's encoded environment can be read (~0.05 us;
    os.environ.get encodes the name and decodes the value, ~0.7 us, on every layer's every call), else str."""
    if isinstance(_ENCODED_ENVIRON, dict):
        return _ENCODED_ENVIRON.get(name.encode())
    return os.environ.get(name)


class LayerCalls:
    def __init__(self, max_keys_per_layer: int):
        self.max_keys = max_keys_per_layer     # x shapes per layer (prefill's dynamic lengths would grow it)
        self._by_id: dict[int, tuple[weakref.ref, dict]] = {}
        _every.add(self)

    def get(self, tensor: Tensor, key: Hashable) -> Optional[Runner]:
        entry = self._by_id.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1].get(key)

    def put(self, tensor: Tensor, key: Hashable, run: Runner) -> None:
        ident = id(tensor)
        entry = self._by_id.get(ident)
        if entry is None or entry[0]() is not tensor or len(entry[1]) >= self.max_keys:
            forget = self._by_id.pop
            entry = self._by_id[ident] = (weakref.ref(tensor, lambda _: forget(ident, None)), {})
        entry[1][key] = run

    def clear(self) -> None:
        self._by_id.clear()


_every: "weakref.WeakSet[Any]" = weakref.WeakSet()   # LayerCalls and clear_with_memos holders


def clear_with_memos(holder: Any) -> None:
    """Have `holder.clear()` called with every memo's (an object keeping runners outside a LayerCalls)."""
    _every.add(holder)


def forget_bound_calls() -> None:
    """Empty every memo (jit.clear_compiled: kernels start afresh, as in a new process)."""
    for calls in list(_every):
        calls.clear()
