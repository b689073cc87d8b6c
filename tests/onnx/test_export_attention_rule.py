"""Attention masks read as rules export as `rule_layout` + `block_attention` functions of standard ops:
nothing S x Skv is stored, a dynamic sequence length works, and onnxruntime computes what the compiled
model computes."""
import numpy as np
import onnx
import pytest
import sparsecc
import torch
import torch.nn.functional as F
from onnx import TensorProto
from sparsecc.onnx.export.exporter import OnnxExportError
from sparsecc.onnx.export.rules import dynamic_shape_misfit
from sparsecc.onnx.export.spec import CallSpec, Operand

from ..passes.hf_attention import ids_and_padding, llama
from .helpers import run_ort

Dim = torch.export.Dim
SEQ = {1: Dim("seq", min=2, max=256)}
BATCH_SEQ = SEQ | {0: Dim("batch", min=1, max=8)}


class RuleAttention(torch.nn.Module):
    """Eager SDPA under causal (& a sliding window of `window` keys) & key padding `keep` [B, S] (unless
    padding=False), the mask built from arange as transformers builds it."""

    def __init__(self, dim=32, heads=2, window=None, padding=True):
        super().__init__()
        self.heads, self.window, self.padding = heads, window, padding
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x, keep):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        positions = torch.arange(s, device=x.device)
        mask = positions[None, :] <= positions[:, None]
        if self.window is not None:
            mask = mask & (positions[:, None] - self.window < positions[None, :])
        mask = mask[None, None] & keep[:, None, None, :] if self.padding else mask[None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, s, d)


class EvenKeysAttention(RuleAttention):
    """A mask no rule expresses (keys of even distance): the layout is read off the materialised mask."""

    def forward(self, x, keep):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        positions = torch.arange(s, device=x.device)
        mask = ((positions[:, None] - positions[None, :]) % 2 == 0)[None, None] & keep[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, s, d)


