"""`expert-parallel`: give each rank of a process group only its experts (`sparsecc::moe_ep`).

Every `sparsecc::moe` (what moe-dispatch made) becomes `sparsecc::moe_ep` with
world_size=W, its per-expert constants (w_gate_up, w_down and the expert biases)
replaced by rank `rank`'s contiguous slice of E/W experts; routing, the shared
expert and everything else stay as they were. The full stacks are left
unread, so cleanup drops them and the program holds only this rank's experts.
A block whose expert weights are computed (not constants) or whose E does not
split evenly over W is skipped with the reason. Runs after the rewrites that
execute the graph (calibration, region recording): moe_ep is a collective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch.fx import GraphModule, Node

from sparsecc.runtime.distributed import expert_range
from sparsecc.runtime.kernels.moe_contract import MOE_ARGUMENTS
from sparsecc.runtime.ops.moe_ep import EXPERT_ARGUMENTS, local_experts

from ..fake import resolve_attr
from ..graph import layer_name, module_paths
from ..manager import Pass, PassContext, PassResult, PassStats, Skip
from ..options import Bounds, OptionBounds, OptionProblem
from ..rewriter import Rewriter

MOE_OP = torch.ops.sparsecc.moe.default


@dataclass(frozen=True)
class ExpertParallel(Pass):
    name: ClassVar[str] = "expert-parallel"
    world_size: int = 1
    rank: int = 0
    option_bounds: ClassVar[dict[str, OptionBounds]] = {"world_size": Bounds(1, whole=True),
                                                        "rank": Bounds(0, whole=True)}
    always_spelled: ClassVar[tuple[str, ...]] = ("world_size", "rank")

    def options_problem(self) -> Optional[OptionProblem]:
        if self.rank >= self.world_size:
            return OptionProblem("rank", f"rank={self.rank} must be below world_size={self.world_size}")
        return None

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        stats = PassStats()
        for node in [n for n in gm.graph.nodes if n.target is MOE_OP]:
            stats.matched += 1
            reason = self._shard(gm, node, ctx)
            if reason:
                stats.skipped.append(Skip(layer_name(node), self.name, reason))
            else:
                stats.rewritten += 1
        return PassResult(gm, modified=bool(stats.rewritten), stats=stats)

    def _shard(self, gm: GraphModule, node: Node, ctx: PassContext) -> Optional[str]:
        """Replace one moe node by moe_ep over this rank's experts; the reason when it cannot."""
        num_experts = node.args[1].meta["val"].shape[-1]
        if num_experts % self.world_size:
            return f"{num_experts} experts do not split evenly over world_size={self.world_size}"
        experts = {name: _expert_argument(node, name) for name in EXPERT_ARGUMENTS}
        computed = [name for name, arg in experts.items() if isinstance(arg, Node) and arg.op != "get_attr"]
        if computed:
            return f"expert weights {', '.join(computed)} are computed, not constants (N:M-compressed?)"
        rw = Rewriter(gm, node)
        local = {arg: rw.add_constant(f"{arg.target}_rank{self.rank}",
                                      local_experts(resolve_attr(gm, arg.target), self.world_size, self.rank))
                 for arg in experts.values() if isinstance(arg, Node)}
        args = tuple(local.get(a, a) if isinstance(a, Node) else a for a in node.args)
        kwargs = {k: local.get(v, v) if isinstance(v, Node) else v for k, v in node.kwargs.items()}
        sharded = rw.call(torch.ops.sparsecc.moe_ep.default, *args, **kwargs, world_size=self.world_size)
        self._note(ctx, node, num_experts)
        node.replace_all_uses_with(sharded)
        gm.graph.erase_node(node)
        return None

    def _note(self, ctx: PassContext, node: Node, num_experts: int) -> None:
        """The block's report record says which experts this rank holds."""
        paths = [path or "<root>" for path in module_paths(node)] or ["<root>"]   # moe-dispatch's naming
        start, end = expert_range(num_experts, self.world_size, self.rank)
        for record in ctx.records:
            if record.op == "sparsecc.moe" and record.layer in paths:
                record.details["expert_parallel"] = {"world_size": self.world_size, "rank": self.rank,
                                                     "experts": [start, end]}


def _expert_argument(node: Node, name: str):
    """The node (or None) a moe call passes as per-expert argument `name`."""
    index = MOE_ARGUMENTS.index(name)
    return node.args[index] if index < len(node.args) else node.kwargs.get(name)


__all__ = ["ExpertParallel"]
