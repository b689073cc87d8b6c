"""`sparsecc export` and `sparsecc sparsify` on the command line."""
import onnx
import pytest
from sparsecc.cli import main

from .helpers import node_types, run_ort, small_transformer


@pytest.mark.slow
def test_export_then_sparsify_a_dense_file(tmp_path, capsys):
    sparse = str(tmp_path / "sparse.onnx")
    assert main(["export", "tests.onnx.helpers:small_transformer", "--sparsity", "2:4", "-o", sparse,
                 "--compare-dense"]) == 0
    out = capsys.readouterr().out
    assert "sparse nodes: nm_linear x6" in out and "dense export" in out
    assert node_types(sparse).count("sparsecc::nm_linear") == 6

    dense = str(tmp_path / "dense.onnx")
    assert main(["export", "tests.onnx.helpers:small_transformer", "--pipeline", "cleanup", "-o", dense]) == 0
    resparsified = str(tmp_path / "resparsified.onnx")
    assert main(["sparsify", dense, "-o", resparsified, "--sparsity", "2:4", "--dim", "unused=3"]) == 0
    assert node_types(resparsified).count("sparsecc::nm_linear") == 6
    onnx.checker.check_model(onnx.load(resparsified), full_check=True)
    _, (ids,) = small_transformer()
    # same weights pruned by the same rule, from the model and from its ONNX file: same outputs
    assert abs(run_ort(resparsified, ids)[0] - run_ort(sparse, ids)[0]).max() < 1e-5


def test_sparsify_reports_an_unreadable_file(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    assert main(["sparsify", str(bad), "-o", str(tmp_path / "out.onnx")]) == 2
    assert "sparsecc sparsify: error:" in capsys.readouterr().err
