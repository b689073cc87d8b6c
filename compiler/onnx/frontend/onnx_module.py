"""Import an ONNX model as a torch module whose forward runs the ONNX graph with ATen ops.

    load.load_model(path)       -> ModelProto, with a clear error for a corrupt or truncated
                                   file and for every unsupported op (named with its node)
    OnnxModule(model, inputs)   -> nn.Module: initializers as parameters named after the
                                   ONNX names (dotted names become submodules), forward(inputs)
    torch.export(OnnxModule)    -> the FX GraphModule of ATen ops (meta["val"] fake tensors)
                                   that sparsecc.compile rewrites like any captured model

Values computable at import time (Constant, Shape of the example inputs' static shapes,
and anything computed only from those and initializers) are folded once: ops that need
Python numbers (Reshape's shape, Slice's starts, axes...) read them from there, so the
imported graph is specialised to the example input shapes. A MatMul/Gemm with a constant
2-D float B runs as F.linear over B stored [out, in], named after the layer that produced
it when the file says (torch exporter's name_scopes), else after the initializer. Each node
runs inside `Scope` submodules named after the layers that made it (when the file says), so
the captured nodes' nn_module_stack holds the original module paths.
"""
from __future__ import annotations

import inspect
import keyword
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .load import OnnxImportError, graph_inputs, opset_version
from .op_table import OPS
from .tensors import to_torch


class _Ctx:
    """What an op function sees of its node."""

    def __init__(self, module: OnnxModule, node: onnx.NodeProto, index: int):
        self.module, self.node, self.index = module, node, index
        self.op_type, self.opset = node.op_type, module.opset
        self._attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def attr(self, name: str, default: Any = None) -> Any:
        value = self._attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def const(self, i: int) -> np.ndarray:
        """Input i as numbers; it must have been folded at import time."""
        name, module = self.node.input[i], self.module
        if name in module.numbers:   # read while folding: torch.export fakes tensor attributes later
            return module.numbers[name]
        live = getattr(module, "_live", {})
        if name not in module.folded and module.freeze_number_inputs and module._folding and name in live:
            module.folded[name] = live[name]
        if name not in module.folded or not module._folding:
            raise OnnxImportError(f"{self.op_type} node '{self.node.name or self.index}': input {i} ('{name}') "
                                  "must be known at import time (it depends on input data)")
        value = module.folded[name]
        module.numbers[name] = (value.float() if value.dtype in (torch.bfloat16, torch.float16) else value).numpy()
        return module.numbers[name]

    def axes(self, index: int, attr: str = "axes") -> list[int] | None:
        """Axes from input `index` (newer opsets) or the attribute (older); None when absent."""
        if len(self.node.input) > index and self.node.input[index]:
            return [int(a) for a in self.const(index)]
        value = self.attr(attr, None)
        return None if value is None else list(value)

    def linear_weight(self, i: int, transposed: bool = False) -> torch.Tensor | None:
        """B of a MatMul/Gemm as an [out, in] parameter when B is a constant 2-D float, else None."""
        return self.module.linear_weight(self.node, i, transposed)


