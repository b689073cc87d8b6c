"""Make a captured graph fit the runtime's op table (`sparsecc.runtime.op_table`).

The runtime keeps its allowlist; the compiler makes the program fit it. Two steps:

- `prepare_for_passes`, on the captured graph: region higher-order ops
  (`wrap_with_set_grad_enabled`, `wrap_with_autocast` with autocast off) are
  inlined, their body GraphModules spliced in (the program is inference, so a
  grad-mode switch changes nothing), and ATen ops outside the table (`concat`)
  are decomposed, since the verifier refuses them before any pass.
- `lower_library_ops`, after the passes (so moe-dispatch can still absorb an
  expert computation such as `transformers::grouped_mm_fallback`): every op
  still outside the table is decomposed, else a LoweringError names the op and
  its layer.

An op is decomposed by the first implementation that traces (make_fx on the
node's FakeTensors, under the graph's own fake mode) into ops that are in the
table or decompose further: `LIBRARY_EQUIVALENTS` (a library op documented as
equal to an ATen op whose Python body cannot be traced), `ATEN_DECOMPOSITIONS`
(ATen ops torch has no decomposition for), torch's decomposition table, the
op's CompositeImplicitAutograd kernel, and a custom op's Python implementation.
"""
from __future__ import annotations

import operator
import warnings
from typing import Any, Callable, Iterator, Optional

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from sparsecc.passes.graph import layer_name
from sparsecc.passes.fake import graph_fake_mode, node_fake, resolve_attr, to_fake
from sparsecc.passes.verify import in_module, type_mismatch
from sparsecc.runtime.op_table import qualname_of

from .errors import LoweringError

aten = torch.ops.aten
_MAX_ROUNDS = 8   # a decomposition may emit ops that decompose again; this bounds the nesting


def grouped_mm_by_rows(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: Optional[torch.Tensor] = None,
                       bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`aten._grouped_mm` for 2-d rows and 3-d group weights: out[r] = a[r] @ b[g(r)] (+ bias[g(r)]),
    g(r) = #{e: offs[e] <= r}; rows past offs[-1] are 0. Every group's product is computed and
    the row's own gathered (data-independent, E times the FLOPs of the grouped form)."""
    if mat_a.dim() != 2 or mat_b.dim() != 3 or offs is None:
        raise NotImplementedError("only the 2-d x 3-d form with offs (rows grouped by offs) decomposes")
    groups, rows, width = mat_b.shape[0], mat_a.shape[0], mat_b.shape[2]
    row_ids = torch.arange(rows, device=mat_a.device)
    group = (row_ids.unsqueeze(1) >= offs.to(torch.int64).unsqueeze(0)).sum(1)
    every = torch.matmul(mat_a.unsqueeze(0), mat_b)                       # [E, rows, width]
    index = group.clamp(max=groups - 1).view(1, rows, 1).expand(1, rows, width)
    out = every.gather(0, index).squeeze(0)
    if bias is not None:
        out = out + bias[group.clamp(max=groups - 1)]
    out = torch.where((group < groups).unsqueeze(1), out, torch.zeros_like(out))
    return out.to(out_dtype) if out_dtype is not None else out


# Library ops equal to an ATen op whose Python body cannot be traced (a loop over offs.tolist()), by
# name: (the ATen op, its decomposition). transformers' ONNX exporter maps this one to _grouped_mm too.
LIBRARY_EQUIVALENTS: dict[str, tuple[str, Callable[..., Any]]] = {
    "transformers::grouped_mm_fallback": ("aten::_grouped_mm", grouped_mm_by_rows),
}
# ATen ops outside the table that torch gives no decomposition for. `detach_` only clears
# requires_grad (torch.tensor(...) constants get one); a program is inference, so its value is enough.
ATEN_DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {
    aten._grouped_mm.default: grouped_mm_by_rows,
    aten.detach_.default: torch.Tensor.detach,
}
# Higher-order ops whose body is a region of ordinary ops: (index of the body, accepts(args)).
REGION_HOPS: dict[Any, tuple[int, Callable[[tuple], bool]]] = {
    torch.ops.higher_order.wrap_with_set_grad_enabled: (1, lambda args: True),
    torch.ops.higher_order.wrap_with_autocast: (4, lambda args: args[2] is False),   # autocast off
}


def prepare_for_passes(gm: GraphModule) -> GraphModule:
    """Inline region higher-order ops and decompose ATen ops outside the table (before the passes)."""
    return _fit(gm, lambda node: _is_region(node) or _is_aten_outside(node))


def lower_library_ops(gm: GraphModule) -> GraphModule:
    """Decompose or inline every call outside the runtime's op table (after the passes)."""
    _warn_dense_grouped_products(gm)
    return _fit(gm, _outside_table)


_GROUPED_PRODUCTS = ("transformers::grouped_mm_fallback", "aten::_grouped_mm")


def _warn_dense_grouped_products(gm: GraphModule) -> None:
    """Grouped expert products left to lowering cost E times their FLOPs: say where, and what avoids it."""
    layers = sorted({layer_name(n) for n in gm.graph.nodes
                     if n.op == "call_function" and any(name in str(n.target).replace(".", "::", 1)
                                                        for name in _GROUPED_PRODUCTS)})
    if layers:
        warnings.warn(f"sparsecc: {len(layers)} grouped expert product(s) ({', '.join(layers[:4])}"
                      f"{', ...' if len(layers) > 4 else ''}) lowered as a product over every expert (E times the "
                      "expert FLOPs); add {\"moe\": \"dispatch\"} to run each token's experts only", stacklevel=3)


def _fit(gm: GraphModule, wanted: Callable[[Node], bool]) -> GraphModule:
    for _ in range(_MAX_ROUNDS):
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and wanted(n)]
        if not nodes:
            break
        for node in nodes:
            if _is_region(node):
                _inline(gm, node)
            else:
                _decompose(gm, node)
    leftover = next((n for n in gm.graph.nodes if n.op == "call_function" and wanted(n)), None)
    if leftover is not None:
        raise LoweringError(f"{_describe(leftover)} still decomposes into ops outside the runtime's op table "
                            f"after {_MAX_ROUNDS} rounds")
    _drop_unused_bodies(gm)
    gm.recompile()
    return gm


