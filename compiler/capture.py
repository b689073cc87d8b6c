"""Capture a model as an FX graph with torch.export (non-strict), without touching the model.

Two GraphModules come out of one export: `gm`, which the passes rewrite, and
`dense_gm`, the untouched reference the report and the exactness checks run.
Both are new module trees; they share parameter tensors with the user's
model, which is safe because no pass writes a tensor in place. Constants the
forward writes in place (buffers such as a call counter or a KV cache) are the
program's state: `gm` and `dense_gm` each get private copies of them, so no
run of either ever writes into the user's module.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._sympy.numbers import int_oo
from torch.utils import _pytree as pytree

from sparsecc.passes.fake import resolve_attr
from sparsecc.passes.state import state_targets, written_inputs

from .errors import CaptureError, ConfigError
from .model_call import BoundCall, bind_call, bound_forward, graph_dynamic_shapes

_EXPORT_REASON_LINES = 25


@dataclass
class Captured:
    gm: torch.fx.GraphModule
    dense_gm: torch.fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    symbol_ranges: dict[str, list[Optional[int]]]
    state_names: list[str] = field(default_factory=list)   # constants the forward writes (program state)
    initial_state: dict[str, torch.Tensor] = field(default_factory=dict)   # their values at capture
    bound: BoundCall = field(default_factory=BoundCall)   # keyword constants baked in, outputs dropped

    def reset_dense_state(self) -> None:
        """Put the dense reference's state back to its value at capture (each reference run starts there)."""
        with torch.no_grad():
            for name, value in self.initial_state.items():
                resolve_attr(self.dense_gm, name).copy_(value)


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


def weightless_tensor(model: torch.nn.Module) -> Optional[str]:
    """The name of a parameter or buffer that holds no values (on the meta device, or a FakeTensor), if any."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta or isinstance(tensor, FakeTensor):
            return name
    return None


def refuse_weightless(model: torch.nn.Module) -> None:
    """compile runs the model: one without weights is refused, pointing to `sparsecc.plan`."""
    name = weightless_tensor(model)
    if name is not None:
        raise ConfigError(f"compile: {type(model).__name__} has no weights ({name!r} is on the meta device or a "
                          "FakeTensor), so there is nothing to run; sparsecc.plan(model, example_inputs, "
                          "sparsity=...) (CLI: sparsecc plan) gives the full report from shapes alone "
                          "(docs/scale.md)")


def capture(model: torch.nn.Module, args: tuple, kwargs: Optional[dict] = None,
            dynamic_shapes: Any = None, reference: bool = True) -> Captured:
    """`reference=False` (a plan, which never runs the dense model) builds no separate `dense_gm`:
    it is `gm` itself, rewritten in place by the passes."""
    check_model(model)
    # no_grad: traced under grad mode, an in-place write into a buffer leaves the user's tensor
    # requiring grad (a non-leaf), which then breaks deepcopy and every later eager call
    tensor_kwargs, bound = bind_call(model, kwargs)
    with eval_mode(model), torch.no_grad(), _buffers_kept(model), bound_forward(model, bound):
        try:
            ep = torch.export.export(model, args, tensor_kwargs, strict=False,
                                     dynamic_shapes=graph_dynamic_shapes(dynamic_shapes, bound.constants))
        except Exception as err:  # the exporter raises many types; all mean "cannot capture"
            raise CaptureError(_capture_message(model, err)) from err
    gm = _unlifted(ep)
    dense_gm = _unlifted(ep) if reference else gm
    _refuse_input_mutation(model, gm)
    state_names = state_targets(gm)
    _own_state(gm, state_names)
    if dense_gm is not gm:
        _own_state(dense_gm, state_names)
    initial_state = {name: resolve_attr(gm, name).detach().clone() for name in state_names}
    return Captured(gm, dense_gm, gm._in_spec, gm._out_spec, _symbol_ranges(ep), state_names, initial_state, bound)


def _refuse_input_mutation(model: torch.nn.Module, gm: torch.fx.GraphModule) -> None:
    # a compiled program never writes the caller's tensors; eager would, so refuse rather than differ
    mutated = written_inputs(gm)
    if mutated:
        raise CaptureError(f"{type(model).__name__}.forward writes its input(s) {', '.join(mutated)} in place; "
                           "sparsecc programs do not write their inputs: keep such state in a buffer "
                           "(register_buffer) or return the updated tensor instead")


def _own_state(gm: torch.fx.GraphModule, targets: list[str]) -> None:
    """Replace each written constant of `gm` by a private copy; constants that alias each other
    (one tensor reachable under two names) keep aliasing one copy."""
    copies: dict[tuple, torch.Tensor] = {}
    for target in targets:
        value = resolve_attr(gm, target)
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
               value.dtype)
        if key not in copies:
            copies[key] = _private_copy(value)
        _set_attr(gm, target, copies[key])


def _private_copy(value: torch.Tensor) -> torch.Tensor:
    copy = value.detach().clone()
    return torch.nn.Parameter(copy, value.requires_grad) if isinstance(value, torch.nn.Parameter) else copy


def _set_attr(gm: torch.fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path)
    for table in (owner._parameters, owner._buffers):
        if name in table:
            table[name] = value
            return
    setattr(owner, name, value)


def _capture_message(model: torch.nn.Module, err: Exception) -> str:
    lines = str(err).strip().splitlines()
    reason = "\n  ".join(lines[:_EXPORT_REASON_LINES])
    more = f"\n  ... ({len(lines) - _EXPORT_REASON_LINES} more lines)" if len(lines) > _EXPORT_REASON_LINES else ""
    return (f"torch.export could not capture {type(model).__name__}: {type(err).__name__}:\n  {reason}{more}\n"
            "sparsecc needs a model torch.export can capture (non-strict); the exporter's reason is above.")


@contextmanager
def _buffers_kept(model: torch.nn.Module):
    """Put the model's buffers and plain tensor attributes back as they were: non-strict export runs
    the forward on the real tensors a module holds outside its parameters (a tensor attribute, a
    StaticCache's layers aliasing the buffers), so an in-place write there would reach the user."""
    # a meta tensor holds no values to write or restore (a model planned without weights)
    saved = [(tensor, tensor.detach().clone()) for tensor in _mutable_tensors(model) if not tensor.is_meta]
    try:
        yield
    finally:
        for tensor, value in saved:
            if not torch.equal(tensor, value):
                tensor.copy_(value)


def _mutable_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Buffers and tensors held as plain attributes (directly or in a list, tuple or dict), each once."""
    found: dict[int, torch.Tensor] = {id(b): b for b in model.buffers()}
    for module in model.modules():
        for value in vars(module).values():
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if isinstance(item, torch.Tensor) and not isinstance(item, torch.nn.Parameter):
                    found.setdefault(id(item), item)
    return list(found.values())


class eval_mode:
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
