"""prune-nm on the stacked experts of `sparsecc.moe`: Wanda/SparseGPT masks from each expert's own routed tokens."""
import pytest
import torch
import torch.nn.functional as F

import sparsecc
from sparsecc.passes import MoEDispatch, PassContext, PassManager
from sparsecc.passes.nm.experts import bound_call
from sparsecc.passes.nm.layerwise import prune_layerwise
from sparsecc.passes.nm.methods import magnitude_prune
from sparsecc.passes.nm.prune import NMRules, PruneNM
from sparsecc.runtime.kernels.cpu.moe import ExpertForm, shared_expert_output
from sparsecc.runtime.moe_routing import route_within_capacity
from sparsecc.runtime.nm_format import decompress_nm

from .. import moe_models as mm
from ..helpers import capture


def loud_block(seed: int = 0) -> torch.nn.Module:
    """Block(LoopMoE): E=4, top_k=2, H=32, I=48; a quarter of the normed channels are 8x louder, so the
    experts' input scale differs by channel and Wanda's choice differs from magnitude's."""
    torch.manual_seed(seed)
    model = mm.Block(mm.LoopMoE()).eval()
    with torch.no_grad():
        model.norm.weight[::4] = 8.0
    return model


def batches(count: int, seed: int) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 16, 32, generator=g),) for _ in range(count)]


def compile_experts(model, method: str, calibration):
    return sparsecc.compile(model, (calibration[0][0],), calibration=calibration, check=False, sparsity={
        "moe": "dispatch", "weights": {"pattern": "2:4", "method": method, "include": ["*.experts"]}})


def expert_masks(compiled) -> dict[str, torch.Tensor]:
    """Stacked expert weight name -> kept mask [E, out, K], decoded from the compressed constants."""
    record = next(r for r in compiled.report().layers if r.op == "sparsecc.moe+nm_decompress")
    constants = compiled.constants
    return {target: decompress_nm(constants[v], constants[i], 2, 4, constants[v].shape[-1] * 2) != 0
            for target, (v, i) in record.details["compressed"].items()}


def moe_error(compiled, model, x) -> float:
    """Error of the MoE branch (output minus the residual) against the dense block."""
    with torch.no_grad():
        dense = model(x)
        return ((compiled(x) - dense).norm() / (dense - x).norm()).item()


@pytest.fixture(scope="module")
def loud_magnitude():
    """loud_block() pruned by magnitude on batches(4, seed=1): the baseline each method is compared with."""
    return compile_experts(loud_block(), "magnitude", batches(4, seed=1))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_expert_masks_follow_the_method_and_lower_the_block_error(loud_magnitude, method):
    model, calibration, held_out = loud_block(), batches(4, seed=1), batches(1, seed=2)[0][0]
    magnitude, chosen = loud_magnitude, compile_experts(model, method, calibration)
    record = next(r for r in chosen.report().layers if r.op == "sparsecc.moe+nm_decompress")
    assert record.details["method"] == method and "calibration: 4 batch(es)" in record.details["calibration"]
    assert sum(record.details["routed_rows"]) == 4 * 32 * 2      # every token reaches its top_k = 2 experts
    masks = {"magnitude": expert_masks(magnitude), method: expert_masks(chosen)}
    assert all(not torch.equal(masks["magnitude"][w], masks[method][w]) for w in masks[method])
    assert moe_error(chosen, model, held_out) < 0.75 * moe_error(magnitude, model, held_out)


def test_each_expert_observes_only_its_routed_tokens_and_down_reads_the_pruned_gate_up():
    model, x = loud_block(), torch.randn(2, 16, 32)
    gm = PassManager([MoEDispatch()]).run(capture(model, (x,)), PassContext(example_inputs=(x,)))
    targets = NMRules(PruneNM(method="wanda"), gm, PassContext(example_inputs=(x,))).targets()
    assert [t.layer for t in targets] == [targets[0].layer] * 2 and targets[0].layer.endswith(".experts")
    seen = {}

    def prune(target, weight, inputs):
        seen.setdefault(target.weight.target, []).append(torch.cat(list(inputs)))
        return magnitude_prune(weight, 2, 4)

    pruned = prune_layerwise(gm, [(x,)], targets, prune)
    with torch.no_grad():
        h = model.norm(x).reshape(-1, 32)
        chosen = model.mlp.router.gate(h).softmax(-1).topk(2, dim=-1).indices
    gate_up, down = (t.weight.target for t in targets)
    for e in range(4):
        rows = h[(chosen == e).any(-1)]
        torch.testing.assert_close(seen[gate_up][e], rows)
        gate, up = F.linear(rows, pruned[gate_up][0][e]).chunk(2, dim=-1)
        torch.testing.assert_close(seen[down][e], F.silu(gate) * up)