class OnnxModule(torch.nn.Module):
    """forward(*inputs) runs the ONNX graph with torch ops; see the module docstring."""

    def __init__(self, model: onnx.ModelProto, example_inputs: Sequence[torch.Tensor],
                 freeze_number_inputs: bool = False):
        super().__init__()
        # True: an input an op needs as numbers (a Reshape shape, Slice starts) is frozen to its example
        # value, so the module is specialised to it (the node test suite feeds axes and shapes as inputs)
        self.freeze_number_inputs = freeze_number_inputs
        self.opset = opset_version(model)
        self.graph = model.graph
        self.input_names = [i.name for i in graph_inputs(model)]
        self.output_names = [o.name for o in model.graph.output]
        self.folded: dict[str, torch.Tensor] = {}       # import-time values (not module state)
        self.numbers: dict[str, np.ndarray] = {}         # the folded values ops read as numbers
        self._state: dict[str, str] = {}                 # ONNX value -> attribute path of its tensor
        self._linear: dict[tuple[str, bool], str] = {}   # (B value, transposed) -> attribute path
        self._scopes: dict[int, list[Scope]] = {}        # node index -> the layers it runs inside
        self._fold(list(example_inputs))

    # ---- import time -------------------------------------------------------------------
    def _fold(self, example_inputs: list[torch.Tensor]) -> None:
        """Run the graph once on the examples; keep the values that do not depend on input data."""
        self._initializers = {t.name for t in self.graph.initializer}
        for t in self.graph.initializer:
            self.folded[t.name] = to_torch(numpy_helper.to_array(t))
        self._live = dict(zip(self.input_names, example_inputs))
        self._dynamic = set(self.input_names)
        self._folding = True
        for index, node in enumerate(self.graph.node):
            self._run_node(node, index)
        self._folding = False
        del self._live

    def _is_static(self, node: onnx.NodeProto) -> bool:
        if node.op_type in ("Shape", "Size"):
            return True
        return not any(name in self._dynamic for name in node.input if name)

    def _store(self, value: str, tensor: torch.Tensor, path_hint: str) -> str:
        """Register a folded tensor used as data by the traced graph; returns its attribute path."""
        if value in self._state:
            return self._state[value]
        path = self._free_path(path_hint)
        module, _, leaf = path.rpartition(".")
        owner = self._owner(module)
        if tensor.is_floating_point():
            owner.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            owner.register_buffer(leaf, tensor)
        self._state[value] = path
        return path

    def _owner(self, module_path: str) -> torch.nn.Module:
        owner: torch.nn.Module = self
        for part in module_path.split(".") if module_path else []:
            if not hasattr(owner, part):
                owner.add_module(part, Scope())
            owner = getattr(owner, part)
        return owner

    def _scope_chain(self, node: onnx.NodeProto) -> list[Scope]:
        """The Scope modules of the layers that made `node`, outermost first (made on first use)."""
        chain, owner = [], self
        for part in layer_scopes(node):
            part = re.sub(r"\W", "_", part)
            while hasattr(owner, part) and not isinstance(getattr(owner, part), Scope):
                part += "_"   # a layer named like an attribute (graph, training) or a tensor
            if not hasattr(owner, part):
                owner.add_module(part, Scope())
            owner = getattr(owner, part)
            chain.append(owner)
        return chain

    def _free_path(self, hint: str) -> str:
        # torch.onnx names its own constants val_<n>: an imported one of that name would collide on re-export
        hint = "onnx_" + hint if re.fullmatch(r"val_\d+", hint) else hint
        parts = [re.sub(r"\W", "_", p) for p in hint.split(".") if p] or ["value"]
        owner: Any = self
        for i, part in enumerate(parts[:-1]):   # a module name must not shadow an attribute (graph, training...)
            while hasattr(owner, part) and not isinstance(getattr(owner, part), torch.nn.Module):
                part += "_"
            parts[i] = part
            owner = getattr(owner, part, torch.nn.Module())
        path = ".".join(parts)
        n = 0
        while self._taken(path):
            n += 1
            path = ".".join(parts[:-1] + [f"{parts[-1]}_{n}"])
        return path

    def _taken(self, path: str) -> bool:
        owner: Any = self
        for part in path.split("."):
            if not hasattr(owner, part):
                return False
            owner = getattr(owner, part)
            if not isinstance(owner, torch.nn.Module):
                return True
        return True

    def linear_weight(self, node: onnx.NodeProto, i: int, transposed: bool) -> torch.Tensor | None:
        name = node.input[i]
        folded = self.folded.get(name)
        if folded is None or folded.dim() != 2 or not folded.is_floating_point() or name in self._dynamic:
            return None
        if not any(i in self._dynamic for i in node.input if i):
            return None   # folded at import time: no layer to keep
        key = (name, transposed)
        if key not in self._linear:
            weight = folded if transposed else folded.t().contiguous()
            self._linear[key] = self._store(f"{name}#linear{int(transposed)}", weight, _layer_name(node, name))
        return self._attribute(self._linear[key])

    def _attribute(self, path: str) -> torch.Tensor:
        owner: Any = self
        for part in path.split("."):
            owner = getattr(owner, part)
        return owner

    # ---- run time ----------------------------------------------------------------------
    def _value(self, name: str) -> torch.Tensor | None:
        if not name:
            return None
        if name in self._live:
            return self._live[name]
        path = None if self._folding else self._state.get(name)
        return self._attribute(path) if path else self.folded[name]   # other folded values: constants

    def _run_node(self, node: onnx.NodeProto, index: int) -> None:
        static = self._folding and self._is_static(node)
        if not self._folding and all(o in self.folded for o in node.output if o):
            return
        if self._folding and not static:
            for i, name in enumerate(node.input):   # float initializers read by traced ops: parameters
                linear = node.op_type in ("MatMul", "Gemm") and i == 1 and self.folded[name].dim() == 2 \
                    if name in self.folded else False   # stored [out, in] by linear_weight instead
                if name in self._initializers and self.folded[name].is_floating_point() and not linear:
                    self._store(name, self.folded[name], name)
        inputs = [self._value(name) for name in node.input]
        chain = self._scope_chain(node) if self._folding else self._scopes.get(index, [])
        if self._folding and chain:
            self._scopes[index] = chain
        try:
            out = _in_scopes(chain, OPS[node.op_type], _Ctx(self, node, index), *inputs)
        except OnnxImportError:
            raise
        except Exception as err:
            raise OnnxImportError(f"{node.op_type} node '{node.name or index}' failed: "
                                  f"{type(err).__name__}: {err}") from err
        outs = out if isinstance(out, tuple) else (out,)
        for name, value in zip(node.output, outs):
            if not name:
                continue
            if static:
                self.folded[name] = value
            else:
                self._live[name] = value
                if self._folding:
                    self._dynamic.add(name)

    def run(self, inputs: Sequence[torch.Tensor]) -> Any:
        if self._folding:
            raise RuntimeError("run() during folding")
        self._live = dict(zip(self.input_names, inputs))
        try:
            for index, node in enumerate(self.graph.node):
                if any(o in self._dynamic for o in node.output):
                    self._run_node(node, index)
            outs = [self._value(name) for name in self.output_names]
        finally:
            self._live = {}
        return outs[0] if len(outs) == 1 else tuple(outs)


