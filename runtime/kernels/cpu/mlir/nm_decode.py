"""Launch the generated N:M decode kernel: y = x @ W.T + bias for 1..16 tokens, W in nm_format.

Rows are split into chunks run on torch's own OpenMP threads (threads.py); each chunk is one
ctypes call (ctypes releases the GIL).
The kernel reads the stored values and packed positions as they are: no dense weight and
no derived metadata. `nm_linear_mlir` returns None where no kernel applies (no torch-mlir,
host lacks the features, dtype, pattern, shape or token count), so the caller falls back.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from ....nm_format import nm_weight_problem
from ...checks import refuse
from .codegen import DecodeSpec, unsupported
from .decompress_kernel import decompress_spec
from .host import missing_features
from .jit import CompiledKernel, decode_kernel, decompress_kernel
from .threads import run_chunks

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
MIN_ROWS_PER_CHUNK = 64     # below this a call (~5 us) and a thread hand-off cost more than the rows
CHUNKS_PER_THREAD = 4       # work sharing granularity: 4 calls per thread cost ~20 us
ROW_ALIGN = 4               # chunk edges on whole row blocks of the decode kernel
# compressed weight bytes below which one thread runs it all: handing chunks to the other thread costs more than
# it saves below this (2-core Zen 4, 2:4 decode step of a 100M Llama, 2 threads: split above 1 MiB 32.4 ms fp32 /
# 23.8 ms bf16; above 16 MiB 25.7 / 18.5 ms; never 27 ms bf16, as the 32000x1024 lm_head needs both threads)
MIN_BYTES_TO_SPLIT = 16 << 20


@functools.lru_cache(maxsize=1)
def mlir_available() -> bool:
    """torch-mlir's bindings and ExecutionEngine are importable."""
    return importlib.util.find_spec("torch_mlir") is not None


def decode_spec(x: Tensor, values: Tensor, n: int, m: int, in_features: int) -> Optional[DecodeSpec]:
    """The kernel spec for this call, or None when no generated kernel can run it here."""
    dtype = DTYPE_NAMES.get(x.dtype)
    if dtype is None or values.dtype != x.dtype or x.device.type != "cpu" or values.dim() != 2:
        return None
    if x.dim() < 1 or x.shape[-1] != in_features or x.numel() == 0:
        return None
    return runnable_spec(dtype, in_features, n, m, x.numel() // in_features)


@functools.lru_cache(maxsize=None)
def runnable_spec(dtype: str, k: int, n: int, m: int, tokens: int) -> Optional[DecodeSpec]:
    """DecodeSpec(dtype, k, n, m, tokens) where this host can generate and run it, else None."""
    spec = DecodeSpec(dtype, k, n, m, tokens)
    if not mlir_available() or missing_features(dtype) or unsupported(spec):
        return None
    return spec


def nm_linear_mlir(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor],
                   n: int, m: int, in_features: int) -> Optional[Tensor]:
    """y[..., out] = x[..., in] @ decompress_nm(values, indices).T + bias in x's dtype, or None (unsupported)."""
    spec = decode_spec(x, values, n, m, in_features)
    if spec is None:
        return None
    refuse("nm_linear", operand_problem(x, values, indices, bias, n, m, in_features))
    return run_decode(spec, x, values, indices, bias)


def run_decode(spec: DecodeSpec, x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The decode kernel of `spec` on operands already checked against it (nm_linear_mlir, or a caller that
    checked this layer's call once: kernels/cpu/nm_linear.py)."""
    out_features = values.shape[0]
    y = torch.empty(spec.tokens, out_features, dtype=x.dtype)
    tokens = x.reshape(spec.tokens, spec.k).contiguous()
    bias32 = zero_bias(out_features) if bias is None else bias.to(torch.float32).contiguous()
    run_rows(decode_kernel(spec), values.contiguous(), indices.contiguous(), tokens, bias32, y,
             out_rows=out_features)
    return y.reshape(*x.shape[:-1], out_features)


@functools.lru_cache(maxsize=64)
def zero_bias(out_features: int) -> Tensor:
    """A shared read-only fp32 zero bias: the kernel always adds one."""
    return torch.zeros(out_features)


def operand_problem(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                    in_features: int) -> Optional[str]:
    """Why these operands break nm_linear's contract (positions decoded once per tensor), or None."""
    if x.shape[-1] != in_features:
        return f"x {list(x.shape)} must end in in_features={in_features}"
    if bias is not None and (list(bias.shape) != [values.shape[0]] or bias.dtype != x.dtype):
        return f"bias {bias.dtype}{list(bias.shape)} must be {x.dtype}[{values.shape[0]}]"
    # shapes and dtypes only: a kernel reads within its window whatever the positions say (a register permute,
    # at most N values per group), so bad positions give wrong numbers, never a stray read; nm_linear checks the
    # positions once per weight before any path runs (a per-tile check here would repeat it on every call)
    return nm_weight_problem(values, indices, n, m, in_features, check_data=False)


def nm_decompress_mlir(values: Tensor, indices: Tensor, n: int, m: int, k: int, out: Tensor) -> Optional[Tensor]:
    """decompress_nm(values, indices, n, m, k, out) into a contiguous [rows, k] `out`, or None (unsupported)."""
    dtype = DTYPE_NAMES.get(values.dtype)
    spec = decompress_spec(dtype, k, n, m) if dtype else None
    if spec is None or unsupported(spec) or not mlir_available() or missing_features(dtype, "decompress"):
        return None
    if values.dim() != 2:
        refuse("nm_decompress", f"values {list(values.shape)} must be [rows, K*N/M]")
    if out.dtype != values.dtype or list(out.shape) != [values.shape[0], k] or not out.is_contiguous():
        wanted = f"{values.dtype}[{values.shape[0]}, {k}]"
        refuse("nm_decompress", f"out {out.dtype}{list(out.shape)} must be a contiguous {wanted}")
    refuse("nm_decompress", nm_weight_problem(values, indices, n, m, k, check_data=False))   # see operand_problem
    run_rows(decompress_kernel(dtype, k, n, m), values.contiguous(), indices.contiguous(), out)
    return out


def run_rows(kernel: CompiledKernel, values: Tensor, *buffers: Tensor, **scalars: int) -> None:
    """Run `kernel(values, *buffers, row_begin, row_end, *scalars)` over every row in chunks, on torch's
    OpenMP threads (threads.py): a thread that starts late takes fewer chunks instead of delaying the call."""
    # a small weight runs on the calling thread: handing work to another costs more than it saves
    threads = torch.get_num_threads() if values.numel() * values.element_size() >= MIN_BYTES_TO_SPLIT else 1
    pointers = [(t.data_ptr(), t.numel()) for t in (values, *buffers)]
    extra = tuple(scalars.values())
    chunks = row_ranges(values.shape[0], threads) if threads > 1 else [(0, values.shape[0])]   # one call when alone
    run_chunks(lambda span: kernel.call(pointers, span + extra), chunks, threads)


def row_ranges(rows: int, threads: int) -> list[tuple[int, int]]:
    """Contiguous [begin, end) row chunks, CHUNKS_PER_THREAD per thread, none smaller than
    MIN_ROWS_PER_CHUNK, edges on multiples of ROW_ALIGN (the kernels' row blocks)."""
    count = max(1, min(threads * CHUNKS_PER_THREAD, rows // MIN_ROWS_PER_CHUNK))
    edges = [min(rows, -(-rows * i // count) // ROW_ALIGN * ROW_ALIGN) for i in range(count)] + [rows]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]
