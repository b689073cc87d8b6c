"""Routers: norm scores, a calibrated probe fitted on calibration batches, router weights from safetensors."""
import pytest
import sparsecc
import torch
from safetensors.torch import save_file
from sparsecc.passes.tokens.routers import (
    Probe,
    fit_probe,
    save_router_weights,
    scores,
)

from ..helpers import Block
from ..routing_models import stack

PIPELINE = "token-routing{{capacity=0.5,layers=[*],router={router}{extra}}},cleanup"


def _compile(router, extra="", calibration=None, model=None, x=None):
    model = model if model is not None else stack(layers=2)
    x = x if x is not None else torch.randn(2, 16, 32)
    return sparsecc.compile(model, (x,), pipeline=PIPELINE.format(router=router, extra=extra),
                            calibration=calibration)


def test_fit_probe_recovers_a_linear_target():
    features = torch.randn(400, 8)
    weight = torch.randn(8)
    probe = fit_probe(features, features @ weight + 0.5)
    torch.testing.assert_close(probe.weight, weight, rtol=1e-2, atol=1e-2)
    assert probe.bias == pytest.approx(0.5, abs=1e-2) and probe.fit_r2 > 0.999


def test_calibrated_router_is_fitted_on_the_calibration_batches():
    batches = [(torch.randn(4, 16, 32),) for _ in range(3)]
    compiled = _compile("calibrated", calibration=batches)
    records = compiled.report().layers
    assert all(r.details["router"] == "calibrated" and "probe_r2" in r.details for r in records)
    assert records[0].details["router_data"] == "calibration: 3 batch(es) of [4, 16, 32]"
    assert records[0].params_after == 33
    assert "routers from calibration: 3 batch(es)" in str(compiled.report())


def test_calibrated_router_without_calibration_uses_the_example_inputs_and_says_so():
    compiled = _compile("calibrated")
    assert "no calibration given" in compiled.report().layers[0].details["router_data"]


def test_calibration_batches_that_do_not_fit_the_graph_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"calibration batch 0: input 0 has shape \[2, 5, 16\], expected \[2, s\d+, 32\] "
                                         r"\(float32\); x dim 2 is 16, but the model fixes it to 32"):
        _compile("calibrated", calibration=[(torch.randn(2, 5, 16),)])


def test_weights_router_keeps_the_tokens_the_file_weights_score_highest(tmp_path):
    model, x = stack(layers=1), torch.randn(2, 16, 32)
    probe = Probe(torch.randn(32), 0.1)
    path = tmp_path / "routers.safetensors"
    save_router_weights(path, {"layers.0.mlp": probe})
    compiled = _compile("weights", f',weights_file="{path}"', model=model, x=x)
    kept = torch.ops.sparsecc.route(scores("weights", model.layers[0].norm(x), probe), 0.5)
    skipped = torch.ones(2, 16, 1, dtype=torch.bool)
    skipped[torch.arange(2)[:, None], kept] = False
    with torch.no_grad():
        expected = torch.where(skipped, x, model(x))
        torch.testing.assert_close(compiled(x), expected, rtol=1e-6, atol=1e-6)


def test_calibrated_probes_saved_and_loaded_route_the_same_tokens(tmp_path):
    model, x = stack(layers=2), torch.randn(2, 16, 32)
    calibrated = _compile("calibrated", model=model, x=x)
    probes = {}
    for i in range(2):
        weight = calibrated.constants[f"layers.{i}.mlp.router_weight"].reshape(-1)
        bias = float(calibrated.constants[f"layers.{i}.mlp.router_bias"].reshape(-1)[0])
        probes[f"layers.{i}.mlp"] = Probe(weight, bias)
    path = tmp_path / "probes.safetensors"
    save_router_weights(path, probes)
    loaded = _compile("weights", f',weights_file="{path}"', model=model, x=x)
    assert torch.equal(loaded(x), calibrated(x))


def test_a_weights_file_without_a_block_names_the_block_and_the_keys(tmp_path):
    path = tmp_path / "partial.safetensors"
    save_file({"layers.0.mlp.router.weight": torch.randn(32)}, str(path))
    with pytest.raises(ValueError, match=r"no 'layers.1.mlp.router.weight' for block 'layers.1.mlp'"):
        _compile("weights", f',weights_file="{path}"')
    save_file({"layers.0.mlp.router.weight": torch.randn(31), "layers.1.mlp.router.weight": torch.randn(32)},
              str(path))
    with pytest.raises(ValueError, match="has 31 values, block 'layers.0.mlp' has width 32"):
        _compile("weights", f',weights_file="{path}"')


def test_a_block_at_the_root_reads_router_weight_without_a_prefix(tmp_path):
    """helpers.Block is x + fc2(relu(relu(fc1(x)))): its matmuls share no module but the root."""
    torch.manual_seed(0)
    model, x = Block(32).eval(), torch.randn(1, 8, 32)
    path = tmp_path / "root.safetensors"
    save_file({"router.weight": torch.randn(32), "router.bias": torch.zeros(1)}, str(path))
    compiled = _compile("weights", f',weights_file="{path}"', model=model, x=x)
    assert [r.layer for r in compiled.report().layers] == ["<root>"]
