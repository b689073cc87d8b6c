"""`sparsecc sweep weights`: how much output error each layer (or layer group) costs when pruned N:M.

Per group: the relative L2 error of the model outputs against the dense model
when only that group is pruned (the rest stays dense). For the whole model:
the error at 1:4, 2:4, 4:8 and at unstructured 50% (magnitude, per weight
tensor), so the point where error rises sharply shows, and so do the layers
worth excluding. Errors are measured on the example inputs; every N:M row
is a full `compile` with `include` narrowed to the group.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from tqdm import tqdm

from .capture import normalize_inputs
from .numerics import relative_error

WHOLE_MODEL_PATTERNS = ("1:4", "2:4", "4:8")


@dataclass
class WeightSweep:
    model: str
    method: str
    pattern: str
    groups: list[dict] = field(default_factory=list)        # {"group", "layers", "error"}
    whole_model: list[dict] = field(default_factory=list)   # {"pattern", "error"}

    def to_dict(self) -> dict:
        return {"model": self.model, "method": self.method, "pattern": self.pattern,
                "groups": self.groups, "whole_model": self.whole_model}

    def __str__(self) -> str:
        return format_sweep(self)


@dataclass
class _Request:
    """What every compile of one sweep shares: the example call, calibration and backend."""
    model: torch.nn.Module
    inputs: Any
    kwargs: Optional[dict]
    method: str
    exclude: list[str]
    calibration: Optional[list]
    backend: Optional[str]
    bar: tqdm

    def compile(self, pattern: str, include: Iterable[str]):
        import sparsecc
        weights = {"pattern": pattern, "method": self.method, "include": list(include), "exclude": self.exclude}
        compiled = sparsecc.compile(self.model, self.inputs, sparsity={"weights": weights},
                                    example_kwargs=self.kwargs, calibration=self.calibration, backend=self.backend)
        self.bar.update(1)
        return compiled


def group_of(layer: str, depth: Optional[int]) -> str:
    """'blocks.0.mlp.up' -> 'blocks.0' at depth 2; the layer itself when depth is None."""
    return layer if depth is None else ".".join(layer.split(".")[:depth])


def sweep_weights(model: torch.nn.Module, example_inputs: Any, *, pattern: str = "2:4", method: str = "magnitude",
                  depth: Optional[int] = None, exclude: Iterable[str] = (), calibration: Optional[list] = None,
                  backend: Optional[str] = None, example_kwargs: Optional[dict] = None,
                  progress: bool = False) -> WeightSweep:
    """Measure per-group and whole-model output error (see the module docstring); `progress` shows a bar
    of the compiles on stderr."""
    bar = tqdm(desc="sparsecc sweep weights", unit="compile", disable=not progress, file=sys.stderr, leave=False)
    with bar:
        request = _Request(model, example_inputs, example_kwargs, method, list(exclude), calibration, backend, bar)
        return _sweep(request, pattern, depth)


def _sweep(request: _Request, pattern: str, depth: Optional[int]) -> WeightSweep:
    full = request.compile(pattern, ["*"])
    layers = [r.layer for r in full.records if "values" in r.details]
    groups: dict[str, list[str]] = {}
    for layer in layers:
        groups.setdefault(group_of(layer, depth), []).append(layer)
    request.bar.total = 1 + len(groups) + sum(whole != pattern for whole in WHOLE_MODEL_PATTERNS)
    method = request.method
    sweep = WeightSweep(type(request.model).__name__, method, pattern)
    for name, members in groups.items():
        compiled = request.compile(pattern, [_escape(layer) for layer in members])
        sweep.groups.append({"group": name, "layers": len(members), "error": compiled.report().error_vs_dense})
    for whole in WHOLE_MODEL_PATTERNS:
        compiled = full if whole == pattern else request.compile(whole, ["*"])
        sweep.whole_model.append({"pattern": f"{whole} ({method})", "error": compiled.report().error_vs_dense})
    sweep.whole_model.append({"pattern": "unstructured 50% (magnitude)",
                              "error": unstructured_error(full, request.inputs, 0.5, request.kwargs)})
    return sweep


def _escape(path: str) -> str:
    """A module path as an fnmatch pattern matching only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def unstructured_error(compiled, example_inputs: Any, sparsity: float, example_kwargs: Optional[dict] = None) -> float:
    """Output error when each weight the N:M compile pruned instead loses its smallest |w| (any position)."""
    dense_gm = compiled.captured.dense_gm
    params = dict(dense_gm.named_parameters()) | dict(dense_gm.named_buffers())
    pruned = {}
    for record in compiled.records:
        name = record.details.get("weight")
        if name is None or name not in params:
            continue
        w = params[name].detach()
        drop = int(w.numel() * sparsity)
        if drop:
            threshold = w.abs().flatten().kthvalue(drop).values
            pruned[name] = torch.where(w.abs() > threshold, w, torch.zeros_like(w))
    args, kwargs = normalize_inputs(example_inputs), compiled.captured.bound.graph_kwargs(example_kwargs)
    with torch.no_grad():
        compiled.captured.reset_dense_state()   # both runs start from the state at compile time
        got = torch.func.functional_call(dense_gm, pruned, args, kwargs, strict=False)
        compiled.captured.reset_dense_state()
        dense = dense_gm(*args, **kwargs)
        compiled.captured.reset_dense_state()
    return relative_error(got, dense)


def format_sweep(sweep: WeightSweep) -> str:
    out = [f"sparsecc sweep weights: {sweep.model}, method {sweep.method}, pattern {sweep.pattern}",
           "error: relative L2 of the outputs vs the dense model, on the example inputs", ""]
    worst = max((g["error"] for g in sweep.groups), default=0.0) or 1.0
    rows = [[g["group"], str(g["layers"]), f"{g['error']:.3e}", "#" * round(20 * g["error"] / worst)]
            for g in sweep.groups]
    out += _table(["only this group pruned", "layers", "error", ""], rows)
    out += [""] + _table(["whole model", "error"], [[w["pattern"], f"{w['error']:.3e}"] for w in sweep.whole_model])
    return "\n".join(out)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


__all__ = ["WeightSweep", "format_sweep", "group_of", "sweep_weights", "unstructured_error"]
