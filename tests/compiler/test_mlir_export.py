"""MLIR export: the file parses, carries structured[N, M] weights, and the MLIR sparsifier runs it like torch."""
import ctypes

import ml_dtypes
import numpy as np
import pytest
import torch

pytest.importorskip("torch_mlir")
from torch_mlir import ir, passmanager                       # noqa: E402
from torch_mlir.execution_engine import ExecutionEngine      # noqa: E402
from torch_mlir.runtime import (as_ctype, get_ranked_memref_descriptor, make_nd_memref_descriptor,  # noqa: E402
                                ranked_memref_to_numpy)

import sparsecc                                               # noqa: E402
from sparsecc.cli import main                                 # noqa: E402
from sparsecc.mlir_export import MlirExportError, mlir_text   # noqa: E402

SPARSIFIER = "builtin.module(sparsifier{enable-runtime-library=false})"   # the wheel ships no sparse runtime


def tiny_mlp() -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    return model, (torch.randn(4, 16),)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy().astype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def run_with_sparsifier(text: str, x: torch.Tensor, expected: torch.Tensor) -> np.ndarray:
    """Parse the exported module, compile it with the sparsifier pipeline, JIT it and run @forward on x;
    the output is read with the expected output's shape and dtype."""
    with ir.Context():
        module = ir.Module.parse(text)
        forward = next(op for op in module.body.operations if op.operation.name == "func.func"
                       and ir.StringAttr(op.attributes["sym_name"]).value == "forward")
        forward.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()
        passmanager.PassManager.parse(SPARSIFIER).run(module.operation)
        engine = ExecutionEngine(module, opt_level=2)
        result = make_nd_memref_descriptor(expected.dim(), as_ctype(as_numpy(expected[:0].detach()).dtype))()
        result_ptr = ctypes.pointer(ctypes.pointer(result))
        arg = ctypes.pointer(ctypes.pointer(get_ranked_memref_descriptor(as_numpy(x))))
        engine.invoke("forward", result_ptr, arg)
        return ranked_memref_to_numpy(result_ptr[0]).copy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, (x,) = tiny_mlp()
    compiled = sparsecc.compile(model, (x,), sparsity="2:4", check=False)
    path = tmp_path_factory.mktemp("mlir") / "mlp.mlir"
    return compiled, x, compiled.export_mlir(str(path))


def test_file_parses_with_structured_weights(exported):
    _, _, result = exported
    text = open(result.path).read()
    with ir.Context():
        ir.Module.parse(text).operation.verify()
    assert "d1 floordiv 4 : dense, d1 mod 4 : structured[2, 4]" in text
    assert text.count("sparse_tensor.assemble") == 2 and text.count("tensor<32x16xf32, #sparse>, tensor<16x4xf32>") == 1
    assert "func.func private @nm_0_weight(%arg0: tensor<16x4xf32>) -> tensor<32x4xf32>" in text
    assert len(result.structured_weights) == 2 and "32x16" in result.structured_weights[0]


def test_sparsifier_runs_the_export_like_torch(exported):
    compiled, x, result = exported
    expected = compiled(x).detach()
    got = run_with_sparsifier(open(result.path).read(), x, expected)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_4_8_weights_export_and_run(tmp_path):
    torch.manual_seed(1)
    model, x = torch.nn.Linear(32, 16).eval(), torch.randn(3, 32)
    compiled = sparsecc.compile(model, (x,), sparsity="4:8", check=False)
    text = open(compiled.export_mlir(str(tmp_path / "l.mlir")).path).read()
    assert "structured[4, 8]" in text
    expected = compiled(x).detach()
    np.testing.assert_allclose(run_with_sparsifier(text, x, expected), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_bf16_weights_stay_bf16_and_run(tmp_path):
    torch.manual_seed(2)
    model, x = torch.nn.Linear(32, 16).to(torch.bfloat16).eval(), torch.randn(2, 32, dtype=torch.bfloat16)
    compiled = sparsecc.compile(model, (x,), sparsity="2:4", check=False)
    text = open(compiled.export_mlir(str(tmp_path / "bf16.mlir")).path).read()
    assert "tensor<256xbf16> to tensor<16x32xbf16, #sparse>" in text
    expected = compiled(x).detach()
    got = run_with_sparsifier(text, x, expected).astype(np.float32)
    np.testing.assert_allclose(got, expected.float().numpy(), rtol=2e-2, atol=2e-2)   # bf16 rounding


def test_dynamic_dims_export_at_the_example_size():
    model, (x,) = tiny_mlp()
    batch = torch.export.Dim("batch", min=1, max=64)
    compiled = sparsecc.compile(model, (x,), sparsity="2:4", check=False, dynamic_shapes=({0: batch},))
    text, weights = mlir_text(compiled.graph_module)
    assert "func.func @forward(%arg0: tensor<4x16xf32>) -> tensor<4x8xf32>" in text and len(weights) == 2


class TiedLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.shared(torch.relu(self.shared(x)))


def test_a_weight_two_layers_share_gets_two_functions():
    model, x = TiedLinear().eval(), torch.randn(3, 16)
    compiled = sparsecc.compile(model, (x,), sparsity="2:4", check=False)
    text, _ = mlir_text(compiled.graph_module)
    assert "@nm_shared_weight(" in text and "@nm_shared_weight_1(" in text
    expected = compiled(x).detach()
    np.testing.assert_allclose(run_with_sparsifier(text, x, expected), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_other_sparse_ops_are_refused_by_name():
    model, x = torch.nn.Linear(16, 8).eval(), torch.randn(2, 16)
    gm = sparsecc.compile(model, (x,), sparsity="2:4", check=False).graph_module
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.sparsecc.nm_linear.default)
    node.target = torch.ops.sparsecc.nm_decompress.default   # stands for any sparse op without an MLIR form
    with pytest.raises(MlirExportError, match=r"node 'nm_linear' is sparsecc::nm_decompress.*docs/mlir.md"):
        mlir_text(gm)


def test_cli_writes_mlir(tmp_path, capsys):
    out = tmp_path / "tiny.mlir"
    assert main(["export", "tests/compiler/test_mlir_export.py:tiny_mlp", "--mlir", "-o", str(out)]) == 0
    assert "structured N:M weights: 2" in capsys.readouterr().out
    assert "structured[2, 4]" in out.read_text()
