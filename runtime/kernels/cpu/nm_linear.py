"""CPU kernel for sparsecc::nm_linear: decompress a block of weight rows, multiply, repeat.

The weight is decompressed BLOCK_ROWS rows at a time into one reused
workspace, and each block runs as a dense `F.linear` (MKL). A whole dense W
per call is a fresh 64 MiB allocation (page faults, cache misses); a block
stays in cache between its decompression and its GEMM. No sparse path beats
MKL here: the kernel saves weight memory, not time. Measured (2 cores, 2:4
fp32, 4096x4096, median ms; tokens 1 | 512): dense F.linear 1.4 | 62-75,
blocked (this) 17 | 87-107, whole-W decompress + F.linear 68-130 | 183-213,
CSR `torch.sparse.mm` with the CSR prebuilt 24 | 458, gather-multiply-sum
with the columns prebuilt 46 | -.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ...nm_format import decompress_nm, nm_weight_problem
from ..checks import refuse

BLOCK_ROWS = 256  # 32..512 rows measured at K=4096 and 11008, fp32 and bf16, 512 tokens: 256 best or within noise


def nm_linear_cpu(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor],
                  n: int, m: int, in_features: int) -> Tensor:
    """y[..., out] = x[..., in] @ decompress_nm(values, indices).T + bias, in x's dtype."""
    refuse("nm_linear", nm_linear_problem(x, values, indices, bias, n, m, in_features, check_data=True))
    tokens = x.reshape(-1, in_features)
    out_features = values.shape[0]
    y = tokens.new_empty(tokens.shape[0], out_features)
    workspace = tokens.new_empty(min(BLOCK_ROWS, out_features), in_features)
    for start in range(0, out_features, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, out_features)
        weight = decompress_nm(values[start:stop], indices[start:stop], n, m, in_features,
                               out=workspace[: stop - start])
        block_bias = None if bias is None else bias[start:stop].to(y.dtype)
        y[:, start:stop] = F.linear(tokens, weight, block_bias)
    return y.reshape(*x.shape[:-1], out_features)


def nm_linear_problem(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                      in_features: int, check_data: bool) -> Optional[str]:
    """None when nm_linear's operands fit together (the positions decoded once when `check_data`), else why not."""
    problem = nm_weight_problem(values, indices, n, m, in_features, check_data)
    if problem is None and values.dim() != 2:
        problem = f"values {list(values.shape)} must be [out, in_features*N/M]"
    if problem is None and (x.dim() < 1 or x.shape[-1] != in_features):
        problem = f"x {list(x.shape)} must end in in_features={in_features}"
    return problem or operand_dtype_problem(x, values, bias)


def operand_dtype_problem(x: Tensor, values: Tensor, bias: Optional[Tensor]) -> Optional[str]:
    """values in x's dtype, bias (if any) x's dtype and one per output row; shared by nm_conv2d."""
    if values.dtype != x.dtype:
        return f"values dtype {values.dtype} != x dtype {x.dtype}"
    if bias is not None and (list(bias.shape) != [values.shape[0]] or bias.dtype != x.dtype):
        return f"bias {bias.dtype}{list(bias.shape)} must be {x.dtype}[{values.shape[0]}]"
    return None
