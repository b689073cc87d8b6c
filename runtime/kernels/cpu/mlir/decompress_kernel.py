"""MLIR text of the N:M decompression kernel: dense rows [row_begin, row_end) of W written into `out`.

For the prefill path: cache-sized row tiles are decompressed and handed to the dense GEMM.
A window is the fp32 decode window (32 dense columns, 32*N/M values) for both dtypes:

    index_i   the dense column of value i, built as in the decode kernel (codegen.py)
    kept      OR over i of (1 << index_i): a 32-bit mask of the columns the window keeps
    dense     `vector.expandload` of the window's values into the kept lanes, zeros elsewhere
              (vexpandps per 16 fp32 lanes, vpexpandw for 32 bf16 lanes)

Every group keeps exactly N entries (padding included), so the window's values start at a
constant offset. A corrupt index sets fewer bits: fewer values read, never past the window.
Signature: (values, indices u8, out [rows*K], row_begin, row_end).
"""
from __future__ import annotations

from typing import Optional

from .codegen import ELEMENT, DecodeSpec, index_constant_lines, index_lines, lane_constants

COLUMNS = 32            # dense columns per window, one 32-bit kept mask


def decompress_spec(dtype: str, k: int, n: int, m: int) -> Optional[DecodeSpec]:
    """The window geometry: that of the fp32 decode kernel (16 index lanes over 32 columns)."""
    return DecodeSpec("float32", k, n, m, 1, block_rows=1, unroll=1) if dtype in ELEMENT else None


def decompress_kernel_name(dtype: str, k: int, n: int, m: int) -> str:
    return f"nm_decompress_{dtype}_k{k}_{n}of{m}"


def _window_lines(dtype: str, spec: DecodeSpec) -> list[str]:
    store, _ = ELEMENT[dtype]
    shuffle, _, _ = lane_constants(spec)
    lane_t = "vector<16xi32>"
    lines = [
        "%vo = arith.muli %w, %window_values : index",
        "%vi = arith.addi %value_row, %vo : index",
        "%bo = arith.muli %w, %window_bytes : index",
        "%bi = arith.addi %index_row, %bo : index",
        "%co = arith.muli %w, %c32 : index",
        "%oi = arith.addi %out_row, %co : index",
        *index_lines("%", "%bi", shuffle, lane_t),
        f"%bit = arith.shli %ones, %ix : {lane_t}",
        f"%kept = vector.reduction <or>, %bit : {lane_t} into i32",
        "%kept1 = vector.broadcast %kept : i32 to vector<1xi32>",
        "%mask = vector.bitcast %kept1 : vector<1xi32> to vector<32xi1>",
    ]
    if store == "i16":
        return lines + [
            "%dense = vector.expandload %values[%vi], %mask, %zero : memref<?xi16>, vector<32xi1>, "
            "vector<32xi16> into vector<32xi16>",
            "vector.store %dense, %out[%oi] : memref<?xi16>, vector<32xi16>"]
    return lines + [
        "%lo = vector.extract_strided_slice %mask {offsets = [0], sizes = [16], strides = [1]} : "
        "vector<32xi1> to vector<16xi1>",
        "%hi = vector.extract_strided_slice %mask {offsets = [16], sizes = [16], strides = [1]} : "
        "vector<32xi1> to vector<16xi1>",
        "%vh = arith.addi %vi, %half_values : index",
        "%oh = arith.addi %oi, %c16 : index",
        "%dense_lo = vector.expandload %values[%vi], %lo, %zero : memref<?xf32>, vector<16xi1>, "
        "vector<16xf32> into vector<16xf32>",
        "%dense_hi = vector.expandload %values[%vh], %hi, %zero : memref<?xf32>, vector<16xi1>, "
        "vector<16xf32> into vector<16xf32>",
        "vector.store %dense_lo, %out[%oi] : memref<?xf32>, vector<16xf32>",
        "vector.store %dense_hi, %out[%oh] : memref<?xf32>, vector<16xf32>"]


def decompress_kernel_text(dtype: str, k: int, n: int, m: int) -> str:
    """The MLIR module of the decompression kernel for (dtype, K, N:M); decode's `unsupported` applies."""
    spec = decompress_spec(dtype, k, n, m)
    store, _ = ELEMENT[dtype]
    zero = "dense<0.0> : vector<16xf32>" if store == "f32" else "dense<0> : vector<32xi16>"
    head = [
        f"func.func @{decompress_kernel_name(dtype, k, n, m)}(%values: memref<?x{store}>, %indices: memref<?xi8>,",
        f"    %out: memref<?x{store}>, %row_begin: index, %row_end: index) {{",
        *(f"  %c{c} = arith.constant {c} : index" for c in (0, 1, 16, 32)),
        *("  " + line for line in index_constant_lines(spec, "vector<16xi32>")),
        f"  %k = arith.constant {k} : index",
        f"  %windows = arith.constant {k // COLUMNS} : index",
        f"  %half_values = arith.constant {spec.window_values * 16 // COLUMNS} : index",
        "  %ones = arith.constant dense<1> : vector<16xi32>",
        f"  %zero = arith.constant {zero}",
    ]
    loop = ["scf.for %row = %row_begin to %row_end step %c1 {",
            "  %value_row = arith.muli %row, %row_values : index",
            "  %index_row = arith.muli %row, %row_bytes : index",
            "  %out_row = arith.muli %row, %k : index",
            "  scf.for %w = %c0 to %windows step %c1 {",
            *("    " + line for line in _window_lines(dtype, spec)),
            "  }",
            "}"]
    return "\n".join([*head, *("  " + line for line in loop), "  return", "}"])
