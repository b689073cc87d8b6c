"""Patterns over FX nodes: `Op`, `Var`, `Const`, `Lit`, `AnyArg`, and `match`.

A pattern is a tree written like the call it matches:

    Op(aten.mm.default, Var("x"), Op(aten.t.default, Const("w")))

`Op` matches a `call_function` node by target and then each argument by its
sub-pattern. Arguments are read through the op schema, so an argument the
graph passes by keyword is found by position too. An argument the pattern
omits must be absent from the node or equal to its schema default (write
`AnyArg()` to accept anything); an argument the node omits matches only an
optional sub-pattern (`Var(.., optional=True)`, `Const(.., optional=True)`,
`AnyArg()`) or a `Lit` equal to the schema default. An omitted optional
`Var` captures nothing (`m.get("b")` is None). A name captured twice must bind
the same value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from torch.fx import Node

_ABSENT = object()  # an argument the node does not pass


@dataclass
class Match:
    """The result of a successful match: the root node and the named captures."""
    node: Node
    captures: dict[str, Any] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)  # every node an `Op` matched, root first

    def __getitem__(self, name: str) -> Any:
        return self.captures[name]

    def __contains__(self, name: str) -> bool:
        return name in self.captures

    def get(self, name: str, default: Any = None) -> Any:
        return self.captures.get(name, default)


class Pattern:
    """Base class: `bind` checks one argument value and records captures into `m`."""
    optional: bool = False

    def bind(self, value: Any, m: Match) -> bool:
        raise NotImplementedError

    def bind_absent(self, default: Any, m: Match) -> bool:
        """An argument the node omits (`default`: its schema default, or absent)."""
        return self.optional

    def root_targets(self) -> Optional[tuple]:
        """The call targets (overloads or packets) a node needs for this pattern to match at it; None: any."""
        return None


def _capture(m: Match, name: Optional[str], value: Any) -> bool:
    if name is None:
        return True
    if name in m.captures:
        return _same(m.captures[name], value)
    m.captures[name] = value
    return True


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same type; nodes by identity; any list/tuple pair elementwise."""
    if isinstance(a, Node) or isinstance(b, Node):
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


class Var(Pattern):
    """Any argument: a node, a literal or None. Optional ones also match an absent argument."""

    def __init__(self, name: str, optional: bool = False):
        self.name, self.optional = name, optional

    def bind(self, value: Any, m: Match) -> bool:
        return _capture(m, self.name, value)

    def __repr__(self) -> str:
        return f"Var({self.name!r}{', optional=True' if self.optional else ''})"


class Const(Pattern):
    """A `get_attr` node (parameter, buffer or constant); captures the node."""

    def __init__(self, name: str, optional: bool = False):
        self.name, self.optional = name, optional

    def bind(self, value: Any, m: Match) -> bool:
        return isinstance(value, Node) and value.op == "get_attr" and _capture(m, self.name, value)

    def __repr__(self) -> str:
        return f"Const({self.name!r})"


class Lit(Pattern):
    """A literal argument equal to `value` (type included, so `Lit(1)` is not `True`)."""

    def __init__(self, value: Any):
        self.value = value

    def bind(self, value: Any, m: Match) -> bool:
        return not isinstance(value, Node) and _same(self.value, value)

    def bind_absent(self, default: Any, m: Match) -> bool:
        return default is not _ABSENT and _same_default(default, self.value)

    def __repr__(self) -> str:
        return f"Lit({self.value!r})"


class AnyArg(Pattern):
    """Anything, absent included; captures nothing."""
    optional = True

    def bind(self, value: Any, m: Match) -> bool:
        return True

    def __repr__(self) -> str:
        return "AnyArg()"


