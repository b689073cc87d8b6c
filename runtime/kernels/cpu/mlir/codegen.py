"""MLIR text of the N:M decode kernel: y[r, t] = sum_k W[r, k] * x[t, k] over compressed rows.

The kernel walks the stored layout of nm_format directly: no kernel-private metadata.
A *window* is V consecutive stored values of a row; they cover S = V*M/N dense
columns: the two x registers one permute reads (AVX-512: S = 32 for fp32, 64 for bf16;
AVX2: S = 16, fp32 only). Per window:

    positions  the window's V*BITS index bits (V*BITS/8 whole bytes, one masked load; AVX2, which
               masks no byte loads: one plain load of exactly 1, 2 or 4 bytes)
    lanes      lane i gets its BITS-bit position p_i: a constant byte shuffle moves the
               bytes holding bits [i*BITS, i*BITS+BITS) into lane i, a constant shift
               right drops the bits below, `& (M-1)` the bits above
    index_i    M*(i // N) + p_i: the dense column of value i inside the window
    x_i        two-register permute of the window's x (vpermi2ps / vpermi2w) by index_i; AVX2 has
               only a one-register permute (vpermps, low 3 index bits): it permutes each register
               and selects per lane on bit 3 of index_i (the compare once per row and window; for
               M <= 8 that bit is fixed per lane and LLVM makes the select a constant blend)
    acc_t     += values * x_i  (fp32: FMA; bf16: vdpbf16ps, pairs of products in fp32)

Any index content keeps every read inside the window (the permutes read registers),
so a corrupt index tensor gives wrong numbers, never an out-of-bounds access.
A block of 2+ rows reduces its rows' lanes together (`reduce_rows`: shuffles and adds into one vector
of row sums, stored at once) where one row alone takes a full lane reduction.
Signature (memrefs are 1-D, flattened): (values, indices u8, x [T*K], bias f32 [out_rows],
y [T*out_rows] in x's dtype, row_begin, row_end, out_rows); y[t*out_rows + r] for rows
[row_begin, row_end), rounded once from fp32 after the bias, as F.linear does. Writing y
here, not with torch ops after the call, matters: a torch op over y starts torch's OpenMP
workers, which then spin on the second core and slow the next call's helper thread.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ....nm_format import index_bits, nm_index_bytes
from .epilogue import reduce_rows, store_output, vector_literal

REGISTER_BITS = 512      # the AVX-512 form's (dense_codegen.py is AVX-512 only)
MAX_TOKENS = 16          # more tokens: the dense GEMM path
TOKEN_GROUP = 4          # tokens accumulated per pass over a row block
MAX_ACCUMULATORS = 16    # + one index and one values register per row + x + permute fit the 32 registers
MAX_BLOCK_ROWS = 4
COMPACT_BLOCKING = (8, 1)  # (rows, windows) at one token for a weight that stays in cache (nm_decode.MAX_COMPACT_BYTES)
WINDOW_BYTES_LOADED = 16  # AVX-512: a window's index bytes are read by one 16-byte masked load
PASS_PIPELINE = ("builtin.module(convert-scf-to-cf,convert-vector-to-llvm{enable-x86=true},"
                 "convert-arith-to-llvm,finalize-memref-to-llvm,convert-func-to-llvm,"
                 "convert-cf-to-llvm,reconcile-unrealized-casts)")
ELEMENT = {"float32": ("f32", 32), "bfloat16": ("i16", 16)}   # (storage type, bits) of values and x


@dataclass(frozen=True)
class VectorIsa:
    """What one form of the kernel is written for: register width, accumulators that fit the register
    file, and per dtype the permute intrinsic and how many x registers one call of it reads."""
    register_bits: int
    max_accumulators: int
    permutes: dict[str, str]
    permute_reads: int
    masked_byte_loads: bool     # AVX-512 BW: a masked byte load is one instruction (vmovdqu8)


ISAS = {   # widest first
    "avx512": VectorIsa(register_bits=REGISTER_BITS, max_accumulators=MAX_ACCUMULATORS,
                        permutes={"float32": "llvm.x86.avx512.vpermi2var.ps.512",
                                  "bfloat16": "llvm.x86.avx512.vpermi2var.hi.512"},
                        permute_reads=2, masked_byte_loads=True),
    # 16 registers: accumulators + the x pair + per row its indices, values and register select
    "avx2": VectorIsa(register_bits=256, max_accumulators=8, permutes={"float32": "llvm.x86.avx2.permps"},
                      permute_reads=1, masked_byte_loads=False),
}


@dataclass(frozen=True)
class DecodeSpec:
    """What a compiled decode kernel is specialised on: all compile-time constants.

    Blocking: `block_rows` rows share each x load, `unroll` windows run as independent
    accumulators, tokens go in groups of at most `group` (a row block's values are re-read
    from L1 per group); block_rows * unroll * group accumulators stay <= the form's max_accumulators."""
    dtype: str          # "float32" | "bfloat16"
    k: int              # in_features
    n: int
    m: int
    tokens: int
    block_rows: int = 0     # 0: chosen from the token count
    unroll: int = 0         # 0: chosen from the token count
    group: int = TOKEN_GROUP    # tokens accumulated per pass over a row block
    isa: str = "avx512"         # a key of ISAS: the instruction set the text is written for

    @property
    def lanes(self) -> int:
        return ISAS[self.isa].register_bits // ELEMENT[self.dtype][1]

    @property
    def window_values(self) -> int:
        return 2 * self.lanes * self.n // self.m

    @property
    def window_columns(self) -> int:
        return 2 * self.lanes

    @property
    def window_bytes(self) -> int:
        return self.window_values * index_bits(self.m) // 8

    @property
    def exact_index_bytes(self) -> Optional[int]:
        """Bytes of a plain index load, or None for the masked 16-byte load. Without masked byte loads LLVM
        splits one into a byte load and a vpinsrb per byte, so 1, 2 and 4 bytes are loaded as one scalar (3-6%
        faster: x86-64-v3 objects, 11008x4096, one thread, 2:4 1 token 6.12 vs 6.33 ms, 8 tokens 19.5 vs 20.8);
        3 (4:8 on AVX2) stay masked: a <3 x i8> load and its shuffle were split further (x86-64-v3 assembly)."""
        window = self.window_bytes
        return None if ISAS[self.isa].masked_byte_loads or window & (window - 1) else window

    @property
    def index_bytes_loaded(self) -> int:
        return self.exact_index_bytes or WINDOW_BYTES_LOADED

    @property
    def token_groups(self) -> list[tuple[int, int]]:
        """(first token, count) of each group."""
        return [(t, min(self.group, self.tokens - t)) for t in range(0, self.tokens, self.group)]

    @property
    def blocking(self) -> tuple[int, int]:
        """(rows per block, windows per loop step). One token: 2 windows in flight (memory bound;
        1-4 rows x 1-4 windows were within noise at 4096x4096). More tokens: 4 rows share each x
        load; at 11008x4096, 8 and 16 tokens, 4 rows x 4 tokens beat 2x8, 4x8, 8x2, 8x4 by 5-30%
        in fp32 and bf16 (one thread, fastest of 7), and software prefetch did not help. AVX2 (8
        accumulators: 2 rows x 4 tokens), x86-64-v3 objects, 2:4 11008x4096, 8 tokens, one thread, median
        of 9: 19.0 ms against 19.9-22.8 for 1x4, 4x2, 2x2, 1x8 and 2 windows x 1x4 or 2x2; at 16 tokens
        all were within 35-41 ms. A weight that stays in cache is given 8 rows x 1 window at one token
        by its caller (COMPACT_BLOCKING; measured in nm_decode beside MAX_COMPACT_BYTES)."""
        group = self.token_groups[0][1]
        even = (self.k // self.window_columns) % 2 == 0
        accumulators = ISAS[self.isa].max_accumulators
        default = (1, 2 if even else 1) if group == 1 else (max(1, min(MAX_BLOCK_ROWS, accumulators // group)), 1)
        return self.block_rows or default[0], self.unroll or default[1]

    @property
    def name(self) -> str:
        rows, unroll = self.blocking
        form = "" if self.isa == "avx512" else f"_{self.isa}"    # AVX-512 names as before the AVX2 form
        shape = f"{self.dtype}_k{self.k}_{self.n}of{self.m}_t{self.tokens}"
        return f"nm_decode_{shape}_r{rows}_u{unroll}_g{self.group}{form}"


def unsupported(spec: DecodeSpec) -> Optional[str]:
    """Why no decode kernel exists for `spec`, or None."""
    if spec.dtype not in ELEMENT:
        return f"dtype {spec.dtype} (fp32 and bf16 only)"
    if spec.isa not in ISAS:
        return f"instruction set {spec.isa!r} ({', '.join(ISAS)} only)"
    if spec.dtype not in ISAS[spec.isa].permutes:
        return f"{spec.dtype} decode has no {spec.isa} form (its dot product, vdpbf16ps, needs AVX512_BF16)"
    if spec.m % spec.n or spec.m & (spec.m - 1):
        return f"{spec.n}:{spec.m}: N and M must be powers of two"
    values, bits = spec.window_values, index_bits(spec.m)
    if values < 4 or values * bits % 8 or values * bits > 8 * WINDOW_BYTES_LOADED:
        return f"{spec.n}:{spec.m}: a window of {values} values does not hold whole index bytes"
    if spec.dtype == "bfloat16" and values < 8:   # vdpbf16ps sums value pairs into 4, 8 or 16 fp32 lanes
        return f"{spec.n}:{spec.m} bf16: a window of {values} values fills fewer than 4 dot-product lanes"
    if spec.k % spec.window_columns:
        return f"in_features={spec.k} is not a multiple of the {spec.window_columns}-column window"
    if not 1 <= spec.tokens <= MAX_TOKENS:
        return f"{spec.tokens} tokens (decode kernel takes 1..{MAX_TOKENS})"
    rows, unroll = spec.blocking
    windows, accumulators = spec.k // spec.window_columns, rows * unroll * spec.token_groups[0][1]
    if rows < 1 or unroll < 1 or windows % unroll:     # the loop steps `unroll` windows: never past a row's end
        return f"blocking {rows} rows x {unroll} windows: unroll must divide the {windows} windows of a row"
    fit = ISAS[spec.isa].max_accumulators
    if accumulators > fit:
        return f"{accumulators} accumulators exceed the {fit} that fit {spec.isa}'s registers"
    return None


def lane_constants(spec: DecodeSpec) -> tuple[list[int], list[int], list[int]]:
    """(byte shuffle mask, shift per lane, dense-column base per lane) of the index builder."""
    lane_bytes, bits = ELEMENT[spec.dtype][1] // 8, index_bits(spec.m)
    shuffle, shifts, bases = [], [], []
    for lane in range(spec.lanes):
        value = lane if lane < spec.window_values else 0   # lanes past the window are never used
        first_bit = value * bits
        shuffle += [min(first_bit // 8 + b, spec.index_bytes_loaded - 1) for b in range(lane_bytes)]
        shifts.append(first_bit % 8)
        bases.append(spec.m * (value // spec.n))
    return shuffle, shifts, bases


def index_constant_lines(spec: DecodeSpec, lane_t: str) -> list[str]:
    """The constants `index_lines` uses: row strides, window byte mask, shifts, in-group mask, bases."""
    _, shifts, bases = lane_constants(spec)
    masked = [f"%byte_mask = vector.constant_mask [{spec.window_bytes}] : vector<{WINDOW_BYTES_LOADED}xi1>",
              f"%no_bytes = arith.constant dense<0> : vector<{WINDOW_BYTES_LOADED}xi8>"]
    return [f"%row_values = arith.constant {spec.k * spec.n // spec.m} : index",
            f"%row_bytes = arith.constant {nm_index_bytes(spec.k, spec.n, spec.m)} : index",
            f"%window_values = arith.constant {spec.window_values} : index",
            f"%window_bytes = arith.constant {spec.window_bytes} : index",
            *(masked if spec.exact_index_bytes is None else []),
            f"%shifts = arith.constant dense<{vector_literal(shifts)}> : {lane_t}",
            f"%in_group = arith.constant dense<{spec.m - 1}> : {lane_t}",
            f"%bases = arith.constant dense<{vector_literal(bases)}> : {lane_t}"]


def _header(spec: DecodeSpec) -> list[str]:
    store, _ = ELEMENT[spec.dtype]
    select = [f"  %register_bit = arith.constant dense<{spec.lanes}> : {_lane_t(spec)}",   # index_i & lanes:
              f"  %no_lanes = arith.constant dense<0> : {_lane_t(spec)}"]               # which x register
    return [f"func.func @{spec.name}(%values: memref<?x{store}>, %indices: memref<?xi8>, %x: memref<?x{store}>,",
            f"    %bias: memref<?xf32>, %y: memref<?x{store}>, %row_begin: index, %row_end: index, %out_rows: index) {{",
            *("  " + line for line in index_constant_lines(spec, _lane_t(spec))),
            f"  %windows = arith.constant {spec.k // spec.window_columns} : index",
            f"  %window_columns = arith.constant {spec.window_columns} : index",
            f"  %zero = arith.constant dense<0.0> : {_acc_type(spec)}",
            *(select if ISAS[spec.isa].permute_reads == 1 else [])]


def _acc_lanes(spec: DecodeSpec) -> int:
    """fp32 lanes of an accumulator: one per window value (bf16: one per pair, vdpbf16ps)."""
    return spec.window_values if spec.dtype == "float32" else spec.window_values // 2


def _acc_type(spec: DecodeSpec) -> str:
    return f"vector<{_acc_lanes(spec)}xf32>"


def _lane_t(spec: DecodeSpec) -> str:
    return f"vector<{spec.lanes}x{'i32' if spec.dtype == 'float32' else 'i16'}>"


def index_lines(q: str, byte_index: str, shuffle: list[int], lane_t: str,
                exact_bytes: Optional[int] = None) -> list[str]:
    """Build `{q}ix`, the window's permute indices, from its index bytes at %indices[byte_index]: one masked
    16-byte load, or with `exact_bytes` a plain load of that many bytes."""
    if exact_bytes is None:
        byte_t = f"vector<{WINDOW_BYTES_LOADED}xi8>"
        load = (f"{q}raw = vector.maskedload %indices[{byte_index}], %byte_mask, %no_bytes : memref<?xi8>, "
                f"vector<{WINDOW_BYTES_LOADED}xi1>, {byte_t} into {byte_t}")
    else:
        byte_t = f"vector<{exact_bytes}xi8>"
        load = f"{q}raw = vector.load %indices[{byte_index}] : memref<?xi8>, {byte_t}"
    return [
        load,
        f"{q}spread = vector.shuffle {q}raw, {q}raw {vector_literal(shuffle)} : {byte_t}, {byte_t}",
        f"{q}lanes = vector.bitcast {q}spread : vector<{len(shuffle)}xi8> to {lane_t}",
        f"{q}shifted = arith.shrui {q}lanes, %shifts : {lane_t}",
        f"{q}pos = arith.andi {q}shifted, %in_group : {lane_t}",
        f"{q}ix = arith.ori {q}pos, %bases : {lane_t}",
    ]


def _window_rows(spec: DecodeSpec, p: str, u: int, rows: int, shuffle: list[int]) -> list[str]:
    """Window `%w + u` of each row of the block: its permute indices and its values."""
    store, _ = ELEMENT[spec.dtype]
    lines = [f"{p}w{u} = arith.addi {p}w, %c{u} : index",
             f"{p}vo{u} = arith.muli {p}w{u}, %window_values : index",
             f"{p}bo{u} = arith.muli {p}w{u}, %window_bytes : index",
             f"{p}xo{u} = arith.muli {p}w{u}, %window_columns : index"]
    for j in range(rows):
        q = f"{p}{j}_{u}"
        lines += [f"{q}vi = arith.addi {p}value_row{j}, {p}vo{u} : index",
                  f"{q}bi = arith.addi {p}index_row{j}, {p}bo{u} : index",
                  *index_lines(q, f"{q}bi", shuffle, _lane_t(spec), spec.exact_index_bytes),
                  f"{q}wv = vector.load %values[{q}vi] : memref<?x{store}>, vector<{spec.window_values}x{store}>"]
        if ISAS[spec.isa].permute_reads == 1:
            lines += [f"{q}bit = arith.andi {q}ix, %register_bit : {_lane_t(spec)}",
                      f"{q}second = arith.cmpi ne, {q}bit, %no_lanes : {_lane_t(spec)}"]
    return lines


def _token_products(spec: DecodeSpec, p: str, u: int, t: int, rows: int) -> list[str]:
    """Load token t's window of x once, permute it for each row, accumulate."""
    q, store = f"{p}{u}_{t}", ELEMENT[spec.dtype][0]
    wide, vals = f"vector<{spec.lanes}x{store}>", f"vector<{spec.window_values}x{store}>"
    lines = [f"{q}xt = arith.addi {p}xo{u}, %c{t * spec.k} : index",
             f"{q}xh = arith.addi {q}xt, %c{spec.lanes} : index",
             f"{q}xa = vector.load %x[{q}xt] : memref<?x{store}>, {wide}",
             f"{q}xb = vector.load %x[{q}xh] : memref<?x{store}>, {wide}"]
    for j in range(rows):
        r, g = f"{p}{j}_{u}", f"{p}{j}_{u}_{t}g"
        lines += _permute(spec, g, q, r, wide)
        if spec.window_values < spec.lanes:
            lines.append(f"{g}s = vector.extract_strided_slice {g} {{offsets = [0], sizes = [{spec.window_values}], "
                         f"strides = [1]}} : {wide} to {vals}")
            g += "s"
        lines += _accumulate(spec, f"{p}acc{j}_{u}_{t}", f"{p}next{j}_{u}_{t}", f"{r}wv", g, vals)
    return lines


def _permute(spec: DecodeSpec, g: str, q: str, r: str, wide: str) -> list[str]:
    """`g`: lane i = column index_i of the window's x registers `q`xa, `q`xb (row `r`'s indices)."""
    isa, lane_t = ISAS[spec.isa], _lane_t(spec)
    permute = isa.permutes[spec.dtype]
    if isa.permute_reads == 2:
        return [f'{g} = llvm.call_intrinsic "{permute}"({q}xa, {r}ix, {q}xb) : ({wide}, {lane_t}, {wide}) -> {wide}']
    return [f'{g}a = llvm.call_intrinsic "{permute}"({q}xa, {r}ix) : ({wide}, {lane_t}) -> {wide}',
            f'{g}b = llvm.call_intrinsic "{permute}"({q}xb, {r}ix) : ({wide}, {lane_t}) -> {wide}',
            f"{g} = arith.select {r}second, {g}b, {g}a : vector<{spec.lanes}xi1>, {wide}"]


def _accumulate(spec: DecodeSpec, acc: str, out: str, weights: str, xs: str, vals: str) -> list[str]:
    if spec.dtype == "float32":
        return [f"{out} = vector.fma {weights}, {xs}, {acc} : {vals}"]
    pairs = f"vector<{spec.window_values}xbf16>"
    return [f"{out}w = vector.bitcast {weights} : {vals} to {pairs}",
            f"{out}x = vector.bitcast {xs} : {vals} to {pairs}",
            f"{out} = x86.avx512.dot {acc}, {out}w, {out}x : {pairs} -> {_acc_type(spec)}"]


def _row_block(spec: DecodeSpec, p: str, rows: int, unroll: int, group: tuple[int, int]) -> list[str]:
    """`rows` rows from %row (in scope) times one token group: the window loop and the stores."""
    shuffle, _, _ = lane_constants(spec)
    tokens = range(group[0], group[0] + group[1])
    accs = [(j, u, t) for j in range(rows) for u in range(unroll) for t in tokens]
    types = ", ".join([_acc_type(spec)] * len(accs))
    lines = []
    for j in range(rows):
        lines += [f"{p}r{j} = arith.addi %row, %c{j} : index",
                  f"{p}value_row{j} = arith.muli {p}r{j}, %row_values : index",
                  f"{p}index_row{j} = arith.muli {p}r{j}, %row_bytes : index"]
    body = []
    for u in range(unroll):
        body += _window_rows(spec, p, u, rows, shuffle)
        for t in tokens:
            body += _token_products(spec, p, u, t, rows)
    iter_args = ", ".join(f"{p}acc{j}_{u}_{t} = %zero" for j, u, t in accs)
    lines += [f"{p}sums:{len(accs)} = scf.for {p}w = %c0 to %windows step %c{unroll} iter_args({iter_args}) "
              f"-> ({types}) {{",
              *("  " + line for line in body),
              f"  scf.yield {', '.join(f'{p}next{j}_{u}_{t}' for j, u, t in accs)} : {types}",
              "}"]
    return lines + _store_sums(spec, p, accs)


def _store_sums(spec: DecodeSpec, p: str, accs: list[tuple[int, int, int]]) -> list[str]:
    """Add up each (row, token)'s unrolled accumulators, reduce the lanes, add the bias, store y[t*out_rows + r]:
    a block of 2+ rows (a power of two, at most the accumulator's lanes) reduces its rows together and stores
    them as one vector per token (`reduce_rows`), a single row reduces its lanes alone."""
    acc_t, lines = _acc_type(spec), []
    rows, unrolled = 1 + max(a[0] for a in accs), 1 + max(a[1] for a in accs)
    totals = {}
    for j, _, t in (a for a in accs if a[1] == 0):
        total = f"{p}sums#{accs.index((j, 0, t))}"
        for u in range(1, unrolled):
            lines.append(f"{p}part{j}_{u}_{t} = arith.addf {total}, {p}sums#{accs.index((j, u, t))} : {acc_t}")
            total = f"{p}part{j}_{u}_{t}"
        totals[j, t] = total
    width = _acc_lanes(spec)
    for t in sorted({t for _, t in totals}):
        if rows > 1 and rows & (rows - 1) == 0 and rows <= width:
            sums, found = reduce_rows(f"{p}t{t}_", [totals[j, t] for j in range(rows)], width)
            lines += [*sums, f"{p}yt_{t} = arith.muli %out_rows, %c{t} : index",
                      f"{p}yi_{t} = arith.addi {p}yt_{t}, {p}r0 : index",
                      *store_output(spec.dtype, f"{p}v{t}_", found, f"{p}r0", f"{p}yi_{t}", rows)]
            continue
        for j in range(rows):
            lines += [f"{p}dot{j}_{t} = vector.reduction <add>, {totals[j, t]} fastmath<reassoc> : {acc_t} into f32",
                      f"{p}yt{j}_{t} = arith.muli %out_rows, %c{t} : index",
                      f"{p}yi{j}_{t} = arith.addi {p}yt{j}_{t}, {p}r{j} : index",
                      *store_output(spec.dtype, f"{p}{j}_{t}", f"{p}dot{j}_{t}", f"{p}r{j}", f"{p}yi{j}_{t}")]
    return lines


def _row_loop(spec: DecodeSpec, p: str, rows: int, unroll: int, begin: str, end: str) -> list[str]:
    body = [line for g, group in enumerate(spec.token_groups)
            for line in _row_block(spec, f"{p}g{g}_", rows, unroll, group)]
    return [f"scf.for %row = {begin} to {end} step %c{rows} {{", *("  " + line for line in body), "}"]


def decode_kernel_text(spec: DecodeSpec) -> str:
    """The whole MLIR module (func/arith/vector/memref/scf + the x86 permute and bf16 dot)."""
    rows, unroll = spec.blocking
    constants = sorted({spec.lanes, spec.tokens} | set(range(max(rows, unroll, spec.tokens) + 1))
                       | {t * spec.k for t in range(spec.tokens)})
    lines = [*_header(spec), *(f"  %c{c} = arith.constant {c} : index" for c in constants)]
    if rows == 1:
        lines += ("  " + line for line in _row_loop(spec, "%b", 1, unroll, "%row_begin", "%row_end"))
    else:
        lines += ["  %span = arith.subi %row_end, %row_begin : index",
                  f"  %leftover = arith.remui %span, %c{rows} : index",
                  "  %blocks_end = arith.subi %row_end, %leftover : index"]
        lines += ("  " + line for line in _row_loop(spec, "%b", rows, unroll, "%row_begin", "%blocks_end"))
        lines += ("  " + line for line in _row_loop(spec, "%t", 1, unroll, "%blocks_end", "%row_end"))
    return "\n".join([*lines, "  return", "}"])
