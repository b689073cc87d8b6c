"""Export a compiled model as MLIR (linalg-on-tensors) through torch-mlir's FX importer.

    rewritten FX graph
      -> each sparsecc::nm_linear(x, values, indices, bias) becomes  mm(W, x^T)^T + bias,
         W a new graph input (the weight feeds the matmul as its left operand, untransposed)
      -> torch_mlir.fx.export_and_import(..., output_type="linalg-on-tensors")
      -> inside the function each W input is replaced by the compressed weight, as sparsecc stores it:
             %v = arith.constant dense_resource<..> : tensor<R*K*N/M x f32>     (kept values)
             %c = arith.constant dense_resource<..> : tensor<R*K*N/M x i8>      (in-group positions)
             %W = sparse_tensor.assemble (%c), %v : ... to tensor<R x K x f32, #NM>
         #NM = #sparse_tensor.encoding<{ map = (i, j) -> (i : dense, j floordiv M : dense,
                                                          j mod M : structured[N, M]), crdWidth = 8 }>

The MLIR sparsifier (`sparsifier{enable-runtime-library=false}`) compiles the matmuls over #NM
without a runtime library. Inputs are exported at the example sizes the model was compiled with.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from sparsecc.runtime.nm_format import unpack_positions

from .errors import SparseccError

NM_LINEAR = torch.ops.sparsecc.nm_linear.default
FUNC_NAME = "forward"


class MlirExportError(SparseccError):
    """The compiled graph could not be written as MLIR; the message names the node and the reason."""


@dataclass
class StructuredWeight:
    """One N:M weight exported as a #sparse_tensor structured[N, M] tensor."""
    layer: str                 # the weight's constant name, e.g. "0.weight_nm_values"
    values: torch.Tensor       # [R, K*N/M]
    positions: torch.Tensor    # [R, K*N/M] int64, in-group positions in [0, M)
    n: int
    m: int
    in_features: int

    @property
    def name(self) -> str:
        """The weight's symbol-safe name in the model, e.g. "0_weight"."""
        return re.sub(r"\W", "_", self.layer.removesuffix("_nm_values"))

    def encoding(self) -> str:
        return ("#sparse_tensor.encoding<{ map = (i, j) -> (i : dense, j floordiv %d : dense, "
                "j mod %d : structured[%d, %d]), crdWidth = 8 }>" % (self.m, self.m, self.n, self.m))


@dataclass
class MlirExportResult:
    path: str
    file_bytes: int
    structured_weights: list[str] = field(default_factory=list)   # "layer: structured[N, M] RxK"

    def __str__(self) -> str:
        lines = [f"wrote {self.path} ({self.file_bytes} bytes); structured N:M weights: "
                 f"{len(self.structured_weights)}"]
        return "\n".join(lines + [f"  {w}" for w in self.structured_weights])


def export_mlir(compiled: Any, path: str) -> MlirExportResult:
    """CompiledModel.export_mlir: write `compiled.graph_module` as linalg-on-tensors MLIR to `path`."""
    text, weights = mlir_text(compiled.graph_module)
    with open(path, "w") as out:
        out.write(text)
    described = [f"{w.layer}: structured[{w.n}, {w.m}] {w.values.shape[0]}x{w.in_features}" for w in weights]
    return MlirExportResult(path, os.path.getsize(path), described)


def mlir_text(gm: torch.fx.GraphModule) -> tuple[str, list[StructuredWeight]]:
    """The MLIR module text of the rewritten graph `gm`, and the N:M weights it carries as sparse tensors."""
    fx = _torch_mlir_fx()
    graph_module, weights = dense_form(gm)
    inputs = [_example(node) for node in graph_module.graph.nodes if node.op == "placeholder"]
    try:
        module = fx.export_and_import(graph_module, *inputs, output_type="linalg-on-tensors", func_name=FUNC_NAME)
    except Exception as err:   # the importer's own message says which op it could not lower
        raise MlirExportError(f"mlir export: torch-mlir could not import the graph: {err}") from err
    with module.context, _unknown_location():
        _outline_structured_matmuls(module, weights)
        if not module.operation.verify():
            raise MlirExportError("mlir export: the module with sparse weights does not verify")
    return str(module), weights


def _unknown_location() -> Any:
    from torch_mlir import ir
    return ir.Location.unknown()


@functools.cache
def _torch_mlir_fx():
    try:
        from torch_mlir import fx
    except ImportError as err:
        raise MlirExportError("mlir export: needs the torch-mlir package (pip install torch-mlir==20261001)") from err
    return fx


