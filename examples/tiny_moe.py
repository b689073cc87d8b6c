"""A small mixture-of-experts decoder: every rewrite sparsecc has, on one model.

Each layer has attention with an explicit boolean causal mask (what real models
capture; the `sparse-attention` pass derives its block layout from it) and a
Mixtral-style MoE MLP written as the classic loop over experts (the
`moe-dispatch` pass turns it into one sorted, grouped dispatch).

    sparsecc compile sparsecc.examples.tiny_moe:build --sparsity '{"moe": "dispatch", "attention": "mask", "weights": "2:4"}'
    python examples/tiny_moe.py
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MaskedAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        positions = torch.arange(s, device=x.device)
        causal = positions[None, :] <= positions[:, None]   # [S, S] bool, built from arange as HF does
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal[None, None])
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class Expert(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LoopMoE(nn.Module):
    """softmax router, top-k, renormalised; for each expert: select its tokens, run it, index_add_ back."""

    def __init__(self, dim: int, hidden: int, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(Expert(dim, hidden) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = F.softmax(self.gate(x), dim=-1, dtype=torch.float).topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        hit = F.one_hot(chosen, len(self.experts)).permute(2, 1, 0)  # [E, k, T]
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(hit[e])
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(shape)


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, experts: int, top_k: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = MaskedAttention(dim, heads)
        self.moe_norm = nn.RMSNorm(dim)
        self.moe = LoopMoE(dim, hidden, experts, top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.moe(self.moe_norm(x))


class TinyMoE(nn.Module):
    def __init__(self, vocab: int = 512, dim: int = 128, heads: int = 4, hidden: int = 256, layers: int = 2,
                 experts: int = 8, top_k: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Layer(dim, heads, hidden, experts, top_k) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def build(batch: int = 2, seq: int = 256, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The `sparsecc compile` factory: (model, example inputs)."""
    torch.manual_seed(seed)
    model = TinyMoE().eval()
    return model, (torch.randint(0, 512, (batch, seq)),)


if __name__ == "__main__":
    import sparsecc

    model, inputs = build()
    compiled = sparsecc.compile(model, inputs, sparsity={"moe": "dispatch", "attention": "mask", "weights": "2:4"})
    print(compiled.report())
