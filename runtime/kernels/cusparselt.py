"""cuSPARSELt's 2:4 GEMM for sparsecc::nm_linear on CUDA, called directly (`torch._cslt_sparse_mm`).

y = x @ W^T + b as (W @ x^T)^T with W the sparse operand: torch._cslt_compress packs the pruned weight
(kept values + cuSPARSELt's own metadata) once per weight and version, and the call passes x^T as a
column-major view and asks for the transposed result, so y needs no transpose copy; x is copied only where
its token count is not a multiple of 8 (padded, as cuSPARSELt needs) or it is not contiguous. The algorithm
id is searched once per device, dtype, shape and token bucket (`torch._cslt_sparse_mm_search`; its split-K
choice is not kept) and reused. What is kept is the compressed weight and the chosen algorithm: torch builds
cuSPARSELt's plan descriptors inside each call (no Python handle to them).

Only 2:4, fp16/bf16, out and in features multiples of 16 (cuSPARSELt's sparse operand). Unmeasured: no GPU
has run this path yet (nm_autotune tries it beside the others and leaves it out if it fails or disagrees).
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nm_format import decompress_nm
from .tuning_cache import bucket
from .weight_copies import WeightCopies

DTYPES = (torch.float16, torch.bfloat16)
SPARSE_MULTIPLE = 16      # cuSPARSELt's sparse operand: rows and columns multiples of 16 (fp16/bf16)
TOKEN_MULTIPLE = 8        # its dense operand's columns (our tokens)
packed_weights = WeightCopies()          # values -> its compressed form, per dtype
_algorithms: dict[tuple, int] = {}       # (device, dtype, out, in, token bucket, bias?) -> cuSPARSELt algorithm id
_lock = threading.Lock()


def available() -> bool:
    """torch was built with cuSPARSELt and a CUDA device is present."""
    return torch.cuda.is_available() and torch.backends.cusparselt.is_available()


def unsupported(n: int, m: int, dtype: torch.dtype, out_features: int, in_features: int) -> Optional[str]:
    """Why cuSPARSELt cannot run this layer, or None."""
    if (n, m) != (2, 4):
        return f"{n}:{m} (cuSPARSELt runs 2:4 only)"
    if dtype not in DTYPES:
        return f"dtype {dtype} (fp16/bf16 only)"
    if out_features % SPARSE_MULTIPLE or in_features % SPARSE_MULTIPLE:
        return f"weight [{out_features}, {in_features}]: both sizes must be multiples of {SPARSE_MULTIPLE}"
    return None


def compressed_weight(values: Tensor, indices: Tensor, in_features: int, dtype: torch.dtype) -> Tensor:
    """The pruned weight in cuSPARSELt's compressed form, made once per weight, versions (values' and
    indices') and dtype; an inference tensor, which has no version, is compressed every call."""
    return packed_weights.get(values, indices, dtype, lambda: torch._cslt_compress(
        decompress_nm(values, indices, 2, 4, in_features).to(dtype).contiguous()))


def algorithm(packed: Tensor, dense_t: Tensor, bias: Optional[Tensor], key: tuple) -> int:
    """cuSPARSELt's fastest algorithm id for this shape, searched on the first call for `key`
    (0, its default, where the search is not offered)."""
    with _lock:
        found = _algorithms.get(key)
    if found is None:    # two threads may both search once: the same answer, stored twice
        try:
            found = int(torch._cslt_sparse_mm_search(packed, dense_t, bias=bias, transpose_result=True))
        except (RuntimeError, AttributeError):
            found = 0
        with _lock:
            _algorithms[key] = found
    return found


def nm_linear_cusparselt(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                         in_features: int) -> Tensor:
    """y[..., out] = x[..., in] @ W.T + bias through cuSPARSELt (operands checked by nm_linear's caller)."""
    out_features = values.shape[0]
    why = unsupported(n, m, x.dtype, out_features, in_features)
    if why is not None:
        raise NotImplementedError(f"cuSPARSELt: {why}")
    packed = compressed_weight(values, indices, in_features, x.dtype)
    tokens = x.reshape(-1, in_features)
    count = tokens.shape[0]
    pad = -count % TOKEN_MULTIPLE
    if pad or not tokens.is_contiguous():
        tokens = F.pad(tokens, (0, 0, 0, pad)).contiguous()
    bias = None if bias is None else bias.to(x.dtype)
    key = (x.device, x.dtype, out_features, in_features, bucket(count), bias is not None)
    dense_t = tokens.t()                                  # [in, tokens]: column-major, no copy
    alg = algorithm(packed, dense_t, bias, key)
    y = torch._cslt_sparse_mm(packed, dense_t, bias=bias, transpose_result=True, alg_id=alg)   # [tokens, out]
    if pad:
        y = y[:count]
    return y.reshape(*x.shape[:-1], out_features)
