"""sparsecc::moe: reference vs a dense formulation, CPU kernel vs reference, verifier, export."""
import re

import pytest
import torch
import torch.nn.functional as F

from sparsecc.runtime.kernels.cpu.moe import ACTIVATIONS, moe_cpu
from sparsecc.runtime.kernels.moe_contract import MOE_ARGUMENTS
from sparsecc.runtime.ops import get_op
from sparsecc.runtime.ops.moe import MOE, moe_flops, moe_reference, sample_moe_arguments, verify_moe, with_options

moe = torch.ops.sparsecc.moe.default


def make_call(tokens=10, width=16, inter=8, num_experts=4, top_k=2, *, gated=True, shared=False,
              shared_gate=False, normalize=True, scoring="softmax", activation="silu", capacity_factor=0.0,
              dtype=torch.float32, biases=False, **options):
    """The op's arguments with random weights: the first 13, or all of them when `biases` (random
    b_gate_up, b_down) or other `options` of the op are given by name."""
    call = (*sample_moe_arguments(tokens, width, inter, num_experts, gated, shared, shared_gate, dtype),
            top_k, normalize, scoring, activation, gated, capacity_factor)
    if biases:
        rows = (2 if gated else 1) * inter
        options.update(b_gate_up=torch.randn(num_experts, rows, dtype=dtype),
                       b_down=torch.randn(num_experts, width, dtype=dtype))
    return with_options(call, **options) if options else call


def dense_moe(hidden, router_logits, w_gate_up, w_down, top_k, normalize, scoring, activation, gated):
    """Every expert on every token, combined by a routing matrix that is zero outside the top k."""
    scores = router_logits.float().softmax(-1) if scoring == "softmax" else router_logits.float().sigmoid()
    weights, experts = scores.topk(top_k, -1)
    weights = weights / weights.sum(-1, keepdim=True) if normalize else weights
    routing = torch.zeros_like(scores).scatter(1, experts, weights)  # [T, E]
    projected = torch.einsum("th,eih->eti", hidden, w_gate_up)
    if gated:
        gate, up = projected.chunk(2, -1)
        projected = ACTIVATIONS[activation](gate) * up
    else:
        projected = ACTIVATIONS[activation](projected)
    return torch.einsum("eti,ehi,te->th", projected, w_down, routing)


@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, "gelu"), (True, "gelu_tanh"),
                                              (False, "relu")])