def dense_form(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[StructuredWeight]]:
    """A copy of `gm` with flat inputs, every nm_linear written as mm(W, x^T)^T (+ bias) over a new
    trailing input W per weight; any other sparsecc op is refused."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))   # a copy keeps the compiled graph intact
    graph.set_codegen(torch.fx.graph.CodeGen())   # flat positional inputs, no pytree spec
    weights = []
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is NM_LINEAR:
            weights.append(_dense_nm_linear(gm, graph, node))
        elif node.op == "call_function" and getattr(node.target, "namespace", None) == "sparsecc":
            raise MlirExportError(f"mlir export: node '{node.name}' is {node.target.name()}, which has no MLIR "
                                  "form (sparsecc::nm_linear exports; see docs/mlir.md)")
    graph.eliminate_dead_code()   # the compressed constants the nm_linear nodes read
    graph.lint()
    return torch.fx.GraphModule(gm, graph), weights


def _dense_nm_linear(gm: torch.fx.GraphModule, graph: torch.fx.Graph, node: torch.fx.Node) -> StructuredWeight:
    x, values, indices, bias, n, m, in_features = node.args
    weight = _structured_weight(gm, node, values, indices, n, m, in_features)
    rows = weight.values.shape[0]
    with graph.inserting_after(_last_placeholder(graph)):
        dense_w = graph.placeholder(f"{node.name}_weight")   # unique even when layers share a weight
    dense_w.meta["val"] = torch.empty(rows, in_features, dtype=weight.values.dtype)
    lead = [_static(d) for d in node.meta["val"].shape[:-1]]   # x's own meta is gone when x was rewritten too
    aten = torch.ops.aten
    with graph.inserting_before(node):
        x_t = graph.call_function(aten.t.default, (graph.call_function(aten.reshape.default, (x, [-1, in_features])),))
        y_t = graph.call_function(aten.mm.default, (dense_w, x_t))   # W feeds the matmul: its sparse operand
        y = graph.call_function(aten.reshape.default, (graph.call_function(aten.t.default, (y_t,)), [*lead, rows]))
        if bias is not None:
            y = graph.call_function(aten.add.Tensor, (y, bias))
    node.replace_all_uses_with(y)
    graph.erase_node(node)
    return weight


def _structured_weight(gm, node, values, indices, n, m, in_features) -> StructuredWeight:
    if not all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in (values, indices)):
        raise MlirExportError(f"mlir export: node '{node.name}' (sparsecc::nm_linear) has a weight that is not a "
                              "constant; only constant N:M weights export")
    stored = _attr(gm, values.target)
    if stored.dim() != 2:
        raise MlirExportError(f"mlir export: node '{node.name}' weight '{values.target}' is "
                              f"{list(stored.shape)}; only 2-D N:M weights export")
    positions = unpack_positions(_attr(gm, indices.target), stored.shape[-1], m)
    return StructuredWeight(values.target, stored.detach(), positions, n, m, in_features)


def _attr(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    return functools.reduce(getattr, target.split("."), gm)


def _last_placeholder(graph: torch.fx.Graph) -> torch.fx.Node:
    return [node for node in graph.nodes if node.op == "placeholder"][-1]


def _static(size: Any) -> int:
    """A dim at the size the model was compiled with (a symbolic dim exports at its example size)."""
    return size if isinstance(size, int) else int(size.node.hint)


def _example(node: torch.fx.Node) -> torch.Tensor:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise MlirExportError(f"mlir export: input '{node.name}' is not a tensor ({val!r}); MLIR export takes "
                              "tensor inputs")
    return torch.zeros([_static(d) for d in val.shape], dtype=val.dtype)


def _outline_structured_matmuls(module: Any, weights: list[StructuredWeight]) -> None:
    """Each trailing dense weight argument of @forward feeds one linalg.matmul: move that matmul into a private
    function of its own that reads the assembled sparse weight, and drop the argument. A function boundary
    keeps the sparsifier's elementwise fusion from merging a producer (bias + ReLU) into the sparse matmul,
    which it then cannot sparsify."""
    from torch_mlir import ir
    forward = _function(module)
    block = forward.regions[0].blocks[0]
    first = len(block.arguments) - len(weights)
    seen: set[str] = set()
    for i, weight in enumerate(weights):
        name = weight.name if weight.name not in seen else f"{weight.name}_{i}"   # a weight two layers share
        seen.add(name)
        matmul = _weight_matmul(block.arguments[first + i], weight)
        _call_instead(matmul, _structured_matmul_function(forward, weight, matmul, name))
    for index in reversed(range(first, len(block.arguments))):
        block.erase_argument(index)
    signature = ir.FunctionType(ir.TypeAttr(forward.attributes["function_type"]).value)
    inputs = [arg.type for arg in block.arguments]
    forward.attributes["function_type"] = ir.TypeAttr.get(ir.FunctionType.get(inputs, signature.results))


def _weight_matmul(argument: Any, weight: StructuredWeight) -> Any:
    users = [use.owner for use in argument.uses]
    if len(users) != 1 or users[0].name != "linalg.matmul" or users[0].operands[0] != argument:
        raise MlirExportError(f"mlir export: torch-mlir lowered the N:M weight '{weight.layer}' into "
                              f"{[u.name for u in users]}, not one linalg.matmul reading it as left operand")
    return users[0]


def _structured_matmul_function(forward: Any, weight: StructuredWeight, matmul: Any, name: str) -> Any:
    """func.func private @nm_<name>(%x_t: tensor<K x B>) -> tensor<R x B>: the sparse weight times %x_t."""
    from torch_mlir import ir
    from torch_mlir.dialects import arith, func, linalg, tensor
    rhs, result = matmul.operands[1].type, ir.RankedTensorType(matmul.results[0].type)
    with ir.InsertionPoint(forward):
        callee = func.FuncOp(f"nm_{name}", ([rhs], [result]), visibility="private")
    with ir.InsertionPoint(callee.add_entry_block()):
        sparse_weight = _assembled(weight, ir.RankedTensorType(matmul.operands[0].type).element_type, name)
        zero = arith.ConstantOp(result.element_type, ir.FloatAttr.get(result.element_type, 0.0))
        init = linalg.fill(zero, outs=[tensor.EmptyOp(result.shape, result.element_type)])
        func.ReturnOp([linalg.matmul(sparse_weight, callee.arguments[0], outs=[init])])
    return callee


def _call_instead(matmul: Any, callee: Any) -> None:
    """Replace `matmul` by a call of `callee` on its right operand; its now unused init (fill, empty) goes too."""
    from torch_mlir import ir
    from torch_mlir.dialects import func
    with ir.InsertionPoint(matmul):
        call = func.CallOp(callee, [matmul.operands[1]])
    matmul.results[0].replace_all_uses_with(call.result)
    init = _producer(matmul.operands[2])
    matmul.erase()
    while init is not None and init.name in ("linalg.fill", "tensor.empty") and not list(init.results[0].uses):
        producer = _producer(init.operands[-1]) if init.name == "linalg.fill" else None
        init.erase()
        init = producer


def _producer(value: Any) -> Any:
    """The operation defining `value`, None for a block argument."""
    from torch_mlir import ir
    owner = value.owner
    return None if isinstance(owner, ir.Block) else owner.operation


def _function(module: Any) -> Any:
    from torch_mlir import ir
    for op in module.body.operations:
        if op.operation.name == "func.func" and ir.StringAttr(op.attributes["sym_name"]).value == FUNC_NAME:
            return op
    raise MlirExportError(f"mlir export: torch-mlir's module has no function @{FUNC_NAME}")


def _assembled(weight: StructuredWeight, element: Any, name: str) -> Any:
    """sparse_tensor.assemble of the weight's positions (i8) and values, typed with its structured encoding."""
    from torch_mlir import ir
    from torch_mlir.dialects import arith, sparse_tensor
    count = weight.values.numel()
    sparse_type = ir.Type.parse(f"tensor<{weight.values.shape[0]}x{weight.in_features}x{element}, "
                                f"{weight.encoding()}>")
    values = _constant(weight.values, ir.RankedTensorType.get([count], element), f"{name}_values")
    byte = ir.IntegerType.get_signless(8)   # crdWidth = 8: one byte per in-group position
    positions = _constant(weight.positions.to(torch.int8), ir.RankedTensorType.get([count], byte),
                          f"{name}_positions")
    return sparse_tensor.AssembleOp(sparse_type, [arith.ConstantOp(positions.type, positions).result],
                                    arith.ConstantOp(values.type, values).result).result


def _constant(tensor: torch.Tensor, tensor_type: Any, name: str) -> Any:
    """A dense_resource elements attribute holding the tensor's bytes (bf16/f16 as raw 16-bit words)."""
    from torch_mlir import ir
    flat = tensor.detach().contiguous().reshape(-1)
    if tensor_type.element_type.width != 8 * flat.element_size():   # the blob is raw bytes: widths must agree
        raise MlirExportError(f"mlir export: constant '{name}' is {flat.dtype} but its MLIR type is {tensor_type}")
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.view(torch.int16)
    return ir.DenseResourceElementsAttr.get_from_buffer(flat.numpy(), name, tensor_type)
