"""The sparse ops. Importing this package registers them with torch.library."""
from __future__ import annotations

from .registry import OpDef
from .block_attention import BLOCK_ATTENTION
from .block_layout import BLOCK_LAYOUT
from .moe import MOE
from .moe_ep import MOE_EP
from .nm_decompress import NM_DECOMPRESS
from .nm_linear import NM_LINEAR
from .nm_conv2d import NM_CONV2D
from .quest_layout import QUEST_LAYOUT
from .route import ROUTE
from .route_gather import ROUTE_GATHER
from .route_unroute import UNROUTE
from .rule_layout import RULE_LAYOUT

OPS: dict[str, OpDef] = {op.name: op for op in (NM_LINEAR, MOE, NM_DECOMPRESS, BLOCK_LAYOUT, BLOCK_ATTENTION,
                                                ROUTE, ROUTE_GATHER, UNROUTE, NM_CONV2D, RULE_LAYOUT,
                                                MOE_EP, QUEST_LAYOUT)}


def get_op(name: str) -> OpDef:
    """Look up an op by short (`nm_linear`) or qualified (`sparsecc::nm_linear`) name."""
    short = name.split("::", 1)[-1]
    if short not in OPS:
        raise KeyError(f"unknown sparse op '{name}' (known: {', '.join(sorted(OPS))})")
    return OPS[short]


__all__ = ["OPS", "OpDef", "get_op"]
