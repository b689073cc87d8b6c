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

import io
import logging
import os
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch
from onnxscript import ir
from sparsecc.errors import SparseccError
from torch.utils import _pytree as pytree

from .body import DOMAIN
from .rules import EXPORT_RULES, rule_for, rule_name
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
    captured = compiled._captured
    result = export_graph(compiled.graph_module, captured.in_spec, path, contrib, opset or DEFAULT_OPSET)
    if compare_dense:
        with tempfile.TemporaryDirectory() as tmp:
            dense = export_graph(captured.dense_gm, captured.in_spec, os.path.join(tmp, "dense.onnx"),
                                 opset=opset or DEFAULT_OPSET)
            result.dense_file_bytes, result.dense_weight_bytes = dense.file_bytes, dense.weight_bytes
    return result


def export_graph(gm: torch.fx.GraphModule, in_spec: Any, path: str, contrib: bool = False,
                 opset: int = DEFAULT_OPSET) -> ExportResult:
    """Write the rewritten graph `gm` (placeholders with static meta["val"]) to `path`."""
    model = _torch_export(gm, in_spec, opset)
    result = ExportResult(path, 0)
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


def example_arguments(gm: torch.fx.GraphModule, in_spec: Any) -> tuple[tuple, dict]:
    """(args, kwargs) of the graph's placeholder shapes: zeros, which is all tracing needs."""
    leaves = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
                raise OnnxExportError(f"input '{node.name}' has no static tensor shape ({val}); ONNX export "
                                      "supports models compiled for static input shapes")
            leaves.append(torch.zeros(val.shape, dtype=val.dtype))
    return pytree.tree_unflatten(leaves, in_spec) if in_spec is not None else (tuple(leaves), {})


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


def _torch_export(gm: torch.fx.GraphModule, in_spec: Any, opset: int) -> ir.Model:
    args, kwargs = example_arguments(gm, in_spec)
    table = translation_table(_sparse_ops(gm))
    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), redirect_stdout(quiet), redirect_stderr(quiet):
            warnings.simplefilter("ignore")
            program = _export_with_cached_registry(gm, args, kwargs, table, opset)
    except Exception as err:  # the exporter raises many types; all mean "cannot export this graph"
        lines = str(err).strip().splitlines()
        raise OnnxExportError("torch.onnx.export failed on the rewritten graph: "
                              + "\n  ".join(lines[:20])) from err
    return program.model


_REGISTRIES: dict[int, tuple[Any, set]] = {}


def _export_with_cached_registry(gm, args, kwargs, table: dict, opset: int):
    """torch.onnx.export(dynamo=True, custom_translation_table=table), reusing the torchlib registry.

    Building the registry takes ~3 s per call; torch.onnx.export rebuilds it every time, so
    this calls the exporter core with one registry per opset (private API: on any change
    there it falls back to the public call).
    """
    try:
        from torch.onnx._internal.exporter import _core, _registration
    except ImportError:
        return torch.onnx.export(gm, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                 custom_translation_table=table, optimize=True, verbose=False)
    if opset not in _REGISTRIES:
        _REGISTRIES[opset] = (_registration.ONNXRegistry.from_torchlib(opset_version=max(opset, 18)), set())
    registry, registered = _REGISTRIES[opset]
    for target, function in table.items():
        if target not in registered:
            registry.register_op(target, function, is_complex=False)
            registered.add(target)
    return _core.export(gm, args, kwargs, registry=registry, optimize=True, opset_version=opset, verbose=False)


def call_spec(node: ir.Node, opset: int) -> CallSpec:
    while node.inputs and node.inputs[-1] is None:   # omitted trailing optionals leave the node
        node.resize_inputs(len(node.inputs) - 1)
    operands = tuple(None if v is None else Operand(tuple(d if isinstance(d, int) else str(d) for d in v.shape),
                                                    int(v.dtype))
                     for v in node.inputs)
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    return CallSpec(node.op_type, node.name or node.op_type, attrs, operands, opset)


def attach_sparse_semantics(model: ir.Model, contrib: bool, opset: int,
                            result: ExportResult | None = None) -> onnx.ModelProto:
    """Give every sparsecc node a local function (or a contrib form); returns the model proto."""
    from .contrib import try_contrib
    from .contrib_attention import map_attention
    result = result or ExportResult("", 0)
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


def _function(spec: CallSpec) -> onnx.FunctionProto:
    try:
        return rule_for(spec.op).function(spec)
    except (ValueError, KeyError) as err:
        raise OnnxExportError(f"sparsecc::{spec.op} node '{spec.node}': {err}") from err


def _import_opset(proto: onnx.ModelProto, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(domain, version))
