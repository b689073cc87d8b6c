"""Lower a rewritten FX graph to a Program (see sparsecc.runtime.program for the format).

Memory plan: every value lives from the instruction that writes it to its
last reader. Reads of an instruction happen before its writes, so a value may
take the register of one that dies at the same instruction. Values whose live
ranges overlap interfere; greedy colouring of the interference graph in order
of definition (optimal for interval graphs) assigns the registers.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw
from torch.utils import _pytree as pytree

from sparsecc.passes.fake import resolve_attr
from sparsecc.passes.state import state_targets
from sparsecc.passes.verify import in_module
from sparsecc.runtime import tree_schema
from sparsecc.runtime.inputs import plain_constant
from sparsecc.runtime.op_table import qualname_of
from sparsecc.runtime.program import InputSpec, Instruction, Program

from .errors import LoweringError

CHECK_ONLY = torch.ops.aten._assert_tensor_metadata.default
NOOP_WHEN_UNCHANGED = (torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten.to.device)


@dataclass
class _Step:
    op: str
    args: list
    kwargs: dict
    unpack: bool
    node: torch.fx.Node


@dataclass
class _Draft:
    """Instructions over virtual values (FX nodes) before registers are assigned."""
    inputs: list[torch.fx.Node] = field(default_factory=list)
    steps: list[_Step] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    tuple_elems: dict[torch.fx.Node, tuple[int, int]] = field(default_factory=dict)  # getitem -> (step, index)
    step_of: dict[torch.fx.Node, int] = field(default_factory=dict)
    aliases: dict[torch.fx.Node, torch.fx.Node] = field(default_factory=dict)  # no-op conversion -> its input


def op_qualname(target: Any, node: torch.fx.Node | None = None) -> str:
    """The runtime op table's name for `target`; a LoweringError naming the node when the runtime cannot run it."""
    qualname = qualname_of(target)
    if qualname is not None:
        return qualname
    where = f"node '{node.name}'{in_module(node)}: " if node is not None else ""
    raise LoweringError(f"{where}cannot lower call to {target}: the sparsecc runtime's op table "
                        "(sparsecc.runtime.op_table) does not hold it")


def lower(gm: torch.fx.GraphModule, symbol_ranges: dict | None = None,
          in_spec: pytree.TreeSpec | None = None, out_spec: pytree.TreeSpec | None = None,
          constant_kwargs: dict | None = None) -> tuple[Program, dict[str, torch.Tensor]]:
    """The Program of `gm` and its constants; `constant_kwargs` are the keyword inputs capture baked in
    (the artifact stores them as JSON so a loaded program accepts them at call time)."""
    for name, value in (constant_kwargs or {}).items():
        if not plain_constant(value):
            raise LoweringError(f"keyword input {name}={value!r}: an artifact stores constant keyword inputs as "
                                "plain JSON (finite numbers, strings, bools, None, short lists)")
    draft = _Draft()
    for node in gm.graph.nodes:
        _lower_node(gm, node, draft)
    registers, count = _assign_registers(draft)
    program = Program(
        inputs=[registers[n] for n in draft.inputs],
        input_specs=[_input_spec(n) for n in draft.inputs],
        instructions=[_finish(step, registers) for step in draft.steps],
        outputs=[_encode(o, registers) for o in draft.outputs],
        num_registers=count,
        constant_names=sorted(draft.constants),
        symbol_ranges=dict(symbol_ranges or {}),
        symbol_hints=_symbol_hints(draft.inputs),
        in_spec=_structure(in_spec),
        out_spec=_structure(out_spec),
        state_names=state_targets(gm),   # the constants the program writes: its own state
        constant_kwargs=dict(constant_kwargs or {}),
    )
    return program, draft.constants


def _structure(spec: pytree.TreeSpec | None) -> dict | None:
    """A TreeSpec in sparsecc's own tree schema (what the artifact stores; never torch's pytree JSON)."""
    try:
        return tree_schema.encode(spec) if spec is not None else None
    except ValueError as err:
        raise LoweringError(str(err)) from None


def _lower_node(gm, node: torch.fx.Node, draft: _Draft) -> None:
    if node.op == "placeholder":
        draft.inputs.append(node)
    elif node.op == "get_attr":
        draft.constants[node.target] = _fetch_constant(gm, node)
    elif node.op == "output":
        draft.outputs = [draft.aliases.get(o, o) for o in pytree.tree_leaves(node.args[0], is_leaf=lambda x: x is None)]
    elif node.op == "call_function":
        _lower_call(node, draft)
    else:
        raise LoweringError(f"cannot lower node '{node.name}' ({node.op} {node.target}): "
                            "only ATen and sparsecc calls are supported")


def _fetch_constant(gm, node) -> torch.Tensor:
    value = resolve_attr(gm, node.target)
    if not isinstance(value, torch.Tensor):
        raise LoweringError(f"constant '{node.target}' is a {type(value).__name__}, not a tensor")
    return value.detach()


