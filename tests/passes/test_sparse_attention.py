"""sparse-attention (policy mask): attention in every form becomes block attention, exactly."""
import pytest
import torch
import torch.nn.functional as F

import sparsecc

from .hf_attention import gpt2, ids_and_padding, llama

PIPELINE = "sparse-attention{block=64},cleanup"


def _count(compiled, op="sparsecc::block_attention"):
    return [i.op for i in compiled.program.instructions].count(op)


@pytest.mark.parametrize("build", [llama, gpt2])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True])
def test_transformers_attention_is_rewritten_exactly(build, attn, padded):
    model = build(attn, layers=2)
    ids, attention_mask = ids_and_padding()
    kwargs = {"attention_mask": attention_mask} if padded else {}
    compiled = sparsecc.compile(model, (ids,), example_kwargs=kwargs, pipeline=PIPELINE)
    assert _count(compiled) == 2 and _count(compiled, "aten::scaled_dot_product_attention.default") == 0
    got, want = compiled(ids, **kwargs)["logits"], model(ids, **kwargs)["logits"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    layer = compiled.report().layers[0]
    assert layer.details["policy"] == "mask" and 0 < layer.details["density"] < 1


def test_gqa_reads_kv_heads_without_repeating_them():
    compiled = sparsecc.compile(llama("sdpa"), (ids_and_padding()[0],), pipeline=PIPELINE)
    assert compiled.report().layers[0].details["gqa"]


class MaskedAttention(torch.nn.Module):
    """SDPA with an explicit mask built from arange comparisons (causal + a key padding vector)."""

    def forward(self, q, k, v, keep):
        s = q.shape[-2]
        causal = torch.arange(s)[:, None] >= torch.arange(s)[None, :]
        mask = causal[None, None] & keep[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class BiasedAttention(torch.nn.Module):
    """An additive positional bias: not a boolean mask, so not block-sparse."""

    def forward(self, q, k, v):
        bias = -torch.arange(q.shape[-2], dtype=q.dtype)[None, :] * 0.1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def test_hand_written_mask_with_fully_masked_rows():
    q, k, v = (torch.randn(2, 2, 96, 16) for _ in range(3))
    keep = torch.ones(2, 96, dtype=torch.bool)
    keep[1, :70] = False   # early queries of row 1 see nothing: NaN rows in torch SDPA
    model = MaskedAttention()
    compiled = sparsecc.compile(model, (q, k, v, keep), pipeline=PIPELINE)
    assert _count(compiled) == 1
    torch.testing.assert_close(compiled(q, k, v, keep), model(q, k, v, keep), rtol=1e-4, atol=1e-5,
                               equal_nan=True)


def test_biases_and_is_causal_are_left_with_reasons():
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    compiled = sparsecc.compile(BiasedAttention(), (q, k, v), pipeline=PIPELINE)
    assert _count(compiled) == 0
    assert "not a boolean mask" in compiled.report().passes["sparse-attention"]["skipped"][0]["reason"]

    class Causal(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    compiled = sparsecc.compile(Causal(), (q, k, v), pipeline=PIPELINE)
    assert "is_causal=True" in compiled.report().passes["sparse-attention"]["skipped"][0]["reason"]


def test_config_spelling():
    model, (ids, _) = gpt2("sdpa"), ids_and_padding()
    compiled = sparsecc.compile(model, (ids,), sparsity={"attention": {"policy": "mask", "block": 64}})
    assert compiled.report().pipeline.startswith("sparse-attention{policy=mask,block=64}")
    assert "sparsecc.block_attention" in compiled.ir()


def test_window_policy_narrows_the_mask_and_reports_its_error():
    from sparsecc.passes.sparse_attention import window_mask

    model = llama("sdpa")
    ids, attention_mask = ids_and_padding(seq=320)
    kwargs = {"attention_mask": attention_mask}
    config = {"attention": {"policy": "window", "block": 64, "window": 48, "sinks": 4}}
    compiled = sparsecc.compile(model, (ids,), example_kwargs=kwargs, sparsity=config)
    layer = compiled.report().layers[0]
    exact = sparsecc.compile(model, (ids,), example_kwargs=kwargs, sparsity={"attention": {"block": 64}})
    assert layer.details["policy"] == "window"
    assert layer.details["density"] < exact.report().layers[0].details["density"]
    assert 0 < layer.details["error_vs_dense"] < 1 and compiled.report().error_vs_dense > 0
    visible = window_mask(5, 7, window=2, sinks=1)
    # the last query sits at key 6: keys 5, 6 and the sink 0; causality stays the model mask's job
    assert visible.tolist()[4] == [True, False, False, False, False, True, True]
