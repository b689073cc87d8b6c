"""`sparsecc::block_attention`: flash attention that visits only the key blocks a layout lists.

    q [B, Hq, S, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv]  ->  out [B, Hq, S, Dv] (q's dtype)
    layout: kv_num_blocks, kv_indices, full_num_blocks, full_indices ([Bm, Hm, NQ(, NK)], see
            `sparsecc.runtime.attention_layout`); mask [Bm', Hm', S, Skv] bool or None;
            rule_rows [A, Bm', S], rule_cols [A, Bm', Skv] int64, rule_ops "ge,ne" or None / ""
            (`sparsecc.runtime.attention_rule`; a rule and a mask are never given together)

    visible(i, j) = block(i, j) is full, or block(i, j) is partial and rule(i, j), where
                    rule = mask, or the rule AND_a rule_rows[a, b, i] op_a rule_cols[a, b, j]
                    (every head of batch row b), or with neither the causal rule j <= i + Skv - S
    out_i         = softmax_j(q_i . k_j * scale over visible j) v     (fp32 accumulation)

Query head h reads kv head h // (Hq / Hkv); k and v are never repeated. A row
that sees no key gives, by `empty_rows`: "zero" 0; "uniform" the mean of v
over all Skv keys (HF eager attention with a finfo.min additive mask); "nan"
NaN. Measured in torch 2.13 on CPU: `F.scaled_dot_product_attention` with an
all-False boolean row returns 0 on both the math and the flash backend, not
NaN, so such SDPA calls are "zero"; the eager softmax of an all -inf row is NaN.

Variants (Gemma2, GPT-OSS): softcap > 0 replaces every logit by softcap * tanh(logit / softcap)
before the mask (0: off); sinks [Hq] adds one learned logit per query head to each row's softmax
and drops its weight after it (v of the sink is 0):

    out_i = sum_j exp(l_ij) v_j / (sum_j exp(l_ij) + exp(sinks[h]))

so with sinks no row is empty: a row that sees no key gives 0 whatever `empty_rows` says.

threshold > 0 (BLASST): each query block visits its full blocks, then its
partial blocks, in ascending order, and skips a block when for every row r of
the block  max_j logit(r, j) - m_r < log(threshold),  m_r being the largest
logit of r over the blocks not skipped so far; 0 visits every listed block.
CPU tensors run `block_attention_cpu`, CUDA tensors the Triton kernel.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..attention_layout import Layout, as_4d, block_states, causal_layout, layout_from_blocks, layout_from_mask
from ..attention_rule import rule_block_states, rule_mask
from ..kernels.attention_contract import block_attention_problem
from ..kernels.cpu.block_attention import block_attention_cpu, fill_empty_rows, softcapped, with_sinks
from .registry import OpDef, has_data


def block_attention_triton(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                           full_num_blocks: Tensor, full_indices: Tensor, mask: Optional[Tensor], scale: float,
                           block_q: int, block_k: int, threshold: float = 0.0, empty_rows: str = "zero",
                           softcap: float = 0.0, sinks: Optional[Tensor] = None, rule_rows: Optional[Tensor] = None,
                           rule_cols: Optional[Tensor] = None, rule_ops: str = "") -> Tensor:
    """The Triton kernel; imported on first call so loading the op registry stays cheap."""
    from ..kernels.triton.block_attention import block_attention_triton as launch
    return launch(q, k, v, kv_num_blocks, kv_indices, full_num_blocks, full_indices, mask, scale,
                  block_q, block_k, threshold, empty_rows, softcap, sinks, rule_rows=rule_rows, rule_cols=rule_cols,
                  rule_ops=rule_ops)


@torch.library.custom_op("sparsecc::block_attention", mutates_args=(), device_types="cpu")
def block_attention(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                    full_num_blocks: Tensor, full_indices: Tensor, mask: Optional[Tensor], scale: float,
                    block_q: int, block_k: int, threshold: float = 0.0, empty_rows: str = "zero",
                    softcap: float = 0.0, sinks: Optional[Tensor] = None, rule_rows: Optional[Tensor] = None,
                    rule_cols: Optional[Tensor] = None, rule_ops: str = "") -> Tensor:
    return block_attention_cpu(q, k, v, kv_num_blocks, kv_indices, full_num_blocks, full_indices, mask, scale,
                               block_q, block_k, threshold, empty_rows, softcap, sinks, rule_rows, rule_cols, rule_ops)


block_attention.register_kernel("cuda")(block_attention_triton)


@block_attention.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, full_num_blocks, full_indices, mask, scale, block_q, block_k,
      threshold=0.0, empty_rows="zero", softcap=0.0, sinks=None, rule_rows=None, rule_cols=None, rule_ops=""):
    return q.new_empty(*q.shape[:3], v.shape[3])


def visible_elements(layout: Layout, mask: Optional[Tensor], seq: int, keys: int, block_q: int,
                     block_k: int, rule_rows: Optional[Tensor] = None, rule_cols: Optional[Tensor] = None,
                     rule_ops: str = "") -> Tensor:
    """Bool [Bm|Bm', Hm|Hm', S, Skv]: the elements the op attends to (before threshold skipping)."""
    full, partial = block_states(layout)

    def elements(blocks: Tensor) -> Tensor:
        return blocks.repeat_interleave(block_q, -2).repeat_interleave(block_k, -1)[..., :seq, :keys]
    if mask is None and rule_rows is not None:
        mask = rule_mask(rule_rows, rule_cols, rule_ops).to(full.device)
    if mask is None:
        rows, cols = torch.arange(seq)[:, None], torch.arange(keys)[None, :]
        mask = (cols <= rows + keys - seq).to(full.device)
    return elements(full) | (elements(partial) & as_4d(mask))


def skipped_blocks(logits: Tensor, layout: Layout, threshold: float, block_q: int, block_k: int) -> Tensor:
    """Bool [B, H, NQ, NK]: the listed blocks the threshold rule skips, given logits [B, H, S, Skv] that are
    -inf where not visible. Vectorised over (batch, head, query block); steps through the visiting order."""
    batch, heads, seq, keys = logits.shape
    padded = torch.nn.functional.pad(logits, (0, -keys % block_k, 0, -seq % block_q), value=float("-inf"))
    block_max = padded.unflatten(-1, (-1, block_k)).amax(-1).unflatten(-2, (-1, block_q))  # [B, H, NQ, bq, NK]
    nk = block_max.shape[-1]
    lead = (batch, heads, block_max.shape[2])
    full_num, kv_num = (n.expand(*lead).long() for n in (layout.full_num_blocks, layout.kv_num_blocks))
    full_idx, kv_idx = (i.expand(*lead, nk).long() for i in (layout.full_indices, layout.kv_indices))
    run_max = torch.full(block_max.shape[:-1], float("-inf"), device=logits.device)
    skipped = torch.zeros(*lead, nk, dtype=torch.bool, device=logits.device)
    for step in range(nk):
        listed = step < full_num + kv_num
        in_full = step < full_num
        block = torch.where(in_full, full_idx[..., min(step, nk - 1)],
                            kv_idx.gather(-1, (step - full_num).clamp(0, nk - 1)[..., None])[..., 0])
        this_max = block_max.gather(-1, block[..., None, None].expand(*lead, block_q, 1))[..., 0]
        gap = torch.where(this_max == float("-inf"), float("-inf"), this_max - run_max)
        keep = gap.amax(-1) >= math.log(threshold)
        run_max = torch.where((keep & listed)[..., None], torch.maximum(run_max, this_max), run_max)
        skipped |= torch.nn.functional.one_hot(block, nk).bool() & (listed & ~keep)[..., None]
    return skipped


def _skipped(logits: Tensor, layout: Layout, threshold: float, block_q: int, block_k: int) -> Tensor:
    """Bool like logits: the elements of blocks the threshold rule skips."""
    blocks = skipped_blocks(logits, layout, threshold, block_q, block_k)
    seq, keys = logits.shape[-2:]
    return blocks.repeat_interleave(block_q, -2).repeat_interleave(block_k, -1)[..., :seq, :keys]


def block_attention_reference(q, k, v, kv_num_blocks, kv_indices, full_num_blocks, full_indices, mask, scale,
                              block_q, block_k, threshold=0.0, empty_rows="zero", softcap=0.0,
                              sinks=None, rule_rows=None, rule_cols=None, rule_ops="") -> Tensor:
    """The semantics above as one dense masked softmax in fp32, for tests."""
    batch, heads, seq, _ = q.shape
    groups = heads // k.shape[1]
    layout = Layout(kv_num_blocks, kv_indices, full_num_blocks, full_indices)
    visible = visible_elements(layout, mask, seq, k.shape[2], block_q, block_k, rule_rows, rule_cols,
                               rule_ops).expand(batch, heads, -1, -1)
    logits = attention_logits(q, k, scale, softcap).masked_fill(~visible, float("-inf"))
    if threshold > 0:
        logits = logits.masked_fill(_skipped(logits, layout, threshold, block_q, block_k), float("-inf"))
    seen = logits.amax(-1) > float("-inf")
    weights = torch.softmax(logits.masked_fill(~seen[..., None], 0.0), -1) * seen[..., None]
    row_max = logits.amax(-1).masked_fill(~seen, 0.0)
    lse = torch.where(seen, torch.logsumexp(logits - row_max[..., None], -1) + row_max, float("-inf"))
    out, lse = with_sinks(weights @ v.float().repeat_interleave(groups, 1), lse, sinks)
    return fill_empty_rows(out, lse, v, empty_rows).to(q.dtype)


def attention_logits(q: Tensor, k: Tensor, scale: float, softcap: float = 0.0) -> Tensor:
    """fp32 [B, Hq, S, Skv] q . k * scale, softcapped when softcap > 0; k read per query head."""
    logits = q.float() @ k.float().repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2) * scale
    return softcapped(logits, softcap)


def verify_block_attention(q, k, v, kv_num_blocks, kv_indices, full_num_blocks, full_indices, mask, scale,
                           block_q, block_k, threshold=0.0, empty_rows="zero", softcap=0.0,
                           sinks=None, rule_rows=None, rule_cols=None, rule_ops="") -> Optional[str]:
    """None when the call is well formed, else the first inconsistency found; real (constant) layout
    tensors also have their values checked (counts in [0, NK], indices in [0, NK), ascending, disjoint)."""
    layout = Layout(kv_num_blocks, kv_indices, full_num_blocks, full_indices)
    return block_attention_problem(q, k, v, layout, mask, scale, block_q, block_k, threshold, empty_rows,
                                   check_data=all(has_data(t) for t in layout), softcap=softcap, sinks=sinks,
                                   rule_rows=rule_rows, rule_cols=rule_cols, rule_ops=rule_ops)


def _qkv(batch, heads, kv_heads, seq, keys, dim, dtype=torch.float32):
    return (torch.randn(batch, heads, seq, dim, dtype=dtype), torch.randn(batch, kv_heads, keys, dim, dtype=dtype),
            torch.randn(batch, kv_heads, keys, dim, dtype=dtype))


def _padded_causal_rule(lengths: list[int], seq: int, block: int) -> tuple:
    """(layout, rule_rows, rule_cols, rule_ops) of causal attention over left-padded rows (the last
    lengths[b] keys of row b are real): padded key blocks are absent from the layout."""
    real = torch.arange(seq)[None, :] >= seq - torch.tensor(lengths)[:, None]
    rows = torch.stack([torch.arange(seq).expand(len(lengths), seq), torch.zeros(len(lengths), seq, dtype=torch.long)])
    cols = torch.stack([torch.arange(seq).expand(len(lengths), seq), real.long()])
    any_visible, full = rule_block_states(rows, cols, "ge,ne", block, block)
    return (*layout_from_blocks(full, any_visible & ~full), rows, cols, "ge,ne")


def _samples() -> list[tuple]:
    causal = causal_layout(40, 40, 16, 16)
    padding = torch.rand(2, 1, 24, 50) > 0.3
    *rule_layout, rule_rows, rule_cols, rule_ops = _padded_causal_rule([40, 21], 40, 16)
    return [(*_qkv(1, 4, 2, 40, 40, 16), *causal, None, 0.25, 16, 16, 0.0, "zero"),
            (*_qkv(2, 2, 2, 24, 50, 16), *layout_from_mask(padding, 16, 32), padding, 0.25, 16, 32, 0.0, "nan"),
            (*_qkv(1, 2, 1, 1, 40, 16, torch.bfloat16), *causal_layout(1, 40, 16, 16), None, 0.25, 16, 16, 0.0,
             "uniform"),
            (*_qkv(1, 2, 2, 40, 40, 16), *causal, None, 0.25, 16, 16, 0.5, "zero"),
            (*_qkv(1, 4, 2, 40, 40, 16), *causal, None, 0.25, 16, 16, 0.0, "zero", 5.0, torch.randn(4)),
            (*_qkv(2, 2, 2, 24, 50, 16), *layout_from_mask(padding, 16, 32), padding, 0.25, 16, 32, 0.0, "nan",
             0.0, torch.randn(2)),
            (*_qkv(2, 4, 2, 40, 40, 16), *rule_layout, None, 0.25, 16, 16, 0.0, "zero", 0.0, None, rule_rows,
             rule_cols, rule_ops)]


BLOCK_ATTENTION = OpDef(name="block_attention", op=torch.ops.sparsecc.block_attention.default,
                        kernels={"torch": block_attention_cpu, "triton": block_attention_triton},
                        verify=verify_block_attention,
                        attrs=("scale", "block_q", "block_k", "threshold", "empty_rows", "softcap", "rule_ops"),
                        samples=_samples)
