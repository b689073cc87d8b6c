"""sparse-attention (policy mask): attention in every form becomes block attention, exactly."""
import functools

import pytest
import torch
import torch.nn.functional as F

import sparsecc

from ..hf_attention import gpt2, ids_and_padding, llama

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


@functools.lru_cache(maxsize=None)
def _exact(attn: str):
    """Llama (GQA, one layer) compiled under `mask`, with its left-padded example inputs (shared by tests)."""
    model = llama(attn)
    ids, attention_mask = ids_and_padding(seq=320)
    kwargs = {"attention_mask": attention_mask}
    return model, ids, kwargs, sparsecc.compile(model, (ids,), example_kwargs=kwargs,
                                                sparsity={"attention": {"block": 64}})


def _lossy(policy_options: dict, attn="sdpa"):
    model, ids, kwargs, exact = _exact(attn)
    config = {"attention": {"block": 64, **policy_options}}
    return model, (ids, kwargs), sparsecc.compile(model, (ids,), example_kwargs=kwargs, sparsity=config), exact


def _assert_lossy_and_reported(compiled, exact, policy):
    report = compiled.report()
    assert _count(compiled) == 1 and len(report.layers) == 1
    layer, exact_layer = report.layers[0], exact.report().layers[0]
    assert layer.details["policy"] == policy and layer.details["density"] < exact_layer.details["density"]
    assert 0 < layer.details["error_vs_dense"] < 1 and report.error_vs_dense > 0
    assert f"policy {policy}" in str(report) and "error vs dense attention" in str(report)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_window_policy_uses_the_window_layout_and_reports_its_error(attn):
    _, _, compiled, exact = _lossy({"policy": "window", "window": 48, "sinks": 4}, attn=attn)
    _assert_lossy_and_reported(compiled, exact, "window")
    assert "logical_and" not in compiled.ir() and "attention_window" not in compiled.ir()  # no S x Skv constant
    assert "window=48" in compiled.ir()
    assert all(t.shape[-2:] != (320, 320) for t in compiled.constants.values())


def test_topk_policy_chooses_blocks_per_call_and_reports_its_error():
    _, _, compiled, exact = _lossy({"policy": "topk", "topk": 0.3, "sinks": 4})
    _assert_lossy_and_reported(compiled, exact, "topk")
    assert "topk=0.3" in compiled.ir()


def test_threshold_policy_on_llama_reports_visited_density_and_error():
    _, (ids, kwargs), compiled, exact = _lossy({"policy": "threshold", "threshold": 0.5})
    layer, exact_layer = compiled.report().layers[0], exact.report().layers[0]
    assert layer.details["policy"] == "threshold" and "threshold=0.5" in compiled.report().pipeline
    assert layer.details["density"] <= exact_layer.details["density"]
    assert 0 <= layer.details["error_vs_dense"] < 1 and "policy threshold (0.5)" in str(compiled.report())
    torch.testing.assert_close(compiled(ids, **kwargs)["logits"], compiled(ids, **kwargs)["logits"])


