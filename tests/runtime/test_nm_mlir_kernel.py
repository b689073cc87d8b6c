"""The generated N:M decode kernel (MLIR -> LLVM JIT) against decompress_nm + F.linear."""
import pytest
import torch
import torch.nn.functional as F

from sparsecc.runtime.errors import RuntimeProgramError
from sparsecc.runtime.kernels.cpu.mlir import host, jit, nm_decode
from sparsecc.runtime.kernels.cpu.mlir.codegen import COMPACT_BLOCKING, DecodeSpec, decode_kernel_text, unsupported
from sparsecc.runtime.kernels.cpu.mlir.host import missing_features
from sparsecc.runtime.kernels.cpu.mlir.nm_decode import chunk_rows, nm_decompress_mlir, nm_linear_mlir
from sparsecc.runtime.nm_format import compress_nm, decompress_nm, nm_mask


def runs_here(dtype: str, kernel: str = "decode") -> bool:
    return nm_decode.mlir_available() and not missing_features(dtype, kernel)


needs_fp32 = pytest.mark.skipif(not runs_here("float32"), reason="needs torch-mlir and AVX-512 VBMI")
needs_bf16 = pytest.mark.skipif(not runs_here("bfloat16"), reason="needs torch-mlir and AVX-512 BF16")
needs_expand = pytest.mark.skipif(not runs_here("bfloat16", "decompress"), reason="needs torch-mlir and AVX-512 VBMI2")


def make_layer(rows, k, n, m, dtype):
    weight = torch.randn(rows, k)
    pruned = (weight * nm_mask(weight.abs(), n, m)).to(dtype)
    values, indices = compress_nm(pruned, n, m)
    return values, indices


def reference(x, values, indices, bias, n, m, k):
    """F.linear in fp32 on the decompressed weight, rounded once to x's dtype."""
    weight = decompress_nm(values, indices, n, m, k).float()
    return F.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)


def check(rows, k, n, m, dtype, batch, with_bias):
    values, indices = make_layer(rows, k, n, m, dtype)
    x = torch.randn(*batch, k).to(dtype)
    bias = torch.randn(rows).to(dtype) if with_bias else None
    y = nm_linear_mlir(x, values, indices, bias, n, m, k)
    expected = reference(x, values, indices, bias, n, m, k)
    assert y is not None and y.shape == expected.shape and y.dtype == dtype and y.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    else:  # fp32 accumulation in another order: within one bf16 rounding of the fp32 result
        torch.testing.assert_close(y.float(), expected.float(), rtol=1e-2, atol=2e-2)


@needs_fp32
@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("tokens", [1, 2, 5, 8, 16])
def test_fp32_equals_dense_linear(pattern, tokens):
    check(67, 128, *pattern, torch.float32, (tokens,), with_bias=tokens % 2 == 1)


@needs_bf16
@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("tokens", [1, 3, 8, 16])
def test_bf16_equals_dense_linear(pattern, tokens):
    check(67, 128, *pattern, torch.bfloat16, (tokens,), with_bias=tokens % 2 == 0)


@needs_bf16
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", [(8, 16), (4, 16), (2, 16), (1, 16), (2, 8), (1, 8)])
@pytest.mark.parametrize("tokens", [1, 3])
def test_every_offered_pattern_of_m_8_and_16_equals_dense_linear(pattern, dtype, tokens):
    spec = DecodeSpec("float32" if dtype == torch.float32 else "bfloat16", 256, *pattern, tokens)
    if unsupported(spec):   # not offered: nm_linear_mlir must say so by returning None
        values, indices = make_layer(8, 256, *pattern, dtype)
        assert nm_linear_mlir(torch.randn(tokens, 256).to(dtype), values, indices, None, *pattern, 256) is None
        return
    check(40, 256, *pattern, dtype, (tokens,), with_bias=True)


@needs_fp32
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
@pytest.mark.parametrize("blocking", [(2, 1), (4, 1), (8, 1), (16, 1), (8, 2), (4, 2)])
@pytest.mark.parametrize("tokens", [1, 2])
def test_row_blocks_reduce_together_and_leave_the_tail_rows_right(blocking, dtype, tokens):
    """Blocks of 2-16 rows sum their rows' lanes in one shuffle tree and store one vector per token; 61 rows
    leave a tail the one-row loop runs, with and without a bias."""
    values, indices = make_layer(61, 128, 2, 4, dtype)
    spec = DecodeSpec({torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype], 128, 2, 4, tokens, *blocking)
    if unsupported(spec):
        pytest.skip(unsupported(spec))     # 16 rows x 2 tokens: more accumulators than registers
    assert "vector.shuffle" in decode_kernel_text(spec) and f"_r{blocking[0]}_u{blocking[1]}_" in spec.name
    for bias in (torch.randn(61).to(dtype), None):
        x = torch.randn(tokens, 128).to(dtype)
        y = nm_decode.run_decode(spec, x, values, indices, bias)
        expected = reference(x, values, indices, bias, 2, 4, 128)
        tolerance = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
        torch.testing.assert_close(y.float(), expected.float(), **tolerance)