def test_an_expert_no_token_reaches_is_pruned_by_magnitude_and_the_record_says_so():
    model = loud_block()
    with torch.no_grad():
        model.norm.bias.fill_(10.0)
        model.mlp.router.gate.weight[3] = -10.0      # logit of expert 3 is about -10 * 10 * 32 for every token
    calibration = batches(2, seed=3)
    compiled = {name: compile_experts(model, name, calibration) for name in ("magnitude", "wanda")}
    masks = {name: expert_masks(c) for name, c in compiled.items()}
    record = next(r for r in compiled["wanda"].report().layers if r.op == "sparsecc.moe+nm_decompress")
    assert record.details["routed_rows"][3] == 0 and record.details["magnitude_experts"] == [3]
    assert "experts [3] got no calibration token, pruned by magnitude" in str(compiled["wanda"].report())
    for weight in masks["wanda"]:
        assert torch.equal(masks["wanda"][weight][3], masks["magnitude"][weight][3])
        assert not torch.equal(masks["wanda"][weight][:3], masks["magnitude"][weight][:3])


# Stock families whose moe call sets routing and expert options: DeepSeek-V3 (group-limited sigmoid
# routing, correction bias, scaling, shared expert), GPT-OSS (expert biases, interleaved clamped SwiGLU).
OPTION_FAMILIES = ("deepseek_v3", "gpt_oss")


@pytest.fixture(scope="module", params=OPTION_FAMILIES)
def family(request):
    """(ids, calibration, {request: compiled}) for one family, batched_mm experts."""
    fam = pytest.importorskip("tests.passes.moe.families")
    model, ids = fam.FAMILIES[request.param]("batched_mm"), fam.tokens()
    calibration = [(fam.tokens(seq=8)[:, :6].roll(i, 1),) for i in range(3)]
    experts_only = {"pattern": "2:4", "include": ["*.experts"]}
    requests = {"dense": None, "2:4": "2:4", "magnitude": experts_only, "wanda": {**experts_only, "method": "wanda"}}
    compiled = {name: sparsecc.compile(model, (ids,), calibration=calibration, check=False,
                                       sparsity={"moe": "dispatch", **({"weights": w} if w else {})})
                for name, w in requests.items()}
    return ids, calibration, compiled


def moe_nodes(compiled) -> list:
    return [n for n in compiled.graph_module.graph.nodes if n.target == torch.ops.sparsecc.moe.default]


def options(moe) -> tuple:
    """The moe call's arguments after the expert weights (stacked and shared), constants by name."""
    return torch.fx.node.map_arg((moe.args[6:], dict(moe.kwargs)), lambda a: a.target)


def test_experts_with_every_option_are_pruned_and_the_moe_keeps_its_options(family):
    _, _, compiled = family
    pruned, dense = moe_nodes(compiled["2:4"]), moe_nodes(compiled["dense"])
    assert len(pruned) == len(dense) == 2
    for p, d in zip(pruned, dense):
        assert [a.target for a in p.args[2:4]] == [torch.ops.sparsecc.nm_decompress.default] * 2
        shared = [a.target for a in p.args[4:6] if a is not None]   # DeepSeek-V3's shared expert is pruned too
        assert shared == [torch.ops.sparsecc.nm_decompress.default] * len([a for a in d.args[4:6] if a is not None])
        assert options(p) == options(d) and len(p.kwargs) >= 4     # routing / expert options set
    report = str(compiled["2:4"].report())
    shared = 2 if any(a is not None for a in pruned[0].args[4:6]) else 0   # a shared expert has its own row
    assert "did not rewrite this block" not in report
    assert report.count("sparsecc.moe+nm_decompress") == 2 + shared


def test_pruned_experts_match_the_dispatched_model_with_the_pruned_weights(family):
    """The rewrite is exact: the dense moe with the decompressed expert weights computes the same."""
    ids, _, compiled = family
    reference = compiled["dense"]
    for target, mask in expert_weights(compiled["magnitude"]).items():
        reference.constants[target].copy_(mask)
    with torch.no_grad():
        got, want = compiled["magnitude"](ids).logits, reference(ids).logits
    reference.reset_state()
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def expert_weights(compiled) -> dict[str, torch.Tensor]:
    """Stacked expert weight name -> its dense pruned value, decoded from the compressed constants."""
    constants, weights = compiled.constants, {}
    for record in compiled.report().layers:
        for target, (v, i) in record.details.get("compressed", {}).items():
            weights[target] = decompress_nm(constants[v], constants[i], 2, 4, constants[v].shape[-1] * 2)
    return weights


