"""MoE dispatch on imported ONNX files: transformers Mixtral exported by torch.onnx in its
`batched_mm` form (GatherND of the stacked expert weights + batched MatMul) becomes `sparsecc::moe`."""
import warnings

import numpy as np
import onnx
import pytest
import sparsecc
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from sparsecc.cli import main
from sparsecc.onnx.frontend.onnx_module import layer_scopes, make_module

from .helpers import assert_close, node_types, run_ort

transformers = pytest.importorskip("transformers")


def tiny_mixtral() -> torch.nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, use_cache=False)
    config._experts_implementation = "batched_mm"   # the form the torch exporter can write
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).eval()


@pytest.fixture(scope="module")
def mixtral_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("onnx_moe") / "mixtral.onnx")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny_mixtral(), (ids,), path, dynamo=True, optimize=True, verbose=False)
    return path, ids


def _moe_records(compiled) -> list:
    return [r for r in compiled.report().layers if r.op == "sparsecc.moe"]


@pytest.mark.slow
def test_imported_moe_blocks_become_one_dispatch_each_and_stay_exact(mixtral_file, tmp_path):
    path, ids = mixtral_file
    assert node_types(path).count("GatherND") == 4
    compiled = sparsecc.compile(path, (ids,), sparsity={"moe": "dispatch"})
    records = _moe_records(compiled)
    assert [r.layer for r in records] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(r.details["form"] == "batched_mm" and r.details["experts"] == 4 for r in records)
    assert not compiled.report().skipped
    targets = {str(n.target) for n in compiled.graph_module.graph.nodes}
    assert "sparsecc.moe.default" in targets and "aten.bmm.default" not in targets
    got = compiled(ids)
    assert_close(run_ort(path, ids)[0], got)
    imported = sparsecc.compile(path, (ids,), pipeline="cleanup", check=False)
    torch.testing.assert_close(got, imported(ids), rtol=1e-5, atol=1e-5)

    out = str(tmp_path / "mixtral_moe.onnx")
    compiled.export_onnx(out)
    assert node_types(out).count("sparsecc::moe") == 2 and "GatherND" not in node_types(out)
    assert_close(run_ort(out, ids)[0], got)


@pytest.mark.slow
def test_with_two_to_four_matches_the_pruned_model_and_re_exports(mixtral_file, tmp_path):
    from sparsecc.runtime.executor import Executor
    from sparsecc.runtime.nm_format import decompress_nm

    path, ids = mixtral_file
    pruned = sparsecc.compile(path, (ids,), sparsity={"moe": "dispatch", "weights": "2:4"}, check=False)
    ops = [r.op for r in pruned.report().layers]
    assert ops.count("sparsecc.moe") == 2 and ops.count("sparsecc.moe+nm_decompress") == 2
    assert ops.count("sparsecc.nm_linear") == 9          # q/k/v/o of both layers, lm_head; routers stay dense
    # the reference: the exact dispatch with every pruned weight put back dense
    exact = sparsecc.compile(path, (ids,), sparsity={"moe": "dispatch"}, check=False)
    constants = {**exact.constants, **pruned.pruned_state_dict()}
    for record in pruned.report().layers:
        for target, (values, indices) in record.details.get("compressed", {}).items():
            constants[target] = decompress_nm(pruned.constants[values], pruned.constants[indices], 2, 4,
                                              constants[target].shape[-1])
    got = pruned(ids)
    torch.testing.assert_close(got, Executor(exact.program, constants).run([ids])[0], rtol=1e-5, atol=1e-5)

    out = str(tmp_path / "mixtral_moe_24.onnx")
    pruned.export_onnx(out)
    assert node_types(out).count("sparsecc::moe") == 2 and "sparsecc::nm_decompress" in node_types(out)
    assert_close(run_ort(out, ids)[0], got)


