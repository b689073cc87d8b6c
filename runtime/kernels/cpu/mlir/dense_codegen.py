"""MLIR text of the dense decode kernel: y[t, r] = sum_k W[r, k] * x[t, k] + bias[r] for 1..16 tokens.

A batch-1 linear is bound by the bytes of its weight, and MKL's GEMV at one token reads them at about
half the rate a plain streaming loop does on the project CPU (fp32 11008x4096: F.linear 16.6 GB/s,
`w.sum()` 39.8 GB/s, quiet 2-core Zen 4). This kernel streams each row once per token group:
`block_rows` rows advance together through K in register-wide chunks (16 fp32 / 32 bf16), every x
chunk loaded once for those rows, products accumulated in fp32 (FMA; bf16 pairs with vdpbf16ps), the
lanes reduced once per row and token, the bias added and the result rounded once, as F.linear does.
Reads stay inside the row (K is a whole number of chunks, checked in `unsupported`).

Signature (1-D memrefs): (w [out_rows*K], x [T*K], bias f32 [out_rows], y [T*out_rows] in x's dtype,
row_begin, row_end, out_rows): rows [row_begin, row_end) of y, as the N:M decode kernel (codegen.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .codegen import ELEMENT, MAX_ACCUMULATORS, MAX_TOKENS, PASS_PIPELINE, REGISTER_BITS, TOKEN_GROUP
from .epilogue import store_output

__all__ = ["DenseSpec", "dense_kernel_text", "unsupported", "PASS_PIPELINE"]
BLOCK_ROWS = 4   # rows sharing each x load (4 independent streams; 4 x 4 tokens fill the accumulators)


@dataclass(frozen=True)
class DenseSpec:
    """Compile-time constants of one dense decode kernel."""
    dtype: str          # "float32" | "bfloat16"
    k: int              # in_features
    tokens: int
    block_rows: int = BLOCK_ROWS
    group: int = TOKEN_GROUP    # tokens accumulated per pass over a row block

    @property
    def lanes(self) -> int:
        return REGISTER_BITS // ELEMENT[self.dtype][1]

    @property
    def token_groups(self) -> list[tuple[int, int]]:
        return [(t, min(self.group, self.tokens - t)) for t in range(0, self.tokens, self.group)]

    @property
    def name(self) -> str:
        return f"dense_decode_{self.dtype}_k{self.k}_t{self.tokens}_r{self.block_rows}_g{self.group}"


def unsupported(spec: DenseSpec) -> Optional[str]:
    """Why no dense decode kernel exists for `spec`, or None."""
    if spec.dtype not in ELEMENT:
        return f"dtype {spec.dtype} (fp32 and bf16 only)"
    if spec.k % spec.lanes:
        return f"in_features={spec.k} is not a multiple of the {spec.lanes}-element register"
    if not 1 <= spec.tokens <= MAX_TOKENS:
        return f"{spec.tokens} tokens (decode kernel takes 1..{MAX_TOKENS})"
    if spec.block_rows * min(spec.group, spec.tokens) > MAX_ACCUMULATORS:
        return f"{spec.block_rows} rows x {spec.group} tokens exceed {MAX_ACCUMULATORS} accumulators"
    return None


def _products(spec: DenseSpec, p: str, rows: int, tokens: range) -> list[str]:
    """One chunk of K: load each token's x chunk and each row's weights once, accumulate every pair."""
    store = ELEMENT[spec.dtype][0]
    vec = f"vector<{spec.lanes}x{store}>"
    lines = [f"{p}k = arith.muli %chunk, %lanes : index"]
    for t in tokens:
        lines += [f"{p}xi{t} = arith.addi {p}k, %c{t * spec.k} : index",
                  f"{p}x{t} = vector.load %x[{p}xi{t}] : memref<?x{store}>, {vec}"]
    for j in range(rows):
        lines += [f"{p}wi{j} = arith.addi {p}wrow{j}, {p}k : index",
                  f"{p}w{j} = vector.load %w[{p}wi{j}] : memref<?x{store}>, {vec}"]
        for t in tokens:
            acc, out = f"{p}acc{j}_{t}", f"{p}next{j}_{t}"
            if spec.dtype == "float32":
                lines.append(f"{out} = vector.fma {p}w{j}, {p}x{t}, {acc} : {vec}")
                continue
            pairs = f"vector<{spec.lanes}xbf16>"
            lines += [f"{out}w = vector.bitcast {p}w{j} : {vec} to {pairs}",
                      f"{out}x = vector.bitcast {p}x{t} : {vec} to {pairs}",
                      f"{out} = x86.avx512.dot {acc}, {out}w, {out}x : {pairs} -> vector<16xf32>"]
    return lines


def _row_block(spec: DenseSpec, p: str, rows: int, group: tuple[int, int]) -> list[str]:
    """`rows` rows from %row (in scope) times one token group: the chunk loop, then the stores."""
    tokens = range(group[0], group[0] + group[1])
    accs = [(j, t) for j in range(rows) for t in tokens]
    types = ", ".join(["vector<16xf32>"] * len(accs))
    lines = []
    for j in range(rows):
        lines += [f"{p}r{j} = arith.addi %row, %c{j} : index",
                  f"{p}wrow{j} = arith.muli {p}r{j}, %k_elements : index"]
    iter_args = ", ".join(f"{p}acc{j}_{t} = %zero" for j, t in accs)
    lines += [f"{p}sums:{len(accs)} = scf.for %chunk = %c0 to %chunks step %c1 iter_args({iter_args}) -> ({types}) {{",
              *("  " + line for line in _products(spec, p, rows, tokens)),
              f"  scf.yield {', '.join(f'{p}next{j}_{t}' for j, t in accs)} : {types}",
              "}"]
    for i, (j, t) in enumerate(accs):
        lines += [f"{p}dot{j}_{t} = vector.reduction <add>, {p}sums#{i} fastmath<reassoc> : vector<16xf32> into f32",
                  f"{p}yt{j}_{t} = arith.muli %out_rows, %c{t} : index",
                  f"{p}yi{j}_{t} = arith.addi {p}yt{j}_{t}, {p}r{j} : index",
                  *store_output(spec.dtype, f"{p}{j}_{t}", f"{p}dot{j}_{t}", f"{p}r{j}", f"{p}yi{j}_{t}")]
    return lines


def _row_loop(spec: DenseSpec, p: str, rows: int, begin: str, end: str) -> list[str]:
    body = [line for g, group in enumerate(spec.token_groups) for line in _row_block(spec, f"{p}g{g}_", rows, group)]
    return [f"scf.for %row = {begin} to {end} step %c{rows} {{", *("  " + line for line in body), "}"]


def dense_kernel_text(spec: DenseSpec) -> str:
    """The whole MLIR module: full row blocks, then the leftover rows one at a time."""
    store, rows = ELEMENT[spec.dtype][0], spec.block_rows
    constants = sorted({0, 1, rows} | set(range(rows)) | {t * spec.k for t in range(spec.tokens)}
                       | set(range(spec.tokens)))
    lines = [f"func.func @{spec.name}(%w: memref<?x{store}>, %x: memref<?x{store}>, %bias: memref<?xf32>,",
             f"    %y: memref<?x{store}>, %row_begin: index, %row_end: index, %out_rows: index) {{",
             "  %zero = arith.constant dense<0.0> : vector<16xf32>",
             f"  %k_elements = arith.constant {spec.k} : index",
             f"  %chunks = arith.constant {spec.k // spec.lanes} : index",
             *(f"  %c{c} = arith.constant {c} : index" for c in constants),
             f"  %lanes = arith.constant {spec.lanes} : index",
             "  %span = arith.subi %row_end, %row_begin : index",
             f"  %leftover = arith.remui %span, %c{rows} : index",
             "  %blocks_end = arith.subi %row_end, %leftover : index"]
    lines += ("  " + line for line in _row_loop(spec, "%b", rows, "%row_begin", "%blocks_end"))
    lines += ("  " + line for line in _row_loop(spec, "%t", 1, "%blocks_end", "%row_end"))
    return "\n".join([*lines, "  return", "}"])
