"""Export a compiled model to ONNX: sparse ops as `sparsecc` nodes with local functions attached.

    torch.onnx.export(rewritten graph, custom translation: one opaque node per sparse op)
      -> for each sparsecc node: a contrib op where asked and the semantics fit,
         else a FunctionProto (standard ops only) specialised to its attributes,
         shapes and dtypes, bound to the node through the function `overload`
      -> onnx.checker.check_model(full_check=True) -> save

Compressed N:M tensors stay initializers of the file; onnxruntime inlines the
functions and constant-folds the decompression when it loads the model.
"""
from __future__ import annotations

import inspect
import io
import logging
import os
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx
import sympy
import torch
from onnxscript import ir
from sparsecc.capture import symbol_range
from sparsecc.errors import SparseccError
from torch.utils import _pytree as pytree

from .body import DOMAIN
from .contrib import try_contrib
from .contrib_attention import map_attention
from .rules import EXPORT_RULES, dynamic_shape_misfit, rule_for, rule_name
from .spec import CallSpec, Operand
from .translate import translation_table

log = logging.getLogger("sparsecc.onnx")
DEFAULT_OPSET = 20


class OnnxExportError(SparseccError):
    """The compiled graph could not be written as ONNX; the message names the node and reason."""


@dataclass
class ExportResult:
    path: str
    file_bytes: int
    weight_bytes: int = 0                                        # initializers
    dense_file_bytes: int | None = None                       # the dense model's export, when compared
    dense_weight_bytes: int | None = None
    sparse_nodes: dict[str, int] = field(default_factory=dict)   # op -> count
    contrib_nodes: dict[str, int] = field(default_factory=dict)  # contrib op -> count
    log: list[str] = field(default_factory=list)                 # one line per decision

    def __str__(self) -> str:
        size = f"{self.file_bytes} bytes, weights {self.weight_bytes}"
        if self.dense_file_bytes:
            size += (f"; dense export {self.dense_file_bytes} bytes, weights {self.dense_weight_bytes}: "
                     f"file {self.file_bytes / self.dense_file_bytes:.2f}x, "
                     f"weights {self.weight_bytes / self.dense_weight_bytes:.2f}x")
        nodes = ", ".join(f"{op} x{n}" for op, n in {**self.sparse_nodes, **self.contrib_nodes}.items())
        return "\n".join([f"wrote {self.path} ({size}); sparse nodes: {nodes or 'none'}", *self.log])


def export_compiled(compiled, path: str, contrib: bool = False, opset: int | None = None,
                    compare_dense: bool = False) -> ExportResult:
    """CompiledModel.export_onnx: the rewritten graph, and optionally the dense graph for its file size."""
    captured = compiled.captured
    result = export_graph(compiled.graph_module, captured.in_spec, path, contrib, opset or DEFAULT_OPSET,
                          captured.symbol_ranges)
    if compare_dense:
        with tempfile.TemporaryDirectory() as tmp:
            dense = export_graph(captured.dense_gm, captured.in_spec, os.path.join(tmp, "dense.onnx"),
                                 opset=opset or DEFAULT_OPSET, symbol_ranges=captured.symbol_ranges)
            result.dense_file_bytes, result.dense_weight_bytes = dense.file_bytes, dense.weight_bytes
    return result


def export_graph(gm: torch.fx.GraphModule, in_spec: Any, path: str, contrib: bool = False,
                 opset: int = DEFAULT_OPSET, symbol_ranges: dict | None = None,
                 prepare: Callable[[ir.Model, ExportResult], None] | None = None) -> ExportResult:
    """Write the rewritten graph `gm` to `path`; symbolic placeholder dims (ranges in `symbol_ranges`,
    the compile's) stay symbolic ONNX dims named as the user's torch.export.Dim, else the symbol.
    `prepare` edits the exported model before sparse nodes get their semantics (generator export:
    cache input/output names, GroupQueryAttention with its cache)."""
    model = _torch_export(gm, in_spec, opset, symbol_ranges)
    result = ExportResult(path, 0, log=_specialised_dims(gm))
    if prepare is not None:
        prepare(model, result)
    proto = attach_sparse_semantics(model, contrib, opset, result)
    onnx.checker.check_model(proto, full_check=True)
    save(proto, path)
    result.file_bytes = os.path.getsize(path)
    result.weight_bytes = sum(len(t.raw_data) or t.ByteSize() for t in proto.graph.initializer)
    for line in result.log:
        log.info(line)
    return result


def save(proto: onnx.ModelProto, path: str) -> None:
    if proto.ByteSize() > 2**31 - 1:
        onnx.save(proto, path, save_as_external_data=True, location=os.path.basename(path) + ".data")
    else:
        onnx.save(proto, path)


