"""Translation functions for torch.onnx.export: each sparse op becomes one opaque `sparsecc` node.

The exporter inlines onnxscript functions and constant-folds what it can, which
would decompress N:M weights into dense initializers; an opaque node keeps the
compressed tensors as its inputs. Its meaning is attached afterwards as a local
function (exporter.py).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import onnxscript
import torch

from .body import DOMAIN
from .schemas import ensure_registered, formal_inputs, split_arguments


def translator(name: str, op: torch._ops.OpOverload) -> Callable[..., Any]:
    """fn(args as the op takes them) -> the node's output(s), with the op's own signature."""
    ensure_registered(name, op)
    emit = getattr(onnxscript.values.Opset(DOMAIN, 1), name)
    _, attrs = split_arguments(op)

    def translate(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = {a.name: bound.arguments[a.name] for a in attrs}
        # by keyword: the exporter binds a positional variadic input to every positional argument
        return emit(**formal_inputs(op, bound.arguments),
                    **{k: int(v) if isinstance(v, bool) else v for k, v in values.items()})

    signature = inspect.Signature([
        inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          default=a.default_value if a.has_default_value() else inspect.Parameter.empty)
        for a in op._schema.arguments])
    translate.__signature__ = signature
    translate.__name__ = f"sparsecc_{name}"
    return translate


def translation_table(op_names: list[str]) -> dict:
    from sparsecc.runtime.ops import get_op
    return {get_op(name).op: translator(name, get_op(name).op) for name in op_names}
