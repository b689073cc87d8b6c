"""The data-dependent attention policies (topk layouts, BLASST threshold skipping) export as local functions
of standard ops, and onnxruntime computes what the compiled model computes."""
import numpy as np
import onnx
import pytest
import sparsecc
import torch
import torch.nn.functional as F
from sparsecc.onnx.export.body import DOMAIN
from sparsecc.runtime.attention_layout import layout_from_mask
from sparsecc.runtime.ops.block_attention import skipped_blocks

from .helpers import run_ort
from .test_op_functions import single_op_model


class MaskedAttention(torch.nn.Module):
    """SDPA under causal & key padding; k and v read through `repeat_kv` when they have fewer heads (GQA)."""

    def forward(self, q, k, v, keep):
        batch, kv_heads, keys, dim = k.shape
        groups = q.shape[1] // kv_heads
        if groups > 1:
            k, v = (t.unsqueeze(2).expand(batch, kv_heads, groups, keys, dim).reshape(batch, -1, keys, dim)
                    for t in (k, v))
        seq = q.shape[-2]
        causal = torch.arange(seq)[:, None] >= torch.arange(seq)[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal[None, None] & keep[:, None, None, :])


def _inputs(seq=256, heads=2, kv_heads=2, sink=0.0, seed=3):
    """Left-padded row 1; `sink` > 0 makes the first 64 keys dominate every query (a learned sink)."""
    torch.manual_seed(seed)
    q = torch.randn(2, heads, seq, 16)
    k, v = torch.randn(2, kv_heads, seq, 16), torch.randn(2, kv_heads, seq, 16)
    q[..., 0], k[:, :, :64, 0] = q[..., 0] + sink, k[:, :, :64, 0] + 4 * sink
    keep = torch.ones(2, seq, dtype=torch.bool)
    keep[1, :20] = False
    return q, k, v, keep


def _export_and_compare(compiled, inputs, path):
    result = compiled.export_onnx(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    got, want = run_ort(str(path), *inputs)[0], compiled(*inputs).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    return result, model


def _function_of(model, op: str) -> onnx.FunctionProto:
    """The local function bound to the graph's one `sparsecc::op` node; its body uses standard ops only."""
    node, = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == op]
    function, = [f for f in model.functions if (f.domain, f.name, f.overload) == (DOMAIN, op, node.overload)]
    assert all(n.domain in ("", "ai.onnx") for n in function.node)
    return function


@pytest.mark.parametrize("options, shapes", [
    ({"topk": 0.3, "sinks": 4, "block": 64}, {}),
    ({"topk": 2, "sinks": 0, "block": 64}, {}),
    ({"topk": 0.5, "sinks": 16, "block": 64}, {"seq": 200, "heads": 4, "kv_heads": 2}),   # GQA, ragged block
], ids=["fraction", "count", "gqa-ragged"])
def test_topk_layout_runs_in_onnxruntime(options, shapes, tmp_path):
    inputs = _inputs(**shapes)
    compiled = sparsecc.compile(MaskedAttention(), inputs, sparsity={"attention": {"policy": "topk", **options}})
    exact = sparsecc.compile(MaskedAttention(), inputs, sparsity={"attention": {"block": options["block"]}})
    assert compiled.report().layers[0].details["density"] < exact.report().layers[0].details["density"]
    result, model = _export_and_compare(compiled, inputs, tmp_path / "topk.onnx")
    assert result.sparse_nodes == {"rule_layout": 1, "block_attention": 1}   # causal & padding read as a rule
    assert "TopK" in {n.op_type for n in _function_of(model, "rule_layout").node}


@pytest.mark.parametrize("shapes", [{}, {"seq": 200, "heads": 4, "kv_heads": 2}], ids=["mha", "gqa-ragged"])
def test_threshold_skipping_runs_in_onnxruntime(shapes, tmp_path):
    inputs = _inputs(sink=3.0, **shapes)   # skipped blocks carry enough weight to change the output
    config = {"attention": {"policy": "threshold", "threshold": 0.2, "block": 64}}
    compiled = sparsecc.compile(MaskedAttention(), inputs, sparsity=config)
    exact = sparsecc.compile(MaskedAttention(), inputs, sparsity={"attention": {"block": 64}})
    assert compiled.report().layers[0].details["density"] < exact.report().layers[0].details["density"]
    assert (compiled(*inputs) - exact(*inputs)).abs().max() > 1e-2
    _, model = _export_and_compare(compiled, inputs, tmp_path / "threshold.onnx")
    assert "Loop" in {n.op_type for n in _function_of(model, "block_attention").node}


def _run_function(name: str, sample: tuple) -> tuple[list, list]:
    """(onnxruntime outputs of the op's function alone, the op's CPU kernel outputs) on one sample."""
    import onnxruntime as ort
    want = getattr(torch.ops.sparsecc, name)(*sample)
    want = want if isinstance(want, (tuple, list)) else (want,)
    model, feeds = single_op_model(name, sample, want)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds), [w.numpy() for w in want]


