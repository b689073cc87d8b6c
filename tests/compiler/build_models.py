"""Models and helpers the AOT build and artifact tests share.

Kernels are cached in pytest's cache folder (`.pytest_cache/d/sparsecc-kernels`): entries are keyed by the
kernel source, specialisation, target and triton version, so a cached entry is what a fresh build makes.
"""
from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsecc

from ..passes.moe_models import Block, DenseMoE

ROOT = Path(__file__).resolve().parents[2]
GPU_TARGETS = ["cuda:80", "cuda:90", "hip:gfx942"]


_SESSION_CACHE: list[Path] = []


def kernel_cache(config) -> Path:
    """pytest's cache folder, or one temporary folder per session when the cache plugin is off
    (`-p no:cacheprovider`, as bench/gpu_check.sh runs)."""
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("sparsecc-kernels"))
    if not _SESSION_CACHE:
        _SESSION_CACHE.append(Path(tempfile.mkdtemp(prefix="sparsecc-kernels-")))
        atexit.register(shutil.rmtree, _SESSION_CACHE[0], True)
    return _SESSION_CACHE[0]


class MixedModel(nn.Module):
    """Masked attention (block-sparse rewrite), a residual MoE block (dispatch) and linears (2:4)."""

    def __init__(self, dim: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.moe = Block(DenseMoE(hidden=dim, inner=64), hidden=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        causal = torch.arange(s)[:, None] >= torch.arange(s)[None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        x = x + self.out(y.transpose(1, 2).reshape(b, s, d))
        return self.moe(x)


MIXED_SPARSITY = {"weights": "2:4", "moe": "dispatch", "attention": {"policy": "mask", "block": 64}}


def compile_tiny():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from examples.tiny_transformer import build
    model, inputs = build()
    return sparsecc.compile(model, inputs, sparsity="2:4", check=False), inputs


def compile_mixed():
    torch.manual_seed(0)
    model, x = MixedModel().eval(), torch.randn(1, 128, 32)
    return sparsecc.compile(model, (x,), sparsity=MIXED_SPARSITY, check=False), (x,)
