"""The CUDA path of sparsecc::nm_linear, chosen per shape by timing the candidates once.

Candidates for y = x @ W^T + b with W N:M-compressed:
  "triton"           the Triton launcher (fused decompress-in-tile kernel up to
                     16 tokens, Triton decompression + cuBLAS above)
  "cusparselt"       cuSPARSELt's 2:4 GEMM called directly (kernels/cusparselt.py:
                     weight compressed once, algorithm searched once per shape);
                     2:4, fp16/bf16, sizes multiples of 16, from MIN_SPARSE_GEMM_TOKENS tokens
  "semi_structured"  torch's 2:4 semi-structured weight (cuSPARSELt, or CUTLASS
                     where cuSPARSELt is absent) through F.linear; only 2:4,
                     fp16/bf16, and shapes to_sparse_semi_structured accepts;
                     from MIN_SPARSE_GEMM_TOKENS tokens (large batched GEMMs)
  "dense"            keep="speed" only: a dense copy of the weight kept, cuBLAS
The first call for a key (device name, dtype, N:M, out x in, token bucket =
next power of two, keep) times each candidate that runs and keeps the fastest,
remembered by kernels/tuning_cache.py (in memory and in a JSON file, so a
later process does not tune again). A candidate whose output disagrees with the
dense product of the pruned weight (fp32, rounded once) is left out with the
reason: a path never measured on this GPU cannot be chosen for its speed if its
numbers are wrong. SPARSECC_NM_PATH=triton|cusparselt|semi_structured|dense forces a path.
"""
from __future__ import annotations

import math
import os
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nm_format import decompress_nm
from . import cusparselt
from .checks import refuse
from .cpu.nm_linear import nm_linear_problem
from .tuning_cache import bucket, fastest, remembered
from .weight_copies import WeightCopies

PATHS = ("triton", "cusparselt", "semi_structured", "dense")
MIN_SPARSE_GEMM_TOKENS = 64
MAX_DISAGREEMENT = 1e-2    # |y - y_dense| / |y_dense| above which a candidate is left out (bf16 eps 7.8e-3)
TUNING_VERSION = 2         # in the key: choices made before cuSPARSELt and the dense copy were candidates retune
_semi_weights = WeightCopies()      # values -> its SparseSemiStructuredTensor
_dense_weights = WeightCopies()     # values -> its dense weight: keep="speed" only


def tuning_key(tokens: int, out_features: int, in_features: int, n: int, m: int, dtype: torch.dtype,
               device: torch.device, keep: str = "memory") -> str:
    return f"{torch.cuda.get_device_name(device)}|v{TUNING_VERSION}|{str(dtype).removeprefix('torch.')}|{n}:{m}|" \
           f"{out_features}x{in_features}|tokens<={bucket(tokens)}|keep={keep}"


def semi_structured_weight(values: Tensor, indices: Tensor, n: int, m: int, in_features: int, dtype: torch.dtype):
    """The dense pruned weight as a SparseSemiStructuredTensor, converted once per weight, version and dtype."""
    from torch.sparse import to_sparse_semi_structured
    return _semi_weights.get(values, indices, dtype, lambda: to_sparse_semi_structured(
        decompress_nm(values, indices, n, m, in_features).to(dtype)))


def _run_triton(x, values, indices, bias, n, m, in_features):
    from .triton.nm_linear import nm_linear_triton
    return nm_linear_triton(x, values, indices, bias, n, m, in_features)


def _run_semi_structured(x, values, indices, bias, n, m, in_features):
    weight = semi_structured_weight(values, indices, n, m, in_features, x.dtype)
    tokens = x.reshape(-1, in_features)
    y = F.linear(tokens, weight, None if bias is None else bias.to(x.dtype))
    return y.reshape(*x.shape[:-1], values.shape[0])


def _run_dense(x, values, indices, bias, n, m, in_features):
    """F.linear on a dense copy of the pruned weight, made once per weight, version and dtype (keep="speed";
    an inference tensor, which has no version, is decompressed every call)."""
    weight = _dense_weights.get(values, indices, x.dtype,
                                lambda: decompress_nm(values, indices, n, m, in_features).to(x.dtype))
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


RUNNERS: dict[str, Callable] = {"triton": _run_triton, "cusparselt": cusparselt.nm_linear_cusparselt,
                                "semi_structured": _run_semi_structured, "dense": _run_dense}


