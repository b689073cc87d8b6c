"""The generated dense decode kernel (MLIR -> LLVM JIT) against F.linear, and its place in compiled programs."""
import pytest
import torch
import torch.nn.functional as F

import sparsecc
from sparsecc.runtime.kernels.cpu import dense_paths
from sparsecc.runtime.kernels.cpu.mlir import nm_decode
from sparsecc.runtime.kernels.cpu.mlir.dense_codegen import DenseSpec, unsupported
from sparsecc.runtime.kernels.cpu.mlir.dense_decode import dense_linear_mlir
from sparsecc.runtime.kernels.cpu.mlir.host import missing_features


def runs_here(dtype: str) -> bool:
    return nm_decode.mlir_available() and not missing_features(dtype)


needs_fp32 = pytest.mark.skipif(not runs_here("float32"), reason="needs torch-mlir and AVX-512")
needs_bf16 = pytest.mark.skipif(not runs_here("bfloat16"), reason="needs torch-mlir and AVX-512 BF16")


def reference(x, weight, bias):
    """F.linear in fp32, rounded once to x's dtype (what the kernel computes)."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=needs_fp32),
                                   pytest.param(torch.bfloat16, marks=needs_bf16)])
@pytest.mark.parametrize("rows,k,batch,with_bias", [
    (7, 64, (1,), True), (130, 96, (1,), False),      # leftover rows past the 4-row blocks
    (130, 96, (2, 4), True), (7, 64, (5,), False),    # two token groups; a partial group
    (4, 32, (16,), True)])
def test_dense_kernel_matches_f_linear(dtype, rows, k, batch, with_bias):
    torch.manual_seed(rows + k + len(batch))
    weight, x = torch.randn(rows, k).to(dtype), torch.randn(*batch, k).to(dtype)
    bias = torch.randn(rows).to(dtype) if with_bias else None
    y = dense_linear_mlir(x, weight, bias)
    assert y is not None and y.shape == (*batch, rows) and y.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 0.0   # bf16: both accumulate in fp32 and round once
    torch.testing.assert_close(y.float(), reference(x, weight, bias).float(), atol=tolerance, rtol=tolerance)


def test_calls_no_kernel_can_run_fall_back():
    weight = torch.randn(8, 64)
    assert dense_linear_mlir(torch.randn(17, 64), weight, None) is None              # past 16 tokens
    assert dense_linear_mlir(torch.randn(1, 64, dtype=torch.float64), weight.double(), None) is None
    assert dense_linear_mlir(torch.randn(1, 64), weight.t().contiguous().t()[:, :64], None) is None   # strided
    assert unsupported(DenseSpec("float32", 40, 1)) is not None                       # K not whole registers
    assert unsupported(DenseSpec("float16", 64, 1)) is not None


class Mlp(torch.nn.Module):
    """Weights of 1 MiB (fp32): large enough that compiled programs consider the generated kernel."""
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@needs_fp32
@pytest.mark.parametrize("path", ["generated", "aten"])
def test_compiled_program_runs_the_forced_path(monkeypatch, path):
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(2, 512)
    calls = []
    real = dense_paths.DenseCall
    monkeypatch.setattr(dense_paths, "DenseCall", lambda spec, weight, bias: calls.append(weight.shape) or
                        real(spec, weight, bias))
    monkeypatch.setenv(dense_paths.FORCE_ENV, path)
    compiled = sparsecc.compile(model, (x,))
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert (len(calls) > 0) == (path == "generated")   # the 1 MiB weights took the kernel only when forced to


@needs_fp32
def test_measured_choice_is_remembered_per_bucket():
    torch.manual_seed(1)
    weight, x = torch.randn(512, 512), torch.randn(3, 512)
    torch.testing.assert_close(dense_paths.linear(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-5)
    chosen = [d for d in dense_paths.decisions(torch.float32, 512, 512) if d["tokens"] == 4]
    assert len(chosen) == 1 and chosen[0]["path"] in dense_paths.PATHS
    assert set(chosen[0]["ms"]) == set(dense_paths.PATHS)


def test_large_batches_and_small_weights_take_f_linear(monkeypatch):
    def kernel_ran(*args):
        raise AssertionError("the generated kernel ran")
    monkeypatch.setattr(dense_paths, "DenseCall", kernel_ran)   # the only way dense_paths runs the kernel
    monkeypatch.setenv(dense_paths.FORCE_ENV, "generated")
    big, small = torch.randn(512, 512), torch.randn(64, 512)   # 1 MiB and 128 KiB
    for x, weight in ((torch.randn(17, 512), big), (torch.randn(1, 512), small)):
        torch.testing.assert_close(dense_paths.linear(x, weight), F.linear(x, weight))


@needs_fp32
def test_report_lists_the_dense_choices(monkeypatch):
    monkeypatch.delenv(dense_paths.FORCE_ENV, raising=False)
    torch.manual_seed(2)
    model, x = Mlp().eval(), torch.randn(1, 512)
    compiled = sparsecc.compile(model, (x,))
    torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-5)
    dense = [k for k in compiled.report().kernels if k["layer"].endswith("(dense)")]
    assert {k["tokens"] for k in dense} == {1} and len(dense) == 2
    assert "Linear kernels (CPU" in str(compiled.report())


@needs_fp32
def test_artifact_for_a_named_cpu_carries_the_dense_kernels(tmp_path, monkeypatch):
    from sparsecc.runtime.kernels.cpu.mlir import jit, objects, targets
    from sparsecc.runtime.kernels.cpu.mlir.dense_decode import runnable_dense_spec
    from sparsecc.runtime.signing import generate_key
    if not objects.available() or targets.host_runs("x86-64-v4"):
        pytest.skip("needs llvmlite and an x86-64-v4 host")
    monkeypatch.setenv(dense_paths.FORCE_ENV, "generated")
    monkeypatch.setenv("SPARSECC_KERNEL_CACHE", str(tmp_path / "kernels"))
    torch.manual_seed(3)
    model, x = Mlp().eval(), torch.randn(1, 512)
    key = generate_key()
    manifest = sparsecc.compile(model, (x,)).save(tmp_path / "a", targets=["cpu", "cpu:x86-64-v4"], sign_with=key,
                                                  progress=False)
    dense = [k for k in manifest["cpu_kernels"] if k["kernel"] == "dense"]
    assert {k["name"] for k in dense} == {runnable_dense_spec("float32", k, 1).name for k in (512, 1024)}
    assert all("cpu:x86-64-v4" in k["binaries"] for k in dense)
    jit.clear_compiled()
    loaded = sparsecc.runtime.load(tmp_path / "a", trusted_keys=[key.public_key()])
    torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=1e-5)
    assert jit.dense_kernel(runnable_dense_spec("float32", 512, 1)).origin == "artifact"
