"""Tiny transformers MoE language models, one per family, random weights, no downloads.

Each builder takes the expert implementation transformers should use ("grouped_mm", its default, or
"batched_mm") and returns a seeded `*ForCausalLM` in eval mode with 2 layers, each with an MoE MLP,
default settings otherwise (`use_cache` on).
Routing parameters that default to zero (score-correction bias, router and expert biases) are drawn at
random so that reading them wrong changes the output.
"""
import pytest
import torch

hf = pytest.importorskip("transformers")

VOCAB, WIDTH, LAYERS = 128, 32, 2
SHAPE = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=2)


def _finish(config, model_cls, implementation: str) -> torch.nn.Module:
    config._experts_implementation = implementation
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():   # biases transformers starts at zero
        for name, tensor in model.named_parameters():
            if name.endswith(("bias", "e_score_correction_bias")) or "_bias" in name:
                tensor.copy_(torch.randn_like(tensor) * 0.1)
        for name, tensor in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn_like(tensor) * 0.1)
    return model


def mixtral(implementation):
    config = hf.MixtralConfig(**SHAPE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    return _finish(config, hf.MixtralForCausalLM, implementation)


def qwen2_moe(implementation):
    config = hf.Qwen2MoeConfig(**SHAPE, intermediate_size=48, moe_intermediate_size=24,
                               shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2)
    return _finish(config, hf.Qwen2MoeForCausalLM, implementation)


def qwen3_moe(implementation):
    config = hf.Qwen3MoeConfig(**SHAPE, intermediate_size=48, moe_intermediate_size=24, num_experts=8,
                               num_experts_per_tok=2, norm_topk_prob=True)
    return _finish(config, hf.Qwen3MoeForCausalLM, implementation)


def olmoe(implementation):
    config = hf.OlmoeConfig(**SHAPE, intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    return _finish(config, hf.OlmoeForCausalLM, implementation)


def granitemoe(implementation):
    config = hf.GraniteMoeConfig(**SHAPE, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    return _finish(config, hf.GraniteMoeForCausalLM, implementation)


def deepseek_v3(implementation):
    # MLA attention: as many key/value heads as query heads
    config = hf.DeepseekV3Config(**{**SHAPE, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=16,
                                 n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
                                 routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=0,
                                 kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=8,
                                 qk_nope_head_dim=8)
    return _finish(config, hf.DeepseekV3ForCausalLM, implementation)


def gpt_oss(implementation):
    config = hf.GptOssConfig(**SHAPE, intermediate_size=16, head_dim=8, num_local_experts=4,
                             num_experts_per_tok=2, swiglu_limit=1.0)
    return _finish(config, hf.GptOssForCausalLM, implementation)


def phimoe(implementation):
    config = hf.PhimoeConfig(**SHAPE, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    return _finish(config, hf.PhimoeForCausalLM, implementation)


FAMILIES = {f.__name__: f for f in (mixtral, qwen2_moe, qwen3_moe, olmoe, granitemoe, deepseek_v3, gpt_oss,
                                     phimoe)}


def tokens(batch: int = 2, seq: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
