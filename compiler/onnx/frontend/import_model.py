"""`sparsecc.compile("model.onnx", ...)`: the ONNX file as a torch module plus its example inputs."""
from __future__ import annotations

import os
from typing import Any

import torch

from .load import OnnxImportError, example_inputs, graph_inputs, load_model
from .onnx_module import make_module


def import_for_compile(path: Any, inputs: Any = None, dims: dict[str, int] | None = None
                       ) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """(module running the ONNX graph, example inputs in graph-input order)."""
    model = load_model(os.fspath(path))
    names = [i.name for i in graph_inputs(model)]
    if inputs is None:
        inputs = example_inputs(model, dims)
    elif isinstance(inputs, dict):
        missing = [n for n in names if n not in inputs]
        if missing or set(inputs) - set(names):
            raise OnnxImportError(f"example inputs {sorted(inputs)} do not match the model's inputs {names}")
        inputs = tuple(inputs[n] for n in names)
    elif isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    inputs = tuple(inputs)
    if len(inputs) != len(names):
        raise OnnxImportError(f"the model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
    return make_module(model, inputs), inputs
