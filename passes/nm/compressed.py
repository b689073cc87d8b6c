"""The weights of one prune-nm run: each pruned by its method's mask and compressed once.

The linear, conv2d and expert rules all store their weight through
`NMWeights.compress`, so a weight several layers share becomes one pair of
(values, indices) constants, and the mask is the one the method chose
(`pruned`, filled layer by layer before the rules run) or, for magnitude,
the N largest |w| of every M along the reduction (last) dim.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from sparsecc.runtime.nm_format import compress_nm, nm_mask

from ..fake import resolve_attr
from ..manager import PassContext
from ..rewriter import Rewriter


def layer_path(weight: Node) -> str:
    """'blocks.0.mlp.up.weight' -> 'blocks.0.mlp.up' (the module owning the weight)."""
    return weight.target.rpartition(".")[0] or weight.target


class NMWeights:
    """Options, graph and compressed-weight cache shared by the rules of one prune-nm run."""

    def __init__(self, options, gm: GraphModule, ctx: PassContext):
        """`options`: the PruneNM pass (n, m, method, include/exclude)."""
        self.options, self.gm, self.ctx = options, gm, ctx
        self.compressed: dict[str, tuple[str, str]] = {}   # weight name -> (values, indices) attrs
        self.pruned: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # weight -> (pruned weight, mask)
        self.tokens: dict[str, list[int]] = {}              # weight -> calibration rows seen per matrix
        self.calibration = ""                                # where the method's activations came from

    def stored(self, weight: Node) -> torch.Tensor:
        """The constant a get_attr node reads."""
        return resolve_attr(self.gm, weight.target)

    def compress(self, target: str, weight: torch.Tensor, rw: Rewriter) -> tuple[Node, Node]:
        """(values, indices) constants of `weight` [..., out, K] pruned by the method (once per weight)."""
        if target not in self.compressed:
            n, m = self.options.n, self.options.m
            weight, mask = self.pruned.get(target, (weight, None))
            values, indices = compress_nm(weight, n, m, mask=nm_mask(weight.abs(), n, m) if mask is None else mask)
            v = rw.add_constant(target + "_nm_values", values)
            i = rw.add_constant(target + "_nm_indices", indices)
            self.compressed[target] = (v.target, i.target)
            return v, i
        return tuple(rw.get_constant(name) for name in self.compressed[target])

    def layer_details(self, weight: Node, values: Node, indices: Node, in_features: int, transposed: bool) -> dict:
        """Record details of one layer rewritten to an N:M op (linear or conv)."""
        return {"weight": weight.target, "values": values.target, "indices": indices.target,
                "in_features": in_features, "transposed": transposed, **self.method_details()}

    def method_details(self) -> dict:
        """What the report says about how the mask was chosen."""
        details = {"method": self.options.method}
        if self.calibration:
            details["calibration"] = self.calibration
        return details
