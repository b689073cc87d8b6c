"""CPU kernel for sparsecc::block_attention: ATen's CPU flash attention over pieces of the layout.

`aten._scaled_dot_product_flash_attention_for_cpu` returns each row's
logsumexp beside its output, so attention over disjoint sets of keys merges
exactly: with (o_p, lse_p) per piece p of a row,

    lse = log sum_p exp(lse_p),    o = sum_p exp(lse_p - lse) o_p     (one lerp per piece)

A piece is one flash call, over strided views of q, k, v (no copies) or over
gathered blocks:

    run       full key blocks [s, s+L) for query blocks q0, q0+d, ..., q0+(n-1)d whose
              runs start at s, s+e, ..., (e = 0 or d): the query blocks form a dimension
              of the call, or one slice of rows when d = 1 and e = 0. A band (e = d = 1)
              whose blocks are each followed by their causal diagonal block takes it
              along under one shared additive mask.
    diagonal  the aligned diagonal blocks under the exact causal triangle (the causal
              rule, or a mask or rule checked to equal it): flash's own causal path
    gathered  the remaining partial blocks of every query block, gathered and padded to
              the most any block has, under the per-element mask as an additive -inf
              mask; also the full blocks of a slice whose runs are scattered (top-k)

Partial blocks' elements come from one `attention_sources` source (the mask, the rule, or the
causal rule), evaluated only at the elements a piece reads.

With fewer query rows than a block (decode, short chunks) every block is partial (rows past S count
as masked), so `_direct` instead reads the listed key blocks in place: one flash call per run of
consecutive blocks under an additive mask over that run's keys, no gather.

Full runs longer than CHUNK_KEYS are cut, from their end, into CHUNK_KEYS
pieces: the causal staircase then becomes a few bands and a piece's keys stay
in cache. With threshold > 0 or softcap > 0 `_blockwise` visits the blocks one by one in
order (full, then partial) and skips as the op's semantics say (plain torch,
slow: it exists for exactness, the Triton kernel is where skipping pays); softcap needs the logits
themselves, which flash never returns. Sinks fold in after the merge, from each row's lse.

Heads: a layout slice (one Bm, Hm entry) covers a set of (batch, query head)
pairs, described as two axes over the flat heads of q [B*Hq] and k [B*Hkv]
(`HeadSet`); with GQA the inner axis walks the Hq/Hkv query heads of one kv
head with k step 0, so k and v are never repeated (gathered pieces copy only
the blocks they use).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...attention_layout import Layout
from ..attention_contract import block_attention_problem
from ..checks import refuse
from .attention_runs import Run, plan_runs, progressions, runs_of
from .attention_sources import MaskSourceT, mask_source

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
CHUNK_KEYS = 1024  # keys per cut piece of a long full run: K and V of one head stay in L2
GATHER_RUNS = 16   # more run calls than this, averaging under GATHER_BELOW full blocks: gather instead
GATHER_BELOW = 8


class Axis(NamedTuple):
    size: int
    q_step: int  # in flat query heads (b*Hq + h)
    k_step: int  # in flat kv heads (b*Hkv + h // groups)


class HeadSet(NamedTuple):
    q_head: int
    k_head: int
    outer: Axis
    inner: Axis


class Problem(NamedTuple):
    q: Tensor             # [B*Hq, NQ*rows, D], rows = min(block_q, S)
    k: Tensor             # [B*Hkv, NK*block_k, D]
    v: Tensor             # [B*Hkv, NK*block_k, Dv]
    out: Tensor           # fp32 [B*Hq, NQ*rows, Dv], merged so far
    lse: Tensor           # fp32 [B*Hq, NQ*rows], -inf where nothing was seen yet
    source: MaskSourceT   # the elements of partial blocks
    seq: int
    keys: int
    heads: int
    rows: int
    block_k: int
    scale: float
    softcap: float        # 0: off; else the logits pass through softcap * tanh(. / softcap)


def head_sets(batch: int, heads: int, kv_heads: int, slice_b: Optional[int], slice_h: Optional[int]) -> HeadSet:
    """The (batch, head) pairs of a layout slice; None = every batch / every head."""
    groups, batches = heads // kv_heads, batch if slice_b is None else 1
    b0 = slice_b or 0
    if slice_h is not None:
        return HeadSet(b0 * heads + slice_h, b0 * kv_heads + slice_h // groups,
                       Axis(batches, heads, kv_heads), Axis(1, 0, 0))
    return HeadSet(b0 * heads, b0 * kv_heads, Axis(batches * kv_heads, groups, 1), Axis(groups, 1, 0))


def strided(t: Tensor, head: int, axes: list[tuple[int, int, int]], row: int, rows: int) -> Tensor:
    """View [*sizes, rows, *tail] of contiguous t [heads, L, *tail]; axes are (size, head step, row step)."""
    per_row = math.prod(t.shape[2:])
    per_head = t.shape[1] * per_row
    shape = [n for n, _, _ in axes] + [rows, *t.shape[2:]]
    strides = [h * per_head + r * per_row for _, h, r in axes] + [per_row, *t.stride()[2:]]
    return t.as_strided(shape, strides, head * per_head + row * per_row)


def merge_into(out: Tensor, lse: Tensor, piece_out: Tensor, piece_lse: Tensor) -> None:
    """Add a normalised partial attention of the same rows to (out, lse), fp32, in place: the two
    weights exp(lse - total) and exp(piece_lse - total) sum to one, so this is one lerp."""
    total = torch.logaddexp(lse, piece_lse)
    safe = total.masked_fill(total == float("-inf"), 0.0)  # rows that have seen nothing stay 0
    out.lerp_(piece_out.to(out.dtype), torch.exp(piece_lse - safe)[..., None])
    lse.copy_(total)


def softcapped(logits: Tensor, softcap: float) -> Tensor:
    """softcap * tanh(logits / softcap) (Gemma2's logit softcapping); 0 leaves the logits as they are."""
    return torch.tanh(logits / softcap) * softcap if softcap > 0 else logits


def with_sinks(out: Tensor, lse: Tensor, sinks: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(out, lse) [B, Hq, S(, Dv)] with one more logit per head, sinks [Hq], whose value vector is 0: the
    sink takes exp(sink - lse') of each row's weight, lse' = logaddexp(lse, sink) is finite everywhere."""
    if sinks is None:
        return out, lse
    total = torch.logaddexp(lse, sinks.float().to(lse.device)[:, None])
    return out * torch.exp(lse - total)[..., None], total


def fill_empty_rows(out: Tensor, lse: Tensor, v: Tensor, empty_rows: str) -> Tensor:
    """out [B, Hq, S, Dv] with the rows that saw no key (lse = -inf) set as `empty_rows` says."""
    empty = (lse == float("-inf"))[..., None]
    if not empty.any():
        return out
    if empty_rows == "uniform":
        fill = v.float().mean(2).repeat_interleave(out.shape[1] // v.shape[1], 1)[:, :, None, :]
    else:
        fill = torch.tensor(0.0 if empty_rows == "zero" else float("nan"), device=out.device)
    return torch.where(empty, fill, out)


def _axes(hs: HeadSet, side: str) -> list[tuple[int, int, int]]:
    """The two head axes of a head set as (size, head step, row step) over q's or k's flat heads."""
    pick = (lambda a: a.q_step) if side == "q" else (lambda a: a.k_step)
    return [(hs.outer.size, pick(hs.outer), 0), (hs.inner.size, pick(hs.inner), 0)]


def _attend(p: Problem, heads: tuple[int, int], axes: tuple[list, list], rows: tuple[int, int],
            keys: tuple[int, int], causal: bool, bias: Optional[Tensor], fresh: bool) -> None:
    """One flash call over 4-d views of q and k/v (causal: top-left within the piece; bias: an additive
    mask broadcast over the batch and heads), merged into the accumulators in place."""
    (q_head, k_head), (q_axes, k_axes) = heads, axes
    q = strided(p.q, q_head, q_axes, *rows)
    k, v = (strided(t, k_head, k_axes, *keys) for t in (p.k, p.v))
    piece_out, piece_lse = _flash(q, k, v, is_causal=causal, attn_mask=bias, scale=p.scale)
    _accumulate(strided(p.out, q_head, q_axes, *rows), strided(p.lse, q_head, q_axes, *rows), piece_out, piece_lse,
                fresh)


def _accumulate(out: Tensor, lse: Tensor, piece_out: Tensor, piece_lse: Tensor, fresh: bool) -> None:
    """Write the first piece of these rows (fresh), or merge a later one into them."""
    if fresh:
        out.copy_(piece_out)
        lse.copy_(piece_lse)
    else:
        merge_into(out, lse, piece_out, piece_lse)


def _run(p: Problem, hs: HeadSet, run: Run, causal: bool, bias: Optional[Tensor], fresh: bool) -> None:
    keys = (run.start * p.block_k, run.length * p.block_k)
    if run.q_step == 1 and run.key_step == 0:  # consecutive query blocks, same keys: one slice of rows
        _attend(p, (hs.q_head, hs.k_head), (_axes(hs, "q"), _axes(hs, "k")),
                (run.first * p.rows, run.count * p.rows), keys, causal, bias, fresh)
        return
    q_entries = (run.count, 0, run.q_step * p.rows)
    k_entries = (run.count, 0, run.key_step * p.block_k)
    q_outer, k_outer = _axes(hs, "q")[0], _axes(hs, "k")[0]
    for i in range(hs.inner.size):  # the query blocks take the heads dimension, so GQA groups loop
        heads = (hs.q_head + i * hs.inner.q_step, hs.k_head + i * hs.inner.k_step)
        # heads outermost: flash walks one head's overlapping key ranges in turn, which stay in cache
        _attend(p, heads, ([q_outer, q_entries], [k_outer, k_entries]), (run.first * p.rows, p.rows), keys,
                causal, bias, fresh)


def _visibility(p: Problem, hs: HeadSet, q_blocks: Tensor, k_blocks: Tensor, valid: Tensor) -> Tensor:
    """Bool [E, O|1, I|1, rows, P*block_k]: which elements of the gathered partial blocks [E, P] may attend."""
    device = q_blocks.device
    rows = q_blocks[:, None] * p.rows + torch.arange(p.rows, device=device)                  # [E, rows]
    cols = (k_blocks[:, :, None] * p.block_k + torch.arange(p.block_k, device=device)).flatten(1)  # [E, P*bk]
    ok = (rows < p.seq)[:, :, None] & ((cols < p.keys) & valid.repeat_interleave(p.block_k, 1))[:, None, :]
    flat = (hs.q_head + torch.arange(hs.outer.size, device=device)[:, None] * hs.outer.q_step
            + torch.arange(hs.inner.size, device=device)[None, :] * hs.inner.q_step)     # [O, I] flat q heads
    return p.source.values(flat, rows.clamp(max=p.seq - 1), cols.clamp(max=p.keys - 1)) & ok[:, None, None]


def _gather_kv(p: Problem, hs: HeadSet, k_blocks: Tensor) -> tuple[Tensor, Tensor]:
    """k, v of the gathered key blocks [E, P] as [E, O, I, P*block_k, D] (I: a stride-0 view)."""
    entries, per_entry = k_blocks.shape
    outer = hs.outer

    def gather(t: Tensor) -> Tensor:
        blocks = strided(t, hs.k_head, [(t.shape[1] // p.block_k, 0, p.block_k), (outer.size, outer.k_step, 0)],
                         0, p.block_k).index_select(0, k_blocks.flatten())             # [E*P, O, bk, D]
        blocks = blocks.view(entries, per_entry, outer.size, p.block_k, -1).transpose(1, 2)
        return blocks.reshape(entries, outer.size, 1, per_entry * p.block_k, -1).expand(
            -1, -1, hs.inner.size, -1, -1)
    return gather(p.k), gather(p.v)


def _padded_table(lists: list[list[int]], device) -> tuple[Tensor, Tensor]:
    """([E, P] long, [E, P] valid) of ragged lists, padded with each list's first block (block 0 when
    empty): a padding slot re-reads a listed block, never an absent one (padded keys stay unread)."""
    width = max(1, max(len(x) for x in lists))
    table = torch.tensor([x + x[:1] * (width - len(x)) if x else [0] * width for x in lists], dtype=torch.long,
                         device=device)
    valid = torch.tensor([[True] * len(x) + [False] * (width - len(x)) for x in lists], device=device)
    return table, valid


def _gathered(p: Problem, hs: HeadSet, lists: dict[int, list[int]], full: bool, fresh: bool) -> None:
    """The listed key blocks of each listed query block (all full, or all partial), gathered and padded:
    one flash call under an additive -inf mask (per key for full blocks, per element for partial ones),
    merged into the accumulators in place (written, when fresh)."""
    device = p.q.device
    q_blocks = torch.tensor(list(lists), dtype=torch.long, device=device)
    k_blocks, valid = _padded_table(list(lists.values()), device)
    entries, (o, i) = len(lists), (hs.outer.size, hs.inner.size)
    shape = (entries, o) if i == 1 else (entries * o, i)  # heads as flash heads unless GQA needs a loop-free fold
    q_axes = [(p.q.shape[1] // p.rows, 0, p.rows), *_axes(hs, "q")]
    q = strided(p.q, hs.q_head, q_axes, 0, p.rows).index_select(0, q_blocks)
    k, v = _gather_kv(p, hs, k_blocks)
    if full:  # full blocks: only padding slots are masked, the same for every row
        visible = valid.repeat_interleave(p.block_k, 1)[:, None, None, None, :]
    else:
        visible = _visibility(p, hs, q_blocks, k_blocks, valid)
    bias = torch.zeros((), dtype=q.dtype).masked_fill(~visible, float("-inf"))  # [E, O|1, I|1, rows|1, keys]
    if i > 1:  # flash batch is (entry, outer head): a mask shared by the outer heads is repeated
        bias = bias.expand(entries, o, *bias.shape[2:])
    bias = bias.reshape(shape[0], -1, *bias.shape[3:])
    piece_out, piece_lse = _flash(q.reshape(*shape, p.rows, -1), k.reshape(*shape, *k.shape[3:]),
                                  v.reshape(*shape, *v.shape[3:]), attn_mask=bias, scale=p.scale)
    piece_out = piece_out.reshape(entries, o, i, p.rows, -1)
    piece_lse = piece_lse.reshape(entries, o, i, p.rows)
    if not full:
        piece_lse = piece_lse.masked_fill(~visible.any(-1), float("-inf"))
    out, lse = strided(p.out, hs.q_head, q_axes, 0, p.rows), strided(p.lse, hs.q_head, q_axes, 0, p.rows)
    if not fresh:
        merged_out, merged_lse = out[q_blocks], lse[q_blocks]
        merge_into(merged_out, merged_lse, piece_out, piece_lse)
        piece_out, piece_lse = merged_out, merged_lse
    out[q_blocks], lse[q_blocks] = piece_out.to(out.dtype), piece_lse


def _blockwise(p: Problem, hs: HeadSet, orders: list[list[int]], partial_counts: list[int],
               threshold: float) -> None:
    """Online softmax over each query block's key blocks in order (full, then partial) on explicit
    (softcapped) logits, skipping a block when threshold > 0 and, for every row, its largest logit is
    below log(threshold) + the running maximum."""
    device, nq = p.q.device, len(orders)
    k_blocks, valid = _padded_table(orders, device)
    is_partial = torch.arange(k_blocks.shape[1], device=device) >= (valid.sum(1) - torch.tensor(
        partial_counts, device=device))[:, None]
    q_axes = [(nq, 0, p.rows), *_axes(hs, "q")]
    q = strided(p.q, hs.q_head, q_axes, 0, p.rows).float()                 # [NQ, O, I, rows, D]
    q_blocks = torch.arange(nq, device=device)
    in_rows = (q_blocks[:, None] * p.rows + torch.arange(p.rows, device=device) < p.seq)[:, None, None, :, None]
    run_max = torch.full(q.shape[:-1], float("-inf"), device=device)
    total, acc = torch.zeros_like(run_max), torch.zeros(*q.shape[:-1], p.v.shape[-1], device=device)
    for t in range(k_blocks.shape[1]):
        k, v = (x.float() for x in _gather_kv(p, hs, k_blocks[:, t:t + 1]))
        logits = softcapped(q @ k.transpose(-1, -2) * p.scale, p.softcap)  # [NQ, O, I, rows, bk]
        seen = _visibility(p, hs, q_blocks, k_blocks[:, t:t + 1], valid[:, t:t + 1])
        full = valid[:, t, None, None, None, None] & in_rows
        seen = torch.where(is_partial[:, t, None, None, None, None], seen, full)
        logits = logits.masked_fill(~seen, float("-inf"))
        block_max = logits.amax(-1)
        gap = torch.where(block_max == float("-inf"), float("-inf"), block_max - run_max)
        keep = gap.amax(-1, keepdim=True) >= (math.log(threshold) if threshold > 0 else float("-inf"))
        new_max = torch.where(keep, torch.maximum(run_max, block_max), run_max)
        safe = new_max.masked_fill(new_max == float("-inf"), 0.0)
        prob = torch.exp(logits - safe[..., None]) * keep[..., None]
        alpha = torch.exp(run_max - safe)
        total, acc, run_max = total * alpha + prob.sum(-1), acc * alpha[..., None] + prob @ v, new_max
    lse = torch.where(total > 0, run_max + torch.log(total), float("-inf"))
    strided(p.out, hs.q_head, q_axes, 0, p.rows).copy_(acc / total.clamp_min(1e-30)[..., None])
    strided(p.lse, hs.q_head, q_axes, 0, p.rows).copy_(lse)


def _problem(q: Tensor, k: Tensor, v: Tensor, source: MaskSourceT, scale: float, block_q: int,
             block_k: int, softcap: float) -> Problem:
    """Flat, contiguous, block-padded operands and fresh accumulators."""
    batch, heads, seq, _ = q.shape
    rows = min(block_q, seq)
    q_len, k_len = math.ceil(seq / rows) * rows, math.ceil(k.shape[2] / block_k) * block_k

    def flat(t: Tensor, length: int) -> Tensor:
        t = F.pad(t, (0, 0, 0, length - t.shape[2])) if length > t.shape[2] else t
        return t.reshape(-1, length, t.shape[3]).contiguous()
    out = torch.empty(batch * heads, q_len, v.shape[3], device=q.device)  # `_clear` sets what no piece writes
    lse = torch.empty(batch * heads, q_len, device=q.device)
    return Problem(flat(q, q_len), flat(k, k_len), flat(v, k_len), out, lse, source, seq, k.shape[2], heads,
                   rows, block_k, scale, softcap)


def _causal_diagonals(p: Problem, partial: dict[int, list[int]], exact: list[bool]) -> set[int]:
    """Query blocks whose only partial block is the aligned diagonal block, where `exact` says that block
    is the causal triangle for every head of the slice: flash's causal path serves them."""
    if p.rows != p.block_k or (p.keys - p.seq) % p.block_k:
        return set()
    shift = (p.keys - p.seq) // p.block_k
    return {qb for qb, blocks in partial.items() if blocks == [qb + shift] and exact[qb]}


def _triangles(p: Problem) -> Optional[Tensor]:
    """Bool [Bm, Hm, NQ'] from the source: is the aligned diagonal block of query block qb exactly the causal
    triangle (for the NQ' query blocks whose diagonal block is whole)? None when blocks are not aligned."""
    if p.rows != p.block_k or (p.keys - p.seq) % p.block_k:
        return None
    shift = (p.keys - p.seq) // p.block_k
    return p.source.diagonals(p.block_k, shift, max(0, min(p.seq // p.block_k, p.keys // p.block_k - shift)))


def _slice_triangles(triangles: Optional[Tensor], nq: int, b: Optional[int], h: Optional[int]) -> list[bool]:
    """Per query block of one layout slice (batch b, head h; None = all): exact triangle for all its heads."""
    if triangles is None:
        return [False] * nq
    if b is not None and triangles.shape[0] > 1:
        triangles = triangles[b:b + 1]
    if h is not None and triangles.shape[1] > 1:
        triangles = triangles[:, h:h + 1]
    exact = triangles.flatten(0, 1).all(0).tolist()
    return exact + [False] * (nq - len(exact))


def _triangle_bias(p: Problem, length: int) -> Tensor:
    """Additive [1, 1, rows, (length+1)*block_k]: `length` visible blocks, then the causal diagonal block."""
    bias = torch.zeros(p.rows, (length + 1) * p.block_k, dtype=p.q.dtype, device=p.q.device)
    upper = torch.ones(p.rows, p.block_k, dtype=torch.bool, device=p.q.device).triu(1)
    bias[:, length * p.block_k:].masked_fill_(upper, float("-inf"))
    return bias[None, None]


def _pieces(p: Problem, runs: list[Run], diagonals: set[int]) -> list[tuple[Run, str, Optional[Tensor]]]:
    """(run, kind, bias): a band whose every block is followed by its causal diagonal takes the diagonal
    along under a shared additive mask; the other diagonals become runs of flash's causal path."""
    shift = (p.keys - p.seq) // p.block_k
    pieces = []
    for run in runs:
        blocks = [run.first + i * run.q_step for i in range(run.count)]
        if run.key_step == run.q_step and run.start + run.length == run.first + shift \
                and diagonals.issuperset(blocks):
            diagonals.difference_update(blocks)
            pieces.append((run._replace(length=run.length + 1), "masked", _triangle_bias(p, run.length)))
        else:
            pieces.append((run, "full", None))
    sorted_diagonals = [(qb, qb + shift) for qb in sorted(diagonals)]
    return pieces + [(Run(qb, step, kb, step, 1, n), "causal", None)
                     for qb, kb, step, n in progressions(sorted_diagonals, band=True)]


SCATTERED_RUNS = 4   # above this many runs of consecutive key blocks, decode gathers them into one flash call


def _direct(p: Problem, hs: HeadSet, layout: list) -> None:
    """Fewer query rows than a block (decode, short chunks): the one query block reads its listed key
    blocks in place, one flash call per run of consecutive blocks under an additive mask over the run's
    keys (full blocks: every key in range; partial blocks: the mask source's elements)."""
    kv_num, kv_indices, full_num, full_indices = (x[0] for x in layout)
    full, device, fresh = set(full_indices[:full_num]), p.q.device, True
    listed = sorted(full.union(kv_indices[:kv_num]))
    if len(runs_of(listed)) > SCATTERED_RUNS:   # scattered blocks (Quest pages): one gathered call, not one per run
        _gathered(p, hs, {0: listed}, full=False, fresh=True)
        return
    q_axes, k_axes = _axes(hs, "q"), _axes(hs, "k")
    q = strided(p.q, hs.q_head, q_axes, 0, p.rows)
    out, lse = (strided(t, hs.q_head, q_axes, 0, p.rows) for t in (p.out, p.lse))
    for start, length in runs_of(listed):
        keys = (start * p.block_k, length * p.block_k)
        whole = torch.tensor([b in full for b in range(start, start + length)], device=device)
        by_rule = _visibility(p, hs, torch.zeros(1, dtype=torch.long, device=device),
                              torch.arange(start, start + length, device=device)[None],
                              torch.ones(1, length, dtype=torch.bool, device=device))[0]
        in_range = torch.arange(keys[0], keys[0] + keys[1], device=device) < p.keys
        visible = torch.where(whole.repeat_interleave(p.block_k) & in_range, True, by_rule)
        bias = torch.zeros((), dtype=p.q.dtype, device=device).masked_fill(~visible, float("-inf"))
        k, v = (strided(t, hs.k_head, k_axes, *keys) for t in (p.k, p.v))
        piece_out, piece_lse = _flash(q, k, v, attn_mask=bias, scale=p.scale)
        _accumulate(out, lse, piece_out, piece_lse.masked_fill(~visible.any(-1), float("-inf")), fresh)
        fresh = False
    if fresh:
        _clear(p, hs, {0})


def _slice_plan(p: Problem, hs: HeadSet, layout: list, threshold: float, direct: bool,
                exact: list[bool]) -> None:
    """Every piece of one layout slice: [kv_num, kv_indices, full_num, full_indices] as lists; `exact`: per
    query block, whether the source's diagonal block is the causal triangle for every head of the slice."""
    kv_num, kv_indices, full_num, full_indices = layout
    # flash cannot cap logits nor take values of another head size (MLA): explicit logits, block by block
    if threshold > 0 or p.softcap > 0 or p.v.shape[-1] != p.q.shape[-1]:
        orders = [f[:nf] + pa[:np] for nf, f, np, pa in zip(full_num, full_indices, kv_num, kv_indices)]
        if any(orders):
            _blockwise(p, hs, orders, kv_num, threshold)
        return
    if direct:
        _direct(p, hs, layout)
        return
    runs = plan_runs(full_num, full_indices, max(1, CHUNK_KEYS // p.block_k))
    touched: set[int] = set()
    if len(runs) > GATHER_RUNS and sum(full_num) < GATHER_BELOW * len(runs):  # scattered (top-k): gather
        touched = {qb for qb, n in enumerate(full_num) if n}
        _gathered(p, hs, {qb: full_indices[qb][:full_num[qb]] for qb in sorted(touched)}, full=True, fresh=True)
        runs = []
    partial = {qb: kv_indices[qb][:n] for qb, n in enumerate(kv_num) if n}
    diagonals = _causal_diagonals(p, partial, exact)
    for qb in diagonals:
        del partial[qb]
    for run, kind, bias in _pieces(p, runs, diagonals):
        blocks = {run.first + i * run.q_step for i in range(run.count)}
        fresh = touched.isdisjoint(blocks)
        touched |= _clear(p, hs, blocks - touched) if not fresh else blocks
        _run(p, hs, run, kind == "causal", bias, fresh)
    if partial:
        fresh = touched.isdisjoint(partial)
        touched |= _clear(p, hs, set(partial) - touched) if not fresh else set(partial)
        _gathered(p, hs, partial, full=False, fresh=fresh)
    _clear(p, hs, set(range(len(kv_num))) - touched)


def _clear(p: Problem, hs: HeadSet, q_blocks: set[int]) -> set[int]:
    """Set output 0 and lse -inf on query blocks no piece has written yet; returns them."""
    if q_blocks:
        index = torch.tensor(sorted(q_blocks), device=p.q.device)
        q_axes = [(p.q.shape[1] // p.rows, 0, p.rows), *_axes(hs, "q")]
        strided(p.out, hs.q_head, q_axes, 0, p.rows).index_fill_(0, index, 0.0)
        strided(p.lse, hs.q_head, q_axes, 0, p.rows).index_fill_(0, index, float("-inf"))
    return q_blocks


def block_attention_cpu(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                        full_num_blocks: Tensor, full_indices: Tensor, mask: Optional[Tensor], scale: float,
                        block_q: int, block_k: int, threshold: float = 0.0, empty_rows: str = "zero",
                        softcap: float = 0.0, sinks: Optional[Tensor] = None, rule_rows: Optional[Tensor] = None,
                        rule_cols: Optional[Tensor] = None, rule_ops: str = "") -> Tensor:
    """sparsecc::block_attention on CPU tensors (semantics in `sparsecc.runtime.ops.block_attention`).
    The layout's values are checked per call (a few reductions over [.., NQ, NK], read here anyway)."""
    refuse("block_attention", block_attention_problem(
        q, k, v, Layout(kv_num_blocks, kv_indices, full_num_blocks, full_indices), mask, scale, block_q, block_k,
        threshold, empty_rows, check_data=True, softcap=softcap, sinks=sinks, rule_rows=rule_rows,
        rule_cols=rule_cols, rule_ops=rule_ops))
    batch, heads, seq, _ = q.shape
    rule = None if rule_rows is None else (rule_rows.to(q.device), rule_cols.to(q.device), rule_ops)
    p = _problem(q, k, v, mask_source(mask, rule, seq, k.shape[2], heads), scale, block_q, block_k, softcap)
    layout = [t.tolist() for t in (kv_num_blocks, kv_indices, full_num_blocks, full_indices)]
    layout_b, layout_h = full_num_blocks.shape[:2]
    triangles = _triangles(p)
    for b in range(layout_b):
        for h in range(layout_h):
            slice_b, slice_h = b if layout_b > 1 else None, h if layout_h > 1 else None
            hs = head_sets(batch, heads, k.shape[1], slice_b, slice_h)
            exact = _slice_triangles(triangles, full_num_blocks.shape[2], slice_b, slice_h)
            _slice_plan(p, hs, [x[b][h] for x in layout], threshold, seq < block_q, exact)
    out = p.out.view(batch, heads, -1, p.out.shape[-1])[:, :, :seq]
    lse = p.lse.view(batch, heads, -1)[:, :, :seq]
    out, lse = with_sinks(out, lse, sinks)
    return fill_empty_rows(out, lse, v, empty_rows).to(q.dtype)
