"""Attention compiled from a rule: the program holds no S x S tensor, and `mask` stays exact."""
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import sparsecc

from ..hf_attention import ids_and_padding, llama

S = 192


def square_values(compiled, seq: int) -> list[str]:
    """Nodes of the compiled program whose value has two dims equal to `seq` (an S x S tensor)."""
    found = []
    for node in compiled.graph_module.graph.nodes:
        value = node.meta.get("val")
        values = value if isinstance(value, (tuple, list)) else [value]
        for v in values:
            if isinstance(v, torch.Tensor) and sum(1 for d in v.shape if d == seq) >= 2:
                found.append(f"{node.name} {list(v.shape)}")
    return found


def _rule_lines(compiled) -> list[str]:
    return [r.details["mask"] for r in compiled.report().layers if r.op == "sparsecc.block_attention"]


MASK, WINDOW, TOPK = {"policy": "mask"}, {"policy": "window", "window": 64, "sinks": 4}, {"policy": "topk", "topk": 0.5}


@pytest.mark.parametrize("attn, padded, policy", [("sdpa", False, MASK), ("sdpa", True, MASK), ("eager", False, MASK),
                                                  ("eager", True, MASK), ("sdpa", True, WINDOW),
                                                  ("eager", False, WINDOW), ("sdpa", True, TOPK)])
def test_llama_compiles_without_an_s_by_s_tensor(attn, padded, policy):
    model = llama(attn, layers=1)
    ids, attention_mask = ids_and_padding(seq=S, pad=70)
    kwargs = {"attention_mask": attention_mask} if padded else {}
    compiled = sparsecc.compile(model, (ids,), example_kwargs=kwargs, sparsity={"attention": {**policy, "block": 64}})
    assert square_values(compiled, S) == []
    lines = _rule_lines(compiled)
    assert len(lines) == 1 and lines[0].startswith("read as a rule")
    if policy["policy"] == "mask":
        got, want = compiled(ids, **kwargs)["logits"], model(ids, **kwargs)["logits"]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class CausalSDPA(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.filterwarnings("ignore:sparsecc.compile. attention")   # under mask, is_causal stays SDPA's
@pytest.mark.parametrize("policy", ["mask", "window"])
def test_is_causal_sdpa_compiles_without_an_s_by_s_tensor(policy):
    q, k, v = (torch.randn(1, 2, S, 16) for _ in range(3))
    compiled = sparsecc.compile(CausalSDPA(), (q, k, v),
                                sparsity={"attention": {"policy": policy, "window": 64, "block": 64}})
    assert square_values(compiled, S) == []
    if policy == "window":
        assert _rule_lines(compiled) == ["read as a rule of 1 terms (ge), no S x Skv tensor"]


class OrMask(torch.nn.Module):
    def forward(self, q):
        i = torch.arange(q.shape[2])
        mask = (i[None, :] <= i[:, None]) | (i[None, :] < 8)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def test_a_mask_that_is_not_a_rule_is_materialised_and_the_report_says_why():
    q = torch.randn(1, 2, 128, 16)
    compiled = sparsecc.compile(OrMask(), (q,), sparsity={"attention": {"block": 64}})
    [line] = _rule_lines(compiled)
    assert line.startswith("materialised per call") and "an OR" in line
    torch.testing.assert_close(compiled(q), OrMask()(q), rtol=1e-5, atol=1e-6)
    assert "materialised per call" in str(compiled.report())


class PaddedCausal(torch.nn.Module):
    """Causal attention with key padding built from arange and a [B, S] keep input, any length."""

    def forward(self, q, keep):
        i = torch.arange(q.shape[2], device=q.device)
        mask = (i[None, :] <= i[:, None])[None, None] & keep[:, None, None, :]
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def test_dynamic_sequence_runs_at_other_lengths_exactly():
    seq = Dim("seq", min=2, max=1024)
    q, keep = torch.randn(2, 2, 128, 16), torch.ones(2, 128, dtype=torch.bool)
    keep[1, :40] = False
    compiled = sparsecc.compile(PaddedCausal(), (q, keep), sparsity={"attention": {"block": 64}},
                                dynamic_shapes=({2: seq}, {1: seq}))
    assert _rule_lines(compiled)[0].startswith("read as a rule")
    for length in (2, 40, 200, 333):   # shorter than a block too
        q, keep = torch.randn(2, 2, length, 16), torch.ones(2, length, dtype=torch.bool)
        keep[0, : length // 3] = False
        torch.testing.assert_close(compiled(q, keep), PaddedCausal()(q, keep), rtol=1e-5, atol=1e-6)