def test_wanda_sees_the_runtime_routing_and_chooses_other_masks_than_magnitude(family):
    ids, calibration, compiled = family
    records = [r for r in compiled["wanda"].report().layers if r.op == "sparsecc.moe+nm_decompress"]
    dispatched = next(r for r in compiled["wanda"].report().layers if r.op == "sparsecc.moe")
    rows = records[0].details["routed_rows"]
    assert sum(rows) == len(calibration) * ids.numel() * dispatched.details["top_k"]   # no capacity limit
    magnitude, wanda = expert_weights(compiled["magnitude"]), expert_weights(compiled["wanda"])
    assert all(not torch.equal(magnitude[w] != 0, wanda[w] != 0) for w in wanda)


def test_calibration_inputs_of_every_expert_rebuild_the_moe_output(family):
    """Per expert, down(what Wanda saw at down) weighted by the runtime's routing, plus the shared expert,
    is the moe's output: the rows and hidden each expert observes follow every routing and expert option."""
    ids, _, compiled = family
    gm = compiled["dense"].graph_module
    every = NMRules(PruneNM(method="wanda"), gm, PassContext(example_inputs=(ids,))).targets()
    targets = [t for t in every if t.layer.endswith(".experts")][:2]      # the first moe's gate/up, down
    seen = {}

    def keep(target, weight, inputs):
        seen.setdefault(target.weight.target, []).append(torch.cat(list(inputs)))
        return weight, weight != 0

    prune_layerwise(gm, [(ids,)], targets, keep)
    interpreter = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interpreter.run(ids)
    call = bound_call(targets[0].node, interpreter.env)
    weights, experts, _ = route_within_capacity(call.router_logits, call.top_k, call.normalize, call.scoring,
                                                call.capacity_factor, **call.selection())
    rebuilt = torch.zeros_like(call.hidden)
    for e, hidden in enumerate(seen[targets[1].weight.target]):
        token, slot = (experts == e).nonzero().unbind(-1)
        out = F.linear(hidden, call.w_down[e], None if call.b_down is None else call.b_down[e])
        rebuilt.index_add_(0, token, out * weights[token, slot, None])
    if call.shared_down is not None:
        rebuilt += shared_expert_output(call.hidden, call.shared_gate_up, call.shared_down, call.shared_gate,
                                        ExpertForm.of(call))
    torch.testing.assert_close(rebuilt, interpreter.env[targets[0].node], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_moe"])
def test_shared_expert_is_pruned_from_the_rows_its_own_linears_read(name):
    """The shared expert's gate/up sees every hidden row and its down the expert form of them, as the
    model's own shared-expert linears do (eager hooks); "2:4" alone prunes it and stays exact."""
    fam = pytest.importorskip("tests.passes.moe.families")
    model, ids = fam.FAMILIES[name]("grouped_mm"), fam.tokens()
    dense = sparsecc.compile(model, (ids,), sparsity={"moe": "dispatch"}, check=False)
    targets = [t for t in NMRules(PruneNM(method="wanda"), dense.graph_module, PassContext(example_inputs=(ids,)))
               .targets() if "shared" in t.layer][:2]
    seen = {}

    def keep(target, weight, inputs):
        seen[target.weight.target] = torch.cat(list(inputs))
        return weight, weight != 0

    prune_layerwise(dense.graph_module, [(ids,)], targets, keep)
    block = model.get_submodule(targets[0].layer.rpartition(".")[0])
    attribute = "shared_experts" if hasattr(block, "shared_experts") else "shared_expert"   # DeepSeek / Qwen2
    shared, eager = getattr(block, attribute), {}

    def record(key):
        def hook(module, args, out) -> None:   # returns None: the output stays the module's own
            eager.setdefault(key, args[0].reshape(-1, args[0].shape[-1]))
        return hook
    hooks = [shared.gate_proj.register_forward_hook(record("gate_up")),
             shared.down_proj.register_forward_hook(record("down"))]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    gate_up, down = (t.weight.target for t in targets)
    torch.testing.assert_close(seen[gate_up], eager["gate_up"])
    torch.testing.assert_close(seen[down], eager["down"], rtol=1e-5, atol=1e-6)
    report = sparsecc.compile(model, (ids,), sparsity={"weights": {"pattern": "2:4", "method": "wanda"}}).report()
    assert {f"model.layers.{i}.mlp.{attribute}" for i in range(len(model.model.layers))} <= {r.layer for r in report.layers}
    assert report.error_vs_reference is not None and report.error_vs_reference < 1e-5