@pytest.mark.parametrize("scoring,normalize", [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_reference_equals_dense_routing_matrix(gated, activation, scoring, normalize):
    call = make_call(gated=gated, activation=activation, scoring=scoring, normalize=normalize)
    dense = dense_moe(*call[:4], *call[7:12])
    torch.testing.assert_close(moe_reference(*call), dense, rtol=1e-5, atol=1e-5)


def test_reference_adds_the_gated_shared_expert():
    call = make_call(shared=True, shared_gate=True)
    hidden, shared_gate_up, shared_down, shared_gate = call[0], call[4], call[5], call[6]
    gate, up = F.linear(hidden, shared_gate_up).chunk(2, -1)
    shared = F.linear(F.silu(gate) * up, shared_down) * torch.sigmoid(hidden @ shared_gate.T)
    routed = moe_reference(*call[:4], None, None, None, *call[7:])
    torch.testing.assert_close(moe_reference(*call), routed + shared)


CASES = {
    "gated silu": dict(),
    "not gated gelu": dict(gated=False, activation="gelu"),
    "no normalize": dict(normalize=False),
    "sigmoid": dict(scoring="sigmoid", activation="gelu_tanh"),
    "shared expert": dict(shared=True),
    "gated shared expert": dict(shared=True, shared_gate=True, gated=False, activation="relu"),
    "E=128 top-1, 4 tokens": dict(tokens=4, num_experts=128, top_k=1),
    "one token": dict(tokens=1, top_k=2, shared=True),
    "T*k < E": dict(tokens=3, num_experts=16, top_k=2),
    "capacity": dict(tokens=16, capacity_factor=0.5),
    "capacity, top-1": dict(tokens=12, top_k=1, capacity_factor=1.0, shared=True),
    "no tokens": dict(tokens=0),
    "DeepSeek-V3 routing": dict(tokens=12, num_experts=8, top_k=3, scoring="sigmoid", shared=True,
                                score_correction_bias=torch.linspace(-0.5, 0.5, 8), n_group=4, topk_group=2,
                                routed_scaling_factor=2.5),
    "group limit, capacity": dict(tokens=16, num_experts=8, n_group=2, topk_group=1, capacity_factor=0.5),
    "GPT-OSS experts": dict(biases=True, interleaved=True, activation="swiglu_clamped", swiglu_limit=0.5),
    "GPT-OSS experts, looped (300 tokens)": dict(tokens=300, biases=True, interleaved=True,
                                                 activation="swiglu_clamped", swiglu_limit=0.5, swiglu_alpha=1.0),
    "biases, not gated": dict(biases=True, gated=False, activation="gelu"),
    "biases, looped, capacity": dict(tokens=300, biases=True, capacity_factor=0.5),
    "sparsemixer": dict(scoring="sparsemixer", normalize=False, sparsemixer_eps=0.2),
    "sparsemixer, no tokens": dict(tokens=0, scoring="sparsemixer"),
}


@pytest.mark.parametrize("case", CASES)
def test_cpu_kernel_equals_reference(case):
    call = make_call(**CASES[case])
    torch.testing.assert_close(moe_cpu(*call), moe_reference(*call), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["gated silu", "gated shared expert", "E=128 top-1, 4 tokens", "capacity"])
def test_cpu_kernel_equals_reference_in_bf16(case):
    call = make_call(**CASES[case], dtype=torch.bfloat16)
    got = moe_cpu(*call)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), moe_reference(*call).float(), rtol=2e-2, atol=2e-2)


def test_capacity_drops_change_the_output():
    call = make_call(tokens=16, top_k=1, capacity_factor=0.25)  # 1 pair per expert survives
    call[1][:, 0] += 10.0  # all tokens choose expert 0: only token 0 gets an output
    y = moe_cpu(*call)
    assert y[0].abs().sum() > 0 and (y[1:] == 0).all()
    torch.testing.assert_close(y, moe_reference(*call))


@pytest.mark.parametrize("options", [dict(), dict(biases=True, interleaved=True, activation="swiglu_clamped"),
                                     dict(num_experts=8, scoring="sigmoid", score_correction_bias=torch.ones(8),
                                          n_group=4, topk_group=2, routed_scaling_factor=2.0)])
def test_op_runs_the_cpu_kernel_and_passes_opcheck(options):
    call = make_call(shared=True, shared_gate=True, capacity_factor=1.0, **options)
    torch.testing.assert_close(moe(*call), moe_cpu(*call))
    torch.library.opcheck(moe, call)


def test_registry_entry():
    assert get_op("sparsecc::moe") is MOE and MOE.op is moe and MOE.kernel("torch") is moe_cpu
    schema = [a for a in moe._schema.arguments]
    assert tuple(a.name for a in schema) == MOE_ARGUMENTS  # MoECall binds the kernels' arguments as the op's
    assert MOE.attrs == tuple(a.name for a in schema if not isinstance(a.type, torch.TensorType)
                              and not isinstance(a.type, torch.OptionalType))
    assert MOE.onnx_export == "moe" and "triton" in MOE.kernels


class MixtralLikeBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        call = make_call(shared=True)
        for name, weight in zip(["w_gate_up", "w_down", "shared_gate_up", "shared_down"],
                                call[2:6]):
            self.register_buffer(name, weight)
        self.router = torch.nn.Linear(16, 4, bias=False)

    def forward(self, x):
        return moe(x, self.router(x), self.w_gate_up, self.w_down, self.shared_gate_up, self.shared_down,
                   None, 2, True, "softmax", "silu", True)


def test_op_survives_torch_export():
    block, x = MixtralLikeBlock(), torch.randn(6, 16)
    program = torch.export.export(block, (x,))
    assert moe in [node.target for node in program.graph.nodes if node.op == "call_function"]
    torch.testing.assert_close(program.module()(x), block(x))