@pytest.mark.parametrize("seq, keys, heads, kv_heads, block_q, block_k, mask_kind", [
    (33, 100, 2, 2, 16, 16, "padding"),         # ragged last blocks, Skv > S
    (40, 130, 6, 2, 16, 32, "per-head"),        # GQA, a mask per head
    (1, 100, 4, 2, 16, 16, "causal"),           # decode: fewer rows than a block
])
def test_functions_match_the_cpu_kernels(seq, keys, heads, kv_heads, block_q, block_k, mask_kind):
    """Layouts equal entry for entry (ties included: zero key blocks score equally, and the lower block
    index wins, as in torch's stable sort), attention to float rounding; the BLASST threshold skips blocks."""
    torch.manual_seed(seq)
    q, k, v = torch.randn(2, heads, seq, 8) * 3, torch.randn(2, kv_heads, keys, 8), torch.randn(2, kv_heads, keys, 8)
    causal = torch.arange(keys)[None, :] <= torch.arange(seq)[:, None] + keys - seq
    mask = {"causal": causal[None, None], "padding": causal[None, None] & (torch.rand(2, 1, 1, keys) > 0.3),
            "per-head": causal & (torch.rand(1, heads, seq, keys) > 0.2)}[mask_kind]
    tied = k.clone()
    tied[:, :, : keys // 2 + 16] = 0
    for topk, sinks, pooled in ((0.4, 20, (q, k)), (2.0, 0, (q, tied)), (0.5, 0, (q, torch.zeros_like(k)))):
        got, want = _run_function("block_layout", (mask, block_q, block_k, "topk", 0, sinks, topk, *pooled))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    layout = layout_from_mask(mask, block_q, block_k)
    logits = (q @ k.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2) * 0.35).masked_fill(~mask, -np.inf)
    assert skipped_blocks(logits, layout, 0.3, block_q, block_k).any()
    for empty_rows in ("zero", "nan"):
        got, want = _run_function("block_attention", (q, k, v, *layout, mask, 0.35, block_q, block_k, 0.3, empty_rows))
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5, equal_nan=True)


class CappedOrSunkAttention(torch.nn.Module):
    """Eager attention as Gemma2 (softcap) and GPT-OSS (sink logits) write it, under causal (& a sliding
    window of `window` keys) & key padding `keep` (None: no padding, so the mask is known at export)."""

    def __init__(self, softcap=0.0, heads=4, window=None):
        super().__init__()
        self.softcap, self.window = softcap, window
        self.sinks = torch.nn.Parameter(torch.linspace(-1.0, 2.0, heads)) if not softcap else None

    def forward(self, q, k, v, keep=None):
        groups, seq = q.shape[1] // k.shape[1], q.shape[-2]
        k, v = (t.repeat_interleave(groups, 1) for t in (k, v))
        scores = q @ k.transpose(2, 3) * q.shape[-1] ** -0.5
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        rows, cols = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
        visible = ((rows >= cols) & (cols > rows - self.window if self.window else True))[None, None]
        visible = visible if keep is None else visible & keep[:, None, None, :]
        scores = scores + torch.where(visible, torch.zeros(()), torch.finfo(torch.float32).min)
        if self.sinks is None:
            return torch.softmax(scores, -1) @ v
        scores = torch.cat([scores, self.sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)], -1)
        probs = torch.softmax(scores - scores.max(-1, keepdim=True).values, -1)
        return probs[..., :-1] @ v


@pytest.mark.parametrize("softcap", [5.0, 0.0], ids=["softcap", "sinks"])
def test_softcap_and_sinks_run_in_onnxruntime(softcap, tmp_path):
    inputs = _inputs(heads=4, kv_heads=2)
    model = CappedOrSunkAttention(softcap)
    compiled = sparsecc.compile(model, inputs, sparsity={"attention": {"block": 64}})
    assert compiled.report().layers[0].details["error_vs_dense"] < 1e-5
    result, exported = _export_and_compare(compiled, inputs, tmp_path / "variant.onnx")
    np.testing.assert_allclose(run_ort(str(tmp_path / "variant.onnx"), *inputs)[0], model(*inputs).detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    body = {n.op_type for n in _function_of(exported, "block_attention").node}
    assert ("Tanh" in body) == bool(softcap) and ("Exp" in body) != bool(softcap)


@pytest.mark.parametrize("window", [None, 40], ids=["causal", "sliding"])
@pytest.mark.parametrize("softcap", [5.0, 0.0], ids=["softcap", "sinks"])
def test_softcap_and_sinks_become_group_query_attention(softcap, window, tmp_path):
    """GroupQueryAttention's softcap and head_sink compute the op's softcap and sinks (measured in ORT 1.32)."""
    q, k, v, _ = _inputs(seq=160, heads=4, kv_heads=2)
    model = CappedOrSunkAttention(softcap, window=window)
    compiled = sparsecc.compile(model, (q, k, v), sparsity={"attention": {"block": 64}})
    path = str(tmp_path / "gqa.onnx")
    result = compiled.export_onnx(path, contrib=True)
    assert result.contrib_nodes == {"com.microsoft.GroupQueryAttention": 1}
    gqa, = [n for n in onnx.load(path).graph.node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs.get("softcap", 0.0) == softcap and (len(gqa.input) > 11 and gqa.input[11] != "") != bool(softcap)
    np.testing.assert_allclose(run_ort(path, q, k, v)[0], model(q, k, v).detach().numpy(), rtol=1e-4, atol=1e-5)
