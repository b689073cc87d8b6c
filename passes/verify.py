"""The graph verifier the PassManager runs after every pass.

Checks, in order: every `call_function` target is an ATen/sparsecc
OpOverload or one of the Python operators export emits for SymInt arithmetic
(no call_module/call_method); every `get_attr` target exists; `graph.lint()`;
every node but the output has `meta["val"]`; constants match their recorded
type; then shape re-propagation: each
call is re-run on the FakeTensors of its inputs (under the graph's own fake
mode) and the result's shape and dtype must equal the recorded `meta["val"]`.
Each node is checked against its recorded inputs, so one bad node is reported
where it is, not at every node downstream. Dims are compared as expressions
(`s0*s1`); dims holding unbacked symbols (`u0`, data-dependent sizes) are not
compared because re-running mints fresh ones. `sparsecc::` ops also run their
registry verifier.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Optional

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                           FakeTensorMode, UnsupportedOperatorException)
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from sparsecc.runtime.op_table import qualname_of

from .fake import fake_args_of, graph_fake_mode, resolve_attr
from .graph import module_path
from .printer import format_node, format_type, sparse_op_def


class VerificationError(ValueError):
    """The graph is malformed; `node` names the offending node when there is one."""

    def __init__(self, message: str, node: Optional[str] = None):
        super().__init__(message)
        self.node = node


_CANNOT_REPROPAGATE = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)


def _fail(node: Node, problem: str) -> VerificationError:
    return VerificationError(f"node %{node.name} ({format_node(node)}): {problem}", node=node.name)


def check_structure(gm: GraphModule) -> None:
    """Call targets, get_attr targets, lint, meta vals (no fake execution)."""
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_module", "call_method"):
            _check_target(node)
        elif node.op == "get_attr" and resolve_attr(gm, node.target) is None:  # before lint: a clearer message
            raise _fail(node, f"get_attr target '{node.target}' does not exist on the module")
    try:
        gm.graph.lint()
    except Exception as err:  # lint raises RuntimeError and others; all mean a broken graph
        raise VerificationError(f"graph lint failed: {err}") from err
    for node in gm.graph.nodes:
        if node.op != "output" and "val" not in node.meta and not _is_subgraph(gm, node):
            raise VerificationError(f"node %{node.name} ({node.op} {node.target}) has no meta['val']", node=node.name)
        if node.op == "get_attr":
            _check_attr(gm, node)


def _is_subgraph(gm: GraphModule, node: Node) -> bool:
    """A `get_attr` of a submodule: the branch or body of a higher-order op (torch.cond)."""
    return node.op == "get_attr" and isinstance(resolve_attr(gm, node.target), torch.nn.Module)


def _check_attr(gm: GraphModule, node: Node) -> None:
    attr, val = resolve_attr(gm, node.target), node.meta.get("val")
    if isinstance(attr, torch.Tensor) and isinstance(val, torch.Tensor):
        problem = type_mismatch(attr, val)
        if problem:
            raise _fail(node, f"meta['val'] does not match attribute '{node.target}': {problem}")


def _check_target(node: Node) -> None:
    if node.op != "call_function":
        raise _fail(node, f"{node.op} nodes are not part of the IR (inline or remove them)")
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        return  # torch.cond and friends verify mid-pipeline; lowering refuses them by name
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace in ("aten", "sparsecc") and qualname_of(target) is None:   # library ops: lowering refuses
            raise _fail(node, f"{target}{in_module(node)} is outside the op table: the sparsecc runtime cannot run it")
        return
    if isinstance(target, torch._ops.OpOverloadPacket):
        raise _fail(node, f"target {target} is an overload packet; use an overload such as {target}.default")
    if qualname_of(target) is None:   # the runtime's op table decides, so what verifies also lowers and runs
        raise _fail(node, f"target {target!r} is neither an OpOverload nor an allowed Python operator")


def in_module(node: Node) -> str:
    """` in module layers.0.mlp` (export's nn_module_stack), "" when unknown or top level."""
    path = module_path(node)
    return f" in module {path}" if path else ""


def type_mismatch(expected: Any, got: Any) -> Optional[str]:
    """None when `got` has the type (shape, dtype, structure) recorded in `expected`, else why not."""
    if isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor):
        if expected.dtype != got.dtype or not _same_dims(expected.shape, got.shape):
            return f"expected {format_type(expected)}, got {format_type(got)}"
        return None
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)) and len(expected) == len(got):
        return next((p for p in map(type_mismatch, expected, got) if p), None)
    if _is_scalar(expected) and _is_scalar(got):
        return None if _same_dim(expected, got) else f"expected {expected}, got {got}"
    if expected is None and got is None:
        return None
    return f"expected {format_type(expected)}, got {format_type(got)}"


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def _same_dims(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(map(_same_dim, a, b))


def _same_dim(a: Any, b: Any) -> bool:
    if _has_unbacked(a) or _has_unbacked(b):
        return True
    return str(a) == str(b)


def _has_unbacked(value: Any) -> bool:
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) and bool(free_unbacked_symbols(value))


