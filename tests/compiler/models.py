"""Small modules the compiler tests share."""
import torch
import torch.nn as nn


class Conv1D(nn.Module):
    """GPT-2's linear: weight stored [in, out], applied with addmm."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.shape[:-1] + (self.weight.shape[1],))


class Projections(nn.Module):
    """One weight per supported linear form."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.conv1d = Conv1D(dim, dim)
        self.w_mm = nn.Parameter(torch.randn(dim, dim) * 0.1)    # x @ W      ([in, out])
        self.w_t = nn.Parameter(torch.randn(dim, dim) * 0.1)     # x @ W.t()  ([out, in])

    def forward(self, x):
        h = torch.relu(self.linear(x))
        h = self.conv1d(h)
        h = h @ self.w_mm
        return h @ self.w_t.t()


class TiedLM(nn.Module):
    """An embedding tied to the output projection, plus a layer whose K does not divide by 4."""

    def __init__(self, vocab: int = 64, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.odd = nn.Linear(dim, 10)
        self.back = nn.Linear(10, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.back(torch.relu(self.odd(h)))
        return self.head(h)
