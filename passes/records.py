"""What a rewrite pass tells the report about each layer it rewrote."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RewriteRecord:
    layer: str                 # module path of the rewritten layer, e.g. "blocks.0.mlp.up"
    op: str                    # the op it became, e.g. "sparsecc.nm_linear"
    source_op: str             # the op it was, e.g. "aten.linear"
    pattern: str               # e.g. "2:4"
    shape: list[int]           # weight shape as the layer sees it, [out, in]
    params_before: int
    params_after: int          # stored weight values
    bytes_before: int
    bytes_after: int           # values + index metadata
    flops_before: int          # per call on the example inputs (multiply-add = 2)
    flops_after: int           # FLOPs over kept weights only
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
