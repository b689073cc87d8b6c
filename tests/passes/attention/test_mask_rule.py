"""Reading attention masks as rules: what is read, what is refused and why, and the rule equals the mask."""
import pytest
import torch
import torch.nn.functional as F

import sparsecc
from sparsecc.passes.attention.block_call import rule_values
from sparsecc.passes.attention.mask_rule import NotARule, read_rule
from sparsecc.passes.attention.sites import attention_site
from sparsecc.passes.region import record_values
from sparsecc.runtime.attention_rule import rule_mask, stack_rule

from ..hf_attention import gpt2, ids_and_padding, llama

S = 48


class MaskedAttention(torch.nn.Module):
    """SDPA under a mask `build(q, keep)` makes; keep [B, S] is a key-padding input."""

    def __init__(self, build):
        super().__init__()
        self.build = build

    def forward(self, q, keep):
        return F.scaled_dot_product_attention(q, q, q, attn_mask=self.build(q, keep))


def _arange_causal(q, keep):
    i = torch.arange(q.shape[2])
    return i[:, None] >= i[None, :]


def _tril(q, keep):
    return torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril(-1) | torch.eye(q.shape[2], dtype=torch.bool)


def _window_and_padding(q, keep):
    i = torch.arange(q.shape[2])
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 8)
    return band[None, None] & keep[:, None, None, :]


def _tril_only(q, keep):
    return torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril(2)


def _chunks(q, keep):
    i = torch.arange(q.shape[2])
    return (i[:, None] // 16) == (i[None, :] // 16)


def _per_head(q, keep):
    i = torch.arange(q.shape[2])
    heads = torch.arange(q.shape[1])[:, None, None]
    return i[None, None, :] <= i[None, :, None] + heads


def _or(q, keep):
    i = torch.arange(q.shape[2])
    return (i[None, :] <= i[:, None]) | (i[None, :] < 4)


def _diff_band(q, keep):
    i = torch.arange(q.shape[2])
    return (i[:, None] - i[None, :]).abs() <= 3


def _float_tril(q, keep):
    return torch.ones(q.shape[2], q.shape[2]).tril().bool()


def _int_not(q, keep):
    return (~torch.tril(torch.full((q.shape[2], q.shape[2]), 1))).bool()


def _padding_3d(q, keep):
    """A [B, S, Skv] mask unsqueezed to [B, 1, S, Skv]: the [B, Skv] keep sits under the batch dim."""
    i = torch.arange(q.shape[2])
    return ((i[None, :] <= i[:, None])[None] & keep[:, None, :]).unsqueeze(1)


def _batch_into_heads(q, keep):
    """A per-batch mask reshaped into the head dim: not the mask its operands' shapes suggest."""
    valid = keep[:, None, None, :].expand(2, 1, q.shape[2], q.shape[2])
    return valid.reshape(1, 2, q.shape[2], q.shape[2])


def _site_and_values(build, keep=None):
    q = torch.randn(2, 2, S, 8)
    keep = torch.ones(2, S, dtype=torch.bool) if keep is None else keep
    compiled = sparsecc.compile(MaskedAttention(build), (q, keep), pipeline="cleanup")
    gm = compiled.graph_module
    sites = [s for s in map(_site_or_none, gm.graph.nodes) if s is not None]
    assert len(sites) == 1
    return gm, sites[0], (q, keep)


def _site_or_none(node):
    try:
        return attention_site(node) if node.op == "call_function" else None
    except ValueError:
        return None


@pytest.mark.parametrize("build, ops", [(_arange_causal, "ge"), (_window_and_padding, "ge,lt,ne"),
                                        (_tril_only, "ge"), (_chunks, "eq"), (_float_tril, "ge"),
                                        (_padding_3d, "ge,ne")])
def test_masks_read_as_rules_equal_the_masks(build, ops):
    keep = torch.ones(2, S, dtype=torch.bool)
    keep[0, :5] = False
    gm, site, inputs = _site_and_values(build, keep)
    rule = read_rule(site.mask)
    assert rule.ops == ops
    values = record_values(gm, inputs, [site.mask, *rule.operands])
    rows, cols = rule_values(rule, values, "cpu")
    got = rule_mask(*stack_rule(rows, cols, S, S), rule.ops)
    want = values[site.mask]
    torch.testing.assert_close(*torch.broadcast_tensors(got, want.reshape(*(1,) * (4 - want.dim()), *want.shape)))


@pytest.mark.parametrize("build, reason", [(_per_head, "differs per head"), (_or, "an OR"),
                                           (_tril, "an OR"), (_diff_band, "both the query and the key dim"),
                                           (_int_not, "is cast to a bool mask"), (_batch_into_heads, "differs per head")])
def test_masks_that_are_not_rules_say_why(build, reason):
    _, site, _ = _site_and_values(build)
    with pytest.raises(NotARule, match=reason):
        read_rule(site.mask)


@pytest.mark.parametrize("build", [llama, gpt2])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padded, ops", [(False, "ge,eq"), (True, "ge,ne")])
def test_transformers_masks_are_rules(build, attn, padded, ops):
    """Causal positions, and packed-document ids without a padding input or key padding with one."""
    ids, attention_mask = ids_and_padding(seq=64)
    kwargs = {"attention_mask": attention_mask} if padded else {}
    compiled = sparsecc.compile(build(attn), (ids,), example_kwargs=kwargs, pipeline="cleanup")
    sites = [s for s in map(_site_or_none, compiled.graph_module.graph.nodes) if s is not None and s.mask]
    assert sites and {read_rule(s.mask).ops for s in sites} == {ops}
