"""ONNX export: every sparse op a `sparsecc` node with a local function; stock onnxruntime matches."""
import onnx
import pytest
import sparsecc
import torch

from examples.tiny_transformer import TinyTransformer

from ..passes.hf_attention import ids_and_padding, llama
from ..passes.hf_moe import mixtral, qwen2_moe, tokens
from .helpers import assert_close, initializer_dtypes, node_types, run_ort


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyTransformer(vocab=64, dim=32, heads=2, hidden=64, layers=1).eval()
    ids = torch.randint(0, 64, (1, 16))
    return sparsecc.compile(model, (ids,), sparsity="2:4"), ids


def test_tiny_transformer_nm_runs_in_onnxruntime(tiny, tmp_path):
    compiled, ids = tiny
    path = str(tmp_path / "tiny.onnx")
    result = compiled.export_onnx(path, compare_dense=True)
    assert result.sparse_nodes == {"nm_linear": 6}
    assert node_types(path).count("sparsecc::nm_linear") == 6
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert {(f.domain, f.name) for f in model.functions} == {("sparsecc", "nm_linear")}
    dtypes = initializer_dtypes(path)
    assert dtypes["lm_head.weight_nm_indices"] == onnx.TensorProto.UINT8 and "lm_head.weight" not in dtypes
    assert result.file_bytes < result.dense_file_bytes
    assert result.weight_bytes < 0.7 * result.dense_weight_bytes   # tiny model: node metadata is most of the rest
    assert_close(run_ort(path, ids)[0], compiled(ids))


@pytest.mark.parametrize("pattern", ["4:8", "1:4", "8:16"])
def test_index_widths_of_every_group_size(pattern, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(48, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16, bias=False))
    x = torch.randn(3, 48)
    compiled = sparsecc.compile(model, (x,), sparsity=pattern)
    path = str(tmp_path / "mlp.onnx")
    compiled.export_onnx(path)
    assert node_types(path).count("sparsecc::nm_linear") == 2
    assert_close(run_ort(path, x)[0], compiled(x))


@pytest.mark.slow
def test_llama_attention_and_nm(tmp_path):
    ids, attention_mask = ids_and_padding(seq=160)
    kwargs = {"attention_mask": attention_mask}
    compiled = sparsecc.compile(llama("sdpa"), (ids,), example_kwargs=kwargs,
                                sparsity={"weights": {"pattern": "2:4"}, "attention": {"block": 64}})
    path = str(tmp_path / "llama.onnx")
    result = compiled.export_onnx(path)
    assert result.sparse_nodes == {"nm_linear": 8, "rule_layout": 1, "block_attention": 1}   # causal & padding rule
    assert_close(run_ort(path, ids, attention_mask)[0], compiled(ids, **kwargs)["logits"])


@pytest.mark.slow
def test_window_attention_matches_the_compiled_model(tmp_path):
    ids, attention_mask = ids_and_padding(seq=192)
    kwargs = {"attention_mask": attention_mask}
    config = {"attention": {"policy": "window", "block": 64, "window": 48, "sinks": 4}}
    compiled = sparsecc.compile(llama("eager"), (ids,), example_kwargs=kwargs, sparsity=config)
    path = str(tmp_path / "window.onnx")
    result = compiled.export_onnx(path, contrib=True)
    assert "sparsecc::block_attention" in node_types(path)
    assert any("local_window_size" in line and "function form" in line for line in result.log)
    assert_close(run_ort(path, ids, attention_mask)[0], compiled(ids, **kwargs)["logits"])


@pytest.fixture(scope="module")
def mixtral_nm():
    model, ids = mixtral(layers=1), tokens()
    return sparsecc.compile(model, (ids,), pipeline="moe-dispatch,prune-nm,cleanup"), ids


@pytest.mark.slow
@pytest.mark.parametrize("contrib", [False, True])
def test_mixtral_moe_with_compressed_experts(mixtral_nm, contrib, tmp_path):
    compiled, ids = mixtral_nm
    path = str(tmp_path / "mixtral.onnx")
    result = compiled.export_onnx(path, contrib=contrib)
    types = node_types(path)
    assert types.count("sparsecc::nm_decompress") == 2          # gate_up and down stay compressed
    assert types.count("com.microsoft::MoE" if contrib else "sparsecc::moe") == 1
    assert any("com.microsoft.MoE" in line for line in result.log) == contrib
    assert_close(run_ort(path, ids)[0], compiled(ids)["logits"])


@pytest.mark.slow
def test_contrib_falls_back_with_the_reason(tmp_path):
    model, ids = qwen2_moe(layers=1), tokens()
    compiled = sparsecc.compile(model, (ids,), pipeline="moe-dispatch,cleanup")
    path = str(tmp_path / "qwen.onnx")
    result = compiled.export_onnx(path, contrib=True)
    assert result.contrib_nodes == {} and result.sparse_nodes == {"moe": 1}
    assert any("shared expert" in line and "function form" in line for line in result.log)
    assert_close(run_ort(path, ids)[0], compiled(ids)["logits"])


@pytest.mark.slow
def test_capacity_factor_in_function_form(tmp_path):
    model, ids = mixtral(layers=1), tokens(seq=12)
    compiled = sparsecc.compile(model, (ids,), sparsity={"moe": {"capacity_factor": 0.5}})
    path = str(tmp_path / "capacity.onnx")
    result = compiled.export_onnx(path, contrib=True)
    assert any("capacity_factor" in line for line in result.log)
    assert_close(run_ort(path, ids)[0], compiled(ids)["logits"])


def test_token_routing_runs_in_onnxruntime(tmp_path):
    from ..passes.routing_models import stack

    torch.manual_seed(0)
    model, x = stack(layers=3).eval(), torch.randn(2, 16, 32)
    compiled = sparsecc.compile(model, (x,), sparsity={"tokens": {"capacity": 0.5, "layers": ["*"]},
                                                       "weights": "2:4"})
    path = str(tmp_path / "routed.onnx")
    result = compiled.export_onnx(path)
    assert {"route", "route_gather", "unroute"} <= set(result.sparse_nodes)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert_close(run_ort(path, x)[0], compiled(x))
