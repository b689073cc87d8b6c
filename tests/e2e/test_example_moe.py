"""The bundled MoE example: dispatch and mask-layout attention are exact, 2:4 composes on top."""
import torch

import sparsecc
from sparsecc.cli import main
from examples.tiny_moe import build


def test_moe_example_dispatch_and_attention_are_exact():
    model, inputs = build(batch=1, seq=64)
    compiled = sparsecc.compile(model, inputs, sparsity={"moe": "dispatch", "attention": "mask"})
    ops = sorted(r.op for r in compiled.report().layers)
    assert ops == ["sparsecc.block_attention"] * 2 + ["sparsecc.moe"] * 2
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


def test_moe_example_cli_with_every_rewrite(capsys):
    code = main(["compile", "examples.tiny_moe:build", "--json", "--sparsity",
                 '{"moe": "dispatch", "attention": "mask", "weights": "2:4"}'])
    assert code == 0
    report = __import__("json").loads(capsys.readouterr().out)
    ops = {layer["op"] for layer in report["layers"]}
    assert {"sparsecc.moe", "sparsecc.block_attention", "sparsecc.nm_linear", "sparsecc.moe+nm_decompress"} <= ops
    assert 0 < report["error_vs_dense"] < 1.0
    # expert weights appear in the dispatch row and the N:M row, but count once in the totals
    assert report["totals"]["bytes_before"] <= report["model_bytes"]["before"]


def test_moe_loop_form_compiles_without_the_moe_rewrite():
    """The loop form's unbacked-size checks (Python comparisons) lower and run."""
    model, inputs = build(batch=1, seq=32)
    compiled = sparsecc.compile(model, inputs, sparsity="2:4")
    assert compiled.report().error_vs_reference < 1e-5


def test_report_totals_count_each_flop_once_when_rewrites_nest():
    """Routing wraps the MoE block, which holds pruned experts: the routed row alone counts their FLOPs."""
    model, inputs = build(batch=1, seq=64)
    report = sparsecc.compile(model, inputs, check=False, sparsity={
        "moe": "dispatch", "tokens": {"capacity": 0.5, "layers": ["*"]}, "weights": "2:4"}).report()
    routed = [r for r in report.layers if r.op == "sparsecc.route"]
    outside = [r for r in report.layers if not r.layer.startswith("layers.0.moe")
               and not r.layer.startswith("layers.1.moe")]
    assert len(routed) == 2
    assert report.totals()["flops_before"] == sum(r.flops_before for r in routed + outside)
    assert report.totals()["flops_after"] == sum(r.flops_after for r in routed + outside)