def _with_expert_bias(path: str, out: str) -> None:
    """The file with a bias added after layer 0's down projection: a block no dispatch reproduces."""
    model = onnx.load(path)
    nodes = list(model.graph.node)
    down = [n for n in nodes if n.op_type == "MatMul" and any(
        p.key == "pkg.torch.onnx.name_scopes" and "model.layers.0.mlp.experts'" in p.value for p in n.metadata_props)][-1]
    biased = down.output[0] + "_biased"
    for node in nodes:
        node.input[:] = [biased if i == down.output[0] else i for i in node.input]
    add = helper.make_node("Add", [down.output[0], "expert_bias"], [biased], name="expert_bias_add")
    add.metadata_props.extend(down.metadata_props)
    model.graph.initializer.append(numpy_helper.from_array(np.full((64, 1), 0.5, np.float32), "expert_bias"))
    model.graph.ClearField("node")
    model.graph.node.extend(nodes[:nodes.index(down) + 1] + [add] + nodes[nodes.index(down) + 1:])
    onnx.save(model, out)


@pytest.mark.slow
def test_a_block_with_an_expert_bias_is_declined_with_the_reason(mixtral_file, tmp_path):
    path, ids = mixtral_file
    biased = str(tmp_path / "biased.onnx")
    _with_expert_bias(path, biased)
    compiled = sparsecc.compile(biased, (ids,), sparsity={"moe": "dispatch"})
    assert [r.layer for r in _moe_records(compiled)] == ["model.layers.1.mlp"]
    [skip] = compiled.report().skipped
    assert skip["layer"] == "model.layers.0.mlp" and "no dispatch of the recognised structure" in skip["reason"]
    assert_close(run_ort(biased, ids)[0], compiled(ids))


@pytest.mark.slow
def test_sparsify_command_rewrites_the_moe_blocks(mixtral_file, tmp_path):
    path, _ = mixtral_file
    out = str(tmp_path / "sparsified.onnx")
    assert main(["sparsify", path, "-o", out, "--sparsity", '{"moe": "dispatch"}']) == 0
    assert node_types(out).count("sparsecc::moe") == 2
    other = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(7))
    np.testing.assert_allclose(run_ort(out, other)[0], run_ort(path, other)[0], rtol=1e-4, atol=1e-5)


def test_layer_scopes_come_from_the_exporters_name_scopes_or_a_scoped_node_name():
    dynamo = helper.make_node("MatMul", ["a", "b"], ["c"], name="node_bmm")
    dynamo.metadata_props.add(key="pkg.torch.onnx.name_scopes",
                              value="['', 'model', 'model.layers.0', 'model.layers.0.mlp.experts', 'bmm']")
    assert layer_scopes(dynamo) == ["model", "layers", "0", "mlp", "experts"]
    torchscript = helper.make_node("MatMul", ["a", "b"], ["c"], name="/model/layers.0/mlp/gate/MatMul")
    assert layer_scopes(torchscript) == ["model", "layers", "0", "mlp", "gate"]
    assert layer_scopes(helper.make_node("Add", ["a", "b"], ["c"], name="add_3")) == []


@pytest.mark.parametrize("data_shape,indices_shape,batch_dims", [
    ((4, 6, 5), (3, 1), 0), ((4, 6, 5), (2,), 0), ((4, 6, 5), (2, 3, 2), 0), ((4, 6, 5), (3, 3), 0),
    ((3, 6, 5), (3, 2, 1), 1), ((3, 4, 6, 5), (3, 4, 2, 1), 2), ((3, 4, 6), (3, 2), 1)])
def test_gather_nd_matches_the_onnx_reference(data_shape, indices_shape, batch_dims):
    generator = np.random.default_rng(0)
    data = generator.standard_normal(data_shape).astype(np.float32)
    indexed = data_shape[batch_dims:batch_dims + indices_shape[-1]]
    indices = np.stack([generator.integers(-size, size, indices_shape[:-1]) for size in indexed], -1)
    node = helper.make_node("GatherND", ["data", "indices"], ["out"], batch_dims=batch_dims)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, data_shape),
                                            helper.make_tensor_value_info("indices", TensorProto.INT64, indices_shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    want = ReferenceEvaluator(model).run(None, {"data": data, "indices": indices})[0]
    tensors = (torch.from_numpy(data), torch.from_numpy(indices))
    np.testing.assert_array_equal(make_module(model, tensors)(*tensors).numpy(), want)