def _input_values(gm: torch.fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """(name, meta["val"]) of every placeholder, in order; each must be a tensor."""
    values = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise OnnxExportError(f"input '{node.name}' is not a tensor ({val}); ONNX export takes tensor inputs")
            values.append((node.name, val))
    return values


def _static_size(size: Any) -> int | None:
    """The dim as an int when it is static (a symbol a pass specialised counts), else None."""
    if isinstance(size, int):
        return size
    return int(size.node.expr) if size.node.expr.is_number else None


def _size_hint(name: str, axis: int, size: Any) -> int:
    """A static dim, or the example size the model was compiled with for a symbolic one."""
    static = _static_size(size)
    if static is not None:
        return static
    hint = size.node.hint
    if hint is None:
        raise OnnxExportError(f"input '{name}' dim {axis} ({size}) has no example size to trace with")
    return int(hint)


def _specialised_dims(gm: torch.fx.GraphModule) -> list[str]:
    """Log lines for input dims compiled as symbols that the rewrite fixed to one size (they export static)."""
    return [f"input '{name}' dim {axis}: compiled dynamic, fixed to {int(d)} by the rewrite; exported static"
            for name, val in _input_values(gm) for axis, d in enumerate(val.shape)
            if not isinstance(d, int) and _static_size(d) is not None]


def example_arguments(gm: torch.fx.GraphModule, in_spec: Any) -> tuple[tuple, dict]:
    """(args, kwargs) of the graph's placeholder shapes at the compiled example sizes: zeros, which
    is all tracing needs."""
    leaves = [torch.zeros([_size_hint(name, axis, d) for axis, d in enumerate(val.shape)], dtype=val.dtype)
              for name, val in _input_values(gm)]
    return pytree.tree_unflatten(leaves, in_spec) if in_spec is not None else (tuple(leaves), {})


def _dim_name(symbol: Any, shape_env: Any) -> str:
    """The name the user gave the dim (torch.export.Dim), else the compile's symbol (s31)."""
    for source in shape_env.var_to_sources.get(symbol, []):
        name = shape_env.source_name_to_debug_name.get(source.name)
        if name:
            return name
    return str(symbol)


def _export_dim(name: str, axis: int, size: Any, ranges: dict, dims: dict) -> Any:
    """One torch.export.Dim per symbol of the compile (shared by every input that has it)."""
    expr = size.node.expr
    if not isinstance(expr, sympy.Symbol):
        raise OnnxExportError(f"input '{name}' dim {axis} is {expr}, an expression of symbols; ONNX export "
                              "supports dynamic dims that are one symbol each")
    if expr not in dims:
        bounds = ranges.get(str(expr)) or symbol_range(size.node.shape_env.var_to_range[expr])
        limits = {"min": bounds[0]} | ({"max": bounds[1]} if bounds[1] is not None else {})
        dims[expr] = torch.export.Dim(_dim_name(expr, size.node.shape_env), **limits)
    return dims[expr]


def dynamic_shapes(gm: torch.fx.GraphModule, in_spec: Any, symbol_ranges: dict | None = None) -> dict | None:
    """torch.export dynamic_shapes for the graph's symbolic input dims, by forward argument name
    ({} for a static input); None when every input is static."""
    dims: dict = {}
    per_input = [{axis: _export_dim(name, axis, d, symbol_ranges or {}, dims)
                  for axis, d in enumerate(val.shape) if _static_size(d) is None}
                 for name, val in _input_values(gm)]
    if not dims:
        return None
    args, kwargs = pytree.tree_unflatten(per_input, in_spec) if in_spec is not None else (tuple(per_input), {})
    return dict(inspect.signature(gm.forward).bind(*args, **kwargs).arguments)


def _sparse_ops(gm: torch.fx.GraphModule) -> list[str]:
    names = sorted({n.target.name().split("::")[1].split(".")[0] for n in gm.graph.nodes
                    if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                    and n.target.namespace == DOMAIN})
    from sparsecc.runtime.ops import get_op
    for name in names:
        if rule_name(get_op(name)) not in EXPORT_RULES:
            raise OnnxExportError(f"sparsecc::{name} has no ONNX export rule (ops with one: "
                                  f"{', '.join(sorted(EXPORT_RULES))})")
    return names


def _torch_export(gm: torch.fx.GraphModule, in_spec: Any, opset: int,
                  symbol_ranges: dict | None = None) -> ir.Model:
    args, kwargs = example_arguments(gm, in_spec)
    dynamic = dynamic_shapes(gm, in_spec, symbol_ranges)
    table = translation_table(_sparse_ops(gm))
    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), redirect_stdout(quiet), redirect_stderr(quiet):
            warnings.simplefilter("ignore")
            program = _export_with_cached_registry(gm, args, kwargs, table, opset, dynamic)
    except Exception as err:  # the exporter raises many types; all mean "cannot export this graph"
        lines = str(err).strip().splitlines()
        raise OnnxExportError("torch.onnx.export failed on the rewritten graph: "
                              + "\n  ".join(lines[:20])) from err
    return program.model