def _masked_inputs(seq=256, sink=0.0):
    """Causal + left padding inputs; `sink` > 0 makes the first 64 keys dominate every query (a learned sink)."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, seq, 16) for _ in range(3))
    q[..., 0], k[:, :, :64, 0] = q[..., 0] + sink, k[:, :, :64, 0] + 4 * sink
    keep = torch.ones(2, seq, dtype=torch.bool)
    keep[1, :20] = False
    mask = (torch.arange(seq)[:, None] >= torch.arange(seq)[None, :])[None, None] & keep[:, None, None, :]
    return (q, k, v, keep), mask


@pytest.mark.parametrize("options", [{"policy": "window", "window": 40, "sinks": 3}, {"policy": "topk", "topk": 2}])
def test_lossy_policies_compute_attention_over_the_blocks_their_layout_names(options):
    """The compiled program is dense attention under mask & (the elements the policy layout keeps)."""
    from sparsecc.runtime.attention_policies import topk_layout_from_mask, window_layout_from_mask
    from sparsecc.runtime.ops.block_attention import visible_elements

    (q, k, v, keep), mask = _masked_inputs()
    model = MaskedAttention()
    compiled = sparsecc.compile(model, (q, k, v, keep), sparsity={"attention": {"block": 64, **options}})
    if options["policy"] == "window":
        layout = window_layout_from_mask(mask, options["window"], options["sinks"], 64, 64)
    else:
        layout = topk_layout_from_mask(mask, q, k, options["topk"], 4, 64, 64)
    narrowed = mask & visible_elements(layout, mask, 256, 256, 64, 64)
    assert (narrowed != mask).any()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=narrowed)
    torch.testing.assert_close(compiled(q, k, v, keep), want, rtol=1e-4, atol=1e-5)
    dense = model(q, k, v, keep)
    error = compiled.report().layers[0].details["error_vs_dense"]
    assert error == pytest.approx(((want - dense).norm() / dense.norm()).item(), rel=1e-3)


def test_topk_over_every_block_is_exact():
    inputs, _ = _masked_inputs()
    compiled = sparsecc.compile(MaskedAttention(), inputs, sparsity={"attention": {"policy": "topk", "topk": 1000}})
    torch.testing.assert_close(compiled(*inputs), MaskedAttention()(*inputs), rtol=1e-4, atol=1e-5)
    assert compiled.report().layers[0].details["error_vs_dense"] < 1e-5


def test_threshold_skips_blocks_of_peaky_attention_and_counts_what_it_visits():
    from sparsecc.runtime.ops.block_attention import block_attention_reference

    inputs, mask = _masked_inputs(sink=6.0)
    model = MaskedAttention()
    compiled = sparsecc.compile(model, inputs, sparsity={"attention": {"policy": "threshold", "threshold": 1e-2,
                                                                       "block": 64}})
    exact = sparsecc.compile(model, inputs, sparsity={"attention": {"block": 64}})
    layer = compiled.report().layers[0]
    assert layer.details["density"] < exact.report().layers[0].details["density"]
    assert 0 < layer.details["error_vs_dense"] < 1e-3  # what it skips lies far below the row maximum
    q, k, v, _ = inputs
    layout = torch.ops.sparsecc.block_layout(mask, 64, 64)
    want = block_attention_reference(q, k, v, *layout, mask, 0.25, 64, 64, 1e-2, "zero")
    torch.testing.assert_close(compiled(*inputs), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config,message", [
    ({"policy": "topk", "topk": 1.5}, "attention.topk: expected a fraction in (0, 1) or a whole count >= 1"),
    ({"policy": "topk", "topk": 0}, "attention.topk"),
    ({"policy": "threshold", "threshold": 1.0}, "attention.threshold: expected a number in (0, 1)"),
    ({"policy": "window", "window": 0}, "attention.window: expected an integer >= 1"),
    ({"policy": "window", "sinks": -2}, "attention.sinks"),
    ({"policy": "blasst"}, "available: mask, window, topk, threshold"),
])
def test_config_errors_name_the_key(config, message):
    from sparsecc.config import parse_sparsity
    from sparsecc.errors import ConfigError
    with pytest.raises(ConfigError) as err:
        parse_sparsity({"attention": config})
    assert message in str(err.value)


def test_pass_options_are_checked_before_anything_runs():
    inputs, _ = _masked_inputs(seq=32)
    with pytest.raises(ValueError, match=r"option 'threshold': expected a number in \(0, 1\), got 2.0"):
        sparsecc.compile(MaskedAttention(), inputs, pipeline="sparse-attention{policy=threshold,threshold=2.0}")
    with pytest.raises(ValueError, match="option 'topk': expected a fraction .* got 0.0"):
        sparsecc.compile(MaskedAttention(), inputs, pipeline="sparse-attention{policy=topk,topk=0}")


def test_policy_layout_arguments_survive_the_artifact(tmp_path):
    """block_layout's policy string, float and optional q/k operands round-trip through save/load."""
    import sparsecc.runtime

    inputs, _ = _masked_inputs()
    compiled = sparsecc.compile(MaskedAttention(), inputs, sparsity={"attention": {"policy": "topk", "topk": 0.25,
                                                                                   "block": 64}})
    compiled.save(str(tmp_path), targets=["cpu"])
    assert torch.equal(sparsecc.runtime.load(str(tmp_path))(*inputs), compiled(*inputs))


class CausalSDPA(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_is_causal_sdpa_is_narrowed_by_lossy_policies_and_left_to_sdpa_under_mask():
    import sparsecc

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    dense = CausalSDPA()(q, k, v)
    kept = sparsecc.compile(CausalSDPA(), (q, k, v), sparsity={"attention": "mask"})
    assert kept.report().layers == [] and "is_causal" in kept.report().skipped[0]["reason"]
    window = sparsecc.compile(CausalSDPA(), (q, k, v),
                              sparsity={"attention": {"policy": "window", "window": 64, "sinks": 4, "block": 64}})
    (layer,) = window.report().layers
    assert layer.op == "sparsecc.block_attention" and layer.details["density"] < 0.7
    got = window(q, k, v)
    error = ((got - dense).norm() / dense.norm()).item()
    assert 0 < error and abs(error - layer.details["error_vs_dense"]) < 1e-5
    # the first 64 + 4 rows see every key they saw before: exact there
    torch.testing.assert_close(got[:, :, :64], dense[:, :, :64], rtol=1e-5, atol=1e-5)


def test_a_causal_site_left_dense_leaves_the_graph_as_it_was():
    """A lossy policy turns causal SDPA into a mask to try it; a site it then skips goes back whole."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    cm = sparsecc.compile(CausalSDPA(), (q, k, v),
                          pipeline="sparse-attention{policy=window,window=64,block=64,tolerance=0.0},cleanup")
    assert [s["rule"] for s in cm.report().skipped] == ["sparse-attention"]
    assert "block_attention" not in cm.ir() and "arange" not in cm.ir()
