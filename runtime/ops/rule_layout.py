"""`sparsecc::rule_layout`: the block layout of an attention mask given as a rule, never as S x Skv.

    rows[a] [.., S, 1] int|bool, cols[a] [.., 1, Skv] int|bool, ops "ge,ne"   (term a, a < A)
    -> kv_num_blocks [L, NQ], kv_indices [L, NQ, NK], full_num_blocks [L, NQ], full_indices [L, NQ, NK] (int32),
       rule_rows [A, Bm, S], rule_cols [A, Bm, Skv] (int64)

Each term's operands are as the graph holds them, broadcastable to [Bm, 1, S, 1] and [Bm, 1, 1, Skv];
the op stacks them into the rule of `sparsecc.runtime.attention_rule` (returned for
`sparsecc::block_attention`, which evaluates partial blocks from it) and computes the layout
(format in `sparsecc.runtime.attention_layout`, L = (Bm, 1), or (B, Hq) of q for topk) from the
rule's block states (value ranges per block), so the cost is O(A * B * (S + Skv) + B * NQ * NK).
Policies as `sparsecc::block_layout` (`sparsecc.runtime.attention_policies`): mask, window, topk.
A block an eq / ne term hides may be listed partial (ranges cannot tell): never the reverse.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..attention_layout import layout_from_blocks
from ..attention_policies import topk_layout_from_states, window_layout_from_states
from ..attention_rule import rule_batch, rule_block_states, rule_ops, rule_ops_problem, stack_rule
from ..kernels.attention_contract import block_size_problem, operand_problem
from ..kernels.checks import refuse
from .block_layout import policy_problem
from .registry import OpDef

SCHEMA = ("(Tensor[] rows, Tensor[] cols, str ops, SymInt seq, SymInt keys, int block_q, int block_k, "
          "str policy=\"mask\", int window=0, int sinks=0, float topk=0.0, Tensor? q=None, Tensor? k=None) "
          "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def rule_layout_kernel(rows: list[Tensor], cols: list[Tensor], ops: str, seq: int, keys: int, block_q: int,
                       block_k: int, policy: str = "mask", window: int = 0, sinks: int = 0, topk: float = 0.0,
                       q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> tuple[Tensor, ...]:
    refuse("rule_layout", verify_rule_layout(rows, cols, ops, seq, keys, block_q, block_k, policy, window, sinks,
                                             topk, q, k))
    rule_rows, rule_cols = stack_rule(list(rows), list(cols), seq, keys)
    any_visible, all_visible = rule_block_states(rule_rows, rule_cols, ops, block_q, block_k)
    if policy == "window":
        layout = window_layout_from_states(any_visible, all_visible, window, sinks, block_q, block_k, seq, keys)
    elif policy == "topk":
        layout = topk_layout_from_states(any_visible, all_visible, q, k, topk, sinks, block_q, block_k)
    else:
        layout = layout_from_blocks(all_visible, any_visible & ~all_visible)
    return (*layout, rule_rows, rule_cols)


@torch.library.custom_op("sparsecc::rule_layout", mutates_args=(), schema=SCHEMA)
def rule_layout(rows: list[Tensor], cols: list[Tensor], ops: str, seq: int, keys: int, block_q: int, block_k: int,
                policy: str = "mask", window: int = 0, sinks: int = 0, topk: float = 0.0, q: Optional[Tensor] = None,
                k: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return rule_layout_kernel(rows, cols, ops, seq, keys, block_q, block_k, policy, window, sinks, topk, q, k)


@rule_layout.register_fake
def _(rows, cols, ops, seq, keys, block_q, block_k, policy="mask", window=0, sinks=0, topk=0.0, q=None, k=None):
    if not rows:
        raise ValueError("sparsecc::rule_layout: a rule needs at least one term")
    batch = rule_batch([*rows, *cols])
    leading = list(q.shape[:2]) if policy == "topk" and q is not None else [batch, 1]
    nq, nk = (seq + block_q - 1) // block_q, (keys + block_k - 1) // block_k
    like = rows[0]
    counts, indices = ([*leading, nq], torch.int32), ([*leading, nq, nk], torch.int32)
    shapes = [counts, indices, counts, indices, ([len(rows), batch, seq], torch.int64),
              ([len(cols), batch, keys], torch.int64)]
    return tuple(like.new_empty(shape, dtype=dtype) for shape, dtype in shapes)


def _operand_problem(term: int, side: str, t: Tensor, wanted: list) -> Optional[str]:
    """None when term `term`'s `side` operand is an integer or bool tensor broadcastable to `wanted`."""
    if not isinstance(t, Tensor):
        return f"term {term} {side} {type(t).__name__} must be a tensor"
    where = f"term {term} {side} {t.dtype}{list(t.shape)}"
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return f"{where} must be an integer or bool tensor"
    shape = [1] * (4 - t.dim()) + list(t.shape)
    if t.dim() > 4 or any(n != 1 and n != want for n, want in zip(shape, wanted)):
        names = ["Bm", "1", "S", "1"] if side == "rows" else ["Bm", "1", "1", "Skv"]
        target = ", ".join(f"{name}={want}" if name != "1" else "1" for name, want in zip(names, wanted))
        return f"{where} does not broadcast to [{target}]"
    return None