def _outside_table(node: Node) -> bool:
    return qualname_of(node.target) is None


def _is_aten_outside(node: Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "aten" and _outside_table(node)


def _is_region(node: Node) -> bool:
    region = REGION_HOPS.get(node.target)
    return region is not None and region[1](node.args)


def _describe(node: Node) -> str:
    return f"op {_op_name(node.target)} (node '{node.name}'){in_module(node)}"


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        overload = "" if target._overloadname == "default" else f".{target._overloadname}"
        return f"{target.namespace}::{target._opname}{overload}"
    return getattr(target, "__name__", repr(target))


def _inline(gm: GraphModule, node: Node) -> None:
    """Splice the body of a region higher-order op in place of the call."""
    body_index, _ = REGION_HOPS[node.target]
    body = resolve_attr(gm, node.args[body_index].target)
    _splice(gm, node, body, list(node.args[body_index + 1:]))


def _decompose(gm: GraphModule, node: Node) -> None:
    if not isinstance(node.target, torch._ops.OpOverload):
        raise LoweringError(f"{_describe(node)} cannot be lowered: the sparsecc runtime's op table does not hold "
                            "it and it is not an op with a decomposition (a higher-order op other than a "
                            "no-grad or autocast-off region, or a Python call)")
    tried = []
    for source, implementation in _implementations(node.target, _device_of(node)):
        try:
            traced, inputs = _trace(gm, node, implementation)
        except Exception as err:  # a failed trace (data-dependent loop, unsupported form) means: try the next
            tried.append(f"{source}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        _splice(gm, node, traced, inputs)
        return
    reasons = "; ".join(tried) or "it has no registered decomposition, composite kernel or Python implementation"
    raise LoweringError(f"{_describe(node)} is outside the sparsecc runtime's op table and cannot be decomposed "
                        f"into ATen ops: {reasons}")


def _implementations(op: torch._ops.OpOverload, device: str) -> Iterator[tuple[str, Callable[..., Any]]]:
    """Candidate ATen-level implementations of `op` on `device` tensors, most specific first."""
    name = _op_name(op)
    if name in LIBRARY_EQUIVALENTS:
        equal_to, decomposition = LIBRARY_EQUIVALENTS[name]
        yield f"decomposition of the equal ATen op {equal_to}", decomposition
    if op in ATEN_DECOMPOSITIONS:
        yield "sparsecc decomposition", ATEN_DECOMPOSITIONS[op]
    if op in torch._decomp.decomposition_table:
        yield "torch decomposition", torch._decomp.decomposition_table[op]
    if op.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd):
        yield "composite implementation", op.decompose
    python_body = _custom_op_body(op, device)
    if python_body is not None:
        yield f"Python implementation for {device}", python_body


def _custom_op_body(op: torch._ops.OpOverload, device: str) -> Optional[Callable[..., Any]]:
    """The Python kernel a `torch.library.custom_op` runs on `device` (its kernel for that device type, or the
    one for every device): the op's own semantics there, so a trace of it is exact. None when it has neither."""
    definition = torch._library.custom_ops.OPDEFS.get(f"{op.namespace}::{op._opname}")
    if definition is None:
        return None
    kernels = definition._backend_fns
    return kernels.get(device) or kernels.get(None)


def _device_of(node: Node) -> str:
    """The device type the node's tensor inputs live on ('cpu' when it reads none)."""
    for a in pytree.tree_leaves((node.args, node.kwargs)):
        value = a.meta.get("val") if isinstance(a, Node) else None
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def _trace(gm: GraphModule, node: Node, implementation: Callable[..., Any]) -> tuple[GraphModule, list[Node]]:
    """`implementation` on the node's FakeTensors, traced to ATen; returns the graph and the nodes it reads."""
    inputs = [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, Node)]
    mode = graph_fake_mode(gm)
    fakes = [node_fake(gm, a, mode) for a in inputs]

    def call(*values: Any) -> Any:
        by_node = dict(zip(inputs, values))
        args, kwargs = pytree.tree_map(lambda a: by_node.get(a, a) if isinstance(a, Node) else a,
                                       (tuple(node.args), dict(node.kwargs)))
        result = implementation(*args, **kwargs)
        if result is NotImplemented:
            raise NotImplementedError("the implementation returned NotImplemented for these arguments")
        return result

    with mode:
        traced = make_fx(call, tracing_mode="real")(*fakes)
    _check_outputs(node, traced)
    return traced, inputs