def _lower_call(node: torch.fx.Node, draft: _Draft) -> None:
    if node.target is CHECK_ONLY:
        return   # a dtype/device check of a value whose type the program fixes: costs a call per run, checks nothing
    if _noop_conversion(node):
        draft.aliases[node] = draft.aliases.get(node.args[0], node.args[0])   # aten.to returns its input itself
        return
    source = node.args[0] if node.target is operator.getitem else None
    if isinstance(source, torch.fx.Node) and _returns_tuple(source) and source.op == "call_function":
        draft.tuple_elems[node] = (draft.step_of[source], node.args[1])
        return
    unpack = _returns_tuple(node)
    draft.step_of[node] = len(draft.steps)
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: draft.aliases.get(a, a))
    draft.steps.append(_Step(op_qualname(node.target, node), list(args), dict(kwargs), unpack, node))


def _noop_conversion(node: torch.fx.Node) -> bool:
    """An `aten.to` that changes nothing (dtype, device and layout kept, no copy asked): eager returns the input."""
    source = node.args[0] if node.args else None
    if node.target not in NOOP_WHEN_UNCHANGED or not isinstance(source, torch.fx.Node):
        return False
    before, after = source.meta.get("val"), node.meta.get("val")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return False
    named = {**dict(zip((a.name for a in node.target._schema.arguments), node.args)), **node.kwargs}
    if named.get("copy") or named.get("pin_memory") or named.get("memory_format") not in (None, torch.preserve_format):
        return False
    return (before.dtype, before.device, before.layout) == (after.dtype, after.device, after.layout)


def _returns_tuple(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (tuple, list))


def _assign_registers(draft: _Draft) -> tuple[dict[torch.fx.Node, int], int]:
    """Colour the interference graph of live ranges; returns node -> register and the count."""
    spans = _live_spans(draft)
    graph = nx.Graph()
    graph.add_nodes_from(spans)
    active: list[torch.fx.Node] = []
    for value in sorted(spans, key=lambda v: spans[v][0]):
        start = spans[value][0]
        active = [a for a in active if spans[a][1] >= start]
        graph.add_edges_from((value, a) for a in active)
        active.append(value)
    order = sorted(spans, key=lambda v: spans[v])
    colours = nx.greedy_color(graph, strategy=lambda g, c: iter(order))
    return colours, (max(colours.values()) + 1) if colours else 0


def _live_spans(draft: _Draft) -> dict[torch.fx.Node, tuple[int, int]]:
    """Value -> (write time, last read time) with reads of step i at 2i and its writes at 2i+1."""
    defined = {n: -1 for n in draft.inputs}
    defined.update(draft.step_of)
    for node, (step_index, _) in draft.tuple_elems.items():
        defined[node] = step_index
    last = {v: 2 * d + 1 for v, d in defined.items()}
    for i, step in enumerate(draft.steps):
        for used in _nodes_in((step.args, step.kwargs)):
            last[used] = max(last[used], 2 * i)
    for used in _nodes_in(draft.outputs):
        last[used] = 2 * len(draft.steps)
    live = {v: (2 * d + 1, last[v]) for v, d in defined.items() if v in draft.tuple_elems or not _returns_tuple(v)}
    return live


def _nodes_in(args: Any) -> list[torch.fx.Node]:
    return [a for a in pytree.tree_leaves(args) if isinstance(a, torch.fx.Node) and a.op in ("placeholder", "call_function")]


def _finish(step: _Step, registers) -> Instruction:
    node = step.node
    if step.unpack:
        count = len(node.meta["val"])
        outputs = [-1] * count
        for user in node.users:
            outputs[user.args[1]] = registers[user]
    else:
        outputs = [registers[node]]
    return Instruction(step.op, [_encode(a, registers) for a in step.args],
                       {k: _encode(v, registers) for k, v in step.kwargs.items()}, outputs, step.unpack, node.name)


def _encode(value: Any, registers: dict) -> Any:
    if isinstance(value, torch.fx.Node):
        return {"c": value.target} if value.op == "get_attr" else {"r": registers[value]}
    if isinstance(value, (list, tuple)):
        return [_encode(v, registers) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise LoweringError(f"cannot encode argument {value!r} of type {type(value).__name__}")


def _symbol_hints(inputs: list[torch.fx.Node]) -> dict[str, int]:
    """Each dynamic dim's size in the example inputs (the shape env's hint), where validation runs the program."""
    hints = {}
    for node in inputs:
        val = node.meta.get("val")
        for dim in getattr(val, "shape", ()):
            if isinstance(dim, torch.SymInt) and dim.node.expr.is_symbol:
                hints[str(dim)] = int(guarding_hint_or_throw(dim))
    return hints


def _input_spec(node: torch.fx.Node) -> InputSpec:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise LoweringError(f"input '{node.name}' is a {type(val).__name__}; only tensor inputs are supported")
    shape = [int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in val.shape]
    return InputSpec(node.name, str(val.dtype).removeprefix("torch."), shape)
