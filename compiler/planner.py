"""`sparsecc.plan`: the compile report of a model that has no weights, from shapes alone.

A model built on the meta device (`with torch.device("meta"): LlamaForCausalLM(config)`)
or under `FakeTensorMode` holds no values, so it cannot be compiled into something that
runs (`compile` refuses it and points here). `plan` does everything of `compile` that
shapes decide:

    capture   torch.export on meta tensors (a FakeTensor model's tensors are swapped for meta
              ones while it is captured, then put back; example inputs become meta tensors)
    rewrite   the same pass pipeline, with `PassContext.shapes_only`: prune-nm compresses to
              meta tensors of the compressed shapes (no mask is chosen, Wanda/SparseGPT see no
              calibration); region rules that plan from shapes (moe-dispatch) take their first
              structural reading unconfirmed; the others skip their regions with the reason
    report    which layers each request rewrites, params / bytes / FLOPs before and after,
              skipped layers with reasons; errors, masks and routed-token counts are
              "not measured: planned without weights"

Nothing is lowered or run and no weight is materialised: a 70B Llama plans in seconds
(docs/scale.md, "Planning without weights").
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from sparsecc.passes import PassContext, PassManager, build_pipeline, format_pipeline
from sparsecc.passes.fake import resolve_attr

from .api import Steps, request_stats, state_bytes
from .capture import capture, check_model, normalize_inputs, weightless_tensor
from .config import parse_sparsity
from .errors import ConfigError
from .library_ops import prepare_for_passes
from .report import Report, noop_lines

PLANNED_BACKEND = "none (planned without weights)"


def plan(model: torch.nn.Module, example_inputs: Any = None, sparsity: Any = None, pipeline: Optional[str] = None,
         dynamic_shapes: Any = None, *, example_kwargs: Optional[dict] = None, verify: bool = False,
         progress: bool = False) -> Report:
    """The report `compile(model, example_inputs, sparsity=...)` would give, computed from shapes alone for a
    model whose parameters are on the meta device or FakeTensors (example inputs may be meta, fake or real:
    only their shapes and dtypes are read). Never materialises a weight; see the module docstring.
    `verify` re-checks the graph after every pass as compile does (shapes re-propagated: it doubles the
    rewrite time of a 70B model, so it is off; the passes are the ones compile runs and verifies)."""
    check_model(model)
    if weightless_tensor(model) is None:
        raise ConfigError(f"plan: {type(model).__name__} has weights (no parameter or buffer is on the meta device "
                          "or a FakeTensor); build it under `with torch.device('meta'):` to plan it, or "
                          "sparsecc.compile it")
    config = parse_sparsity(sparsity)
    passes = build_pipeline(pipeline) if pipeline is not None else config.passes()
    args, kwargs = _on_meta(normalize_inputs(example_inputs)), _on_meta(example_kwargs)
    steps = Steps(progress, total=2, desc="sparsecc plan")
    with steps("capture"), _meta_weights(model):
        captured = capture(model, args, kwargs, dynamic_shapes, reference=False)
    dense_bytes = state_bytes(captured.gm)   # before the passes rewrite it (it is the dense graph too)
    leaves = pytree.tree_leaves((args, captured.bound.graph_kwargs(kwargs)))
    ctx = PassContext(example_inputs=tuple(t for t in leaves if isinstance(t, torch.Tensor)), progress=progress,
                      shapes_only=True)
    with steps("rewrite"):
        gm = PassManager(passes, verify=verify).run(prepare_for_passes(captured.gm), ctx)
    report = Report(
        model=type(model).__name__, pipeline=format_pipeline(passes), backend=PLANNED_BACKEND,
        layers=list(ctx.records),
        skipped=[{"layer": s.where, "rule": s.rule, "reason": s.reason}
                 for stats in ctx.stats.values() for s in stats.skipped],
        passes={name: stats.to_dict() for name, stats in ctx.stats.items()},
        model_bytes_before=dense_bytes, model_bytes_after=constant_bytes(gm),
        constant_inputs=dict(captured.bound.constants), dropped_outputs=list(captured.bound.dropped_outputs),
        timings=dict(steps.timings), planned=True)
    report.noops = noop_lines(request_stats(config if pipeline is None else None, passes, ctx))
    return report


def constant_bytes(gm: torch.fx.GraphModule) -> int:
    """Bytes of the constants the graph reads (what lowering would keep), each tensor once."""
    tensors = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = resolve_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                tensors[id(value)] = value
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _on_meta(tree: Any) -> Any:
    """Every tensor of `tree` as an empty meta tensor of its shape and dtype (a FakeTensor's too)."""
    def meta(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        return torch.empty(tuple(leaf.shape), dtype=leaf.dtype, device="meta")
    return pytree.tree_map(meta, tree)


@contextmanager
def _meta_weights(model: torch.nn.Module):
    """While capturing, every FakeTensor parameter or buffer of `model` is a meta tensor of its shape and dtype
    (a FakeTensor belongs to a mode export does not own); put back afterwards. Meta ones stay as they are."""
    swapped = []
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if isinstance(tensor, FakeTensor):
                    swapped.append((table, name, tensor))
                    meta = _on_meta(tensor)
                    table[name] = torch.nn.Parameter(meta, tensor.requires_grad) \
                        if isinstance(tensor, torch.nn.Parameter) else meta
    try:
        yield
    finally:
        for table, name, tensor in swapped:
            table[name] = tensor
