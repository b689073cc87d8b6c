"""Mixture-of-experts blocks written the ways models write them (forms 1, 2, 5 of the MoE issue);
forms 3 and 4 come from transformers models built in the tests."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ExpertMLP(nn.Module):
    """SwiGLU expert with Mixtral's legacy names: w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inner, bias=False)
        self.w2 = nn.Linear(inner, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inner, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluExpert(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner, bias=False)
        self.fc2 = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Router(nn.Module):
    def __init__(self, hidden, experts, top_k, order="softmax_topk", normalize=True):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.top_k, self.order, self.normalize = top_k, order, normalize

    def forward(self, h):
        logits = self.gate(h)
        if self.order == "topk_softmax":
            values, selected = torch.topk(logits, self.top_k, dim=-1)
            return F.softmax(values, dim=-1, dtype=torch.float).to(h.dtype), selected
        weights = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(h.dtype), selected


class LoopMoE(nn.Module):
    """Form 1: the classic per-expert loop (older HF Mixtral)."""

    def __init__(self, hidden=32, inner=48, experts=4, top_k=2, **router):
        super().__init__()
        self.router = Router(hidden, experts, top_k, **router)
        self.experts = nn.ModuleList(ExpertMLP(hidden, inner) for _ in range(experts))

    def forward(self, x):
        b, s, h = x.shape
        flat = x.view(-1, h)
        weights, selected = self.router(flat)
        out = torch.zeros_like(flat)
        mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(mask[e])
            out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return out.view(b, s, h)


class DenseMoE(nn.Module):
    """Form 2: every expert on every token, weighted by a routing matrix zero outside the top-k."""

    def __init__(self, hidden=32, inner=48, experts=4, top_k=2, expert=ExpertMLP, **router):
        super().__init__()
        self.router = Router(hidden, experts, top_k, **router)
        self.experts = nn.ModuleList(expert(hidden, inner) for _ in range(experts))

    def forward(self, x):
        weights, selected = self.router(x)
        routing = torch.zeros(*x.shape[:-1], len(self.experts), dtype=x.dtype).scatter(-1, selected, weights)
        outputs = torch.stack([expert(x) for expert in self.experts], dim=-2)
        return (outputs * routing.unsqueeze(-1)).sum(dim=-2)


class SharedExpertMoE(nn.Module):
    """Form 5: routed experts (dense formulation) plus a sigmoid-gated shared expert in one block (Qwen2-MoE)."""

    def __init__(self, hidden=32, inner=24, experts=4, top_k=2, shared_inner=40):
        super().__init__()
        self.router = Router(hidden, experts, top_k, normalize=False)
        self.experts = nn.ModuleList(ExpertMLP(hidden, inner) for _ in range(experts))
        self.shared_expert = ExpertMLP(hidden, shared_inner)
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, x):
        weights, selected = self.router(x)
        routing = torch.zeros(*x.shape[:-1], len(self.experts), dtype=x.dtype).scatter(-1, selected, weights)
        routed = sum(routing[..., e:e + 1] * expert(x) for e, expert in enumerate(self.experts))
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return routed + shared


class NotMoE(nn.Module):
    """Uses topk, but for top-k pooling, not routing: nothing to dispatch."""

    def __init__(self, hidden=32):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        return torch.topk(self.proj(x), 4, dim=-1).values.sum(-1, keepdim=True) * x


class Block(nn.Module):
    """A residual block around any MoE, so the MoE is one region inside a bigger graph."""

    def __init__(self, moe: nn.Module, hidden=32):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mlp = moe

    def forward(self, x):
        return x + self.mlp(self.norm(x))