def test_a_blocking_that_would_step_past_a_row_is_refused():
    """K = 96 is three 32-column windows: two windows a loop step would read past the row's end."""
    spec = DecodeSpec("float32", 96, 2, 4, 1, 8, 2)
    assert "unroll must divide the 3 windows" in unsupported(spec)
    assert "accumulators exceed" in unsupported(DecodeSpec("float32", 128, 2, 4, 4, 8, 1))    # 8 rows x 4 tokens
    with pytest.raises(ValueError, match="no N:M decode kernel .* unroll must divide"):
        jit.decode_kernel(spec)


@needs_fp32
def test_one_token_on_a_weight_in_cache_takes_the_compact_blocking():
    small, _ = make_layer(64, 128, 2, 4, torch.float32)
    large = torch.empty(nm_decode.MAX_COMPACT_BYTES // 4 // 64 + 1, 64)     # just over the size, K = 128 at 2:4
    one, eight = torch.randn(1, 128), torch.randn(8, 128)
    assert nm_decode.decode_spec(one, small, 2, 4, 128).blocking == COMPACT_BLOCKING
    assert nm_decode.decode_spec(one, large, 2, 4, 128).blocking != COMPACT_BLOCKING
    assert nm_decode.decode_spec(eight, small, 2, 4, 128).blocking != COMPACT_BLOCKING
    # K = 96: three 32-column windows, one a loop step: the compact blocking runs there too
    assert nm_decode.decode_spec(torch.randn(1, 96), make_layer(8, 96, 2, 4, torch.float32)[0], 2, 4, 96).blocking \
        == COMPACT_BLOCKING


@needs_fp32
@pytest.mark.parametrize("native", [True, False], ids=["native-team", "callbacks"])
@pytest.mark.parametrize("rows", [1, 63, 64, 129, 130, 1027])
def test_odd_row_counts_split_across_threads(rows, native, monkeypatch):
    monkeypatch.setattr(nm_decode, "MIN_BYTES_TO_SPLIT", 0)   # these small weights run on every thread too
    monkeypatch.setattr(nm_decode, "MIN_BYTES_TO_SPLIT_NATIVE", 0)
    monkeypatch.setattr(nm_decode, "CHUNKS_PER_THREAD", 8)      # more chunks than threads: the counter shares them
    monkeypatch.setattr(nm_decode, "MIN_ROWS_PER_CHUNK", 8)
    if native and not nm_decode.team_available():
        pytest.skip("no native team here (llvmlite or libgomp missing)")
    if not native:
        monkeypatch.setattr(nm_decode, "team_available", lambda: False)
    check(rows, 64, 2, 4, torch.float32, (3,), with_bias=True)


@needs_fp32
def test_three_dimensional_x_and_a_wide_layer():
    check(40, 1024, 2, 4, torch.float32, (2, 3), with_bias=True)


@needs_fp32
def test_a_repeated_position_is_refused_by_the_op_before_any_path():
    values, indices = make_layer(8, 64, 2, 4, torch.float32)
    indices[3, 0] = 0b0101  # group 0 stores position 1 twice
    with pytest.raises(RuntimeProgramError, match="sparsecc::nm_linear: indices row 3 stores a position twice"):
        torch.ops.sparsecc.nm_linear(torch.randn(1, 64), values, indices, None, 2, 4, 64)


@pytest.mark.parametrize("dtype,n,m,k,tokens,why", [
    ("float16", 2, 4, 64, 1, "dtype"), ("float32", 3, 8, 64, 1, "powers of two"),
    ("float32", 2, 4, 48, 1, "multiple of the 32-column window"), ("bfloat16", 2, 4, 96, 1, "64-column"),
    ("float32", 2, 4, 64, 17, "1..16"), ("float32", 1, 16, 64, 1, "whole index bytes"),
    ("bfloat16", 1, 16, 256, 1, "fewer than 4 dot-product lanes")])
def test_what_no_kernel_covers_is_named(dtype, n, m, k, tokens, why):
    assert why in unsupported(DecodeSpec(dtype, k, n, m, tokens))


@pytest.fixture
def patched(monkeypatch):
    """monkeypatch, with the remembered per-shape decisions forgotten before and after the test."""
    nm_decode.runnable_spec.cache_clear()
    yield monkeypatch
    nm_decode.runnable_spec.cache_clear()


def test_unsupported_calls_return_none_for_the_fallback(patched):
    values, indices = make_layer(8, 64, 2, 4, torch.float16)
    assert nm_linear_mlir(torch.randn(1, 64).half(), values, indices, None, 2, 4, 64) is None
    values, indices = make_layer(8, 64, 2, 4, torch.float32)
    assert nm_linear_mlir(torch.randn(17, 64), values, indices, None, 2, 4, 64) is None
    patched.setattr(nm_decode, "mlir_available", lambda: False)
    assert nm_linear_mlir(torch.randn(1, 64), values, indices, None, 2, 4, 64) is None


def test_a_host_without_the_features_gets_no_kernel(patched):
    """Neither form's features (AVX-512 VBMI, AVX2 + FMA): no kernel, the caller falls back."""
    patched.setattr(host, "host_features", lambda: frozenset({"sse4_2", "avx"}))
    values, indices = make_layer(8, 64, 2, 4, torch.float32)
    assert nm_linear_mlir(torch.randn(1, 64), values, indices, None, 2, 4, 64) is None


@pytest.mark.parametrize("rows,threads", [(1, 2), (127, 2), (128, 2), (1000, 3), (5, 1), (11008, 2), (4099, 2)])
def test_chunks_keep_row_blocks_whole(rows, threads):
    chunk = chunk_rows(rows, threads)
    assert chunk % 4 == 0 and chunk >= nm_decode.MIN_ROWS_PER_CHUNK
    assert -(-rows // chunk) <= max(1, 4 * threads)


def test_the_kernel_text_names_its_specialisation():
    text = decode_kernel_text(DecodeSpec("bfloat16", 128, 2, 4, 3))
    assert "@nm_decode_bfloat16_k128_2of4_t3_" in text and "x86.avx512.dot" in text
    assert "vpermi2var.hi.512" in text and "vector.maskedload" in text


@needs_expand
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (1, 4)])
def test_decompression_equals_decompress_nm(dtype, pattern):
    values, indices = make_layer(67, 96, *pattern, dtype)
    out = torch.full((67, 96), 7.0, dtype=dtype)          # stale contents must not survive
    assert nm_decompress_mlir(values, indices, *pattern, 96, out) is out
    assert torch.equal(out, decompress_nm(values, indices, *pattern, 96))