VERIFIED = "sparsecc_verified"   # meta key: what a node's last passing shape check saw


def check_shapes(gm: GraphModule) -> None:
    """Re-run every call on FakeTensors and compare with the recorded `meta["val"]`. A node whose target,
    arguments and every value it reads (the same objects) are what its last passing check saw is not re-run:
    the pass manager verifies after every pass, and most passes touch a few nodes of a large graph."""
    mode = graph_fake_mode(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function" and _repropagates(node):
            seen = _inputs_seen(gm, node)
            if not _same(node.meta.get(VERIFIED), seen):
                _check_node_shape(gm, node, mode)
                node.meta[VERIFIED] = [(how, _weakly(v)) if how == "is" else (how, v) for how, v in seen]


def _inputs_seen(gm: GraphModule, node: Node) -> list:
    """What the check of `node` depends on: its target, its own recorded val, and per argument the value
    object it reads (an input's meta val, a constant attribute) or the plain argument itself."""
    seen: list = [("is", node.target), ("is", node.meta.get("val"))]

    def visit(arg: Any) -> None:
        if isinstance(arg, (list, tuple)):
            seen.append(("==", (type(arg), len(arg))))
            for a in arg:
                visit(a)
        elif isinstance(arg, dict):
            seen.append(("==", tuple(arg)))
            for a in arg.values():
                visit(a)
        elif isinstance(arg, Node):
            value = resolve_attr(gm, arg.target) if arg.op == "get_attr" else arg.meta.get("val")
            seen.append(("is", value))
            if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
                seen.append(("==", (value.dtype, tuple(value.shape), value._version)))
        elif isinstance(arg, torch.Tensor):
            seen.append(("is", arg))
        else:
            seen.append(("==", (type(arg), arg)))
    visit(tuple(node.args))
    visit(dict(node.kwargs))
    return seen


def _weakly(value: Any) -> Any:
    """A weak reference to `value` where it takes one: the record must not keep alive a weight the graph no
    longer reads (a rewritten layer's dense weight). None and tuples (of fakes) are kept as they are."""
    try:
        return weakref.ref(value)
    except TypeError:
        return value


def _same(before: Optional[list], now: list) -> bool:
    if before is None or len(before) != len(now):
        return False
    for (how, old), (_, new) in zip(before, now):
        if how == "is":
            if isinstance(old, weakref.ref):
                old = old()
                if old is None:      # what the check saw is gone: the node reads something else now
                    return False
            if old is not new:
                return False
        elif type(old) is not type(new) or old != new:
            return False
    return True


def _repropagates(node: Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        return False  # subgraph arguments; their bodies are not part of this graph's IR
    schema = getattr(target, "_schema", None)
    return schema is None or not schema.is_mutable  # re-running a mutating op would alter the recorded vals


def _check_node_shape(gm: GraphModule, node: Node, mode: FakeTensorMode) -> None:
    args, kwargs = fake_args_of(gm, node, mode)
    try:
        with mode, _quiet_unbacked(mode):
            got = node.target(*args, **kwargs)
    except _CANNOT_REPROPAGATE:
        return
    except Exception as err:  # any failure to run means the recorded input types do not fit the op
        raise _fail(node, f"re-running on the recorded input types failed: {type(err).__name__}: {err}") from err
    problem = type_mismatch(got, node.meta["val"])
    if problem:
        raise _fail(node, f"meta['val'] does not match what the op gives on its inputs: {problem}")
    _check_sparse_op(node, args, kwargs)


def _quiet_unbacked(mode: FakeTensorMode) -> Any:
    shape_env = mode.shape_env
    return contextlib.nullcontext() if shape_env is None else shape_env.ignore_fresh_unbacked_symbols()


def _check_sparse_op(node: Node, args: tuple, kwargs: dict) -> None:
    opdef = sparse_op_def(node.target)
    if opdef is None:
        return
    reason = opdef.verify(*args, **kwargs)
    if reason:
        raise _fail(node, f"{opdef.qualname} verifier: {reason}")


def verify_graph(gm: GraphModule) -> None:
    """Raise `VerificationError` when `gm` is not a well-formed sparsecc IR graph."""
    check_structure(gm)
    check_shapes(gm)


__all__ = ["VerificationError", "check_shapes", "check_structure", "in_module",
           "type_mismatch", "verify_graph"]
