"""moe-dispatch on every MoE form: rewrite count, op types, exact match with the original block."""
import pytest
import torch

import sparsecc

from .. import moe_models as mm
from ..hf_moe import mixtral, qwen2_moe, tokens


def _compile(model, inputs, **kw):
    return sparsecc.compile(model, inputs, pipeline="moe-dispatch,cleanup", **kw)


def _assert_dispatched(compiled, blocks, form):
    layers = compiled.report().layers
    assert [r.source_op for r in layers] == [f"moe/{form}"] * blocks
    ops = [i.op for i in compiled.program.instructions]
    assert ops.count("sparsecc::moe") == blocks
    assert not any(op.startswith(("aten::topk", "aten::bmm", "aten::index_add", "transformers::")) for op in ops)


@pytest.mark.parametrize("moe, form", [
    (lambda: mm.LoopMoE(), "loop"),
    (lambda: mm.DenseMoE(), "dense"),
    (lambda: mm.DenseMoE(expert=mm.GeluExpert, order="topk_softmax"), "dense"),
    (lambda: mm.DenseMoE(normalize=False), "dense"),
    (lambda: mm.SharedExpertMoE(), "dense"),
])
def test_hand_written_forms_are_exact(moe, form):
    model, x = mm.Block(moe()).eval(), torch.randn(2, 5, 32)
    compiled = _compile(model, (x,))
    _assert_dispatched(compiled, 1, form)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert compiled.report().error_vs_dense < 1e-5


def test_shared_expert_is_folded_into_the_op():
    compiled = _compile(mm.Block(mm.SharedExpertMoE()).eval(), (torch.randn(1, 4, 32),))
    record = compiled.report().layers[0]
    assert record.details["shared_expert"] and not record.details["normalize"]
    assert "aten::sigmoid.default" not in [i.op for i in compiled.program.instructions]


@pytest.mark.parametrize("build", [mixtral, qwen2_moe])
@pytest.mark.parametrize("implementation, form", [(None, "grouped_mm"), ("batched_mm", "batched_mm")])
def test_transformers_models_are_exact(build, implementation, form):
    model, ids = build(implementation), tokens()
    compiled = _compile(model, (ids,))
    _assert_dispatched(compiled, 2, form)
    torch.testing.assert_close(compiled(ids)["logits"], model(ids)["logits"], rtol=1e-4, atol=1e-5)


def test_qwen2_moe_with_normalised_top_k():
    model, ids = qwen2_moe(norm_topk_prob=True), tokens()
    compiled = _compile(model, (ids,))
    assert all(r.details["normalize"] for r in compiled.report().layers)
    torch.testing.assert_close(compiled(ids)["logits"], model(ids)["logits"], rtol=1e-4, atol=1e-5)


def test_128_experts_top_1_most_of_them_empty():
    model, ids = mixtral(experts=128, top_k=1, layers=1), tokens(1, 6)
    compiled = _compile(model, (ids,))
    details = compiled.report().layers[0].details
    assert details["experts"] == 128 and details["tokens_per_expert"]["min"] == 0
    torch.testing.assert_close(compiled(ids)["logits"], model(ids)["logits"], rtol=1e-4, atol=1e-5)


def test_single_token():
    model, ids = mixtral(layers=1), tokens(1, 1)
    compiled = _compile(model, (ids,))
    torch.testing.assert_close(compiled(ids)["logits"], model(ids)["logits"], rtol=1e-4, atol=1e-5)


def test_capacity_factor_drops_pairs_and_says_how_many():
    model, ids = mixtral(layers=1), tokens(2, 8)
    compiled = sparsecc.compile(model, (ids,), sparsity={"moe": {"capacity_factor": 0.5}})
    details = compiled.report().layers[0].details
    assert details["dropped_pairs"] > 0 and details["pairs"] == 32
    assert "dropped" in str(compiled.report()) and compiled.report().error_vs_dense > 0


