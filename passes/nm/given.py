"""Masks prune-nm takes as given instead of choosing them: the N:M-compressed weights of a pruned checkpoint.

`sparsecc.compile(..., compressed=checkpoint)` puts a `GivenNM` on the PassContext. prune-nm then takes
each weight it rewrites from it (stacked experts are built from the given parameters as moe-dispatch
built them from the model's): the kept positions are the checkpoint's indices and the values are the
checkpoint's; no method runs and no calibration is observed. That is only sound when the model's dense
weight is the checkpoint's pruned weight (the model was built from the pruned checkpoint), so every
weight is checked: its dense matrix must equal the decompressed one, else the weight is named and
refused, as is a weight the request rewrites that the checkpoint lacks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from sparsecc.runtime.nm_format import decompress_nm, nm_index_problem

from ..fake import resolve_attr
from ..manager import PassContext
from .layerwise import LayerTarget


class GivenMaskError(ValueError):
    """The given compressed weights do not fit the request or the model."""


@dataclass
class GivenNM:
    """Compressed weights by the model's parameter name: (values [..., out, K*N/M], indices), nm_format's layout."""
    n: int
    m: int
    method: str
    weights: dict[str, tuple[Tensor, Tensor]]
    in_features: dict[str, int]
    source: str                                   # where they came from, for errors and the report

    def problem(self, n: int, m: int, method: str) -> Optional[str]:
        """Why a prune-nm run for n:m by `method` cannot take these weights; None when it can."""
        if (n, m, method) == (self.n, self.m, self.method):
            return None
        example = next(iter(self.weights), "(none)")
        return (f"the compressed checkpoint {self.source} holds {self.n}:{self.m} {self.method} masks (every weight, "
                f"e.g. '{example}'), the request asks {n}:{m} {method}: ask for what the checkpoint was pruned "
                "with, or compile without compressed=")


def take_given(options, gm: torch.fx.GraphModule, ctx: PassContext,
               targets: list[LayerTarget]) -> dict[str, tuple[Tensor, Tensor]]:
    """weight attribute -> (pruned matrix, kept mask) for every target, from `ctx.nm_given`; refuses a mismatch.
    A stacked expert weight is built from the given parameters as moe-dispatch built it (its record's `sources`)."""
    given = ctx.nm_given
    problem = given.problem(options.n, options.m, options.method)
    if problem:
        raise GivenMaskError(f"prune-nm: {problem}")
    built = {name: source for record in ctx.records for name, source in record.details.get("sources", {}).items()}
    sources = {t.weight.target: built.get(t.weight.target, t.weight.target) for t in targets}
    lacking = sorted({p for source in sources.values() for p in _parameters(source)} - set(given.weights))
    if lacking:
        listed = ", ".join(lacking[:4]) + (", ..." if len(lacking) > 4 else "")
        raise GivenMaskError(f"prune-nm: the request prunes {len(lacking)} weights the compressed checkpoint "
                             f"{given.source} does not hold ({listed}): exclude them, or prune the checkpoint "
                             "with them")
    pruned = {}
    for target in targets:
        attr = target.weight.target
        if attr not in pruned:
            pruned[attr] = _given_matrix(attr, sources[attr], target.to_matrix(resolve_attr(gm, attr)), given)
    return pruned


def _given_matrix(attr: str, source, dense: Tensor, given: GivenNM) -> tuple[Tensor, Tensor]:
    """(checkpoint's pruned matrix, its mask) for weight `attr` built from parameters as `source` says,
    checked against the model's `dense` matrix."""
    parts = {name: _decompressed(name, given, dense.dtype) for name in _parameters(source)}
    pruned = _built(source, {name: weight for name, (weight, _) in parts.items()})
    named = f"'{source}'" if isinstance(source, str) else f"'{attr}' (built from {sorted(parts)})"
    where = f"prune-nm: weight {named} of the compressed checkpoint {given.source}"
    if pruned.shape != dense.shape:
        raise GivenMaskError(f"{where} is a {list(pruned.shape)} matrix, the model's is {list(dense.shape)}")
    if not torch.equal(pruned, dense):
        raise GivenMaskError(f"{where} differs from the model's dense weight ({int((pruned != dense).sum())} of "
                             f"{dense.numel()} elements): build the model from the pruned checkpoint, whose dense "
                             "weights these are")
    return pruned, _built(source, {name: mask for name, (_, mask) in parts.items()})


def _decompressed(name: str, given: GivenNM, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(pruned dense weight in `dtype`, kept mask) of given weight `name`, its indices checked first."""
    values, indices = given.weights[name]
    k = given.in_features[name]
    problem = nm_index_problem(indices, given.n, given.m, k)   # downloaded data: positions in range and distinct
    if problem:
        raise GivenMaskError(f"prune-nm: weight '{name}' of the compressed checkpoint {given.source}: {problem}")
    mask = decompress_nm(torch.ones_like(values, dtype=torch.uint8), indices, given.n, given.m, k).bool()
    return decompress_nm(values.to(dtype), indices, given.n, given.m, k), mask


def _parameters(source) -> list[str]:
    """The parameter names a moe-dispatch provenance (passes/moe/experts.py) reads; a name reads itself."""
    if isinstance(source, str):
        return [source]
    parts = source["of"] if isinstance(source["of"], list) else [source["of"]]
    return [name for part in parts for name in _parameters(part)]


def _built(source, tensors: dict[str, Tensor]) -> Tensor:
    """The tensor moe-dispatch built from `tensors` (by parameter name) as `source` says (what
    compiler/reference.py undoes)."""
    if isinstance(source, str):
        return tensors[source]
    if "transpose" in source:
        return _built(source["of"], tensors).transpose(*source["transpose"])
    if "swap_halves" in source:
        first, second = _built(source["of"], tensors).chunk(2, source["swap_halves"])
        return torch.cat([second, first], source["swap_halves"])
    if "cat" in source:
        return torch.cat([_built(part, tensors) for part in source["of"]], source["cat"])
    if "stack" in source:
        return torch.stack([_built(part, tensors) for part in source["of"]], source["stack"])
    raise ValueError(f"prune-nm: unknown weight provenance {source!r}")
