"""A graph holding a `sparsecc::nm_linear` call, for printer and verifier tests (needs the runtime ops)."""
from __future__ import annotations

import pytest
import torch

from sparsecc.passes.rewriter import Rewriter

from .helpers import TinyLinear, capture


def nm_linear_graph(in_features: int = 8, indices_dtype: torch.dtype = torch.uint8):
    """TinyLinear (8 -> 4, no bias) with its linear replaced by an all-zero 2:4 nm_linear."""
    pytest.importorskip("sparsecc.runtime.ops", reason="the runtime ops do not import")
    gm = capture(TinyLinear(bias=False), (torch.randn(2, 8),))
    root = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    rw = Rewriter(gm, root)
    values = rw.add_constant("l.weight_nm_values", torch.zeros(4, 4))
    indices = rw.add_constant("l.weight_nm_indices", torch.zeros(4, 1, dtype=indices_dtype))
    out = rw.call(torch.ops.sparsecc.nm_linear.default, root.args[0], values, indices, None, 2, 4, in_features)
    root.replace_all_uses_with(out)
    gm.graph.erase_node(root)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
