"""`PASSES`: every pass a pipeline string may name, by its kebab-case name.

Listed explicitly (no registration as an import side effect), so the list is
the one place that says which passes exist.
"""
from __future__ import annotations

from .attention import SparseAttention
from .cleanup import Cleanup
from .fold import FoldConstants
from .manager import Pass
from .moe import ExpertParallel, MoEDispatch
from .nm.prune import PruneNM
from .tokens import TokenRouting

PASSES: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (
        Cleanup,
        FoldConstants,
        PruneNM,
        MoEDispatch,
        ExpertParallel,
        SparseAttention,
        TokenRouting,
    )
}

__all__ = ["PASSES"]
