"""Tiny transformers Llama and GPT-2 with random weights (no downloads), in sdpa or eager attention."""
import pytest
import torch

transformers = pytest.importorskip("transformers")


def llama(attn: str, layers: int = 1):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False, attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def gpt2(attn: str, layers: int = 1):
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=4, use_cache=False,
                                     attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def ids_and_padding(batch=2, seq=160, pad=70):
    """Token ids and an attention mask whose second row is left-padded by `pad` tokens."""
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, :pad] = 0
    return ids, attention_mask
