"""ONNX export of models compiled with dynamic dims: the file keeps them symbolic and onnxruntime
matches the compiled model at several sizes inside the compiled ranges."""
import numpy as np
import onnx
import pytest
import sparsecc
import torch
from onnx import TensorProto, helper
from sparsecc.onnx.export.exporter import OnnxExportError
from sparsecc.onnx.export.functions_route import (
    route_function,
    route_gather_function,
    unroute_function,
)
from sparsecc.onnx.export.rules import rule_for
from sparsecc.onnx.export.spec import CallSpec, Operand

from examples.tiny_moe import LoopMoE, MaskedAttention

from ..passes.moe_models import Block, DenseMoE, SharedExpertMoE
from .helpers import run_ort

Dim = torch.export.Dim


def _dims(path: str, output: bool = False) -> list:
    value = (onnx.load(path).graph.output if output else onnx.load(path).graph.input)[0]
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _export(compiled, path, **kwargs):
    result = compiled.export_onnx(str(path), **kwargs)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return result


def _max_error(path, compiled, shapes) -> list[float]:
    """Max abs difference onnxruntime vs the compiled model at each input shape."""
    errors = []
    for shape in shapes:
        x = torch.randn(*shape)
        got, = run_ort(str(path), x)
        want = compiled(x)
        assert got.shape == tuple(want.shape)
        errors.append(float(np.abs(got - want.detach().numpy()).max()))
    return errors


def test_nm_mlp_with_dynamic_batch_and_sequence(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    dims = {0: Dim("batch", min=1, max=16), 1: Dim("seq", min=2, max=64)}
    compiled = sparsecc.compile(model, (torch.randn(2, 8, 32),), sparsity="2:4", dynamic_shapes=(dims,))
    path = tmp_path / "mlp.onnx"
    assert _export(compiled, path).sparse_nodes == {"nm_linear": 2}
    assert _dims(path) == ["batch", "seq", 32] and _dims(path, output=True) == ["batch", "seq", 16]
    assert max(_max_error(path, compiled, [(1, 5, 32), (3, 17, 32), (16, 64, 32)])) < 1e-5


def test_an_unnamed_dim_keeps_the_compiled_symbol(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.GELU()).eval()
    compiled = sparsecc.compile(model, (torch.randn(4, 16),), sparsity="2:4",
                                dynamic_shapes=({0: Dim.DYNAMIC(min=2, max=32)},))
    path = tmp_path / "unnamed.onnx"
    result = _export(compiled, path, compare_dense=True)   # the dense graph exports with the same dims
    assert result.weight_bytes < result.dense_weight_bytes
    symbol, = compiled.captured.symbol_ranges
    assert _dims(path) == [symbol, 16]
    assert max(_max_error(path, compiled, [(2, 16), (9, 16), (32, 16)])) < 1e-5


def test_nm_conv_with_dynamic_batch_and_spatial_dims(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 8, 3, stride=2)).eval()
    dims = {0: Dim("batch", min=1, max=8), 2: Dim("height", min=8, max=32), 3: Dim("width", min=8, max=32)}
    compiled = sparsecc.compile(model, (torch.randn(2, 8, 12, 12),), sparsity="2:4", dynamic_shapes=(dims,))
    path = tmp_path / "conv.onnx"
    assert _export(compiled, path).sparse_nodes == {"nm_conv2d": 2}
    assert _dims(path) == ["batch", 8, "height", "width"]
    assert max(_max_error(path, compiled, [(1, 8, 9, 11), (3, 8, 20, 16)])) < 1e-5


TOKENS = {0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=64)}


@pytest.fixture(scope="module")
def dense_moe():
    torch.manual_seed(0)
    return sparsecc.compile(Block(DenseMoE()).eval(), (torch.randn(2, 8, 32),),
                            sparsity={"moe": "dispatch", "weights": "2:4"}, dynamic_shapes=(TOKENS,))


@pytest.mark.parametrize("contrib", [False, True])
def test_moe_with_compressed_experts_and_dynamic_tokens(dense_moe, contrib, tmp_path):
    path = tmp_path / "moe.onnx"
    result = _export(dense_moe, path, contrib=contrib)
    assert result.sparse_nodes.get("nm_decompress") == 2
    assert (result.contrib_nodes == {"com.microsoft.MoE": 1}) == contrib
    assert _dims(path) == ["batch", "seq", 32]
    assert max(_max_error(path, dense_moe, [(1, 5, 32), (3, 17, 32), (8, 64, 32)])) < 1e-5


@pytest.mark.parametrize("block, sparsity", [(SharedExpertMoE, {"moe": "dispatch"}),
                                             (DenseMoE, {"moe": {"capacity_factor": 0.5}})])
def test_moe_function_forms_with_dynamic_tokens(block, sparsity, tmp_path):
    torch.manual_seed(0)
    compiled = sparsecc.compile(Block(block()).eval(), (torch.randn(2, 8, 32),), sparsity=sparsity,
                                dynamic_shapes=(TOKENS,))
    path = tmp_path / "moe.onnx"
    assert _export(compiled, path, contrib=True).sparse_nodes == {"moe": 1}
    assert _dims(path) == ["batch", "seq", 32]
    assert max(_max_error(path, compiled, [(1, 3, 32), (3, 17, 32), (2, 8, 32)])) < 1e-5


