"""The dense model an exact rewrite must reproduce: original weights replaced by their pruned values."""
from __future__ import annotations

import torch

from sparsecc.passes.records import RewriteRecord
from sparsecc.runtime.nm_format import decompress_nm


def pruned_state_dict(records: list[RewriteRecord], constants: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model parameter name -> dense pruned weight, for every N:M-rewritten weight."""
    weights = {}
    for record in records:
        d = record.details
        if "values" not in d:
            continue
        dense = decompress_nm(constants[d["values"]], constants[d["indices"]], d["n"], d["m"], d["in_features"])
        dense = dense.reshape(d["weight_shape"]) if "weight_shape" in d else dense   # conv: [out, C, kh, kw]
        weights[d["weight"]] = dense.t() if d["transposed"] else dense
    return weights
