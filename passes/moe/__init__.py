"""moe-dispatch: mixture-of-experts blocks, in any form, become one `sparsecc::moe`.

    regions.py   find a block from its router topk; read router, activation, output
    experts.py   the expert weights as the stacked tensors the op takes (candidate layouts)
    reading.py   a reading of a block: run eagerly (to confirm) or inserted into the graph
    dispatch.py  the pass: a RegionRule over the blocks, and the report record
"""
from .dispatch import MoEDispatch

__all__ = ["MoEDispatch"]
