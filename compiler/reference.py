"""The dense model an exact rewrite must reproduce: original weights replaced by their pruned values.

A pruned stacked expert weight of `sparsecc.moe` was built by moe-dispatch from the model's
parameters; its record's `sources` says how (passes/moe/experts.py: a parameter name, or a
transpose, cat, per-expert stack or half swap of such), and `_scatter` undoes that on the pruned
values, so every weight comes back under the model's own name and layout.
"""
from __future__ import annotations

from typing import Any

import torch

from sparsecc.passes.records import RewriteRecord
from sparsecc.runtime.nm_format import decompress_nm


def pruned_state_dict(records: list[RewriteRecord], constants: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model parameter name -> dense pruned weight, for every N:M-rewritten weight."""
    weights = {}
    for record in records:
        d = record.details
        if "values" in d:
            dense = decompress_nm(constants[d["values"]], constants[d["indices"]], d["n"], d["m"], d["in_features"])
            dense = dense.reshape(d["weight_shape"]) if "weight_shape" in d else dense   # conv: [out, C, kh, kw]
            weights[d["weight"]] = dense.t() if d["transposed"] else dense
        elif "compressed" in d and "sources" in d:
            for name, (values, indices) in d["compressed"].items():
                _scatter(d["sources"][name], _decompressed(constants[values], constants[indices], d["n"], d["m"]),
                         weights)
    return weights


def parameters_of(source: Any, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's parameters, by name and in their own layout, that `value` (built from them as `source` says) holds."""
    weights: dict[str, torch.Tensor] = {}
    _scatter(source, value, weights)
    return weights


def _decompressed(values: torch.Tensor, indices: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The dense [.., K] weight of (values [.., K*N/M], indices)."""
    return decompress_nm(values, indices, n, m, values.shape[-1] * m // n)


def _scatter(source: Any, value: torch.Tensor, weights: dict[str, torch.Tensor]) -> None:
    """Put `value`, built from parameters as `source` says, back into `weights` by parameter name."""
    if isinstance(source, str):
        weights[source] = value.contiguous()
    elif "transpose" in source:
        _scatter(source["of"], value.transpose(*source["transpose"]), weights)
    elif "swap_halves" in source:   # [b; a] of a parameter [a; b]: the same swap undoes it
        first, second = value.chunk(2, source["swap_halves"])
        _scatter(source["of"], torch.cat([second, first], source["swap_halves"]), weights)
    elif "cat" in source:
        for part, piece in zip(source["of"], value.split(source["sizes"], source["cat"])):
            _scatter(part, piece, weights)
    elif "stack" in source:
        for part, piece in zip(source["of"], value.unbind(source["stack"])):
            _scatter(part, piece, weights)
    else:
        raise ValueError(f"unknown weight provenance {source!r}")
