"""export_onnx(contrib=True) on attention: GroupQueryAttention / SparseAttention where exact, else functions."""
import numpy as np
import onnx
import pytest
import sparsecc
import torch
import torch.nn.functional as F
from sparsecc.onnx.runner import SHARED_BUFFERS, OnnxRunner

from examples.tiny_transformer import TinyTransformer

from .helpers import assert_close, node_types, run_ort

WINDOW = {"attention": {"policy": "window", "block": 64, "window": 48, "sinks": 4}}


class MaskedGQA(torch.nn.Module):
    """Projections, kv heads read through repeat_kv, SDPA under a boolean mask built from arange:
    causal, causal with a sliding window of `window` keys, or (`causal=False`) a symmetric band."""

    def __init__(self, dim=64, heads=4, kv_heads=2, window=None, causal=True):
        super().__init__()
        self.heads, self.kv_heads, self.window, self.causal = heads, kv_heads, window, causal
        self.head_dim = dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = torch.nn.Linear(dim, dim)

    def mask(self, s: int) -> torch.Tensor:
        i = torch.arange(s)
        if not self.causal:
            return (i[None, :] - i[:, None]).abs() < self.window
        mask = i[None, :] <= i[:, None]
        return mask & (i[None, :] > i[:, None] - self.window) if self.window else mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        group = self.heads // self.kv_heads
        k, v = (t[:, :, None].expand(b, self.kv_heads, group, s, self.head_dim).reshape(b, self.heads, s, self.head_dim)
                for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(s) if mask is None else mask)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


def _export(model, inputs, sparsity, tmp_path, name="model.onnx"):
    torch.manual_seed(0)
    compiled = sparsecc.compile(model.eval(), inputs, sparsity=sparsity)
    path = str(tmp_path / name)
    result = compiled.export_onnx(path, contrib=True)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    return compiled, path, result


def test_window_policy_becomes_sparse_attention_with_bound_buffers(tmp_path):
    torch.manual_seed(0)
    model, ids = TinyTransformer(vocab=64, dim=32, heads=2, hidden=64, layers=2), torch.randint(0, 64, (2, 200))
    compiled, path, result = _export(model, (ids,), WINDOW, tmp_path)
    assert result.contrib_nodes == {"com.microsoft.SparseAttention": 2} and result.sparse_nodes == {}
    types = node_types(path)
    assert types.count("com.microsoft::SparseAttention") == 2 and not any("sparsecc" in t for t in types)
    assert any("9 of 16 blocks" in line for line in result.log)   # 4 query blocks: diagonal, one back, sinks
    runner = OnnxRunner(path)
    assert runner.inputs == ["tokens"] and len(runner.outputs) == 1 and len(runner.shared) == 4
    assert_close(runner.run(ids)[0], compiled(ids))
    assert_close(runner.run(tokens=ids)[0], compiled(ids))
    with pytest.raises(ValueError, match=r"missing inputs \['tokens'\]"):
        runner.run()


def test_sparse_attention_refuses_unshared_buffers(tmp_path):
    torch.manual_seed(0)
    model, ids = TinyTransformer(vocab=64, dim=32, heads=2, hidden=64, layers=1), torch.randint(0, 64, (1, 200))
    _, path, _ = _export(model, (ids,), WINDOW, tmp_path)
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros(i.shape, np.float32) for i in session.get_inputs() if i.name != "tokens"}
    with pytest.raises(Exception, match="past_key->DataRaw\\(\\) == present_key->DataRaw\\(\\)"):
        session.run(None, {"tokens": ids.numpy(), **feeds})


