"""MoE models dispatched and pruned 2:4: the pruned expert weights come back under the model's own names
and layouts, and the compiled model matches the dense model run with them (report.error_vs_reference)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecc

from .. import moe_models as mm
from .families import FAMILIES, tokens

SPARSITY = {"moe": "dispatch", "weights": "2:4"}


def _expert_records(compiled) -> list:
    """The routed experts' N:M records (a shared expert has its own, under its module's name)."""
    return [r for r in compiled.report().layers if r.op == "sparsecc.moe+nm_decompress" and r.layer.endswith(".experts")]


def _assert_reference(model, compiled, inputs, outputs=lambda out: out):
    """The report's reference error is exact, and the model itself, with the pruned state, computes the same."""
    report = compiled.report()
    assert report.error_vs_reference is not None and report.error_vs_reference < 1e-5
    assert report.error_vs_dense > 1e-3    # pruning changed the experts: the reference is not the dense model
    pruned, params = compiled.pruned_state_dict(), dict(model.named_parameters())
    assert {name: params[name].shape for name in pruned} == {name: w.shape for name, w in pruned.items()}
    with torch.no_grad():
        want = outputs(torch.func.functional_call(model, pruned, inputs))
        got = outputs(compiled(*inputs))
    assert (got - want).norm() / want.norm() < 1e-5
    return pruned


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_pruned_2_4_match_their_pruned_reference(family, implementation):
    model, ids = FAMILIES[family](implementation), tokens()
    with pytest.warns(UserWarning, match="left out of the compiled program's outputs"):
        compiled = sparsecc.compile(model, (ids,), sparsity=SPARSITY)
    pruned = _assert_reference(model, compiled, (ids,), lambda out: out["logits"])
    experts = [name for name in pruned if ".experts." in name]
    assert len(experts) == 2 * len(_expert_records(compiled)) == 4   # gate_up and down of both layers
    for name in experts:   # half of every stacked expert parameter is pruned, in the model's layout
        assert (pruned[name] == 0).float().mean().item() >= 0.5


class UpFirstMoE(nn.Module):
    """Stacked experts stored unlike any family: gate_up [E, H, 2I] with the up columns first, down [E, I, H];
    moe-dispatch reads both transposed, gate_up with its halves swapped."""

    def __init__(self, hidden=32, inner=24, experts=4, top_k=2):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.gate_up = nn.Parameter(torch.randn(experts, hidden, 2 * inner) * 0.2)
        self.down = nn.Parameter(torch.randn(experts, inner, hidden) * 0.2)
        self.top_k = top_k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        probs = self.gate(flat).softmax(-1)
        weights, chosen = probs.topk(self.top_k, -1)
        routing = torch.zeros_like(probs).scatter(1, chosen, weights / weights.sum(-1, keepdim=True))
        up, gate = torch.einsum("th,ehi->eti", flat, self.gate_up).chunk(2, -1)
        out = torch.einsum("eti,eih->eth", F.silu(gate) * up, self.down)
        return (out * routing.t().unsqueeze(-1)).sum(0).reshape(x.shape)


@pytest.mark.parametrize("moe", [mm.LoopMoE, mm.SharedExpertMoE, lambda: mm.DenseMoE(expert=mm.GeluExpert),
                                 UpFirstMoE], ids=["loop", "shared", "gelu", "up_first"])
def test_every_expert_layout_is_put_back(moe):
    torch.manual_seed(0)
    model, x = mm.Block(moe()).eval(), torch.randn(2, 5, 32)
    compiled = sparsecc.compile(model, (x,), sparsity=SPARSITY)
    pruned = _assert_reference(model, compiled, (x,))
    expert_params = {name for name, _ in model.named_parameters()
                     if name.startswith(("mlp.experts.", "mlp.gate_up", "mlp.down"))}
    assert expert_params and expert_params <= set(pruned)


class OwnMoECall(nn.Module):
    """Calls sparsecc.moe itself: its stacked weights were not built by moe-dispatch."""

    def __init__(self, hidden=32, inner=16, experts=4):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.randn(experts, 2 * inner, hidden) * 0.2)
        self.w_down = nn.Parameter(torch.randn(experts, hidden, inner) * 0.2)

    def forward(self, x):
        return torch.ops.sparsecc.moe(x, self.router(x), self.w_gate_up, self.w_down, None, None, None,
                                      2, True, "softmax", "silu", True, 0.0)


def test_weights_of_unknown_provenance_say_why_there_is_no_reference():
    model, x = OwnMoECall().eval(), torch.randn(6, 32)
    compiled = sparsecc.compile(model, (x,), sparsity={"weights": "2:4"})
    [record] = _expert_records(compiled)
    assert "not built by moe-dispatch" in record.details["reference_unavailable"]
    assert compiled.report().error_vs_reference is None


def test_up_first_experts_record_the_transpose_and_the_half_swap():
    model = mm.Block(UpFirstMoE()).eval()
    compiled = sparsecc.compile(model, (torch.randn(2, 5, 32),), pipeline="moe-dispatch,cleanup")
    [record] = compiled.report().layers
    assert record.details["sources"] == {
        "mlp.moe_w_gate_up": {"swap_halves": 1, "of": {"transpose": [1, 2], "of": "mlp.gate_up"}},
        "mlp.moe_w_down": {"transpose": [1, 2], "of": "mlp.down"}}