def _terms_problem(rows: list[Tensor], cols: list[Tensor], ops: str, seq, keys) -> Optional[str]:
    problem = rule_ops_problem(ops)
    if problem:
        return problem
    if len(rows) != len(rule_ops(ops)) or len(cols) != len(rule_ops(ops)):
        return f"{len(rows)} rows and {len(cols)} cols operands for the {len(rule_ops(ops))} terms of ops {ops!r}"
    for name, length in (("seq", seq), ("keys", keys)):
        if isinstance(length, int) and length < 1:
            return f"{name}={length} must be >= 1"
    batch = rule_batch([*rows, *cols])
    for term, (row, col) in enumerate(zip(rows, cols)):
        problem = (_operand_problem(term, "rows", row, [batch, 1, seq, 1])
                   or _operand_problem(term, "cols", col, [batch, 1, 1, keys]))
        if problem:
            return problem
    return None


def _topk_operands_problem(batch, seq, keys, q: Optional[Tensor], k: Optional[Tensor]) -> Optional[str]:
    if q is None or k is None:
        return "policy topk needs q and k"
    problem = operand_problem(q, k, k)
    if problem or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return problem or f"q {list(q.shape)} and k {list(k.shape)}: kv heads must divide query heads"
    if q.shape[2] != seq or k.shape[2] != keys or (batch != 1 and batch != q.shape[0]):
        return (f"rule of batch {batch}, seq={seq}, keys={keys} does not match q {list(q.shape)} and "
                f"k {list(k.shape)} ([1|B, ., S, .] and [B, ., Skv, .])")
    return None


def verify_rule_layout(rows: list[Tensor], cols: list[Tensor], ops: str, seq: int, keys: int, block_q: int,
                       block_k: int, policy: str = "mask", window: int = 0, sinks: int = 0, topk: float = 0.0,
                       q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Optional[str]:
    """None when the call is well formed, else the first inconsistency found."""
    problem = (_terms_problem(list(rows), list(cols), ops, seq, keys) or block_size_problem(block_q, block_k)
               or policy_problem(policy, window, sinks, topk))
    if problem is None and policy == "topk":
        problem = _topk_operands_problem(rule_batch([*rows, *cols]), seq, keys, q, k)
    return problem


def _samples() -> list[tuple]:
    seq, keys = 24, 50
    position = torch.arange(seq)[:, None] + keys - seq                   # causal rows, as a graph holds them
    key = torch.arange(keys)
    padding = torch.rand(2, 1, 1, keys) > 0.3                            # bool key padding, [B, 1, 1, Skv]
    docs = torch.arange(keys, dtype=torch.int32).div(17, rounding_mode="floor")
    q, k = torch.randn(2, 4, seq, 8), torch.randn(2, 2, keys, 8)
    causal_padding = ([position, torch.tensor(0)], [key, padding], "ge,ne")
    return [([position], [key], "ge", seq, keys, 16, 16),
            (*causal_padding, seq, keys, 16, 32),
            ([docs[-seq:, None]], [docs], "eq", seq, keys, 16, 16),
            (*causal_padding, seq, keys, 16, 16, "window", 20, 4),
            (*causal_padding, seq, keys, 16, 16, "topk", 0, 1, 0.5, q, k),
            ([position, position - 9], [key, key[:, None].T], "ge,lt", seq, keys, 32, 16, "topk", 0, 0, 2.0, q, k)]


RULE_LAYOUT = OpDef(name="rule_layout", op=torch.ops.sparsecc.rule_layout.default,
                    kernels={"torch": rule_layout_kernel, "triton": rule_layout_kernel},
                    verify=verify_rule_layout,
                    attrs=("ops", "block_q", "block_k", "policy", "window", "sinks", "topk"), samples=_samples)
