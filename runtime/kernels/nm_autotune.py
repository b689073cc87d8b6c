"""The CUDA path of sparsecc::nm_linear, chosen per shape by timing the candidates once.

Candidates for y = x @ W^T + b with W N:M-compressed:
  "triton"           the Triton launcher (fused decompress-in-tile kernel up to
                     16 tokens, Triton decompression + cuBLAS above)
  "semi_structured"  torch's 2:4 semi-structured weight (cuSPARSELt, or CUTLASS
                     where cuSPARSELt is absent) through F.linear; only 2:4,
                     fp16/bf16, and shapes to_sparse_semi_structured accepts;
                     tried from MIN_SEMI_STRUCTURED_TOKENS tokens (large batched GEMMs)
The first call for a key (device name, dtype, N:M, out x in, token bucket =
next power of two) times each candidate that runs and keeps the fastest,
remembered by kernels/tuning_cache.py (in memory and in a JSON file, so a
later process does not tune again). SPARSECC_NM_PATH=triton|semi_structured forces a path.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..nm_format import decompress_nm
from .checks import refuse
from .cpu.nm_linear import nm_linear_problem
from .tuning_cache import bucket, fastest, remembered

PATHS = ("triton", "semi_structured")
MIN_SEMI_STRUCTURED_TOKENS = 64
_semi_weights = WeakIdKeyDictionary()     # values tensor -> (version, SparseSemiStructuredTensor)


def tuning_key(tokens: int, out_features: int, in_features: int, n: int, m: int, dtype: torch.dtype,
               device: torch.device) -> str:
    return f"{torch.cuda.get_device_name(device)}|{str(dtype).removeprefix('torch.')}|{n}:{m}|" \
           f"{out_features}x{in_features}|tokens<={bucket(tokens)}"


def semi_structured_weight(values: Tensor, indices: Tensor, n: int, m: int, in_features: int, dtype: torch.dtype):
    """The dense pruned weight as a SparseSemiStructuredTensor, converted once per weight (and version)."""
    cached = _semi_weights.get(values)
    if cached is not None and cached[0] == values._version:
        return cached[1]
    from torch.sparse import to_sparse_semi_structured
    weight = to_sparse_semi_structured(decompress_nm(values, indices, n, m, in_features).to(dtype))
    _semi_weights[values] = (values._version, weight)
    return weight


def _run_triton(x, values, indices, bias, n, m, in_features):
    from .triton.nm_linear import nm_linear_triton
    return nm_linear_triton(x, values, indices, bias, n, m, in_features)


def _run_semi_structured(x, values, indices, bias, n, m, in_features):
    weight = semi_structured_weight(values, indices, n, m, in_features, x.dtype)
    tokens = x.reshape(-1, in_features)
    y = F.linear(tokens, weight, None if bias is None else bias.to(x.dtype))
    return y.reshape(*x.shape[:-1], values.shape[0])


RUNNERS: dict[str, Callable] = {"triton": _run_triton, "semi_structured": _run_semi_structured}


def candidates(tokens: int, n: int, m: int, dtype: torch.dtype) -> list[str]:
    paths = ["triton"]
    if (n, m) == (2, 4) and dtype in (torch.float16, torch.bfloat16) and tokens >= MIN_SEMI_STRUCTURED_TOKENS:
        paths.append("semi_structured")
    return paths


def _time_ms(run: Callable[[], Tensor], repeats: int = 10) -> float:
    for _ in range(3):
        run()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeats


def autotune(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
             in_features: int) -> dict:
    """{"path": fastest, "ms": {path: time or error}} for this call's shape; a failing candidate is left out."""
    runners = {path: partial(RUNNERS[path], x, values, indices, bias, n, m, in_features)
               for path in candidates(x.numel() // in_features, n, m, x.dtype)}
    try:
        return fastest(runners, _time_ms)
    except RuntimeError as err:
        raise RuntimeError(f"nm_linear: no CUDA path ran for x {list(x.shape)}, weight "
                           f"[{values.shape[0]}, {in_features}] {n}:{m}: {err}") from None


def choose_path(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                in_features: int) -> str:
    forced = os.environ.get("SPARSECC_NM_PATH")
    if forced:
        if forced not in PATHS:
            raise ValueError(f"SPARSECC_NM_PATH={forced!r}: expected one of {PATHS}")
        return forced
    tokens = x.numel() // in_features
    if len(candidates(tokens, n, m, x.dtype)) == 1:
        return "triton"
    key = tuning_key(tokens, values.shape[0], in_features, n, m, x.dtype, x.device)
    return remembered(key, lambda: autotune(x, values, indices, bias, n, m, in_features))["path"]


def nm_linear_cuda(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                   in_features: int) -> Tensor:
    """sparsecc::nm_linear on CUDA through the path tuned for this shape (operands checked first, so tuning
    never mistakes a malformed weight for a slow path)."""
    refuse("nm_linear", nm_linear_problem(x, values, indices, bias, n, m, in_features, check_data=True))
    path = choose_path(x, values, indices, bias, n, m, in_features)
    return RUNNERS[path](x, values, indices, bias, n, m, in_features)