def _check_outputs(node: Node, traced: GraphModule) -> None:
    """The traced result must have the node's recorded types (the decomposition computes the same thing)."""
    output = next(n for n in traced.graph.nodes if n.op == "output")
    got = pytree.tree_map(lambda a: a.meta.get("val") if isinstance(a, Node) else a, output.args[0])
    problem = type_mismatch(node.meta.get("val"), got)
    if problem:
        raise ValueError(f"the traced implementation's result differs from the recorded one: {problem}")


def _splice(gm: GraphModule, node: Node, body: GraphModule, inputs: list[Any]) -> None:
    """Copy `body`'s nodes before `node` (its placeholders reading `inputs`), then replace `node` by its output."""
    placeholders = iter(inputs)
    env: dict[Node, Any] = {}
    result: Any = None
    with gm.graph.inserting_before(node):
        for inner in body.graph.nodes:
            if inner.op == "placeholder":
                env[inner] = next(placeholders)
            elif inner.op == "get_attr":
                env[inner] = _copy_constant(gm, body, inner)
            elif inner.op == "output":
                result = pytree.tree_map(lambda a: env[a] if isinstance(a, Node) else a, inner.args[0])
            else:
                env[inner] = _copy_node(gm, inner, env, node)
    _replace_results(gm, node, result)


def _copy_node(gm: GraphModule, inner: Node, env: dict, outer: Node) -> Node:
    copied = gm.graph.node_copy(inner, lambda a: env[a])
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):   # the layer it came from names it
        if key not in inner.meta and key in outer.meta:
            copied.meta[key] = outer.meta[key]
    return copied


def _copy_constant(gm: GraphModule, body: GraphModule, inner: Node) -> Node:
    """A body's constant (a traced tensor literal or a nested body) registered on `gm` under a fresh name."""
    value = resolve_attr(body, inner.target)
    name = _fresh_attribute(gm, f"_inlined_{inner.target.replace('.', '_')}")
    if isinstance(value, torch.nn.Module):
        gm.add_submodule(name, value)
    else:
        gm.register_buffer(name, value)
    constant = gm.graph.get_attr(name)
    if isinstance(value, torch.Tensor):
        constant.meta["val"] = to_fake(value, graph_fake_mode(gm))
    return constant


def _fresh_attribute(gm: GraphModule, stem: str) -> str:
    index = 0
    while hasattr(gm, f"{stem}_{index}"):
        index += 1
    return f"{stem}_{index}"


def _replace_results(gm: GraphModule, node: Node, result: Any) -> None:
    single = isinstance(result, (tuple, list)) and not isinstance(node.meta.get("val"), (tuple, list))
    if single:   # a body returns a 1-tuple where the op returned one tensor
        result = result[0]
    if isinstance(result, (tuple, list)):
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise LoweringError(f"{_describe(node)}: a tuple result read by {user.name}, not by indexing")
            user.replace_all_uses_with(result[user.args[1]])
            gm.graph.erase_node(user)
    else:
        node.replace_all_uses_with(result)
    gm.graph.erase_node(node)


def _drop_unused_bodies(gm: GraphModule) -> None:
    """Body GraphModules nothing calls any more (inlined regions) leave the graph and the module."""
    bodies = [n for n in gm.graph.nodes if n.op == "get_attr" and isinstance(resolve_attr(gm, n.target), torch.nn.Module)]
    for node in bodies:
        if not node.users:
            gm.graph.erase_node(node)
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in {n.target for n in bodies} - still_read:
        gm.delete_submodule(target)


__all__ = ["ATEN_DECOMPOSITIONS", "LIBRARY_EQUIVALENTS", "REGION_HOPS", "grouped_mm_by_rows",
           "lower_library_ops", "prepare_for_passes"]
