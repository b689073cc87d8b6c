"""prune-nm methods: Wanda and SparseGPT against magnitude, calibration plumbing, layer-by-layer order."""
import pytest
import torch
from torch import nn

import sparsecc
from sparsecc.errors import ConfigError
from sparsecc.passes import PassContext, PassManager, build_pipeline
from sparsecc.passes.calibration import NO_CALIBRATION
from sparsecc.passes.nm.layerwise import prune_layerwise
from sparsecc.passes.nm.methods import magnitude_prune
from sparsecc.passes.nm.prune import NMRules, PruneNM
from sparsecc.passes.nm.sparsegpt import HessianStats, sparsegpt_prune
from sparsecc.passes.nm.wanda import WandaStats

from ..helpers import capture, outputs


class MLP(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 64):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def correlated_inputs(batches: int, tokens: int, d: int, seed: int = 1) -> list[tuple]:
    """Low-rank inputs plus noise, columns at very different scales: correlation OBS uses, scales Wanda uses."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d // 4, d, generator=g) * torch.logspace(-0.5, 0.5, d)[None, :]
    return [(torch.randn(tokens, d // 4, generator=g) @ mix + 0.1 * torch.randn(tokens, d, generator=g),)
            for _ in range(batches)]


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    return bool(((weight.reshape(weight.shape[0], -1, m) != 0).sum(-1) <= n).all())


def _layer_error(weight, pruned, xs) -> float:
    x = torch.cat([b[0] for b in xs]).double()
    return ((x @ (weight.double() - pruned.double()).T).norm() / (x @ weight.double().T).norm()).item()


def test_sparsegpt_reconstruction_beats_magnitude_on_the_same_budget():
    weight, xs = torch.randn(48, 64), correlated_inputs(4, 64, 64)
    hessian, wanda = HessianStats(64, weight.device), WandaStats(64, weight.device)
    for (x,) in xs:
        hessian.observe(x)
        wanda.observe(x)
    sparse, keep = sparsegpt_prune(weight, hessian.hessian(), 2, 4, blocksize=16)
    magnitude, _ = magnitude_prune(weight, 2, 4)
    wanda_w, _ = wanda.prune(weight, 2, 4)
    assert is_nm(sparse, 2, 4) and int(keep.sum()) == weight.numel() // 2 == int((sparse != 0).sum())
    assert not torch.equal(sparse[keep], weight[keep])            # kept weights were updated
    errors = [_layer_error(weight, w, xs) for w in (magnitude, wanda_w, sparse)]
    assert errors[2] < errors[1] < errors[0] and errors[2] < 0.8 * errors[0]


def test_wanda_keeps_small_weights_on_loud_columns():
    weight = torch.tensor([[1.0, 0.9, 0.2, 0.1], [0.1, 0.2, 0.9, 1.0]])
    stats = WandaStats(4, weight.device)
    stats.observe(torch.tensor([[0.01, 0.01, 10.0, 10.0]]))      # columns 2, 3 carry the signal
    _, wanda_mask = stats.prune(weight, 2, 4)
    _, magnitude_mask = magnitude_prune(weight, 2, 4)
    assert wanda_mask.tolist() == [[False, False, True, True], [False, False, True, True]]
    assert magnitude_mask[0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_methods_through_compile_are_exact_against_the_pruned_dense_model(method):
    model, cal = MLP(), correlated_inputs(3, 48, 32)
    x = cal[0][0][:8]
    errors = {}
    for name in ("magnitude", method):
        cm = sparsecc.compile(model, (x,), sparsity={"weights": {"pattern": "2:4", "method": name}},
                              calibration=cal)
        report = cm.report()
        assert report.error_vs_reference < 1e-5
        weights = cm.pruned_state_dict()
        assert set(weights) == {"up.weight", "down.weight"} and all(is_nm(w, 2, 4) for w in weights.values())
        with torch.no_grad():
            held_out = correlated_inputs(1, 64, 32, seed=1)[0][0]   # same distribution as calibration
            pruned = torch.func.functional_call(model, weights, (held_out,), strict=False)
            errors[name] = (pruned - model(held_out)).norm().item()
        if name != "magnitude":
            assert {r.details["method"] for r in cm.records} == {method}
            text = str(report)
            assert f"N:M mask method: {method} (2 layers)" in text and "calibration: 3 batch(es) of [48, 32]" in text
            assert report.passes["prune-nm"]["extra"]["method"] == method
    assert errors[method] < errors["magnitude"]


def test_wanda_and_magnitude_choose_different_masks_when_activations_scale_columns():
    model = MLP()
    scale = torch.ones(32)
    scale[::2] = 30.0                                              # even columns are loud
    cal = [(torch.randn(64, 32) * scale,)]
    masks = {}
    for method in ("magnitude", "wanda"):
        cm = sparsecc.compile(model, (cal[0][0][:4],), sparsity={"weights": {"method": method}}, calibration=cal)
        masks[method] = cm.pruned_state_dict()["up.weight"] != 0
    loud_kept = {k: m[:, ::2].float().mean().item() for k, m in masks.items()}
    assert not torch.equal(masks["magnitude"], masks["wanda"])
    assert loud_kept["wanda"] > 0.8 and loud_kept["magnitude"] < 0.65


def test_without_calibration_the_example_inputs_are_used_and_the_report_says_so():
    cm = sparsecc.compile(MLP(), (torch.randn(16, 32),), sparsity={"weights": {"method": "wanda"}})
    assert cm.records[0].details["calibration"] == NO_CALIBRATION
    assert f"activations from {NO_CALIBRATION}" in str(cm.report())
    assert "calibration" not in sparsecc.compile(MLP(), (torch.randn(4, 32),), "2:4").records[0].details


def test_layers_see_inputs_computed_with_earlier_layers_already_pruned():
    model = MLP()
    x = torch.randn(16, 32)
    gm = capture(model, (x,))
    ctx = PassContext(example_inputs=(x,))
    targets = NMRules(PruneNM(), gm, ctx).targets()
    seen = {}

    def prune(target, weight, inputs):
        seen[target.layer] = torch.cat(list(inputs))
        return magnitude_prune(weight, 2, 4)

    pruned = prune_layerwise(gm, [(x[:8],), (x[8:],)], targets, prune)
    assert [t.layer for t in targets] == ["up", "down"] and set(pruned) == {"up.weight", "down.weight"}
    torch.testing.assert_close(seen["up"], x)
    up_pruned = pruned["up.weight"][0]
    torch.testing.assert_close(seen["down"], torch.relu(x @ up_pruned.T + model.up.bias))


def test_pipeline_option_and_pass_context_calibration():
    model, x = MLP(), torch.randn(8, 32)
    gm = capture(model, (x,))
    ctx = PassContext(example_inputs=(x,), calibration=[(torch.randn(32, 32),)])
    gm = PassManager(build_pipeline("prune-nm{n=2,m=4,method=sparsegpt,percdamp=0.1,blocksize=8},cleanup")).run(gm, ctx)
    assert ctx.stats["prune-nm"].rewritten == 2
    assert ctx.records[0].details["calibration"] == "calibration: 1 batch(es) of [32, 32]"
    assert outputs(gm, x)[0].shape == (8, 32)


def test_bad_method_options_and_calibration_are_named():
    with pytest.raises(ConfigError, match="unknown method 'obs'.*magnitude, wanda, sparsegpt"):
        sparsecc.compile(MLP(), (torch.randn(4, 32),), {"weights": {"method": "obs"}})
    with pytest.raises(ConfigError, match="weights.blocksize: blocksize must be a positive multiple of M=8"):
        sparsecc.compile(MLP(), (torch.randn(4, 32),), {"weights": {"pattern": "4:8", "blocksize": 12}})
    with pytest.raises(ConfigError, match="calibration batch 1 has structure"):
        sparsecc.compile(MLP(), (torch.randn(4, 32),), {"weights": {"method": "wanda"}},
                         calibration=[(torch.randn(4, 32),), (torch.randn(4, 32), torch.randn(2))])
    with pytest.raises(ConfigError, match="calibration: expected an iterable of batches"):
        sparsecc.compile(MLP(), (torch.randn(4, 32),), "2:4", calibration=torch.randn(4, 32))
    with pytest.raises(ValueError, match="unknown method 'obs'"):
        PassManager(build_pipeline("prune-nm{method=obs}")).run(capture(MLP(), (torch.randn(4, 32),)), PassContext())


def test_sparsegpt_names_the_layer_when_the_hessian_cannot_be_factored():
    with pytest.raises(ValueError, match="Hessian of layer 'blocks.0.up' is not positive definite"):
        sparsegpt_prune(torch.randn(4, 8), torch.full((8, 8), float("nan")), 2, 4, percdamp=0.0, layer="blocks.0.up")


def test_calibration_runs_the_captured_graph_of_an_onnx_import():
    np = pytest.importorskip("numpy")
    from onnx import TensorProto, helper, numpy_helper
    from sparsecc.onnx.frontend.onnx_module import make_module

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for shape, name in (((32, 64), "up_w"), ((64, 32), "down_w"))]
    nodes = [helper.make_node("MatMul", ["x", "up_w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "down_w"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 32])], weights)
    x = torch.randn(8, 32)
    module = make_module(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), (x,))
    calibration = [(torch.randn(8, 32) * torch.linspace(0.1, 10, 32),) for _ in range(3)]
    masks = {}
    for method in ("magnitude", "wanda"):
        cm = sparsecc.compile(module, (x,), {"weights": {"method": method}}, calibration=calibration)
        assert [r.layer for r in cm.records] == ["up_w", "down_w"] and cm.report().error_vs_reference < 1e-6
        masks[method] = cm.pruned_state_dict()["up_w"] != 0
    assert not torch.equal(masks["magnitude"], masks["wanda"])


class FixedShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(32, 32)

    def forward(self, x):
        return self.l(x).reshape(2, 4, 32)     # a size baked into the captured graph


def test_a_calibration_batch_that_does_not_fit_the_graph_names_the_batch_and_node():
    with pytest.raises(sparsecc.ConfigError, match=r"calibration batch 1: input 0 has shape \[6, 32\], expected "
                       r"\[8, 32\] \(float32\); x dim 0 is 6, but the model fixes it to 8"):
        sparsecc.compile(FixedShape(), (torch.randn(8, 32),), {"weights": {"method": "wanda"}},
                         calibration=[(torch.randn(8, 32),), (torch.randn(6, 32),)])


def test_progress_shows_a_bar_over_the_layers(capsys):
    sparsecc.compile(MLP(), (torch.randn(8, 32),), {"weights": {"method": "sparsegpt"}}, progress=True)
    err = capsys.readouterr().err
    assert "prune-nm sparsegpt" in err and "2/2" in err
