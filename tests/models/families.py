"""Tiny stock transformers models of every family issue 15 names, built from their config classes.

Random weights, seeded, no downloads; each is a `*ForCausalLM` with default settings
(`use_cache` on, the library's default expert path) except sizes. The MoE families come
from tests/passes/moe/families.py (expert implementation as transformers defaults it).
"""
from __future__ import annotations

import pytest
import torch

from ..passes.moe import families as moe_families

hf = pytest.importorskip("transformers")

VOCAB, WIDTH = moe_families.VOCAB, moe_families.WIDTH
DENSE = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=3, num_attention_heads=4)


def _seeded(model_cls, config) -> torch.nn.Module:
    torch.manual_seed(0)
    return model_cls(config).eval()


def llama():
    return _seeded(hf.LlamaForCausalLM, hf.LlamaConfig(**DENSE, num_key_value_heads=2, intermediate_size=64))


def qwen2():
    return _seeded(hf.Qwen2ForCausalLM, hf.Qwen2Config(**DENSE, num_key_value_heads=2, intermediate_size=64))


def gpt2():
    config = hf.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=3, n_head=4, n_positions=64)
    return _seeded(hf.GPT2LMHeadModel, config)


def gemma2():
    config = hf.Gemma2Config(**DENSE, num_key_value_heads=2, intermediate_size=64, head_dim=8,
                             sliding_window=4, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    return _seeded(hf.Gemma2ForCausalLM, config)


def falcon():
    config = hf.FalconConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=3, num_attention_heads=4)
    return _seeded(hf.FalconForCausalLM, config)


def gpt_neox():
    config = hf.GPTNeoXConfig(**DENSE, intermediate_size=64, use_parallel_residual=True)
    return _seeded(hf.GPTNeoXForCausalLM, config)


def _moe(name: str):
    def build():
        return moe_families.FAMILIES[name]("grouped_mm")   # transformers' default expert path
    build.__name__ = name
    return build


FAMILIES = {f.__name__: f for f in (llama, qwen2, gpt2, gemma2, falcon, gpt_neox)}
FAMILIES.update({name: _moe(name) for name in moe_families.FAMILIES})
MOE = set(moe_families.FAMILIES)


def tokens(batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
