"""token-routing: blocks found, routed tokens only, capacity 1 bit-exact, lossy settings reported."""
import pytest
import sparsecc
import torch

from ..routing_models import CumulativeMLP, LeakyLayer, stack


def _compile(model, inputs, pipeline="token-routing{capacity=0.5,layers=[*]},cleanup", **kw):
    return sparsecc.compile(model, inputs, pipeline=pipeline, **kw)


def _ops(compiled):
    return [i.op for i in compiled.program.instructions]


def test_capacity_one_reproduces_the_dense_model_bit_for_bit():
    model, x = stack(), torch.randn(2, 12, 32)
    compiled = _compile(model, (x,), "token-routing{capacity=1.0,layers=[*]},cleanup")
    assert _ops(compiled).count("sparsecc::unroute") == 4
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
    assert compiled.report().error_vs_dense == 0.0


def test_half_capacity_runs_the_mlp_on_half_the_tokens_and_reports_it():
    model, x = stack(), torch.randn(2, 12, 32)
    compiled = _compile(model, (x,))
    layers = compiled.report().layers
    assert [r.layer for r in layers] == [f"layers.{i}.mlp" for i in range(4)]
    d = layers[0].details
    assert (d["kept"], d["tokens"], d["router"], d["capacity"]) == (6, 12, "norm", 0.5)
    assert 0 < d["block_error"] < 1 and d["flops_saved"] > 0
    assert layers[0].flops_after < 0.55 * layers[0].flops_before
    linears = [n for n in compiled.graph_module.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 12 and all(n.meta["val"].shape[1] == 6 for n in linears)
    error = compiled.report().error_vs_dense
    assert 0 < error < 1
    with torch.no_grad():
        dense = model(x)
        assert sparsecc.numerics.relative_error(compiled(x), dense) == pytest.approx(error)
    text = str(compiled.report())
    assert "token-routed blocks: 4" in text and "6 of 12 tokens per sequence" in text


def test_skipped_tokens_ride_the_residual_stream_unchanged():
    model, x = stack(layers=1), torch.randn(1, 8, 32)
    compiled = _compile(model, (x,), "token-routing{capacity=0.25,layers=[0]},cleanup")
    scores = torch.linalg.vector_norm(model.layers[0].norm(x), dim=-1)
    kept = scores.topk(2, -1).indices.sort(-1).values[0]
    with torch.no_grad():
        y, dense = compiled(x), model(x)
    skipped = [i for i in range(8) if i not in kept.tolist()]
    assert torch.equal(y[0, skipped], x[0, skipped])
    torch.testing.assert_close(y[0, kept], dense[0, kept], rtol=1e-6, atol=1e-6)


def test_first_and_last_blocks_stay_dense_by_default():
    compiled = sparsecc.compile(stack(), (torch.randn(1, 8, 32),), sparsity={"tokens": {"capacity": 0.5}})
    assert [r.layer for r in compiled.report().layers] == ["layers.1.mlp", "layers.2.mlp"]
    reasons = {s["layer"]: s["reason"] for s in compiled.report().skipped}
    assert "kept dense by default" in reasons["layers.0.mlp"] and "layers.3.mlp" in reasons


@pytest.mark.parametrize("layers, chosen", [("[layers.2.*]", ["layers.2.mlp"]),
                                            ("[0,-1]", ["layers.0.mlp", "layers.3.mlp"])])
def test_layers_by_glob_or_index(layers, chosen):
    compiled = _compile(stack(), (torch.randn(1, 8, 32),), f"token-routing{{layers={layers}}},cleanup")
    assert [r.layer for r in compiled.report().layers] == chosen


def test_a_block_that_mixes_tokens_is_left_dense_with_the_reason():
    model, x = stack(layers=2, mlp=CumulativeMLP), torch.randn(2, 8, 32)
    compiled = _compile(model, (x,))
    assert compiled.report().layers == [] and "sparsecc::route" not in _ops(compiled)
    reasons = [s["reason"] for s in compiled.report().skipped]
    assert len(reasons) == 2 and all("does not act token by token" in r for r in reasons)


def test_a_block_whose_intermediate_escapes_is_left_dense():
    torch.manual_seed(0)
    model, x = LeakyLayer(32, 64).eval(), torch.randn(1, 8, 32)
    compiled = _compile(model, (x,))
    assert compiled.report().layers == []
    reasons = [s["reason"] for s in compiled.report().skipped]
    assert any("is also read outside it" in r and "%" not in r for r in reasons), reasons


def test_the_model_is_not_modified():
    model, x = stack(), torch.randn(1, 8, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _compile(model, (x,))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_triton_backend_matches_torch_backend():
    """Interpreter on CPU; on a CUDA machine the model moves there and the kernels launch for real."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, x = stack(layers=2).to(device), torch.randn(2, 8, 32, device=device)
    torch_out = _compile(model, (x,), backend="torch", check=False)(x)
    triton_out = _compile(model, (x,), backend="triton", check=False)(x)
    torch.testing.assert_close(triton_out, torch_out, rtol=0, atol=0)


def test_bad_options_name_the_problem():
    with pytest.raises(ValueError, match=r"capacity.*expected a number in \(0, 1\]"):
        _compile(stack(layers=1), (torch.randn(1, 4, 32),), "token-routing{capacity=1.5}")
    with pytest.raises(ValueError, match="needs weights_file"):
        _compile(stack(layers=1), (torch.randn(1, 4, 32),), "token-routing{router=weights}")


def test_a_dynamic_sequence_length_leaves_the_blocks_dense_with_the_reason():
    model, x = stack(layers=2), torch.randn(1, 16, 32)
    seq = torch.export.Dim("seq", min=2, max=64)
    compiled = _compile(model, (x,), dynamic_shapes=({1: seq},))
    assert compiled.report().layers == []
    assert all("static batch and sequence length" in s["reason"] for s in compiled.report().skipped)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_models_route_and_stay_exact_at_capacity_one(dtype):
    model, x = stack(layers=2).to(dtype), torch.randn(2, 12, 32, dtype=dtype)
    exact = _compile(model, (x,), "token-routing{capacity=1.0,layers=[*]},cleanup")
    routed = _compile(model, (x,))
    with torch.no_grad():
        assert torch.equal(exact(x), model(x))
    assert len(routed.report().layers) == 2 and 0 < routed.report().error_vs_dense < 1
