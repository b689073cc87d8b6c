"""Capture a model as an FX graph with torch.export (non-strict), without touching the model.

Two GraphModules come out of one export: `gm`, which the passes rewrite, and
`dense_gm`, the untouched reference the report and the exactness checks run.
Both are new module trees; they share parameter tensors with the user's
model, which is safe because no pass writes a tensor in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils._sympy.numbers import int_oo
from torch.utils import _pytree as pytree

from .errors import CaptureError, ConfigError

_EXPORT_REASON_LINES = 25


@dataclass
class Captured:
    gm: torch.fx.GraphModule
    dense_gm: torch.fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    symbol_ranges: dict[str, list[Optional[int]]]


def normalize_inputs(example_inputs: Any) -> tuple:
    """The example inputs as a tuple of positional args; a lone tensor is wrapped."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise ConfigError("example_inputs: expected a tuple of positional arguments (tensors or nested "
                          f"lists/dicts of tensors), got {type(example_inputs).__name__}")
    for i, leaf in enumerate(pytree.tree_leaves(tuple(example_inputs))):
        if not isinstance(leaf, (torch.Tensor, int, float, bool, type(None))):
            raise ConfigError(f"example_inputs: leaf {i} is a {type(leaf).__name__}; "
                              "expected torch.Tensor (convert arrays with torch.as_tensor)")
    return tuple(example_inputs)


def check_model(model: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def capture(model: torch.nn.Module, args: tuple, kwargs: Optional[dict] = None,
            dynamic_shapes: Any = None) -> Captured:
    check_model(model)
    with _eval_mode(model):
        try:
            ep = torch.export.export(model, args, kwargs or {}, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as err:  # the exporter raises many types; all mean "cannot capture"
            raise CaptureError(_capture_message(model, err)) from err
    gm, dense_gm = _unlifted(ep), _unlifted(ep)
    return Captured(gm, dense_gm, gm._in_spec, gm._out_spec, _symbol_ranges(ep))


def _capture_message(model: torch.nn.Module, err: Exception) -> str:
    lines = str(err).strip().splitlines()
    reason = "\n  ".join(lines[:_EXPORT_REASON_LINES])
    more = f"\n  ... ({len(lines) - _EXPORT_REASON_LINES} more lines)" if len(lines) > _EXPORT_REASON_LINES else ""
    return (f"torch.export could not capture {type(model).__name__}: {type(err).__name__}:\n  {reason}{more}\n"
            "sparsecc needs a model torch.export can capture (non-strict); the exporter's reason is above.")


class _eval_mode:
    """Export in eval mode and restore every submodule's own training flag afterwards."""

    def __init__(self, model: torch.nn.Module):
        self.flags = [(m, m.training) for m in model.modules()]
        self.model = model

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        for module, training in self.flags:
            module.training = training


def _unlifted(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """ep.module() without the input-guard call: the runtime checks inputs itself."""
    try:
        gm = ep.module()
    except KeyError as err:  # a parameter or buffer named like a GraphModule attribute ("meta", "graph", ...)
        blank = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
        reserved = set(dir(blank)) | set(vars(blank))
        clashes = [name for name in [*ep.state_dict, *ep.constants] if name.rpartition(".")[2] in reserved]
        raise CaptureError(f"cannot rebuild the captured graph: {err}; the tensor(s) {clashes or '?'} are named "
                           "like attributes torch.fx.GraphModule reserves; rename them") from err
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()
    return gm


def _symbol_ranges(ep: torch.export.ExportedProgram) -> dict[str, list[Optional[int]]]:
    return {str(symbol): symbol_range(bounds) for symbol, bounds in ep.range_constraints.items()}


def symbol_range(bounds: Any) -> list[Optional[int]]:
    """[lower, upper or None] of a sympy ValueRanges (torch's int_oo claims to be finite: test for it)."""
    unbounded = bounds.upper is int_oo or not bounds.upper.is_finite
    return [int(bounds.lower), None if unbounded else int(bounds.upper)]