def test_topk_that_is_not_routing_is_left_alone():
    model, x = mm.NotMoE().eval(), torch.randn(3, 32)
    compiled = _compile(model, (x,))
    stats = compiled.report().passes["moe-dispatch"]
    assert stats["rewritten"] == 0 and "expert weights" in stats["skipped"][0]["reason"]
    torch.testing.assert_close(compiled(x), model(x))


def test_model_is_untouched():
    model = mixtral(layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _compile(model, (tokens(),))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_two_to_four_on_top_keeps_routers_dense_and_matches_pruned_model():
    model, ids = qwen2_moe(), tokens()
    everything = sparsecc.compile(model, (ids,), sparsity={"moe": "dispatch", "weights": "2:4"}, check=False)
    assert {r.op for r in everything.report().layers} == {
        "sparsecc.moe", "sparsecc.nm_linear", "sparsecc.moe+nm_decompress"}
    compiled = sparsecc.compile(model, (ids,), sparsity={"moe": "dispatch",
                                                         "weights": {"pattern": "2:4", "exclude": ["*.experts"]}})
    report = compiled.report()
    assert {r.op for r in report.layers} == {"sparsecc.moe", "sparsecc.nm_linear"}
    routers = [s for s in report.skipped if s["layer"].endswith("mlp.gate")]
    assert len(routers) == 2 and all("router of an MoE block" in s["reason"] for s in routers)
    reference = torch.func.functional_call(model, compiled.pruned_state_dict(), (ids,))
    torch.testing.assert_close(compiled(ids)["logits"], reference["logits"], rtol=1e-4, atol=1e-5)
    assert report.error_vs_reference < 1e-5


@pytest.mark.interpreter
def test_dispatch_under_the_triton_interpreter():
    model, ids = mixtral(layers=1), tokens(1, 4)
    compiled = sparsecc.compile(model, (ids,), sparsity={"moe": "dispatch"}, backend="triton")
    torch.testing.assert_close(compiled(ids)["logits"], model(ids)["logits"], rtol=1e-4, atol=1e-4)


def test_expert_weights_pruned_two_to_four_are_exact_against_the_pruned_experts():
    from sparsecc.runtime.executor import Executor
    from sparsecc.runtime.nm_format import decompress_nm

    model, ids = mixtral(layers=1), tokens()
    pruned = sparsecc.compile(model, (ids,), pipeline="moe-dispatch,prune-nm{include=[*.experts]},cleanup")
    record = next(r for r in pruned.report().layers if r.op == "sparsecc.moe+nm_decompress")
    assert record.bytes_after / record.bytes_before == pytest.approx(0.5 + 1 / 32)   # fp32 values + 2-bit indices
    dense = _compile(model, (ids,))
    constants = dict(dense.constants)
    for target, (values, indices) in record.details["compressed"].items():
        weight = constants[target]
        constants[target] = decompress_nm(pruned.constants[values], pruned.constants[indices], 2, 4, weight.shape[-1])
        assert (constants[target].reshape(-1, 4) != 0).sum(-1).max() <= 2
    want = Executor(dense.program, constants).run([ids])[0]
    torch.testing.assert_close(pruned(ids)["logits"], want, rtol=1e-5, atol=1e-5)
    assert pruned.report().error_vs_reference < 1e-5   # the experts are put back under the model's names


@pytest.mark.interpreter
def test_pruned_experts_under_the_triton_interpreter_match_the_torch_backend():
    model, ids = mixtral(layers=1), tokens(1, 4)
    config = {"moe": "dispatch", "weights": "2:4"}
    on_torch = sparsecc.compile(model, (ids,), sparsity=config, check=False)
    on_triton = sparsecc.compile(model, (ids,), sparsity=config, backend="triton", check=False)
    torch.testing.assert_close(on_triton(ids)["logits"], on_torch(ids)["logits"], rtol=1e-4, atol=1e-4)


def test_a_bare_moe_block_is_its_own_root_module():
    block, x = mixtral(layers=1).model.layers[0].mlp, torch.randn(1, 6, 32)
    compiled = _compile(block, (x,))
    assert [r.layer for r in compiled.report().layers] == ["<root>"]
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)