def test_decompression_refuses_a_wrong_buffer():
    values, indices = make_layer(4, 64, 2, 4, torch.float32)
    if nm_decompress_mlir(values, indices, 2, 4, 64, torch.empty(4, 64)) is None:
        pytest.skip("no generated kernel on this host")
    with pytest.raises(RuntimeProgramError, match="sparsecc::nm_decompress: out"):
        nm_decompress_mlir(values, indices, 2, 4, 64, torch.empty(4, 32))


def test_a_kernel_the_jit_cannot_build_is_a_path_not_taken():
    pytest.importorskip("torch_mlir")
    from sparsecc.runtime.kernels.cpu.mlir.jit import KernelCompileError, compile_text
    with pytest.raises(NotImplementedError, match="the generated kernel broken did not compile") as err:
        compile_text("func.func @broken( {", "broken")
    assert isinstance(err.value, KernelCompileError)


@needs_fp32
def test_python_threads_calling_one_bound_layer_at_once_get_their_own_results(monkeypatch):
    """A bound call's packed arguments and team job are per calling thread: two threads running the same
    layer (rows split over OpenMP teams of their own) each get their own x's result."""
    import concurrent.futures
    from sparsecc.runtime.kernels.cpu.mlir.nm_decode import DecodeCall, decode_spec
    if torch.get_num_threads() < 2:
        pytest.skip("one OpenMP thread: nothing is split")
    monkeypatch.setattr(nm_decode, "MIN_BYTES_TO_SPLIT_NATIVE", 0)
    monkeypatch.setattr(nm_decode, "MIN_BYTES_TO_SPLIT", 0)
    values, indices = make_layer(512, 128, 2, 4, torch.float32)
    xs = [torch.randn(1, 128) for _ in range(2)]
    call = DecodeCall(decode_spec(xs[0], values, 2, 4, 128), values, indices, None)
    assert call.call.threads > 1
    want = [reference(x, values, indices, None, 2, 4, 128) for x in xs]

    def worker(i):
        return all(torch.allclose(call(xs[i]), want[i], rtol=1e-5, atol=1e-5) for _ in range(200))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert all(pool.map(worker, [0, 1]))
