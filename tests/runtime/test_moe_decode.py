"""sparsecc::moe with N:M-compressed experts on CPU (kernels/cpu/moe_decode.py) against today's path:
nm_decompress of the stacked weights, then the dense moe kernel, on the same pruned weights."""
import pytest
import torch

from sparsecc.runtime.errors import RuntimeProgramError
from sparsecc.runtime.kernels.cpu import nm_paths
from sparsecc.runtime.kernels.cpu.mlir.nm_decode import runnable_spec
from sparsecc.runtime.kernels.cpu.moe import moe_cpu
from sparsecc.runtime.kernels.cpu.moe_decode import NMExperts, moe_cpu_nm
from sparsecc.runtime.nm_format import compress_nm, nm_mask
from sparsecc.runtime.ops.moe import sample_moe_arguments, with_options

WIDTH, INTER, EXPERTS = 64, 64, 8   # K = 64: the smallest reduction dim the bf16 decode kernel takes
HAS_DECODE_KERNEL = all(runnable_spec(dtype, WIDTH, 2, 4, 1) for dtype in ("float32", "bfloat16"))
needs_kernel = pytest.mark.skipif(not HAS_DECODE_KERNEL, reason="no generated decode kernel on this host")
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def compressed(weight: torch.Tensor, n: int = 2, m: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return compress_nm(weight, n, m, mask=nm_mask(weight.abs(), n, m))


def make_call(tokens, dtype, *, gated=True, top_k=2, biases=False, interleaved=False, shared=False):
    """(NMExperts, the op's arguments with the dense weights pruned to the same pattern)."""
    hidden, logits, w_gate_up, w_down, *shared_parts = sample_moe_arguments(
        tokens, WIDTH, INTER, EXPERTS, gated, shared, False, dtype)
    experts = NMExperts(*compressed(w_gate_up), *compressed(w_down), 2, 4)
    activation = "swiglu_clamped" if interleaved else "silu" if gated else "gelu"
    call = (hidden, logits, *experts.decompressed(), *shared_parts, top_k, True, "softmax", activation, gated, 0.0)
    options = {}
    if biases:
        options.update(b_gate_up=torch.randn(EXPERTS, (2 if gated else 1) * INTER, dtype=dtype),
                       b_down=torch.randn(EXPERTS, WIDTH, dtype=dtype))
    if interleaved:
        options.update(interleaved=True, swiglu_limit=0.5)
    return experts, with_options(call, **options)


def without_weights(call: tuple) -> tuple:
    return (*call[:2], None, None, *call[4:])


@pytest.fixture
def decode_only(monkeypatch, tmp_path):
    """The generated decode kernel forced, and any decompression of an expert weight an error."""
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SPARSECC_NM_CPU_PATH", "generated")

    def refuse_to_decompress(*args, **kwargs):
        raise AssertionError("an expert weight was decompressed")
    monkeypatch.setattr(nm_paths, "decompress_tile", refuse_to_decompress)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 16])   # every count between: the next test
@pytest.mark.parametrize("form", [dict(), dict(gated=False), dict(biases=True), dict(biases=True, interleaved=True),
                                  dict(top_k=1), dict(shared=True)])
def test_decode_kernel_matches_decompress_then_moe(decode_only, dtype, tokens, form):
    experts, call = make_call(tokens, dtype, **form)
    want = moe_cpu(*call)
    got = moe_cpu_nm(experts, *without_weights(call))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


@needs_kernel
def test_every_token_count_up_to_16_with_empty_experts(decode_only):
    for tokens in range(1, 17):   # 1 token, top-2 of 8: six experts receive no row and are never read
        experts, call = make_call(tokens, torch.float32)
        torch.testing.assert_close(moe_cpu_nm(experts, *without_weights(call)), moe_cpu(*call), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["generated", "whole"])
def test_experts_no_token_reached_are_never_read(monkeypatch, tmp_path, path):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SPARSECC_NM_CPU_PATH", path)
    experts, call = make_call(1, torch.float32)
    used = call[1].topk(2, -1).indices.flatten().tolist()
    unused = [e for e in range(EXPERTS) if e not in used]
    for values in (experts.gate_up_values, experts.down_values):
        values[unused] = float("nan")
    torch.testing.assert_close(moe_cpu_nm(experts, *without_weights(call)), moe_cpu(*call), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["whole", "tiles"])
def test_prefill_paths_decompress_one_expert_at_a_time(monkeypatch, tmp_path, path):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SPARSECC_NM_CPU_PATH", path)
    experts, call = make_call(40, torch.float32, biases=True)
    torch.testing.assert_close(moe_cpu_nm(experts, *without_weights(call)), moe_cpu(*call), rtol=1e-5, atol=1e-5)


def test_the_path_is_chosen_per_projection_by_measurement(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPARSECC_NM_CPU_PATH", raising=False)
    experts, call = make_call(2, torch.bfloat16, biases=True)
    got = moe_cpu_nm(experts, *without_weights(call))
    torch.testing.assert_close(got.float(), moe_cpu(*call).float(), **TOLERANCE[torch.bfloat16])
    chosen = nm_paths.decisions(torch.bfloat16, 2, 4, 2 * INTER, WIDTH) + nm_paths.decisions(
        torch.bfloat16, 2, 4, WIDTH, INTER)
    assert {d["tokens"] for d in chosen} <= {1, 2} and chosen


def test_malformed_experts_are_refused():
    experts, call = make_call(2, torch.float32)
    short = NMExperts(experts.gate_up_values[:, :, :-2], experts.gate_up_indices, experts.down_values,
                      experts.down_indices, 2, 4)
    with pytest.raises(RuntimeProgramError, match="sparsecc::moe: gate_up"):
        moe_cpu_nm(short, *without_weights(call))
    other_width = make_call(2, torch.float32)[1][0][:, :32]
    with pytest.raises(RuntimeProgramError, match="sparsecc::moe"):
        moe_cpu_nm(experts, other_width, *without_weights(call)[1:])
