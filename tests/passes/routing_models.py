"""Small residual stacks for the token-routing tests (Llama-style blocks, and blocks routing must refuse)."""
import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.gate = nn.Linear(width, inner, bias=False)
        self.up = nn.Linear(width, inner, bias=False)
        self.down = nn.Linear(inner, width, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class CumulativeMLP(SwiGLU):
    """Mixes tokens (a running sum over the sequence): not routable."""

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)).cumsum(1) * self.up(x))


class Layer(nn.Module):
    def __init__(self, width: int, inner: int, mlp=SwiGLU):
        super().__init__()
        self.norm, self.mlp = RMSNorm(width), mlp(width, inner)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class LeakyLayer(Layer):
    """Also returns an intermediate of the MLP: the block is not closed."""

    def forward(self, x):
        gate = self.mlp.gate(self.norm(x))
        return x + self.mlp.down(nn.functional.silu(gate) * self.mlp.up(self.norm(x))), gate


class Stack(nn.Module):
    def __init__(self, layers: int = 4, width: int = 32, inner: int = 64, mlp=SwiGLU):
        super().__init__()
        self.layers = nn.ModuleList(Layer(width, inner, mlp) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def stack(layers: int = 4, mlp=SwiGLU) -> Stack:
    torch.manual_seed(0)
    return Stack(layers, mlp=mlp).eval()
