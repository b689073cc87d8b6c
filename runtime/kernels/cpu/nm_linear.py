"""CPU kernel for sparsecc::nm_linear: the path measured fastest for the layer and token count.

The paths and the choice are in `nm_paths.py`: the MLIR-generated decode kernel for
few tokens (compressed values streamed once), decompressed tiles into MKL GEMMs, and
(keep="speed" only) a dense copy kept. Plain torch formulations were measured and lose
to MKL (2 cores, 2:4 fp32, 4096x4096, median ms; tokens 1 | 512): dense F.linear
1.4 | 62-75, tiles with torch decompression 17 | 87-107, whole-W decompress + F.linear
68-130 | 183-213, CSR `torch.sparse.mm` 24 | 458, gather-multiply-sum 46 | -.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ...nm_format import nm_weight_problem
from ..checks import refuse
from .layer_calls import LayerCalls, clear_with_memos, environ_value
from .mlir.nm_decode import DecodeCall, decode_spec
from .nm_paths import FORCE_ENV, KEEPS, RUNNERS, choose_path

Runner = Callable[..., Tensor]
# values -> {call key: runner}: a layer's call checked and its path chosen once per operand state and x shape.
# The checks and the choice cost ~18 us a call (2 cores), more than a small layer's whole GEMV.
_checked_calls = LayerCalls(max_keys_per_layer=64)


def nm_linear_cpu(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor],
                  n: int, m: int, in_features: int, keep: str = "memory") -> Tensor:
    """y[..., out] = x[..., in] @ decompress_nm(values, indices).T + bias, in x's dtype."""
    return checked_runner(x, values, indices, bias, n, m, in_features, keep)(x, values, indices, bias, n, m,
                                                                             in_features)


def checked_runner(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                   in_features: int, keep: str) -> Runner:
    """The runner for this call, its operands checked and its path chosen on the first call for its key."""
    key = call_key(x, values, indices, bias, n, m, in_features, keep)
    run = _checked_calls.get(values, key) if key is not None else None
    if run is None:
        refuse("nm_linear", nm_linear_problem(x, values, indices, bias, n, m, in_features, check_data=True,
                                              keep=keep))
        run = runner(choose_path(x, values, indices, bias, n, m, in_features, keep), x, values, indices, bias, n, m,
                     in_features)
        if key is not None:
            _checked_calls.put(values, key, run)
    return run


class InstructionCall:
    """nm_linear for one program instruction whose values, indices and bias are constants (the same tensors
    every call): the runner its last call took, kept with the memo key it was taken for (`call_key`: x's
    shape, dtype and device, the constants' shapes, dtypes, versions and pointers, the forcing variable, the
    thread count) and run again while the key is equal: no hashing and no memo lookup, 0.2-0.6 us of a
    ~8 us 384x128 layer call at the example's size (2-core Zen 4). Anything else goes to nm_linear_cpu;
    jit.clear_compiled and tuning_cache.forget drop the kept runner."""

    def __init__(self, values: Tensor, indices: Tensor, bias: Optional[Tensor]):
        self.operands = (values, indices, bias)
        self.last: Optional[tuple] = None      # (key, runner), replaced whole: callers on two threads are safe
        clear_with_memos(self)

    def clear(self) -> None:
        self.last = None

    def __call__(self, x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                 in_features: int, keep: str = "memory") -> Tensor:
        key = call_key(x, values, indices, bias, n, m, in_features, keep)
        last, mine = self.last, key is not None and self._given(values, indices, bias)
        if mine and last is not None and last[0] == key:
            return last[1](x, values, indices, bias, n, m, in_features)
        run = checked_runner(x, values, indices, bias, n, m, in_features, keep)
        if mine:
            self.last = (key, run)
        return run(x, values, indices, bias, n, m, in_features)

    def _given(self, values: Tensor, indices: Tensor, bias: Optional[Tensor]) -> bool:
        """The instruction's own constants (by identity: == would compare tensors elementwise)."""
        mine = self.operands
        return values is mine[0] and indices is mine[1] and bias is mine[2]


_OPERANDS = ("x", "values", "indices", "bias")   # nm_linear's schema, in order


def instruction_call(args: list, kwargs: dict) -> Optional[InstructionCall]:
    """OpDef.instruction_kernels["torch"]: an InstructionCall where values, indices and bias (passed by
    position or by name) are constants."""
    given = {**dict(zip(_OPERANDS, args)), **{k: v for k, v in kwargs.items() if k in _OPERANDS}}
    if not {"values", "indices", "bias"} <= given.keys():
        return None
    values, indices, bias = given["values"], given["indices"], given["bias"]
    constant = isinstance(values, Tensor) and isinstance(indices, Tensor) and (bias is None or isinstance(bias, Tensor))
    return InstructionCall(values, indices, bias) if constant else None


def call_key(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
             in_features: int, keep: str) -> Optional[tuple]:
    """Everything a checked call's verdict and path depend on, or None where nothing proves the operands
    unchanged since (inference tensors have no version counter: checked on every call)."""
    try:   # nm_format.tensor_version, inlined: one try for the three (every call builds this key)
        versions = (values._version, indices._version, None if bias is None else bias._version)
    except RuntimeError:
        return None
    bias_state = None if bias is None else (bias.dtype, bias.shape, bias.data_ptr())
    return (x.dtype, x.shape, x.device, values.dtype, values.shape, values.data_ptr(), id(indices), indices.dtype,
            indices.shape, indices.data_ptr(), bias_state, versions, n, m, in_features, keep,
            environ_value(FORCE_ENV), torch.get_num_threads())


def runner(path: str, x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
           in_features: int) -> Runner:
    """The path's function; the generated kernel bound to this layer's operands (no second check per call)."""
    spec = decode_spec(x, values, n, m, in_features) if path == "generated" else None
    if spec is None:
        return RUNNERS[path]
    return DecodeCall(spec, values, indices, bias)


def nm_linear_problem(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                      in_features: int, check_data: bool, keep: str = "memory") -> Optional[str]:
    """None when nm_linear's operands fit together (the positions decoded once when `check_data`), else why not."""
    if keep not in KEEPS:
        return f"keep={keep!r} must be one of {KEEPS}"
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
