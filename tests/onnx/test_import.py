"""ONNX import: files become ATen graphs the passes rewrite; round trips run in onnxruntime."""
import os
import warnings

import onnx
import pytest
import sparsecc
import torch
from onnx import TensorProto, helper
from sparsecc.onnx.frontend.load import OnnxImportError, load_model

from ..passes.hf_attention import llama
from .helpers import assert_close, node_types, run_ort


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    """transformers Llama (tiny config) exported by torch.onnx, dynamo exporter."""
    path = str(tmp_path_factory.mktemp("onnx") / "llama.onnx")
    ids = torch.randint(0, 64, (2, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(llama("sdpa"), (ids,), path, dynamo=True, optimize=True, verbose=False)
    return path, ids


@pytest.mark.slow
def test_import_is_exact_before_any_rewrite(llama_file):
    path, ids = llama_file
    compiled = sparsecc.compile(path, (ids,), pipeline="cleanup")
    graph_ops = {str(n.target) for n in compiled.graph_module.graph.nodes if n.op == "call_function"}
    assert "aten.linear.default" in graph_ops
    assert all("val" in n.meta for n in compiled.graph_module.graph.nodes if n.op != "output")
    assert_close(run_ort(path, ids)[0], compiled(ids), atol=1e-5)


@pytest.mark.slow
def test_llama_round_trip_with_2_4(llama_file, tmp_path):
    path, ids = llama_file
    compiled = sparsecc.compile(path, {"input_ids": ids}, sparsity="2:4")
    layers = sorted(r.layer for r in compiled.report().layers)
    assert len(layers) == 8 and "model.layers.0.mlp.down_proj" in layers and "lm_head" in layers
    assert compiled.report().error_vs_reference == 0.0
    out = str(tmp_path / "llama_24.onnx")
    compiled.export_onnx(out)
    assert node_types(out).count("sparsecc::nm_linear") == 8
    assert_close(run_ort(out, ids)[0], compiled(ids))


@pytest.mark.slow
def test_the_file_is_not_modified(llama_file):
    path, ids = llama_file
    before = os.path.getmtime(path), os.path.getsize(path)
    sparsecc.compile(path, (ids,), sparsity="2:4", check=False)
    assert (os.path.getmtime(path), os.path.getsize(path)) == before


def _model(nodes, inputs, outputs, initializers=(), opset=20):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_unsupported_op_names_op_node_and_the_supported_list(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = _model([helper.make_node("Relu", ["x"], ["r"], name="first"),
                    helper.make_node("HardSwish", ["r"], ["y"], name="the_swish")], [x], [y])
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    with pytest.raises(OnnxImportError, match=r"unsupported ONNX op 'HardSwish' at node 'the_swish' \(node 1\); "
                                              r"supported ops: .*MatMul.*Softmax"):
        sparsecc.compile(path, (torch.randn(2, 3),))


def test_truncated_and_garbage_files_give_a_clear_error(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])
    weight = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], [0.5] * 64 * 64)
    data = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [x],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])], [weight]).SerializeToString()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(OnnxImportError, match="not a readable ONNX model|not a valid ONNX model|holds no graph"):
        load_model(str(truncated))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not protobuf \x00\xff" * 10)
    with pytest.raises(OnnxImportError, match="not a readable ONNX model|not a valid ONNX model|holds no graph"):
        load_model(str(garbage))
    with pytest.raises(OnnxImportError, match="no such file"):
        load_model(str(tmp_path / "missing.onnx"))


def test_shape_from_data_is_rejected_with_the_node(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = _model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape_by_data")], [x, shape], [y])
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    with pytest.raises(Exception, match="reshape_by_data.*must be known at import time"):
        sparsecc.compile(path, (torch.randn(6), torch.tensor([2, 3])))


@pytest.mark.slow
def test_conv_and_gemm_network_imports_and_prunes(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, 16)).eval()
    x = torch.randn(2, 4, 8, 8)
    path = str(tmp_path / "cnn.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), path, dynamo=True, verbose=False)
    imported = sparsecc.compile(path, (x,), pipeline="cleanup")
    assert_close(run_ort(path, x)[0], imported(x))
    compiled = sparsecc.compile(path, (x,), sparsity="2:4")
    assert {r.op for r in compiled.report().layers} == {"sparsecc.nm_linear", "sparsecc.nm_conv2d"}
    out = str(tmp_path / "cnn_24.onnx")
    compiled.export_onnx(out)
    assert {"sparsecc::nm_conv2d", "sparsecc::nm_linear"} <= set(node_types(out))
    assert_close(run_ort(out, x)[0], compiled(x))


@pytest.mark.slow
def test_mixtral_batched_mm_export_round_trip(tmp_path):
    from ..passes.hf_moe import mixtral, tokens
    model, ids = mixtral("batched_mm", layers=1), tokens()
    path = str(tmp_path / "mixtral.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids,), path, dynamo=True, optimize=True, verbose=False)
    assert "GatherND" in node_types(path)              # the batched_mm expert gather
    imported = sparsecc.compile(path, (ids,), pipeline="cleanup")
    assert_close(run_ort(path, ids)[0], imported(ids))
    compiled = sparsecc.compile(path, (ids,), sparsity="2:4")
    ops = sorted(r.op for r in compiled.report().layers)   # "2:4" runs moe-dispatch first: experts N:M inside moe
    assert ops == ["sparsecc.moe", "sparsecc.moe+nm_decompress"] + ["sparsecc.nm_linear"] * 5
    assert compiled.report().error_vs_reference is not None and compiled.report().error_vs_reference < 1e-5
    assert any("router of an MoE block" in s["reason"] for s in compiled.report().to_dict()["skipped"])
    out = str(tmp_path / "mixtral_24.onnx")
    compiled.export_onnx(out)
    assert_close(run_ort(out, ids)[0], compiled(ids))
