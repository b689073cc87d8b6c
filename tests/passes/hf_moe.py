"""Tiny transformers MoE models with random weights (no downloads)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")


def _finish(config, model_cls, experts_implementation):
    config.use_cache = False
    if experts_implementation:
        config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    return model_cls(config).eval()


def mixtral(experts_implementation=None, experts=4, top_k=2, layers=2):
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=top_k)
    return _finish(config, transformers.MixtralForCausalLM, experts_implementation)


def qwen2_moe(experts_implementation=None, norm_topk_prob=False, layers=2):
    config = transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob)
    return _finish(config, transformers.Qwen2MoeForCausalLM, experts_implementation)


def tokens(batch=2, seq=6):
    return torch.randint(0, 64, (batch, seq))
