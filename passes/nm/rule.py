"""What every prune-nm rule is: a pattern, a check of the matched weight, its calibration targets, a replacement.

The linear, conv2d and expert rules subclass `NMRule`: it selects layers by
include/exclude, reports every skip at the layer's path, and shares the run's
`NMWeights` (options, graph, compressed-weight cache).
"""
from __future__ import annotations

from torch.fx import Node

from ..manager import PassContext
from ..match import Match, Pattern
from ..rewrite import CheckResult, Rule, fail
from ..rewriter import Rewriter
from .compressed import NMWeights, layer_path
from .layerwise import LayerTarget


class NMRule:
    """One prune-nm rule; subclasses set `rule_name` and `pattern` and implement the three methods below."""
    rule_name: str
    pattern: Pattern

    def __init__(self, weights: NMWeights):
        self.weights = weights

    def rule(self) -> Rule:
        return Rule(self.rule_name, self.pattern, self.replace, self.check)

    def layer(self, m: Match) -> str:
        """The path the layer is selected and reported by."""
        return layer_path(m["w"])

    def check(self, m: Match, ctx: PassContext) -> CheckResult:
        chosen = self.weights.options.selects(self.layer(m))
        result = self.weight_problem(m) if chosen else chosen
        return result if result else fail(result.reason, where=self.layer(m))

    def weight_problem(self, m: Match) -> CheckResult:
        """ok() when the selected layer's weight can be pruned, else why not."""
        raise NotImplementedError

    def targets(self, m: Match) -> list[LayerTarget]:
        """The weights this match prunes, with how each reads its calibration inputs."""
        raise NotImplementedError

    def replace(self, m: Match, rw: Rewriter) -> Node:
        raise NotImplementedError