def test_window_policy_over_gqa_heads(tmp_path):
    x = torch.randn(2, 256, 64)   # query block 3 skips key block 1
    torch.manual_seed(0)
    model, band = MaskedGQA(), MaskedGQA(window=48)
    band.load_state_dict(model.state_dict())
    compiled, path, result = _export(model, (x,), WINDOW, tmp_path)
    # the window policy keeps whole key blocks (a staircase), GQA's local_window_size a per-element band
    assert (compiled(x) - band(x)).abs().max() > 1e-2
    assert result.contrib_nodes == {"com.microsoft.SparseAttention": 1}
    sparse = next(n for n in onnx.load(path).graph.node if n.op_type == "SparseAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in sparse.attribute}
    assert (attrs["num_heads"], attrs["kv_num_heads"], attrs["sparse_block_size"]) == (4, 2, 64)
    assert_close(run_ort(path, x)[0], compiled(x))


@pytest.mark.parametrize("window, local_window_size", [(None, -1), (40, 40)])
def test_causal_and_sliding_window_masks_become_group_query_attention(window, local_window_size, tmp_path):
    x = torch.randn(2, 160, 64)
    compiled, path, result = _export(MaskedGQA(window=window), (x,), {"attention": {"block": 64}}, tmp_path)
    assert result.contrib_nodes == {"com.microsoft.GroupQueryAttention": 1}
    gqa = next(n for n in onnx.load(path).graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert (attrs["local_window_size"], attrs["num_heads"], attrs["kv_num_heads"]) == (local_window_size, 4, 2)
    assert SHARED_BUFFERS not in {p.key for p in onnx.load(path).metadata_props}
    assert_close(run_ort(path, x)[0], compiled(x))


def test_symmetric_mask_keeps_the_function_form_with_the_reason(tmp_path):
    x = torch.randn(1, 160, 64)
    compiled, path, result = _export(MaskedGQA(window=40, causal=False), (x,), {"attention": {"block": 64}}, tmp_path)
    # the rule |i - j| < 40 follows from constants: fold-constants left its layout and rule as constants
    assert result.contrib_nodes == {} and result.sparse_nodes == {"block_attention": 1}
    line = next(line for line in result.log if line.startswith("block_attention"))
    assert "not one causal band" in line and "not causal over whole key blocks" in line and "function form" in line
    assert_close(run_ort(path, x)[0], compiled(x))


def test_mask_from_a_graph_input_keeps_the_function_form(tmp_path):
    x = torch.randn(1, 128, 64)
    mask = torch.ones(128, 128, dtype=torch.bool).tril()
    compiled, path, result = _export(MaskedGQA(), (x, mask), {"attention": {"block": 64}}, tmp_path)
    assert result.contrib_nodes == {}
    assert any("the mask depends on graph input 'mask'" in line and "function form" in line for line in result.log)
    assert_close(run_ort(path, x, mask)[0], compiled(x, mask))


@pytest.mark.parametrize("pipeline, op", [
    ("sparse-attention{policy=window,window=48,sinks=4,block=64,tolerance=1e-2},cleanup", "SparseAttention"),
    ("sparse-attention{block=64,tolerance=1e-2},cleanup", "GroupQueryAttention")])
def test_float16(pipeline, op, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 256, 64).half()
    model = MaskedGQA(window=None if op == "SparseAttention" else 40).eval().half()
    compiled = sparsecc.compile(model, (x,), pipeline=pipeline)   # fp16 needs a looser confirmation tolerance
    path = str(tmp_path / "half.onnx")
    assert compiled.export_onnx(path, contrib=True).contrib_nodes == {f"com.microsoft.{op}": 1}
    got = run_ort(path, x)[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), compiled(x).float().numpy(), rtol=0, atol=2e-3)


@pytest.mark.slow
def test_llama_window_policy(tmp_path):
    from ..passes.hf_attention import llama

    ids = torch.randint(0, 64, (2, 256))
    compiled, path, result = _export(llama("sdpa"), (ids,), WINDOW, tmp_path)
    assert result.contrib_nodes == {"com.microsoft.SparseAttention": 1}
    assert_close(run_ort(path, ids)[0], compiled(ids)["logits"])