def candidates(tokens: int, n: int, m: int, dtype: torch.dtype, out_features: int = 0, in_features: int = 0,
               keep: str = "memory") -> list[str]:
    """The paths worth timing for this call: the Triton launcher always (the path every other one falls back
    to), the 2:4 sparse GEMMs for prefill-sized calls, the dense copy where keep="speed"."""
    paths = ["triton"]
    half_2_4 = (n, m) == (2, 4) and dtype in (torch.float16, torch.bfloat16)
    if half_2_4 and tokens >= MIN_SPARSE_GEMM_TOKENS:
        if cusparselt.available() and cusparselt.unsupported(n, m, dtype, out_features, in_features) is None:
            paths.append("cusparselt")
        paths.append("semi_structured")
    if keep == "speed":
        paths.append("dense")
    return paths


def disagreement(got: Tensor, want: Tensor) -> Optional[str]:
    """Why `got` is not `want` to the tuning tolerance (norm-relative, accumulated in fp32 without an fp32
    copy of either), or None."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{got.dtype}{list(got.shape)} != {want.dtype}{list(want.shape)}"
    norm = partial(torch.linalg.vector_norm, dtype=torch.float32)
    diff = float(norm(got - want)) / max(float(norm(want)), 1e-30)
    if not math.isfinite(diff) or diff > MAX_DISAGREEMENT:
        return f"relative error {diff:.3g} > {MAX_DISAGREEMENT} against the dense product"
    return None


def dense_product(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                  in_features: int) -> Tensor:
    """What every candidate must compute: x @ W^T + b with W decompressed, in fp32, rounded once to x's dtype
    (no candidate is the reference: each is checked against this)."""
    weight = decompress_nm(values, indices, n, m, in_features).float()
    return F.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)


def forget_unchosen(values: Tensor, chosen: str) -> None:
    """Drop the copies of `values` that tuning made for paths it did not choose (keep="memory" keeps none)."""
    for path, copies in (("semi_structured", _semi_weights), ("dense", _dense_weights),
                         ("cusparselt", cusparselt.packed_weights)):
        if chosen != path:
            copies.forget(values)


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
             in_features: int, keep: str = "memory") -> dict:
    """{"path": fastest, "ms": {path: time or why not}} for this call's shape; a candidate that fails or
    whose output disagrees with the dense product of the pruned weight is left out."""
    paths = candidates(x.numel() // in_features, n, m, x.dtype, values.shape[0], in_features, keep)
    runners = {path: partial(RUNNERS[path], x, values, indices, bias, n, m, in_features) for path in paths}
    want = dense_product(x, values, indices, bias, n, m, in_features)
    try:
        entry = fastest(runners, _time_ms, check=partial(disagreement, want=want))
        forget_unchosen(values, entry["path"])
        return entry
    except RuntimeError as err:
        raise RuntimeError(f"nm_linear: no CUDA path ran for x {list(x.shape)}, weight "
                           f"[{values.shape[0]}, {in_features}] {n}:{m}: {err}") from None


def choose_path(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                in_features: int, keep: str = "memory") -> str:
    forced = os.environ.get("SPARSECC_NM_PATH")
    if forced:
        if forced not in PATHS:
            raise ValueError(f"SPARSECC_NM_PATH={forced!r}: expected one of {PATHS}")
        if forced == "dense" and keep != "speed":
            raise ValueError('SPARSECC_NM_PATH=dense keeps a dense copy of the weight: only for keep="speed"')
        return forced
    tokens = x.numel() // in_features
    paths = candidates(tokens, n, m, x.dtype, values.shape[0], in_features, keep)
    if len(paths) == 1:
        return paths[0]
    key = tuning_key(tokens, values.shape[0], in_features, n, m, x.dtype, x.device, keep)
    path = remembered(key, lambda: autotune(x, values, indices, bias, n, m, in_features, keep))["path"]
    return path if path in paths else "triton"    # a file from a machine with cuSPARSELt: the path always offered


def nm_linear_cuda(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                   in_features: int, keep: str = "memory") -> Tensor:
    """sparsecc::nm_linear on CUDA through the path tuned for this shape (operands checked first, so tuning
    never mistakes a malformed weight for a slow path)."""
    refuse("nm_linear", nm_linear_problem(x, values, indices, bias, n, m, in_features, check_data=True, keep=keep))
    path = choose_path(x, values, indices, bias, n, m, in_features, keep)
    return RUNNERS[path](x, values, indices, bias, n, m, in_features)
