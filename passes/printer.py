"""A compact MLIR-like text form of an FX graph, for humans and snapshot tests.

    func @forward(%x: f32[2,16,64]) -> (f32[2,16,16]) {
      %l_weight = const "l.weight" : f32[16,64]
      %linear = aten.linear(%x, %l_weight, %l_bias) : f32[2,16,16]
      %nm = sparsecc.nm_linear(%x, %w_values, %w_indices, None) {n=2, m=4} : f32[2,16,16]
      return (%linear)
    }

Types: short dtype and shape (`bf16[s0,4096]`, symbolic dims as their
expression, a device suffix `@cuda:0` when not on the CPU); `sym(s0*s1)` for
a SymInt; `(t1, t2)` for a tuple. The `.default` overload is dropped. For
`sparsecc::` ops the arguments named in the registry entry's `attrs` are
printed as an attribute dict. Output is deterministic: graph order only.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Callable, Optional

import torch
from torch.fx import GraphModule, Node

SHORT_DTYPES = {
    torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.uint16: "u16", torch.uint32: "u32", torch.uint64: "u64",
    torch.bool: "b8", torch.complex64: "c64", torch.complex128: "c128",
    torch.float8_e4m3fn: "f8e4m3fn", torch.float8_e5m2: "f8e5m2",
}


def short_dtype(dtype: torch.dtype) -> str:
    return SHORT_DTYPES.get(dtype, str(dtype).removeprefix("torch."))


def format_type(val: Any) -> str:
    """The printed type of a `meta["val"]`."""
    if isinstance(val, torch.Tensor):
        dims = ",".join(str(d) for d in val.shape)
        device = "" if val.device.type in ("cpu", "meta") else f"@{val.device}"
        return f"{short_dtype(val.dtype)}[{dims}]{device}"
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return f"sym({val})"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(format_type(v) for v in val) + ")"
    return "none" if val is None else type(val).__name__


def format_arg(arg: Any) -> str:
    """An argument as printed inside a call."""
    if isinstance(arg, Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(format_arg(a) for a in arg) + "]"
    if isinstance(arg, str):
        return json.dumps(arg)
    if isinstance(arg, torch.dtype):
        return short_dtype(arg)
    if isinstance(arg, (torch.device, torch.layout, torch.memory_format)):
        return str(arg).removeprefix("torch.")
    return repr(arg)


def op_name(target: Any) -> str:
    """`aten.linear`, `aten.add.Tensor`, `sparsecc.nm_linear`, `getitem`."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target).removesuffix(".default")
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", None) or str(target)


@functools.lru_cache(maxsize=None)
def _sparse_op_lookup() -> Optional[Callable[[str], Any]]:
    """`sparsecc.runtime.ops.get_op`, or None while the runtime does not import."""
    try:
        from sparsecc.runtime.ops import get_op
    except Exception:  # the runtime is optional for printing and verifying
        return None
    return get_op


def sparse_op_def(target: Any) -> Optional[Any]:
    """The runtime registry entry (`OpDef`) of a `sparsecc::` op, or None."""
    schema = getattr(target, "_schema", None)
    lookup = _sparse_op_lookup()
    if schema is None or not schema.name.startswith("sparsecc::") or lookup is None:
        return None
    try:
        return lookup(schema.name)
    except KeyError:
        return None


def _split_attrs(node: Node) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """(positional args, keyword args, attrs) of a call; attrs only for registered sparse ops."""
    opdef = sparse_op_def(node.target)
    if opdef is None or not opdef.attrs:
        return list(node.args), dict(node.kwargs), {}
    names = [a.name for a in node.target._schema.arguments]
    named = {**dict(zip(names, node.args)), **node.kwargs}
    attrs = {k: named[k] for k in opdef.attrs if k in named}
    args = [a for n, a in zip(names, node.args) if n not in attrs]
    kwargs = {k: v for k, v in node.kwargs.items() if k not in attrs}
    return args, kwargs, attrs


def format_call(node: Node) -> str:
    """`aten.linear(%x, %w) {k=v}` without the result name or type."""
    args, kwargs, attrs = _split_attrs(node)
    parts = [format_arg(a) for a in args] + [f"{k}={format_arg(v)}" for k, v in kwargs.items()]
    text = f"{op_name(node.target)}({', '.join(parts)})"
    if node.op == "call_method":
        text = "." + text
    if attrs:
        text += " {" + ", ".join(f"{k}={format_arg(v)}" for k, v in attrs.items()) + "}"
    return text


def format_node(node: Node) -> str:
    """One line of the printed graph (without indentation)."""
    if node.op == "output":
        return f"return {_format_results(node.args[0])}"
    if node.op == "get_attr":
        body = f"const {json.dumps(node.target)}"
    elif node.op == "call_module":
        body = f"call_module @{node.target}({', '.join(format_arg(a) for a in node.args)})"
    else:
        body = format_call(node)
    val = node.meta.get("val")
    suffix = "" if val is None else f" : {format_type(val)}"
    return f"%{node.name} = {body}{suffix}"


def _format_results(results: Any) -> str:
    items = results if isinstance(results, (list, tuple)) else (results,)
    return "(" + ", ".join(format_arg(r) for r in items) + ")"


def _result_type(result: Any) -> str:
    return format_type(result.meta.get("val")) if isinstance(result, Node) else format_type(result)


def print_graph(gm: GraphModule, name: str = "forward") -> str:
    """The whole graph as text, ending with a newline."""
    nodes = list(gm.graph.nodes)
    params = [f"%{n.name}: {format_type(n.meta.get('val'))}" for n in nodes if n.op == "placeholder"]
    output = next((n for n in reversed(nodes) if n.op == "output"), None)
    results = output.args[0] if output is not None else ()
    results = results if isinstance(results, (list, tuple)) else (results,)
    lines = [f"func @{name}({', '.join(params)}) -> ({', '.join(_result_type(r) for r in results)}) {{"]
    lines += [f"  {format_node(n)}" for n in nodes if n.op != "placeholder"]
    return "\n".join(lines + ["}"]) + "\n"


__all__ = ["format_arg", "format_call", "format_node", "format_type", "op_name",
           "print_graph", "short_dtype", "sparse_op_def"]
