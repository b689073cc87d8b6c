"""sparsecc::moe against the transformers MoE blocks themselves: each family's block built tiny from its
config class, random weights, and the op fed the block's own weights (CPU kernel and Triton)."""
import pytest
import torch
import torch.nn.functional as F
import transformers as hf

from sparsecc.runtime.kernels.cpu.moe import moe_cpu
from sparsecc.runtime.ops.moe import moe_reference

triton_moe = pytest.importorskip("sparsecc.runtime.kernels.triton.moe")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WIDTH, INTER, TOKENS = 32, 16, 12
IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm"]


def _randomised(block: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """The block in eval mode with every parameter and buffer drawn from N(0, scale^2)."""
    with torch.no_grad():
        for tensor in [*block.parameters(), *block.buffers()]:
            tensor.copy_(torch.randn_like(tensor) * scale)
    return block.eval()


def _gate_up(mlp) -> torch.Tensor:
    return torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])


def deepseek_v3(implementation):
    config = hf.DeepseekV3Config(hidden_size=WIDTH, moe_intermediate_size=INTER, n_routed_experts=8,
                                 num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
                                 routed_scaling_factor=2.5, norm_topk_prob=True,
                                 experts_implementation=implementation)
    block = _randomised(hf.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(config))

    def call(h):
        gate, experts, shared = block.gate, block.experts, block.shared_experts
        return dict(hidden=h, router_logits=F.linear(h.float(), gate.weight.float()), w_gate_up=experts.gate_up_proj,
                    w_down=experts.down_proj, shared_gate_up=_gate_up(shared), shared_down=shared.down_proj.weight,
                    shared_gate=None, top_k=3, normalize=True, scoring="sigmoid", activation="silu", gated=True,
                    score_correction_bias=gate.e_score_correction_bias, n_group=4, topk_group=2,
                    routed_scaling_factor=2.5)
    return block, call


def gpt_oss(implementation):
    config = hf.GptOssConfig(hidden_size=WIDTH, intermediate_size=INTER, num_local_experts=4, num_experts_per_tok=2,
                             swiglu_limit=1.0, experts_implementation=implementation)
    block = _randomised(hf.models.gpt_oss.modeling_gpt_oss.GptOssMLP(config))

    def call(h):
        router, experts = block.router, block.experts
        # transformers stores x @ W ([E, H, 2I], gate/up columns interleaved); the op reads W.T rows
        return dict(hidden=h, router_logits=F.linear(h, router.weight, router.bias),
                    w_gate_up=experts.gate_up_proj.transpose(1, 2), w_down=experts.down_proj.transpose(1, 2),
                    shared_gate_up=None, shared_down=None, shared_gate=None, top_k=2, normalize=True,
                    scoring="softmax", activation="swiglu_clamped", gated=True, b_gate_up=experts.gate_up_proj_bias,
                    b_down=experts.down_proj_bias, interleaved=True, swiglu_limit=1.0, swiglu_alpha=1.702)
    return block, call


def _softmax_top_k(block_cls, config, normalize):
    """Qwen3-MoE / OLMoE / GraniteMoE / Qwen2-MoE: softmax -> top-k (-> normalize), gated SiLU experts."""
    block = _randomised(block_cls(config))
    router = block.router if hasattr(block, "router") else block.gate

    def call(h):
        shared = getattr(block, "shared_expert", None)
        has_shared = shared is not None
        return dict(hidden=h, router_logits=F.linear(h, router.weight), w_gate_up=block.experts.gate_up_proj,
                    w_down=block.experts.down_proj, shared_gate_up=_gate_up(shared) if has_shared else None,
                    shared_down=shared.down_proj.weight if has_shared else None,
                    shared_gate=block.shared_expert_gate.weight if has_shared else None,
                    top_k=config.num_experts_per_tok,
                    normalize=normalize, scoring="softmax", activation="silu", gated=True)
    return block, call


