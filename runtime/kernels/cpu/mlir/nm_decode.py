"""Launch the generated N:M decode kernel: y = x @ W.T + bias for 1..16 tokens, W in nm_format.

A layer's call is bound once (DecodeCall: its weight's pointers packed, its row split chosen); rows
split into chunks on torch's own OpenMP threads in native code (team.py: one ctypes call, which
releases the GIL), or through threads.py's callbacks where team.py cannot run.
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
from .codegen import COMPACT_BLOCKING, DecodeSpec, unsupported
from .decompress_kernel import decompress_spec
from .host import decode_isa, missing_features
from .jit import BoundCall, CompiledKernel, decode_kernel, decompress_kernel
from .team import available as team_available

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
MIN_ROWS_PER_CHUNK = 64     # below this a call and a thread hand-off cost more than the rows
CHUNKS_PER_THREAD = 4       # work sharing granularity: a thread that starts late takes fewer chunks
ROW_ALIGN = 16              # chunk edges on whole row blocks (blocks are 1-16 rows: the accumulator limit)
# weight bytes from which rows split over torch's threads. Native split (team.py), 2-core Zen 4, 1 token,
# median ms split | one thread: 2:4 fp32 512x512 (0.5 MiB) 0.036 | 0.050, 4096x4096 1.65 | 2.98, 11008x4096
# 4.08 | 4.81; 128x512 (0.13 MiB) 0.029 | 0.025 (the hand-off costs more than it saves). Through threads.py's
# callbacks (no llvmlite) a split paid only from 16 MiB (100M Llama 2:4 decode step, split above 1 MiB
# 32.4 ms fp32, above 16 MiB 25.7 ms).
MIN_BYTES_TO_SPLIT_NATIVE = 512 << 10
MIN_BYTES_TO_SPLIT = 16 << 20
# One token on a weight whose stored values stay in cache (1 MiB of L2 a core on the project CPU; a weight
# from 512 KiB splits over both cores): the call is bound by instructions, not bytes, and 8-row blocks (one x
# load and one vectorised 8-row reduction per block) beat the streaming blocking (1 row x 2 windows). 2-core
# Zen 4, 2:4, the kernel call alone, median us default | 8x1: fp32 384x128 3.36 | 2.77, 384x512 8.64 | 6.78,
# 384x1024 12.1 | 9.3, 1024x1024 (2 MiB, split) 31 | 29 and 30 | 25 (two runs); bf16 384x128 2.86 | 2.29,
# 384x1024 9.83 | 7.48; the AVX2 form (fp32) 384x128 4.21 | 3.63, 384x512 12.9 | 10.8. Measured layer by
# layer, called back to back; a whole decode step evicts some of it (the example transformer end to end gained
# less, see docs/benchmarks.md). Larger weights stream from memory, where 8 rows (16 streams a core with
# their positions) measured up to 14 % slower (fp32 11008x4096 3.0 | 3.4 ms). Counted on values alone.
MAX_COMPACT_BYTES = 2 << 20


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
    tokens = x.numel() // in_features
    return runnable_spec(dtype, in_features, n, m, tokens, compact(values, tokens))


def compact(values: Tensor, tokens: int) -> bool:
    """Whether a call takes the blocking for a weight that stays in cache (COMPACT_BLOCKING): one token on
    at most MAX_COMPACT_BYTES of stored values."""
    return tokens == 1 and values.numel() * values.element_size() <= MAX_COMPACT_BYTES


@functools.lru_cache(maxsize=None)
def runnable_spec(dtype: str, k: int, n: int, m: int, tokens: int, compact: bool = False) -> Optional[DecodeSpec]:
    """DecodeSpec(dtype, k, n, m, tokens) in the form this host runs (AVX-512, else AVX2 for fp32) where it
    can generate and run it, else None; `compact`: blocked for a weight that stays in cache (COMPACT_BLOCKING)."""
    isa = decode_isa(dtype) if mlir_available() else None
    if isa is None:
        return None
    if compact:
        spec = DecodeSpec(dtype, k, n, m, tokens, *COMPACT_BLOCKING, isa=isa)
        if not unsupported(spec):
            return spec
    spec = DecodeSpec(dtype, k, n, m, tokens, isa=isa)
    return None if unsupported(spec) else spec


def nm_linear_mlir(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor],
                   n: int, m: int, in_features: int) -> Optional[Tensor]:
    """y[..., out] = x[..., in] @ decompress_nm(values, indices).T + bias in x's dtype, or None (unsupported)."""
    spec = decode_spec(x, values, n, m, in_features)
    if spec is None:
        return None
    refuse("nm_linear", operand_problem(x, values, indices, bias, n, m, in_features))
    return run_decode(spec, x, values, indices, bias)


