"""The decode kernels' epilogue as MLIR text: lane reductions, the bias, rounding and the stores of y.

`store_output` writes one (row, token) sum, or a vector of row sums that `reduce_rows` made from a block
of rows at once. Shared by the N:M decode kernel (codegen.py) and the dense one (dense_codegen.py).
"""
from __future__ import annotations


def vector_literal(values: list[int]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def reduce_rows(p: str, totals: list[str], width: int) -> tuple[list[str], str]:
    """The lane sums of `totals` (R vector<width x f32>, R a power of two <= width) as one vector<R x f32>, in
    order: pairs of vectors are merged by two shuffles and an add (each row keeps half as many partial lanes)
    until one vector holds R groups, then each group is halved the same way down to one lane. R-1 merges and
    log2(width/R) halvings: ~3 instructions a row against ~8 for reducing each row alone (a 4-level tree)."""
    lines, vectors, groups, size, level = [], list(totals), 1, width, 0
    while len(vectors) > 1:
        half = size // 2
        firsts = [g * size + i for g in range(groups) for i in range(half)]
        lo = firsts + [width + i for i in firsts]
        hi = [i + half for i in lo]
        merged = []
        for n, (a, b) in enumerate(zip(vectors[::2], vectors[1::2])):
            q = f"{p}m{level}_{n}"
            pair = f"vector<{width}xf32>, vector<{width}xf32>"
            lines += [f"{q}lo = vector.shuffle {a}, {b} {vector_literal(lo)} : {pair}",
                      f"{q}hi = vector.shuffle {a}, {b} {vector_literal(hi)} : {pair}",
                      f"{q} = arith.addf {q}lo, {q}hi : vector<{width}xf32>"]
            merged.append(q)
        vectors, groups, size, level = merged, groups * 2, half, level + 1
    found, lanes = vectors[0], width
    while size > 1:
        half = size // 2
        lo = [g * size + i for g in range(groups) for i in range(half)]
        hi = [i + half for i in lo]
        q = f"{p}h{size}"
        pair = f"vector<{lanes}xf32>, vector<{lanes}xf32>"
        lines += [f"{q}lo = vector.shuffle {found}, {found} {vector_literal(lo)} : {pair}",
                  f"{q}hi = vector.shuffle {found}, {found} {vector_literal(hi)} : {pair}",
                  f"{q} = arith.addf {q}lo, {q}hi : vector<{lanes // 2}xf32>"]
        found, lanes, size = q, lanes // 2, half
    return lines, found


def store_output(dtype: str, q: str, value: str, row: str, index: str, rows: int = 0) -> list[str]:
    """y[index] = value + bias[row] for one f32 `value`, or with `rows` y[index + i] = value[i] + bias[row + i]
    for a vector<rows x f32> of row sums; rounded once to the output dtype (nearest even, as torch rounds)."""
    f32, half, bits = (f"vector<{rows}x{t}>" if rows else t for t in ("f32", "bf16", "i16"))
    load, store = ("vector.load", "vector.store") if rows else ("memref.load", "memref.store")
    lines = [f"{q}b = {load} %bias[{row}] : memref<?xf32>{f', {f32}' if rows else ''}",
             f"{q}out = arith.addf {value}, {q}b : {f32}"]
    if dtype == "float32":
        return lines + [f"{store} {q}out, %y[{index}] : memref<?xf32>{f', {f32}' if rows else ''}"]
    return lines + [f"{q}half = arith.truncf {q}out : {f32} to {half}",
                    f"{q}bits = arith.bitcast {q}half : {half} to {bits}",
                    f"{store} {q}bits, %y[{index}] : memref<?xi16>{f', {bits}' if rows else ''}"]