def qwen3_moe(implementation):
    config = hf.Qwen3MoeConfig(hidden_size=WIDTH, moe_intermediate_size=INTER, num_experts=8, num_experts_per_tok=2,
                               norm_topk_prob=True, experts_implementation=implementation)
    return _softmax_top_k(hf.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock, config, True)


def olmoe(implementation):
    config = hf.OlmoeConfig(hidden_size=WIDTH, intermediate_size=INTER, num_experts=8, num_experts_per_tok=2,
                            norm_topk_prob=False, experts_implementation=implementation)
    return _softmax_top_k(hf.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock, config, False)


def granitemoe(implementation):
    # top-k of the logits, then softmax over the k: softmax -> top-k -> normalize
    config = hf.GraniteMoeConfig(hidden_size=WIDTH, intermediate_size=INTER, num_local_experts=4,
                                 num_experts_per_tok=2, experts_implementation=implementation)
    return _softmax_top_k(hf.models.granitemoe.modeling_granitemoe.GraniteMoeMoE, config, True)


def qwen2_moe(implementation):
    config = hf.Qwen2MoeConfig(hidden_size=WIDTH, moe_intermediate_size=INTER, shared_expert_intermediate_size=24,
                               num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                               experts_implementation=implementation)
    return _softmax_top_k(hf.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock, config, False)


def phimoe(implementation):
    config = hf.PhimoeConfig(hidden_size=WIDTH, intermediate_size=INTER, num_local_experts=4, num_experts_per_tok=2,
                             router_jitter_noise=0.3, experts_implementation=implementation)
    block = _randomised(hf.models.phimoe.modeling_phimoe.PhimoeSparseMoeBlock(config))

    def call(h):
        return dict(hidden=h, router_logits=F.linear(h, block.router.weight), w_gate_up=block.experts.gate_up_proj,
                    w_down=block.experts.down_proj, shared_gate_up=None, shared_down=None, shared_gate=None,
                    top_k=2, normalize=False, scoring="sparsemixer", activation="silu", gated=True,
                    sparsemixer_eps=0.3)
    return block, call


FAMILIES = {f.__name__: f for f in (deepseek_v3, gpt_oss, qwen3_moe, olmoe, granitemoe, qwen2_moe, phimoe)}

# per family, options that must matter: set back to their default, the op no longer matches the block
THE_POINT = {
    "deepseek_v3": [dict(score_correction_bias=None), dict(n_group=1, topk_group=1), dict(routed_scaling_factor=1.0)],
    "gpt_oss": [dict(interleaved=False), dict(b_gate_up=None), dict(b_down=None), dict(swiglu_limit=7.0)],
    "phimoe": [dict(sparsemixer_eps=0.01), dict(scoring="softmax", normalize=True)],
}


def block_output(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out  # GptOssMLP also returns its router scores


def family_case(name, implementation="eager"):
    block, call = FAMILIES[name](implementation)
    x = torch.randn(1, TOKENS, WIDTH)
    with torch.no_grad():
        return block_output(block, x).reshape(TOKENS, WIDTH), call(x.reshape(TOKENS, WIDTH))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", FAMILIES)
def test_cpu_kernel_matches_the_transformers_block(name, implementation):
    expected, call = family_case(name, implementation)
    torch.testing.assert_close(moe_cpu(**call), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_reference_and_op_match_the_transformers_block(name):
    expected, call = family_case(name)
    torch.testing.assert_close(moe_reference(**call), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.ops.sparsecc.moe(**call), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_triton_kernel_matches_the_transformers_block(name):
    expected, call = family_case(name)
    on_device = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    y = triton_moe.moe_triton(**on_device, block_m=16, block_n=16, block_k=16)
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,change", [pytest.param(n, c, id=f"{n}-{'+'.join(c)}")
                                         for n, changes in THE_POINT.items() for c in changes])
def test_each_new_option_is_needed(name, change):
    expected, call = family_case(name)
    assert not torch.allclose(moe_cpu(**{**call, **change}), expected, rtol=1e-3, atol=1e-3), change
