"""sparsecc::rule_layout: the layout of a rule equals the layout of the mask it stands for, built without it."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from sparsecc.runtime.attention_layout import Layout, block_states, layout_from_mask
from sparsecc.runtime.attention_policies import topk_layout_from_mask, window_layout_from_mask
from sparsecc.runtime.attention_rule import rule_mask
from sparsecc.runtime.errors import RuntimeProgramError
from sparsecc.runtime.ops.rule_layout import RULE_LAYOUT, verify_rule_layout

CASES = ["causal", "window", "causal_left_padding", "causal_right_padding", "documents", "padding_only"]
SHAPES = [(64, 64), (1, 300), (48, 200), (70, 70), (100, 130)]  # prefill, decode, chunked prefill, ragged
BLOCKS = [(16, 16), (32, 16)]
EXACT = ("causal", "window", "documents", "padding_only")  # one term, or terms whose ranges cannot disagree


def rule_terms(case: str, seq: int, keys: int) -> tuple[list, list, str]:
    """A batch of 2 rule's operands as a model's mask graph holds them (rows [.., S, 1], cols [.., 1, Skv])."""
    position, key = (torch.arange(seq) + keys - seq)[:, None], torch.arange(keys)
    kept = torch.tensor([keys, keys - keys // 3])[:, None]                    # row 1 pads a third of its keys
    left, right = (key >= keys - kept).long(), key < kept                     # transformers' attention_mask
    if case == "causal":
        return [position], [key], "ge"
    if case == "window":
        return [position, position - 20], [key, key], "ge,lt"
    if case in ("causal_left_padding", "causal_right_padding"):
        padding = left if case == "causal_left_padding" else right
        return [position, torch.tensor(0)], [key, padding[:, None, None]], "ge,ne"
    if case == "documents":
        doc = torch.cat([torch.zeros(2, 1, dtype=torch.long),
                         (torch.rand(2, keys - 1, generator=torch.Generator().manual_seed(keys)) < 0.03).long()],
                        1).cumsum(1)
        return [doc[:, None, -seq:, None]], [doc[:, None, None, :]], "eq"
    return [torch.tensor(False)], [left.bool()[:, None, None]], "ne"


def run(case, seq, keys, block_q, block_k, *policy):
    rows, cols, ops = rule_terms(case, seq, keys)
    out = torch.ops.sparsecc.rule_layout(rows, cols, ops, seq, keys, block_q, block_k, *policy)
    return Layout(*out[:4]), rule_mask(out[4], out[5], ops)


def assert_same_blocks(got, want):
    for a, b in zip(block_states(got), block_states(want)):
        assert a.shape == b.shape and torch.equal(a, b)


def assert_covers(got, want):
    """got lists every block want keeps, and the same full blocks (a superset only in partial blocks)."""
    (full, partial), (want_full, want_partial) = block_states(got), block_states(want)
    assert torch.equal(full, want_full)                                # full is exact for every rule
    assert not ((want_full | want_partial) & ~(full | partial)).any()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seq,keys", SHAPES)
@pytest.mark.parametrize("block_q,block_k", BLOCKS)
def test_mask_policy_is_the_layout_of_the_rule_mask(case, seq, keys, block_q, block_k):
    layout, mask = run(case, seq, keys, block_q, block_k)
    want = layout_from_mask(mask, block_q, block_k)
    assert_same_blocks(layout, want) if case in EXACT else assert_covers(layout, want)


def test_ranges_may_list_an_empty_block_partial_never_a_visible_one_absent():
    rows, cols = torch.tensor([0, 2] * 8)[:, None], torch.ones(16, dtype=torch.long)  # eq: ranges overlap, no match
    kv_count, _, full_count = torch.ops.sparsecc.rule_layout([rows], [cols], "eq", 16, 16, 16, 16)[:3]
    assert kv_count.flatten().tolist() == [1] and full_count.flatten().tolist() == [0]
    assert not rule_mask(rows.T[None], cols[None, None], "eq").any()
    # causal + left padding: query block 0 sees keys 0..15 causally, the key block's unpadded keys
    # start at 21, so no element is visible, yet each term alone holds somewhere in the block
    layout, mask = run("causal_left_padding", 64, 64, 16, 32)
    assert block_states(layout)[1][1, 0, 0, 0] and not mask[1, 0, :16, :32].any()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seq,keys", SHAPES)
def test_window_policy_is_the_mask_window_on_the_rule_mask(case, seq, keys):
    layout, mask = run(case, seq, keys, 16, 16, "window", 24, 5)
    want = window_layout_from_mask(mask, 24, 5, 16, 16)
    assert_same_blocks(layout, want) if case in EXACT else assert_covers(layout, want)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seq,keys", SHAPES)
@pytest.mark.parametrize("topk", [0.3, 2.0])
def test_topk_policy_is_the_mask_topk_on_the_rule_mask(case, seq, keys, topk):
    q, k = torch.randn(2, 4, seq, 8), torch.randn(2, 2, keys, 8)
    layout, mask = run(case, seq, keys, 16, 32, "topk", 0, 20, topk, q, k)
    assert layout.kv_num_blocks.shape == (2, 4, -(-seq // 16))
    if case in EXACT:
        return assert_same_blocks(layout, topk_layout_from_mask(mask, q, k, topk, 20, 16, 32))
    # the rule's empty partial blocks compete for the budget too: the choice differs, it never widens
    full, partial = block_states(layout)
    rule_visible = sum(block_states(run(case, seq, keys, 16, 32)[0])).bool()
    assert not ((full | partial) & ~rule_visible).any()
    assert not (full & ~block_states(layout_from_mask(mask, 16, 32))[0]).any()


def test_returns_the_stacked_rule_and_fake_shapes_match():
    rows, cols, ops = rule_terms("causal_left_padding", 48, 200)
    real = torch.ops.sparsecc.rule_layout(rows, cols, ops, 48, 200, 16, 32, "window", 30, 4)
    assert real[4].shape == (2, 2, 48) and real[5].shape == (2, 2, 200) and real[4].dtype == torch.int64
    assert torch.equal(real[4][0, 1], torch.arange(152, 200)) and torch.equal(real[5][1, 1], cols[1][1, 0, 0])
    with FakeTensorMode() as mode:
        fake = torch.ops.sparsecc.rule_layout([mode.from_tensor(t) for t in rows], [mode.from_tensor(t) for t in cols],
                                              ops, 48, 200, 16, 32, "window", 30, 4)
    assert [(f.shape, f.dtype) for f in fake] == [(r.shape, r.dtype) for r in real]


def test_fake_keeps_a_dynamic_sequence_symbolic():
    class Causal(torch.nn.Module):
        def forward(self, x, attention_mask):
            seq = x.shape[1]
            position = torch.arange(seq)[:, None]
            return torch.ops.sparsecc.rule_layout([position, torch.tensor(0)], [torch.arange(seq), attention_mask[
                :, None, None, :]], "ge,ne", seq, seq, 64, 64)

    s = torch.export.Dim("s", min=65, max=4096)  # torch's stride logic guards NQ != 1 on any 4-d fake
    program = torch.export.export(Causal(), (torch.randn(2, 100, 8), torch.ones(2, 100, dtype=torch.long)),
                                  dynamic_shapes=({1: s}, {1: s}))
    node = next(n for n in program.graph.nodes if n.target == torch.ops.sparsecc.rule_layout.default)
    counts, indices, _, _, rows, cols = node.meta["val"]
    assert counts.shape[0] == 2 and isinstance(counts.shape[2], torch.SymInt) and isinstance(rows.shape[2],
                                                                                               torch.SymInt)
    out = program.module()(torch.randn(2, 130, 8), torch.ones(2, 130, dtype=torch.long))
    assert out[0].shape == (2, 1, 3) and out[4].shape == (2, 2, 130)


class ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("policy", [(), ("window", 256, 4), ("topk", 0, 4, 0.1)])
def test_no_tensor_with_two_sequence_dims_is_allocated(policy):
    seq = 2048
    rows, cols, ops = rule_terms("causal_left_padding", seq, seq)
    qk = (torch.randn(2, 2, seq, 8), torch.randn(2, 1, seq, 8)) if policy and policy[0] == "topk" else ()
    with ShapeLog() as log:
        RULE_LAYOUT.kernel("torch")(rows, cols, ops, seq, seq, 64, 64, *policy, *qk)
    assert log.shapes and all(sum(n >= seq for n in shape) < 2 for shape in log.shapes)


@pytest.mark.parametrize("args,reason", [
    (([torch.arange(8)[:, None]], [torch.arange(8)], "gte"), "rule ops 'gte' must be 1 to 8 of lt, le"),
    (([torch.arange(8)[:, None]] * 2, [torch.arange(8)], "ge,ge"), "2 rows and 1 cols operands for the 2 terms"),
    (([torch.arange(8.0)[:, None]], [torch.arange(8)], "ge"), "term 0 rows torch.float32[8, 1] must be an integer"),
    (([torch.arange(8)[:, None]], [torch.arange(8)[:, None]], "ge"),
     "term 0 cols torch.int64[8, 1] does not broadcast to [Bm=1, 1, 1, Skv=8]"),
    (([torch.zeros(2, 1, 8, 1, dtype=torch.long)], [torch.zeros(3, 1, 1, 8, dtype=torch.long)], "eq"),
     "term 0 cols torch.int64[3, 1, 1, 8] does not broadcast to [Bm=2, 1, 1, Skv=8]"),
    (([torch.arange(8)[:, None]], [torch.arange(8)], "ge", 8, 8, 24, 16), "block_q=24 must be a power of two"),
    (([torch.arange(8)[:, None]], [torch.arange(8)], "ge", 8, 8, 16, 16, "window", 0), "window=0 must be"),
    (([torch.arange(8)[:, None]], [torch.arange(8)], "ge", 8, 8, 16, 16, "topk", 0, 0, 0.5), "needs q and k"),
    (([torch.arange(8)[:, None]], [torch.arange(8)], "ge", 8, 8, 16, 16, "topk", 0, 0, 0.5, torch.randn(1, 2, 9, 4),
      torch.randn(1, 1, 8, 4)), "seq=8, keys=8 does not match q [1, 2, 9, 4]"),
])
def test_verifier_names_the_term_and_the_reason(args, reason):
    full = (*args, 8, 8, 16, 16) if len(args) == 3 else args
    assert reason in verify_rule_layout(*full)
    with pytest.raises(RuntimeProgramError, match=r"sparsecc::rule_layout: "):
        RULE_LAYOUT.kernel("torch")(*full)