def test_loop_form_moe_keeps_its_dynamic_dims(tmp_path):
    torch.manual_seed(0)   # the dispatch reshapes back to [batch, seq, H] with the graph's own size nodes
    compiled = sparsecc.compile(LoopMoE(32, 48, 4, 2).eval(), (torch.randn(2, 8, 32),),
                                sparsity={"moe": "dispatch"}, dynamic_shapes=(TOKENS,))
    path = tmp_path / "loop.onnx"
    result = _export(compiled, path)
    assert result.sparse_nodes == {"moe": 1} and not any("exported static" in line for line in result.log)
    assert _dims(path) == ["batch", "seq", 32]
    assert max(_max_error(path, compiled, [(2, 8, 32), (3, 17, 32), (1, 5, 32)])) < 1e-5


BATCH = {0: Dim("batch", min=1, max=8)}
POLICIES = {"window": {"policy": "window", "block": 64, "window": 48, "sinks": 4},
            "topk": {"policy": "topk", "block": 64, "topk": 0.3},
            "threshold": {"policy": "mask", "block": 64, "threshold": 0.5}}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_sparse_attention_with_a_dynamic_batch(policy, tmp_path):
    torch.manual_seed(0)
    compiled = sparsecc.compile(MaskedAttention(32, heads=2).eval(), (torch.randn(2, 200, 32),),
                                sparsity={"attention": POLICIES[policy]}, dynamic_shapes=(BATCH,), check=False)
    path = tmp_path / "attention.onnx"
    # the causal mask is read as a rule: a rule_layout node, or its layout folded into constants
    assert _export(compiled, path).sparse_nodes in ({"rule_layout": 1, "block_attention": 1}, {"block_attention": 1})
    assert _dims(path) == ["batch", 200, 32]
    assert max(_max_error(path, compiled, [(1, 200, 32), (3, 200, 32), (5, 200, 32)])) < 1e-5


def test_a_causal_mask_maps_to_group_query_attention_with_a_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    compiled = sparsecc.compile(MaskedAttention(32, heads=2).eval(), (torch.randn(2, 200, 32),),
                                sparsity={"attention": "mask"}, dynamic_shapes=(BATCH,), check=False)
    path = tmp_path / "attention.onnx"
    assert _export(compiled, path, contrib=True).contrib_nodes == {"com.microsoft.GroupQueryAttention": 1}
    assert max(_max_error(path, compiled, [(1, 200, 32), (4, 200, 32)])) < 1e-5


def test_sparse_attention_contrib_needs_a_static_batch(tmp_path):
    torch.manual_seed(0)
    compiled = sparsecc.compile(MaskedAttention(32, heads=2).eval(), (torch.randn(2, 200, 32),),
                                sparsity={"attention": POLICIES["window"]}, dynamic_shapes=(BATCH,), check=False)
    result = _export(compiled, tmp_path / "attention.onnx", contrib=True)
    assert result.contrib_nodes == {} and any("need a static batch" in line for line in result.log)


def test_route_needs_a_static_sequence_length():
    spec = CallSpec("route", "node_route", {"capacity": 0.5}, (Operand(("batch", "seq"), TensorProto.FLOAT),), 20)
    with pytest.raises(ValueError, match="fixed by the compiled sequence length.*'seq'"):
        route_function(spec)


def _single_node_model(function, spec: CallSpec, names: list[str], out_shape: list) -> onnx.ModelProto:
    """One sparsecc node calling `function`, with the spec's operands as graph inputs (symbolic dims kept)."""
    inputs = [helper.make_tensor_value_info(n, o.elem_type, list(o.shape)) for n, o in zip(names, spec.operands)]
    node = helper.make_node(spec.op, names, ["y"], domain="sparsecc", overload=spec.key(), **spec.attrs)
    output = helper.make_tensor_value_info("y", rule_for(spec.op).output_types(spec)[0], out_shape)
    graph = helper.make_graph([node], spec.op, inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("sparsecc", 1)],
                              functions=[function(spec)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, *arrays: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, (a.numpy() for a in arrays))))[0]


def test_routing_bodies_take_a_dynamic_batch():
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    route = CallSpec("route", "r", {"capacity": 0.5}, (Operand(("batch", 16), f32),), 20)
    gather = CallSpec("route_gather", "g", {}, (Operand(("batch", 16, 8), f32), Operand(("batch", 8), i64)), 20)
    unroute = CallSpec("unroute", "u", {}, (Operand(("batch", 16, 8), f32), Operand(("batch", 8, 8), f32),
                                            Operand(("batch", 8), i64)), 20)
    models = (_single_node_model(route_function, route, ["scores"], ["batch", 8]),
              _single_node_model(route_gather_function, gather, ["x", "indices"], ["batch", 8, 8]),
              _single_node_model(unroute_function, unroute, ["residual", "rows", "indices"], ["batch", 16, 8]))
    ops = torch.ops.sparsecc
    for batch in (1, 3):
        scores, x, rows = torch.randn(batch, 16), torch.randn(batch, 16, 8), torch.randn(batch, 8, 8)
        kept = ops.route(scores, 0.5)
        np.testing.assert_array_equal(_run(models[0], scores), kept.numpy())
        np.testing.assert_array_equal(_run(models[1], x, kept), ops.route_gather(x, kept).numpy())
        np.testing.assert_allclose(_run(models[2], x, rows, kept), ops.unroute(x, rows, kept).numpy())