class Op(Pattern):
    """A `call_function` node whose target is one of `targets` (a packet matches all overloads)."""

    def __init__(self, targets: Any, *args: Pattern, name: Optional[str] = None, **kwargs: Pattern):
        self.targets = targets if isinstance(targets, tuple) else (targets,)
        self.args, self.kwargs, self.name = args, kwargs, name

    def root_targets(self) -> Optional[tuple]:
        return self.targets

    def matches_target(self, target: Any) -> bool:
        packet = getattr(target, "overloadpacket", None)
        return any(t is target or (packet is not None and t is packet) for t in self.targets)

    def bind(self, value: Any, m: Match) -> bool:
        if not (isinstance(value, Node) and value.op == "call_function"):
            return False
        if not self.matches_target(value.target):
            return False
        m.nodes.append(value)
        return self._bind_args(_Arguments(value), m) and _capture(m, self.name, value)

    def _bind_args(self, node_args: "_Arguments", m: Match) -> bool:
        for index, sub in enumerate(self.args):
            if not _bind_one(sub, node_args.positional(index), node_args.default(index), m):
                return False
        for key, sub in self.kwargs.items():
            index = node_args.names.index(key) if key in node_args.names else -1
            if not _bind_one(sub, node_args.keyword(key), node_args.default(index), m):
                return False
        return node_args.rest_is_default(len(self.args), set(self.kwargs))

    def __repr__(self) -> str:
        parts = [str(t) for t in self.targets] + [repr(a) for a in self.args]
        parts += [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"Op({', '.join(parts)})"


def _bind_one(sub: Pattern, value: Any, default: Any, m: Match) -> bool:
    return sub.bind_absent(default, m) if value is _ABSENT else sub.bind(value, m)


class _Arguments:
    """A node's arguments seen through its op schema (positional index <-> keyword name)."""

    def __init__(self, node: Node):
        self.node = node
        schema = getattr(node.target, "_schema", None)
        self.schema_args = list(schema.arguments) if schema is not None else []
        self.names = [a.name for a in self.schema_args]

    def positional(self, index: int) -> Any:
        if index < len(self.node.args):
            return self.node.args[index]
        if index < len(self.names):
            return self.node.kwargs.get(self.names[index], _ABSENT)
        return _ABSENT

    def default(self, index: int) -> Any:
        """The schema default of argument `index`, or `_ABSENT` when it has none."""
        if not 0 <= index < len(self.schema_args) or not self.schema_args[index].has_default_value():
            return _ABSENT
        return self.schema_args[index].default_value

    def keyword(self, key: str) -> Any:
        if key in self.node.kwargs:
            return self.node.kwargs[key]
        return self.positional(self.names.index(key)) if key in self.names else _ABSENT

    def rest_is_default(self, n_matched: int, matched_keys: set[str]) -> bool:
        """Arguments the pattern did not mention must be absent or equal their default."""
        return all(self._is_default(name, value) for name, value in self._unmatched(n_matched, matched_keys))

    def _unmatched(self, n_matched: int, matched_keys: set[str]) -> Iterator[tuple[Optional[str], Any]]:
        for index in range(n_matched, len(self.node.args)):
            name = self.names[index] if index < len(self.names) else None
            if name not in matched_keys:
                yield name, self.node.args[index]
        for key, value in self.node.kwargs.items():
            if key not in matched_keys and key not in self.names[:n_matched]:
                yield key, value

    def _is_default(self, name: Optional[str], value: Any) -> bool:
        if name is None or name not in self.names:
            return False
        arg = self.schema_args[self.names.index(name)]
        return arg.has_default_value() and not isinstance(value, Node) and _same_default(arg.default_value, value)


def _same_default(default: Any, value: Any) -> bool:
    """Like `_same`, but 1 == 1.0 (schema defaults of Scalar arguments are ints)."""
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return len(default) == len(value) and all(map(_same_default, default, value))
    if isinstance(default, bool) or isinstance(value, bool):
        return default is value
    return default == value


def match(pattern: Pattern, node: Node) -> Optional[Match]:
    """Match `pattern` rooted at `node`; returns the `Match` or None."""
    m = Match(node)
    return m if pattern.bind(node, m) else None


__all__ = ["AnyArg", "Const", "Lit", "Match", "Op", "Pattern", "Var", "match"]
