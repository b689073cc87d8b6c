"""moe-dispatch on every transformers MoE family, in both expert implementations transformers runs on
CPU: one `sparsecc::moe` per MoE layer, the family's routing and expert form read off the graph, and
the compiled model equal to the model to float tolerance."""
import pytest
import torch

import sparsecc

from .families import FAMILIES, tokens

IMPLEMENTATIONS = ["grouped_mm", "batched_mm"]
MOE_LAYERS = 2
CACHE_DROPPED = "left out of the compiled program.s outputs"   # the model's cache: the program returns none
# what each family's routing and experts must be read as (report details of every block)
READ_AS = {
    "mixtral": dict(scoring="softmax", normalize=True, shared_expert=False),
    "qwen2_moe": dict(scoring="softmax", normalize=False, shared_expert=True),
    "qwen3_moe": dict(scoring="softmax", normalize=True),
    "olmoe": dict(scoring="softmax", normalize=False),
    "granitemoe": dict(scoring="softmax", normalize=True),
    "deepseek_v3": dict(scoring="sigmoid", normalize=True, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                        score_correction_bias=True, shared_expert=True, top_k=3),
    "gpt_oss": dict(scoring="softmax", normalize=True, activation="swiglu_clamped", swiglu_limit=1.0,
                    swiglu_alpha=1.702, interleaved=True, expert_biases=True),
    "phimoe": dict(scoring="sparsemixer", normalize=False, sparsemixer_eps=0.01),
}


@pytest.fixture(scope="module", params=[(f, i) for f in FAMILIES for i in IMPLEMENTATIONS],
                ids=lambda case: "-".join(case))
def case(request):
    family, implementation = request.param
    model, ids = FAMILIES[family](implementation), tokens()
    with pytest.warns(UserWarning, match=CACHE_DROPPED):   # stock settings: use_cache on
        compiled = sparsecc.compile(model, (ids,), sparsity={"moe": "dispatch"})
    return family, implementation, model, ids, compiled


def test_every_moe_layer_is_one_moe_op(case):
    _, implementation, _, _, compiled = case
    ops = [i.op for i in compiled.program.instructions]
    assert ops.count("sparsecc::moe") == MOE_LAYERS
    assert not any(op.startswith(("aten::topk", "aten::bmm", "transformers::")) for op in ops)
    assert [r.source_op for r in compiled.report().layers] == [f"moe/{implementation}"] * MOE_LAYERS
    assert not compiled.report().skipped   # a group-limited router's inner topks are no misses


def test_matches_the_model(case):
    _, _, model, ids, compiled = case
    error = compiled.report().error_vs_dense
    assert error is not None and error < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids)["logits"], model(ids).logits, rtol=1e-5, atol=1e-5)


def test_routing_and_experts_are_read_as_the_family_computes_them(case):
    family, _, _, _, compiled = case
    for record in compiled.report().layers:
        assert {k: record.details.get(k) for k in READ_AS[family]} == READ_AS[family]


def test_a_block_no_reading_reproduces_is_skipped_with_its_layer_and_closest_error():
    model, ids = FAMILIES["deepseek_v3"]("batched_mm"), tokens()
    with pytest.warns(UserWarning, match="rewrote nothing"), pytest.warns(UserWarning, match=CACHE_DROPPED):
        compiled = sparsecc.compile(model, (ids,), pipeline="moe-dispatch{tolerance=1e-12},cleanup")
    skipped = compiled.report().skipped
    assert [s["layer"] for s in skipped] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    read = "8 experts, sigmoid top-3 in 2 of 4 groups, silu experts, shared expert"
    assert all(f"({read})" in s["reason"] and "closest relative error" in s["reason"] for s in skipped)
    assert "sparsecc::moe" not in [i.op for i in compiled.program.instructions]


class _MaxOverLinear(torch.nn.Module):
    """A max over a linear's output outside any MoE block (the shape of a sparsemixer's first pick)."""
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.head(x).max(-1, keepdim=True).values


def test_a_max_over_a_linear_outside_any_moe_block_is_no_candidate():
    model, x = _MaxOverLinear().eval(), torch.randn(3, 16)
    with pytest.warns(UserWarning, match="rewrote nothing"):
        compiled = sparsecc.compile(model, (x,), pipeline="moe-dispatch,cleanup")
    assert compiled.report().skipped == []
