"""Rewrite rules as data: `Rule(name, pattern, replace, check)`, `RuleSet`, `apply_rules`.

    def linear_no_bias_check(m, ctx):
        return ok() if m.get("b") is None else fail("linear has a bias")

    def linear_to_mm(m, rw):
        return rw.call(aten.mm.default, m["x"], rw.call(aten.t.default, m["w"]))

    RULES = RuleSet("linear-to-mm", [Rule("linear-to-mm",
        Op(aten.linear.default, Var("x"), Const("w"), Var("b", optional=True)),
        linear_to_mm, linear_no_bias_check)])

`apply_rules` visits the `call_function` nodes that exist when it starts, in
graph (topological) order; nodes a replacement creates are not visited. Rules
are indexed by their pattern's root op (`RuleIndex`), so a node tries only the
rules for its target and those whose root may be any node, in the set's order:
the first whose pattern matches and whose check passes replaces the node. A node counts once in `matched`; the reasons
of declined rules are recorded in `skipped` only when no rule rewrote it.
Producers left dead by a rewrite stay in the graph for `cleanup`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from torch.fx import GraphModule, Node

from .graph import layer_name
from .manager import PassContext, PassStats, Skip
from .match import Match, Pattern, match
from .rewriter import RewriteError, Rewriter
from .verify import type_mismatch


@dataclass(frozen=True)
class CheckResult:
    """Truthy when the rule may fire; otherwise `reason` says why not.

    `where` overrides the place the skip is reported at (default: the node's module path)."""
    reason: Optional[str] = None
    where: Optional[str] = None

    def __bool__(self) -> bool:
        return self.reason is None


def ok() -> CheckResult:
    return CheckResult()


def fail(reason: str, where: Optional[str] = None) -> CheckResult:
    if not reason:
        raise ValueError("fail() needs a reason")
    return CheckResult(reason, where)


def always(m: Match, ctx: PassContext) -> CheckResult:
    """The check of a rule that fires whenever its pattern matches."""
    return ok()


Check = Callable[[Match, PassContext], CheckResult]
Replace = Callable[[Match, Rewriter], Node]


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: Pattern
    replace: Replace
    check: Check = always


@dataclass(frozen=True)
class RuleSet:
    name: str
    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))

    def __add__(self, other: "RuleSet") -> "RuleSet":
        return RuleSet(f"{self.name}+{other.name}", self.rules + other.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)


class RuleIndex:
    """The rules of a RuleSet keyed by their pattern's root op (an overload or a whole packet)."""

    def __init__(self, rules: RuleSet):
        self.rules = rules.rules
        self.by_root: dict[Any, list[int]] = {}
        self.any_root: list[int] = []       # rules whose pattern may match at any node
        for position, rule in enumerate(self.rules):
            targets = rule.pattern.root_targets()
            if targets is None:
                self.any_root.append(position)
            for target in targets or ():
                self.by_root.setdefault(target, []).append(position)
        self.cache: dict[Any, tuple[Rule, ...]] = {}

    def rules_for(self, target: Any) -> tuple[Rule, ...]:
        """The rules a node calling `target` may match, in the rule set's order."""
        if target not in self.cache:
            keys = (target, getattr(target, "overloadpacket", None))
            positions = {*self.any_root, *(p for key in keys for p in self.by_root.get(key, ()))}
            self.cache[target] = tuple(self.rules[p] for p in sorted(positions))
        return self.cache[target]


def _run_check(rule: Rule, m: Match, ctx: PassContext) -> CheckResult:
    result = rule.check(m, ctx)
    if not isinstance(result, CheckResult):
        raise TypeError(f"check of rule '{rule.name}' returned {result!r}; return ok() or fail(reason)")
    return result


def _replace(gm: GraphModule, rule: Rule, m: Match) -> None:
    rw = Rewriter(gm, m.node)
    try:
        new = rule.replace(m, rw)
        _check_replacement(rule, m.node, new, rw)
    except Exception:
        _erase_unused(rw.created)
        raise
    m.node.replace_all_uses_with(new)
    gm.graph.erase_node(m.node)


def _check_replacement(rule: Rule, root: Node, new: Node, rw: Rewriter) -> None:
    if not isinstance(new, Node) or new is root or new.graph is not root.graph:
        raise RewriteError(f"rule '{rule.name}' must return a new node of the same graph, got {new!r}")
    if any(root in n.all_input_nodes for n in rw.created):
        raise RewriteError(f"rule '{rule.name}' built nodes that consume the node they replace")
    problem = type_mismatch(root.meta.get("val"), new.meta.get("val"))
    if problem:
        raise RewriteError(f"rule '{rule.name}' changed the type of %{root.name}: {problem}")


def _erase_unused(nodes: Sequence[Node]) -> None:
    for node in reversed(nodes):
        if not node.users:
            node.graph.erase_node(node)


def _rewrite_node(gm: GraphModule, node: Node, rules: Sequence[Rule], ctx: PassContext, stats: PassStats) -> None:
    skips: list[Skip] = []
    for rule in rules:
        m = match(rule.pattern, node)
        if m is None:
            continue
        result = _run_check(rule, m, ctx)
        if result:
            _replace(gm, rule, m)
            stats.matched, stats.rewritten = stats.matched + 1, stats.rewritten + 1
            return
        skips.append(Skip(result.where or layer_name(node), rule.name, result.reason))
    stats.matched += bool(skips)
    stats.skipped.extend(skips)


def apply_rules(gm: GraphModule, rules: RuleSet, ctx: PassContext,
                stats: Optional[PassStats] = None) -> PassStats:
    """Apply `rules` once over the graph (see the module docstring); returns the stats."""
    stats = stats if stats is not None else PassStats()
    index = RuleIndex(rules)
    for node in list(gm.graph.nodes):  # a snapshot: nodes made by replacements are not visited
        if node.op == "call_function":
            _rewrite_node(gm, node, index.rules_for(node.target), ctx, stats)
    return stats


__all__ = ["Check", "CheckResult", "Replace", "Rule", "RuleIndex", "RuleSet", "RewriteError", "Rewriter",
           "always", "apply_rules", "fail", "ok"]