def run_decode(spec: DecodeSpec, x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The decode kernel of `spec` on operands already checked against it (nm_linear_mlir)."""
    return DecodeCall(spec, values, indices, bias)(x)


class LayerCall:
    """A generated kernel bound to one layer's checked weight-side operands (`self.call`, a BoundCall whose
    open buffers are x and y): a call allocates y and runs. Kept per layer and x shape by the callers'
    memos, keyed by the operands' tensors, pointers and versions; it holds every operand it packed a
    pointer of except the weight itself (the memo's key: every call passes that same tensor)."""
    out_features: int
    call: BoundCall
    _shapes: tuple = ((), ())    # (x's shape, y's shape) of the last call: one compare, ~0.5 us less than a build

    def __call__(self, x: Tensor, *_) -> Tensor:
        x = x.contiguous()      # x's elements in order: [tokens, k] flattened
        shape, shapes = x.shape, self._shapes
        if shape != shapes[0]:     # one tuple replaced whole: a call on another thread sees a matching pair
            shapes = self._shapes = (shape, (*shape[:-1], self.out_features))
        y = x.new_empty(shapes[1])   # torch.empty(..., dtype=) costs ~0.5 us more
        self.call.run(x.data_ptr(), y.data_ptr())
        return y


class DecodeCall(LayerCall):
    """The N:M decode kernel of `spec` bound to one layer's values, indices and bias."""

    def __init__(self, spec: DecodeSpec, values: Tensor, indices: Tensor, bias: Optional[Tensor]):
        out_features = values.shape[0]
        stored, packed = values.contiguous(), indices.contiguous()
        bias32 = zero_bias(out_features) if bias is None else bias.to(torch.float32).contiguous()
        # alive while the pointers are used, and so are the originals the memo key names by pointer
        self._kept = (None if stored is values else stored, indices, packed, bias, bias32)
        self.out_features = out_features
        self.call = bind_rows(decode_kernel(spec), stored, [(packed.data_ptr(), packed.numel()),
                                                            (None, spec.tokens * spec.k),
                                                            (bias32.data_ptr(), out_features),
                                                            (None, spec.tokens * out_features)],
                              out_rows=out_features)


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
    """Run `kernel(values, *buffers, row_begin, row_end, *scalars)` over every row (bind_rows)."""
    bind_rows(kernel, values, [(t.data_ptr(), t.numel()) for t in buffers], **scalars).run()


def bind_rows(kernel: CompiledKernel, values: Tensor, buffers: list[tuple[Optional[int], int]],
              **scalars: int) -> BoundCall:
    """`kernel(values, *buffers, row_begin, row_end, *scalars)` over every row of `values`, bound once
    (buffers: (pointer, element count), pointer None for one given per run). A weight of at least the split
    size runs in chunks on torch's OpenMP threads; a thread that starts late takes fewer chunks."""
    native = team_available()
    split = MIN_BYTES_TO_SPLIT_NATIVE if native else MIN_BYTES_TO_SPLIT
    threads = torch.get_num_threads() if values.numel() * values.element_size() >= split else 1
    rows = values.shape[0]
    chunk = chunk_rows(rows, threads) if threads > 1 else rows
    return kernel.bind([(values.data_ptr(), values.numel()), *buffers], rows, tuple(scalars.values()),
                       threads, chunk, native)


def chunk_rows(rows: int, threads: int) -> int:
    """Rows per chunk: CHUNKS_PER_THREAD per thread, at least MIN_ROWS_PER_CHUNK, whole row blocks."""
    chunk = max(MIN_ROWS_PER_CHUNK, -(-rows // (threads * CHUNKS_PER_THREAD)))
    return -(-chunk // ROW_ALIGN) * ROW_ALIGN