class Scope(torch.nn.Module):
    """A layer of the original model: ops run inside it, so torch.export records the layer path
    in each node's nn_module_stack (what passes find regions by), and its tensors live on it."""

    def forward(self, run: Any, *args: Any) -> Any:
        return run(*args)


def _in_scopes(chain: list[Scope], fn: Any, *args: Any) -> Any:
    if not chain:
        return fn(*args)
    return chain[0](_in_scopes, chain[1:], fn, *args)


def layer_scopes(node: onnx.NodeProto) -> list[str]:
    """Layer names around `node`, outermost first: ['model', 'layers', '0', 'mlp'] from the torch
    exporter's name scopes (['', 'model', 'model.layers.0', 'model.layers.0.mlp', 'add_3']), or
    from a scoped node name ('/model/layers.0/mlp/Add', the TorchScript exporter); [] if neither."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in re.findall(r"'([^']*)'", prop.value)[:-1] if s]
            return scopes[-1].split(".") if scopes else []
    if node.name.startswith("/"):
        return [p for part in node.name.split("/")[1:-1] for p in part.split(".") if p]
    return []


def _layer_name(node: onnx.NodeProto, value: str) -> str:
    """'model.layers.0.mlp.up_proj.weight' from the torch exporter's name scopes, else the value name."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = re.findall(r"'([^']*)'", prop.value)
            if len(scopes) >= 2 and scopes[-2]:
                return scopes[-2] + ".weight"
    return value


def python_name(text: str) -> str:
    """`text` as a Python identifier (the forward's parameter name of an ONNX input)."""
    name = re.sub(r"\W", "_", text)
    name = "_" + name if not name or name[0].isdigit() or keyword.iskeyword(name) else name
    return name


def make_module(model: onnx.ModelProto, example_inputs: Sequence[torch.Tensor],
                freeze_number_inputs: bool = False) -> OnnxModule:
    """An OnnxModule whose forward takes the graph inputs by their (Python-safe) names."""
    module = OnnxModule(model, example_inputs, freeze_number_inputs)
    names = [python_name(n) for n in module.input_names]

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.run(inputs)

    # torch.export names the graph's placeholders after the signature: the ONNX input names
    forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    module.__class__ = type("OnnxModel", (OnnxModule,), {"forward": forward})
    return module