def _inputs(batch: int, seq: int, padded: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x and keep, row 1 left-padded by `padded` keys."""
    torch.manual_seed(seed)
    keep = torch.ones(batch, seq, dtype=torch.bool)
    keep[1:2, :padded] = False
    return torch.randn(batch, seq, 32), keep


def _compile(model, sparsity, dynamic=(BATCH_SEQ, BATCH_SEQ), example=(2, 160, 0)):
    torch.manual_seed(0)
    return sparsecc.compile(model.eval(), _inputs(*example), sparsity={"attention": sparsity},
                            dynamic_shapes=dynamic, check=False)


def _largest_stored(model: onnx.ModelProto) -> list[int]:
    """The shape of every initializer and Constant tensor of the graph and its functions."""
    nodes = [*model.graph.node, *(n for f in model.functions for n in f.node)]
    tensors = [*model.graph.initializer, *(a.t for n in nodes if n.op_type == "Constant" for a in n.attribute
                                           if a.name == "value")]
    return [list(t.dims) for t in tensors]


def _export_and_compare(compiled, path, shapes, **kwargs):
    result = compiled.export_onnx(str(path), **kwargs)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    for batch, seq, padded in shapes:
        x, keep = _inputs(batch, seq, padded, seed=seq)
        got, = run_ort(str(path), x, keep)
        np.testing.assert_allclose(got, compiled(x, keep).detach().numpy(), rtol=1e-4, atol=1e-5)
    return result, model


@pytest.mark.parametrize("policy, window", [("mask", None), ("mask", 24), ("window", None)])
def test_a_rule_exports_with_a_dynamic_sequence_and_runs_at_several_lengths(policy, window, tmp_path):
    """Causal & padding (& a model's own sliding window) with a dynamic batch and length; the window
    policy narrows to 40 keys + 4 sinks."""
    sparsity = {"policy": policy, "block": 64} | ({"window": 40, "sinks": 4} if policy == "window" else {})
    compiled = _compile(RuleAttention(window=window), sparsity)
    assert "rule" in str(compiled.report())
    result, model = _export_and_compare(compiled, tmp_path / "rule.onnx", [(2, 160, 30), (3, 37, 5), (1, 230, 0)])
    assert result.sparse_nodes == {"rule_layout": 1, "block_attention": 1}
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq", 32]
    assert all(sum(d >= 37 for d in dims) < 2 for dims in _largest_stored(model))   # nothing S x S stored


def test_transformers_llama_with_a_dynamic_sequence_and_left_padding(tmp_path):
    """transformers builds the causal & padding mask from cache positions and attention_mask: read as a rule."""
    seq = Dim("seq", min=2, max=256)
    ids, padding = ids_and_padding(seq=160)
    compiled = sparsecc.compile(llama("sdpa"), (ids,), example_kwargs={"attention_mask": padding},
                                sparsity={"attention": {"block": 64}}, check=False,
                                dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}})
    path = str(tmp_path / "llama.onnx")
    assert compiled.export_onnx(path).sparse_nodes == {"rule_layout": 1, "block_attention": 1}
    for length, pad in ((160, 70), (90, 30)):
        ids, padding = ids_and_padding(seq=length, pad=pad)
        got = run_ort(path, ids, padding)[0]
        np.testing.assert_allclose(got, compiled(ids, attention_mask=padding)["logits"].detach().numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_a_static_causal_rule_maps_to_group_query_attention(tmp_path):
    """The rule follows from constants (no padding input), so the contrib mapping evaluates it."""
    compiled = _compile(RuleAttention(padding=False), {"policy": "mask", "block": 64}, dynamic=None,
                        example=(2, 130, 0))
    result, model = _export_and_compare(compiled, tmp_path / "gqa.onnx", [(2, 130, 0)], contrib=True)
    assert result.contrib_nodes == {"com.microsoft.GroupQueryAttention": 1}
    assert not [n for n in model.graph.node if n.domain == "sparsecc"]


def test_a_rule_from_a_graph_input_keeps_the_function_form_with_the_reason(tmp_path):
    compiled = _compile(RuleAttention(), {"policy": "mask", "block": 64}, dynamic=None, example=(2, 100, 0))
    result, _ = _export_and_compare(compiled, tmp_path / "rule.onnx", [(2, 100, 70)], contrib=True)
    assert result.contrib_nodes == {} and result.sparse_nodes == {"rule_layout": 1, "block_attention": 1}
    assert any("the rule depends on graph input 'keep'" in line for line in result.log), result.log


def test_a_materialised_mask_with_a_dynamic_sequence_is_refused_naming_the_node(tmp_path):
    compiled = _compile(EvenKeysAttention(), {"policy": "mask", "block": 64})
    with pytest.raises(OnnxExportError, match="sparsecc::block_layout node .*static sequence length"):
        compiled.export_onnx(str(tmp_path / "mask.onnx"))


def test_topk_over_a_rule_with_a_dynamic_sequence_is_refused_naming_the_reason():
    q, k = Operand(("batch", 2, "seq", 16), TensorProto.FLOAT), Operand(("batch", 2, "seq", 16), TensorProto.FLOAT)
    lengths, term = Operand((), TensorProto.INT64), Operand(("seq", 1), TensorProto.INT64)
    spec = CallSpec("rule_layout", "node_rule_layout", {"ops": "ge", "block_q": 64, "block_k": 64, "policy": "topk",
                                                        "topk": 0.5}, (lengths, lengths, q, k, term, term), 20)
    assert "policy topk pools q and k" in dynamic_shape_misfit(spec)
    assert dynamic_shape_misfit(CallSpec(**{**spec.__dict__, "attrs": {**spec.attrs, "policy": "window"}})) is None


def test_topk_over_a_static_rule_runs_in_onnxruntime(tmp_path):
    compiled = _compile(RuleAttention(), {"policy": "topk", "block": 64, "topk": 0.5}, dynamic=None)
    result, _ = _export_and_compare(compiled, tmp_path / "topk.onnx", [(2, 160, 30)])
    assert result.sparse_nodes == {"rule_layout": 1, "block_attention": 1}
