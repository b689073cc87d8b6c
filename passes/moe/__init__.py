"""moe-dispatch: mixture-of-experts blocks, in any form, become one `sparsecc::moe`.

    regions.py      find a block from its router's selection; its output, constants, forms
    routing.py      the routing: scoring, correction bias, group limit, normalisation, scaling, sparsemixer
    experts.py      the expert weights as the stacked tensors the op takes (candidate layouts)
    expert_form.py  activation (clamped SwiGLU included), gate/up interleaving, expert biases
    block.py        an MoE block as read: routing, candidates, expert form, shared expert
    reading.py      a reading of a block: run eagerly (to confirm) or inserted into the graph
    dispatch.py     the pass: a RegionRule over the blocks, and the report record
    parallel.py     expert-parallel: each rank of a process group keeps its experts (sparsecc::moe_ep)
"""
from .dispatch import MoEDispatch
from .parallel import ExpertParallel

__all__ = ["ExpertParallel", "MoEDispatch"]
