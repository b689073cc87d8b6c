"""What an export rule sees of one `sparsecc` node: its attributes and its inputs' shapes and dtypes."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import helper


@dataclass(frozen=True)
class Operand:
    shape: tuple                 # ints, or strings for symbolic dims
    elem_type: int               # onnx.TensorProto data type

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def np_dtype(self) -> np.dtype:
        return helper.tensor_dtype_to_np_dtype(self.elem_type)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def static_dim(self, axis: int, what: str) -> int:
        """One dim that must be static (a weight's width, a head count) while others may be symbolic."""
        if isinstance(self.shape[axis], int):
            return self.shape[axis]
        raise ValueError(f"{what} needs a static dim {axis}, got {list(self.shape)}")

    def static_but_batch(self, what: str) -> tuple:
        """The shape with every dim static except possibly dim 0 (a symbolic batch, kept as its name)."""
        if not all(isinstance(d, int) for d in self.shape[1:]):
            raise ValueError(f"{what} needs static dims after the batch, got {list(self.shape)}")
        return self.shape

    def static(self, what: str) -> tuple[int, ...]:
        if not all(isinstance(d, int) for d in self.shape):
            raise ValueError(f"{what} needs a static shape, got {list(self.shape)}")
        return self.shape


@dataclass(frozen=True)
class CallSpec:
    """One call of a sparse op: the node's name (for messages), attributes and operands (None: omitted)."""
    op: str
    node: str
    attrs: dict[str, Any]
    operands: tuple[Operand | None, ...]
    opset: int

    def key(self) -> str:
        """The function overload: calls with equal attributes, shapes and dtypes share one function."""
        text = repr((sorted(self.attrs.items()), self.operands))
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def operand(self, i: int) -> Operand | None:
        return self.operands[i] if i < len(self.operands) else None
