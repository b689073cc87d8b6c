"""How many tokens token routing keeps: shared by the route ops, their ONNX export and the pass."""
from __future__ import annotations

import math


def kept_tokens(seq_len: int, capacity: float) -> int:
    """K = ceil(capacity * S), at least 1 and at most S; static for a given S.

    The product is rounded to 6 decimals first so 0.7 * 10 = 7.000000000000001 keeps 7, not 8."""
    if not 0.0 < capacity <= 1.0:
        raise ValueError(f"capacity must be in (0, 1], got {capacity}")
    return min(seq_len, max(1, math.ceil(round(capacity * seq_len, 6))))


__all__ = ["kept_tokens"]