def test_verifier_accepts_a_well_formed_call():
    assert verify_moe(*make_call(shared=True, shared_gate=True, capacity_factor=1.0)) is None
    assert verify_moe(*make_call(gated=False, shared=True)) is None


def _change(call, **changes):
    return with_options(call, **changes)


@pytest.mark.parametrize("changes,reason", [
    (dict(router_logits=torch.randn(9, 4)), "router_logits"),
    (dict(w_down=torch.randn(4, 12, 8)), r"w_down \[4, 12, 8\] must be \[E=4, H=16, I\]"),
    (dict(gated=False), r"w_gate_up \[4, 16, 16\] must be \[4, 8, 16\] \(gated=False\)"),
    (dict(shared_down=None), "without shared_down"),
    (dict(shared_gate_up=torch.randn(8, 16)), r"shared_gate_up \[8, 16\] must be \[16, 16\]"),
    (dict(shared_gate=torch.randn(16)), "shared_gate"),
    (dict(w_down=torch.randn(4, 16, 8, dtype=torch.float64)), "w_down dtype"),
    (dict(top_k=5), "top_k=5 must be in 1..E=4"),
    (dict(top_k=0), "top_k=0"),
    (dict(scoring="softplus"), "scoring 'softplus'"),
    (dict(activation="swish"), "activation 'swish'"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(score_correction_bias=torch.randn(5)), r"score_correction_bias \[5\] .* must be floating point \[E=4\]"),
    (dict(score_correction_bias=torch.zeros(4, dtype=torch.int64)), "score_correction_bias"),
    (dict(n_group=3), "n_group=3 must be a positive divisor of E=4"),
    (dict(n_group=0), "n_group=0"),
    (dict(n_group=4, topk_group=1), "leaves 1 expert per group"),
    (dict(n_group=2, topk_group=3), r"topk_group=3 must be in 1..n_group=2"),
    (dict(n_group=2, topk_group=0), "topk_group=0"),
    (dict(n_group=2, topk_group=1, top_k=3), "top_k=3 exceeds the 2 experts in topk_group=1 of n_group=2"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor=0.0 must be finite and > 0"),
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor"),
    (dict(scoring="sparsemixer", top_k=1), "sparsemixer' picks exactly top_k=2"),
    (dict(scoring="sparsemixer", n_group=2), "sparsemixer"),
    (dict(sparsemixer_eps=-0.1), "sparsemixer_eps"),
    (dict(b_gate_up=torch.randn(4, 8)), r"b_gate_up \[4, 8\] must be \[E=4, 16\]"),
    (dict(b_down=torch.randn(3, 16)), r"b_down \[3, 16\] must be \[E=4, H=16\]"),
    (dict(b_down=torch.randn(4, 16, dtype=torch.float64)), "b_down dtype"),
    (dict(interleaved=1), "interleaved=1 must be a boolean"),
    (dict(activation="swiglu_clamped", gated=False, w_gate_up=torch.randn(4, 8, 16), shared_gate_up=None,
          shared_down=None, shared_gate=None), "needs gated experts"),
    (dict(swiglu_limit=0.0), "swiglu_limit=0.0 must be finite and > 0"),
    (dict(swiglu_alpha=float("inf")), "swiglu_alpha"),
])
def test_verifier_names_the_problem(changes, reason):
    problem = verify_moe(*_change(make_call(shared=True, shared_gate=True), **changes))
    assert problem is not None and re.search(reason, problem), problem


def test_flops_count_top_k_of_e_experts():
    dense, dispatch = moe_flops(512, 1024, 2816, 8, 2, True)
    router = 2 * 512 * 1024 * 8
    assert dense - router == 4 * (dispatch - router) == 512 * 8 * 6 * 1024 * 2816
    with_shared = moe_flops(512, 1024, 2816, 8, 2, True, shared_intermediate=100, shared_gate=True)
    assert with_shared[1] - dispatch == with_shared[0] - dense == 512 * (6 * 1024 * 100 + 2 * 1024)
