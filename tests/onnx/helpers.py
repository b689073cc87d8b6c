"""Run exported files in onnxruntime (CPU) and compare with the compiled model."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from sparsecc.onnx.runner import OnnxRunner


def run_ort(path: str, *inputs: torch.Tensor) -> list[np.ndarray]:
    """The model's outputs in onnxruntime CPU; SparseAttention's past/present bound to one buffer each."""
    return OnnxRunner(path).run(*inputs)


def node_types(path: str) -> list[str]:
    model = onnx.load(path)
    return [f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node]


def initializer_dtypes(path: str) -> dict[str, int]:
    return {t.name: t.data_type for t in onnx.load(path).graph.initializer}


def assert_close(got: np.ndarray, want: torch.Tensor, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-4, atol=atol)


def small_transformer():
    """Factory for the CLI tests: the example transformer at a small size."""
    from examples.tiny_transformer import TinyTransformer
    torch.manual_seed(0)
    return TinyTransformer(vocab=64, dim=32, heads=2, hidden=64, layers=1).eval(), (torch.randint(0, 64, (1, 16)),)
