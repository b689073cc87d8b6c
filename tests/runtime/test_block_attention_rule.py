"""block_attention with a rule (issue 17): the CPU kernel with rule_rows / rule_cols / rule_ops against the same
call with the rule's dense mask and against the reference; padded key blocks are skipped; no S x Skv tensor."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsecc.runtime.attention_layout import block_states, layout_from_blocks
from sparsecc.runtime.attention_rule import rule_block_states, rule_mask
from sparsecc.runtime.kernels.cpu.attention_sources import RuleSource
from sparsecc.runtime.ops.block_attention import BLOCK_ATTENTION, block_attention_reference, verify_block_attention

op = torch.ops.sparsecc.block_attention.default
cpu_kernel = BLOCK_ATTENTION.kernel("torch")  # called directly, a dispatch mode sees every ATen op it runs


def causal_terms(batch, seq, keys):
    """Bottom-right aligned causal: rows = i + Skv - S, cols = j, "ge"."""
    rows = (torch.arange(seq) + keys - seq).expand(batch, seq)
    return [(rows, torch.arange(keys).expand(batch, keys), "ge")]


def window_terms(batch, seq, keys, window):
    rows = (torch.arange(seq) + keys - seq - window).expand(batch, seq)
    return [(rows, torch.arange(keys).expand(batch, keys), "lt")]


def padding_terms(lengths, seq, keys, left=True):
    """Key padding: rows = 0, cols = attention_mask[b, j], "ne"; row b has lengths[b] real keys."""
    j, n = torch.arange(keys)[None, :], torch.tensor(lengths)[:, None]
    real = j >= keys - n if left else j < n
    return [(torch.zeros(len(lengths), seq, dtype=torch.long), real.long(), "ne")]


def document_terms(docs):
    """Packed documents of the given lengths (self-attention): doc[b, i] == doc[b, j]."""
    ids = torch.cat([torch.full((n,), d) for d, n in enumerate(docs)])[None]
    return [(ids, ids, "eq")]


def rule_of(terms):
    return (torch.stack([r for r, _, _ in terms]), torch.stack([c for _, c, _ in terms]),
            ",".join(name for _, _, name in terms))


def rule_layout(rule, block_q, block_k):
    any_visible, full = rule_block_states(*rule, block_q, block_k)
    return layout_from_blocks(full, any_visible & ~full)


def qkv(batch, heads, kv_heads, seq, keys, dim=16, dtype=torch.float32):
    torch.manual_seed(0)
    return (torch.randn(batch, heads, seq, dim).to(dtype), torch.randn(batch, kv_heads, keys, dim).to(dtype),
            torch.randn(batch, kv_heads, keys, dim).to(dtype))


def check_rule_call(q, k, v, terms, block=16, threshold=0.0, empty_rows="zero", softcap=0.0, sinks=None,
                    tol=1e-5, block_k=None):
    """The rule call equals the mask call (mask = the rule's dense mask, same layout) and the reference."""
    block_k = block_k or block
    rule = rule_of(terms)
    layout = rule_layout(rule, block, block_k)
    head = (q.shape[-1] ** -0.5, block, block_k, threshold, empty_rows, softcap, sinks)
    got = op(q, k, v, *layout, None, *head, *rule)
    by_mask = op(q, k, v, *layout, rule_mask(*rule), *head)
    want = block_attention_reference(q, k, v, *layout, None, *head, *rule)
    torch.testing.assert_close(got.float(), by_mask.float(), rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol, equal_nan=True)
    assert verify_block_attention(q, k, v, *layout, None, *head, *rule) is None
    return got, layout


CASES = {
    "causal": (1, 2, 2, 64, 64, lambda b, s, kv: causal_terms(b, s, kv)),
    "window": (1, 2, 2, 80, 80, lambda b, s, kv: causal_terms(b, s, kv) + window_terms(b, s, kv, 20)),
    "left padding": (3, 2, 2, 64, 64, lambda b, s, kv: causal_terms(b, s, kv) + padding_terms([64, 40, 9], s, kv)),
    "right padding": (3, 2, 2, 64, 64,
                      lambda b, s, kv: causal_terms(b, s, kv) + padding_terms([64, 33, 16], s, kv, left=False)),
    "documents": (1, 2, 2, 64, 64, lambda b, s, kv: causal_terms(b, s, kv) + document_terms([20, 7, 30, 7])),
    "gqa": (2, 4, 2, 48, 48, lambda b, s, kv: causal_terms(b, s, kv) + padding_terms([48, 30], s, kv)),
    "decode": (2, 4, 2, 1, 70, lambda b, s, kv: causal_terms(b, s, kv) + padding_terms([70, 12], s, kv)),
    "chunk": (2, 2, 1, 40, 104, lambda b, s, kv: causal_terms(b, s, kv) + padding_terms([90, 60], s, kv)),
    "ragged": (1, 2, 2, 50, 50, lambda b, s, kv: causal_terms(b, s, kv) + window_terms(b, s, kv, 24)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rule_matches_mask_and_reference(case):
    batch, heads, kv_heads, seq, keys, terms = CASES[case]
    check_rule_call(*qkv(batch, heads, kv_heads, seq, keys), terms(batch, seq, keys))


@pytest.mark.parametrize("variant", [dict(threshold=0.3), dict(softcap=20.0), dict(sinks=torch.linspace(-1, 2, 4)),
                                     dict(dtype=torch.bfloat16), dict(block_k=32)])
def test_rule_variants(variant):
    dtype = variant.pop("dtype", torch.float32)
    q, k, v = qkv(2, 4, 2, 64, 64, dtype=dtype)
    terms = causal_terms(2, 64, 64) + window_terms(2, 64, 64, 24) + padding_terms([64, 27], 64, 64)
    check_rule_call(q, k, v, terms, tol=2e-2 if dtype == torch.bfloat16 else 1e-5, **variant)


@pytest.mark.parametrize("empty_rows", ["zero", "uniform", "nan"])
def test_rule_empty_rows(empty_rows):
    """Left padding leaves the padded query rows with no key: they follow `empty_rows`."""
    got, _ = check_rule_call(*qkv(2, 2, 2, 48, 48), causal_terms(2, 48, 48) + padding_terms([48, 20], 48, 48),
                             empty_rows=empty_rows)
    assert got[1, :, :28].isnan().all() if empty_rows == "nan" else got.isfinite().all()


def test_padded_key_blocks_are_absent_and_never_read():
    """Whole padded key blocks are not in the layout; NaN keys and values there leave the output finite."""
    q, k, v = qkv(2, 2, 2, 64, 64)
    terms = causal_terms(2, 64, 64) + padding_terms([64, 30], 64, 64)
    full, partial = block_states(rule_layout(rule_of(terms), 16, 16))
    assert not (full | partial)[1, :, :, :2].any() and (full | partial)[0, :, :, :2].any()
    clean, layout = check_rule_call(q, k, v, terms)
    k[1, :, :32], v[1, :, :32] = float("nan"), float("nan")
    got = op(q, k, v, *layout, None, 0.25, 16, 16, 0.0, "zero", 0.0, None, *rule_of(terms))
    torch.testing.assert_close(got, clean)


def test_rule_diagonals_are_causal_triangles_only_where_exact():
    rule = rule_of(causal_terms(2, 64, 64) + padding_terms([64, 40], 64, 64))
    exact = RuleSource(*rule, heads=2).diagonals(16, 0, 4)
    assert exact.tolist() == [[[True] * 4], [[False, False, True, True]]]
    window = rule_of(causal_terms(1, 64, 64) + window_terms(1, 64, 64, 8))
    assert not RuleSource(*window, heads=2).diagonals(16, 0, 4).any()


def test_verifier_refuses_bad_rules():
    q, k, v = qkv(2, 2, 2, 32, 32)
    rule = rule_of(causal_terms(2, 32, 32))
    layout = rule_layout(rule, 16, 16)
    call = lambda mask, *r: verify_block_attention(q, k, v, *layout, mask, 0.25, 16, 16, 0.0, "zero", 0.0, None, *r)
    assert "a mask and a rule were both given" in call(rule_mask(*rule), *rule)
    assert "rule_rows and rule_cols must be given together" in call(None, rule[0], None, "ge")
    assert "given without rule_rows and rule_cols" in call(None, None, None, "ge")
    assert "rule ops 'geq'" in call(None, rule[0], rule[1], "geq")
    assert "rule rows" in call(None, rule[0][:, :, :16], rule[1], "ge")
    assert "int64" in call(None, rule[0].int(), rule[1], "ge")
    with pytest.raises(Exception, match="a mask and a rule"):
        op(q, k, v, *layout, rule_mask(*rule), 0.25, 16, 16, 0.0, "zero", 0.0, None, *rule)


class LargeAllocations(TorchDispatchMode):
    """Records the shape of every tensor an op returns with two dims >= `size`."""

    def __init__(self, size):
        super().__init__()
        self.size, self.seen = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and sum(d >= self.size for d in t.shape) >= 2:
                self.seen.append((str(func), list(t.shape)))
        return out


@pytest.mark.parametrize("variant", [dict(), dict(softcap=30.0)])
def test_rule_path_allocates_no_s_by_s_tensor(variant):
    seq, block = 2048, 64
    q, k, v = qkv(2, 1, 1, seq, seq, dim=16)
    rule = rule_of(causal_terms(2, seq, seq) + window_terms(2, seq, seq, 300) + padding_terms([seq, 1500], seq, seq))
    layout = rule_layout(rule, block, block)
    with LargeAllocations(seq) as mode:
        cpu_kernel(q, k, v, *layout, None, 0.25, block, block, 0.0, "zero", variant.get("softcap", 0.0), None, *rule)
    assert mode.seen == []
    with LargeAllocations(seq) as control:  # the check sees a dense mask when one is built
        rule_mask(*rule)
    assert control.seen


class CausalFlashCalls(TorchDispatchMode):
    """Counts ATen CPU flash calls on their own causal path."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func == torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            self.count += bool(args[4] if len(args) > 4 else (kwargs or {}).get("is_causal", False))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("lengths", [[128, 128], [128, 80]])
def test_rule_diagonal_takes_flash_causal_path_like_the_mask(lengths):
    q, k, v = qkv(2, 2, 2, 128, 128)
    rule = rule_of(causal_terms(2, 128, 128) + padding_terms(lengths, 128, 128))
    layout = rule_layout(rule, 16, 16)
    counts = []
    for mask, extra in ((None, rule), (rule_mask(*rule), ())):
        with CausalFlashCalls() as calls:
            cpu_kernel(q, k, v, *layout, mask, 0.25, 16, 16, 0.0, "zero", 0.0, None, *extra)
        counts.append(calls.count)
    assert counts[0] == counts[1] > 0