_REGISTRIES: dict[int, tuple[Any, set]] = {}


def _export_with_cached_registry(gm, args, kwargs, table: dict, opset: int, dynamic: dict | None = None):
    """torch.onnx.export(dynamo=True, custom_translation_table=table, dynamic_shapes=dynamic), reusing
    the torchlib registry.

    Building the registry takes ~3 s per call; torch.onnx.export rebuilds it every time, so
    this calls the exporter core with one registry per opset (private API: on any change
    there it falls back to the public call, which names the dynamic axes itself).
    """
    try:
        from torch.onnx._internal.exporter import _core, _registration
    except ImportError:
        return torch.onnx.export(gm, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                 custom_translation_table=table, optimize=True, verbose=False,
                                 dynamic_shapes=dynamic)
    if opset not in _REGISTRIES:
        _REGISTRIES[opset] = (_registration.ONNXRegistry.from_torchlib(opset_version=max(opset, 18)), set())
    registry, registered = _REGISTRIES[opset]
    for target, function in table.items():
        if target not in registered:
            registry.register_op(target, function, is_complex=False)
            registered.add(target)
    program = _core.export(gm, args, kwargs, registry=registry, dynamic_shapes=dynamic, optimize=True,
                           opset_version=opset, verbose=False)
    if dynamic:   # the exporter's own symbols (s0, ...) -> the Dim names, as torch.onnx.export does
        program._rename_dynamic_axes(dynamic)
    return program


def call_spec(node: ir.Node, opset: int) -> CallSpec:
    while node.inputs and node.inputs[-1] is None:   # omitted trailing optionals leave the node
        node.resize_inputs(len(node.inputs) - 1)
    return _spec(node, opset)


def _spec(node: ir.Node, opset: int) -> CallSpec:
    operands = tuple(None if v is None else _operand(v) for v in node.inputs)
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    return CallSpec(node.op_type, node.name or node.op_type, attrs, operands, opset)


def _operand(value: ir.Value) -> Operand:
    """Shape (symbolic dims as their names) and dtype; an earlier sparse node's output is typed only
    once that node is attached, so before then its dtype reads UNDEFINED."""
    shape = tuple(d if isinstance(d, int) else str(d) for d in value.shape)
    return Operand(shape, int(value.dtype) if value.dtype is not None else onnx.TensorProto.UNDEFINED)


def attach_sparse_semantics(model: ir.Model, contrib: bool, opset: int,
                            result: ExportResult | None = None) -> onnx.ModelProto:
    """Give every sparsecc node a local function (or a contrib form); returns the model proto."""
    result = result or ExportResult("", 0)
    _check_dynamic_shapes(model, opset)
    functions: dict[tuple[str, str], onnx.FunctionProto] = {}
    attention_lines: dict[str, str] = {}
    if contrib:   # attention first: a mapped block_attention takes its block_layout with it
        mapped, attention_lines = map_attention(model, opset)
        for used, line in mapped:
            result.log.append(line)
            if used:
                result.contrib_nodes[used] = result.contrib_nodes.get(used, 0) + 1
    for node in list(model.graph):
        if node.domain != DOMAIN:
            continue
        spec = call_spec(node, opset)
        for value, elem_type in zip(node.outputs, rule_for(spec.op).output_types(spec)):
            value.dtype = ir.DataType(elem_type)
        if contrib:
            used, line = try_contrib(model, node, spec, attention_lines)
            result.log.append(line)
            if used:
                result.contrib_nodes[used] = result.contrib_nodes.get(used, 0) + 1
                continue
        node.overload = spec.key()
        result.sparse_nodes[spec.op] = result.sparse_nodes.get(spec.op, 0) + 1
        if (spec.op, spec.key()) not in functions:
            functions[(spec.op, spec.key())] = _function(spec)
    proto = ir.serde.serialize_model(model)
    proto.functions.extend(functions.values())
    if contrib and result.contrib_nodes:
        _import_opset(proto, "com.microsoft", 1)
    _import_opset(proto, DOMAIN, 1)
    return proto


def _check_dynamic_shapes(model: ir.Model, opset: int) -> None:
    """Refuse, naming the node, sparse nodes whose bodies cannot take their symbolic dims."""
    for node in model.graph:
        if node.domain == DOMAIN:
            spec = _spec(node, opset)   # the node is left as it is: contrib mapping reads it next
            misfit = dynamic_shape_misfit(spec)
            if misfit:
                raise OnnxExportError(f"sparsecc::{spec.op} node '{spec.node}': {misfit}")


def _function(spec: CallSpec) -> onnx.FunctionProto:
    try:
        return rule_for(spec.op).function(spec)
    except (ValueError, KeyError) as err:
        raise OnnxExportError(f"sparsecc::{spec.op} node '{spec.node}': {err}") from err


def _import_opset(proto: onnx.ModelProto, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(domain, version))
