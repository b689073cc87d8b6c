"""block_attention with logit softcapping (Gemma2) and learned sink logits (GPT-OSS): the CPU kernel and the
Triton kernel (interpreter on CPU, fp32) against torch written the way transformers writes them."""
import pytest
import torch

from sparsecc.runtime.attention_layout import causal_layout, layout_from_mask, window_layout
from sparsecc.runtime.kernels.cpu.block_attention import block_attention_cpu
from sparsecc.runtime.ops.block_attention import block_attention_reference, verify_block_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def qkv(batch=2, heads=4, kv_heads=2, seq=48, keys=48, dim=16):
    torch.manual_seed(0)
    return (torch.randn(batch, heads, seq, dim) * 2, torch.randn(batch, kv_heads, keys, dim) * 2,
            torch.randn(batch, kv_heads, keys, dim))


def eager(q, k, v, visible, softcap=0.0, sinks=None):
    """Gemma2 / GPT-OSS eager attention: cap, additive finfo.min mask, sink column concatenated then dropped."""
    groups = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(groups, 1).transpose(2, 3) * q.shape[-1] ** -0.5
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + torch.zeros(()).masked_fill(~visible, torch.finfo(torch.float32).min)
    if sinks is not None:
        scores = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)], -1)
    probs = torch.softmax(scores - scores.amax(-1, keepdim=True), -1)
    return probs[..., :k.shape[2]] @ v.repeat_interleave(groups, 1)


def causal(seq, keys, window=None):
    rows, cols = torch.arange(seq)[:, None] + keys - seq, torch.arange(keys)[None, :]
    visible = cols <= rows
    return visible if window is None else visible & (cols > rows - window)


def padded_causal(seq):
    keep = torch.ones(2, seq, dtype=torch.bool)
    keep[1, :20] = False  # left padding: rows 0..19 of batch row 1 see no key
    return causal(seq, seq)[None, None] & keep[:, None, None, :]


CASES = {"softcap": (30.0, None), "sinks": (0.0, "sinks"), "both": (5.0, "sinks")}


def _sinks(kind):
    return None if kind is None else torch.linspace(-2.0, 3.0, 4)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mask_kind", ["causal", "window", "padded"])
def test_cpu_kernel_matches_eager_attention(case, mask_kind):
    softcap, sink_kind = CASES[case]
    q, k, v = qkv()
    mask = {"causal": causal(48, 48)[None, None], "window": causal(48, 48, window=20)[None, None],
            "padded": padded_causal(48)}[mask_kind]
    args = (q, k, v, *layout_from_mask(mask, 16, 16), mask, q.shape[-1] ** -0.5, 16, 16, 0.0, "uniform",
            softcap, _sinks(sink_kind))
    got = block_attention_cpu(*args)
    want = eager(q, k, v, mask, softcap, _sinks(sink_kind))
    if sink_kind is None and mask_kind == "padded":  # finfo.min rows are uniform, as empty_rows says
        assert torch.equal(got[1, :, :20], v.mean(2, keepdim=True).repeat_interleave(2, 1)[1].expand(-1, 20, -1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block_attention_reference(*args), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_decode_and_threshold_paths(case):
    softcap, sink_kind = CASES[case]
    q, k, v = qkv(seq=3, keys=40)
    for threshold in (0.0, 0.2):
        args = (q, k, v, *causal_layout(3, 40, 16, 16), None, 0.25, 16, 16, threshold, "zero", softcap,
                _sinks(sink_kind))
        torch.testing.assert_close(block_attention_cpu(*args), block_attention_reference(*args), rtol=1e-5,
                                   atol=1e-6)


def test_sinks_make_empty_rows_zero_whatever_empty_rows_says():
    q, k, v = qkv()
    mask = padded_causal(48)
    for empty_rows in ("zero", "uniform", "nan"):
        out = block_attention_cpu(q, k, v, *layout_from_mask(mask, 16, 16), mask, 0.25, 16, 16, 0.0, empty_rows,
                                  0.0, _sinks("sinks"))
        assert torch.equal(out[1, :, :20], torch.zeros_like(out[1, :, :20]))


@pytest.mark.parametrize("softcap, sinks, problem", [
    (-1.0, None, "softcap"), (float("inf"), None, "softcap"), (0.0, torch.zeros(3), "sinks"),
    (0.0, torch.zeros(4, dtype=torch.long), "sinks"), (0.0, torch.zeros(1, 4), "sinks")])
def test_verifier_refuses_bad_variants(softcap, sinks, problem):
    q, k, v = qkv()
    found = verify_block_attention(q, k, v, *causal_layout(48, 48, 16, 16), None, 0.25, 16, 16, 0.0, "zero",
                                   softcap, sinks)
    assert found is not None and found.startswith(problem)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("policy", ["window", "threshold", "decode"])
def test_triton_kernel_matches_reference(case, policy):
    launch = pytest.importorskip("sparsecc.runtime.kernels.triton.block_attention").block_attention_triton
    softcap, sink_kind = CASES[case]
    seq = 5 if policy == "decode" else 48
    q, k, v = qkv(batch=1, seq=seq, keys=48)
    layout = window_layout(seq, 48, 20, 4, 16, 16) if policy == "window" else causal_layout(seq, 48, 16, 16)
    args = (q, k, v, *layout, None, 0.25, 16, 16, 0.3 if policy == "threshold" else 0.0, "zero", softcap,
            _sinks(sink_kind))
    got = launch(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args])
    torch.testing.assert_close(got.cpu(), block_attention_reference(*args), rtol=1e-4, atol=1e-4)
