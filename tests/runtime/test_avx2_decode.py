"""The AVX2 form of the generated fp32 N:M decode kernel: on its own, built for x86-64-v3, chosen on an AVX2 host,
and carried by a cpu:x86-64-v3 artifact. It runs here too (an AVX-512 host runs AVX2 code)."""
import pytest
import torch

import sparsecc
from sparsecc.runtime.kernels.cpu.mlir import aot, host, jit, nm_decode, objects, targets
from sparsecc.runtime.kernels.cpu.mlir.codegen import ISAS, DecodeSpec, decode_kernel_text, unsupported
from sparsecc.runtime.kernels.cpu.mlir.jit import CompiledKernel
from sparsecc.runtime.kernels.cpu.mlir.nm_decode import COMPACT_BLOCKING, nm_linear_mlir, run_decode, runnable_spec
from sparsecc.runtime.nm_format import compress_nm, decompress_nm, nm_mask
from sparsecc.runtime.signing import generate_key

AVX2_HOST = frozenset(targets.NAMED_CPUS["x86-64-v3"])    # Zen 3 / Alder Lake: no AVX-512
runs_avx2 = nm_decode.mlir_available() and {"avx2", "fma"} <= host.host_features()
needs_avx2 = pytest.mark.skipif(not runs_avx2, reason="needs torch-mlir and an AVX2/FMA host")
needs_objects = pytest.mark.skipif(not (runs_avx2 and objects.available()), reason="needs llvmlite too")


def make_layer(rows, k, n, m):
    weight = torch.randn(rows, k)
    return compress_nm(weight * nm_mask(weight.abs(), n, m), n, m)


def reference(x, values, indices, bias, n, m, k):
    """x @ decompress(W).T + bias in float64."""
    y = x.double() @ decompress_nm(values, indices, n, m, k).double().T
    return y if bias is None else y + bias.double()


def run_rows(kernel: CompiledKernel, spec: DecodeSpec, values, indices, x, bias, begin, end):
    """Rows [begin, end) of y by one call; the other rows keep their NaN."""
    rows = values.shape[0]
    y = torch.full((spec.tokens, rows), float("nan"))
    buffers = [values, indices, x, bias, y]
    kernel.call([(t.data_ptr(), t.numel()) for t in buffers], (begin, end, rows))
    return y


def avx2_spec(k, n, m, tokens, blocking=(0, 0)):
    return DecodeSpec("float32", k, n, m, tokens, *blocking, isa="avx2")


@pytest.fixture
def avx2_host(monkeypatch):
    """This host's CPU flags read as an AVX2-only CPU's, the per-shape decisions and target key forgotten."""
    for cached in (runnable_spec, host.host_target):
        cached.cache_clear()
    monkeypatch.setattr(host, "host_features", lambda: AVX2_HOST)
    monkeypatch.setattr(targets, "host_features", lambda: AVX2_HOST)
    yield monkeypatch
    for cached in (runnable_spec, host.host_target):
        cached.cache_clear()


@needs_avx2
@pytest.mark.parametrize("tokens", range(1, 17))
def test_2_of_4_equals_the_float64_reference_at_every_token_count(tokens):
    values, indices = make_layer(37, 80, 2, 4)     # 5 windows of 16 columns: AVX-512's 32 do not divide 80
    x, bias = torch.randn(tokens, 80), torch.randn(37)
    y = run_decode(avx2_spec(80, 2, 4, tokens), x, values, indices, bias if tokens % 2 else None)
    expected = reference(x, values, indices, bias if tokens % 2 else None, 2, 4, 80)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)


@needs_avx2
@pytest.mark.parametrize("pattern", [(4, 8), (1, 4), (4, 16), (8, 16)])   # M=16: the register select is dynamic
@pytest.mark.parametrize("tokens", [1, 3, 8, 16])
def test_other_patterns_equal_the_float64_reference(pattern, tokens):
    values, indices = make_layer(37, 64, *pattern)
    x, bias = torch.randn(tokens, 64), torch.randn(37)
    y = run_decode(avx2_spec(64, *pattern, tokens), x, values, indices, bias)
    torch.testing.assert_close(y.double(), reference(x, values, indices, bias, *pattern, 64), rtol=1e-5, atol=1e-4)


@needs_avx2
@pytest.mark.parametrize("tokens", [1, 6])
@pytest.mark.parametrize("begin,end", [(0, 37), (3, 34), (5, 6), (10, 10)])
def test_a_row_range_writes_those_rows_only(tokens, begin, end):
    spec = avx2_spec(64, 2, 4, tokens)
    values, indices = make_layer(37, 64, 2, 4)
    x, bias = torch.randn(tokens, 64), torch.randn(37)
    y = run_rows(jit.decode_kernel(spec), spec, values, indices, x, bias, begin, end)
    torch.testing.assert_close(y[:, begin:end].double(), reference(x, values, indices, bias, 2, 4, 64)[:, begin:end],
                               rtol=1e-5, atol=1e-4)
    assert y[:, :begin].isnan().all() and y[:, end:].isnan().all()


def test_patterns_without_an_avx2_form_are_named():
    assert "whole index bytes" in unsupported(avx2_spec(64, 2, 8, 1))    # 4 values x 3 bits: 12 bits a window
    assert "multiple of the 16-column window" in unsupported(avx2_spec(72, 2, 4, 1))
    assert "AVX512_BF16" in unsupported(DecodeSpec("bfloat16", 64, 2, 4, 1, isa="avx2"))
    assert unsupported(avx2_spec(80, 2, 4, 1)) is None and unsupported(DecodeSpec("float32", 80, 2, 4, 1))


def test_the_forms_have_their_own_names_and_intrinsics():
    assert list(host.FORM_FEATURES) == list(ISAS)     # the host's features per form, widest first
    assert DecodeSpec("float32", 64, 2, 4, 3).name == "nm_decode_float32_k64_2of4_t3_r4_u1_g4"    # as before
    avx2 = avx2_spec(64, 2, 4, 3)
    assert avx2.name == "nm_decode_float32_k64_2of4_t3_r2_u1_g4_avx2"     # 8 accumulators: 2 rows x 3 tokens
    text = decode_kernel_text(avx2)
    assert "llvm.x86.avx2.permps" in text and "avx512" not in text and "vector.maskedload" not in text
    assert "vector.maskedload" in decode_kernel_text(avx2_spec(64, 4, 8, 1))   # 3 index bytes: the masked load


@needs_avx2
def test_a_corrupt_index_gives_wrong_numbers_but_reads_only_x():
    """Random index bytes (repeated positions, bits past the group): x sits between NaNs, which any read
    outside it would carry into y."""
    values, indices = make_layer(37, 64, 2, 4)
    corrupt = torch.randint(0, 256, indices.shape, dtype=torch.uint8)
    guarded = torch.full((3 * 64 * 3,), float("nan"))
    x = guarded[3 * 64:6 * 64].view(3, 64).normal_()
    y = run_decode(avx2_spec(64, 2, 4, 3), x, values, corrupt, None)
    assert y.isfinite().all()
    assert not torch.allclose(y.double(), reference(x, values, indices, None, 2, 4, 64))


@needs_objects
@pytest.mark.parametrize("pattern,tokens", [((2, 4), 1), ((2, 4), 7), ((4, 8), 16), ((8, 16), 2)])
def test_an_object_built_for_x86_64_v3_loads_and_matches(pattern, tokens):
    spec = avx2_spec(64, *pattern, tokens)
    kernel = CompiledKernel(objects.ObjectEngine(objects.build_object(decode_kernel_text(spec), spec.name,
                                                                      "x86-64-v3", "")), spec.name)
    values, indices = make_layer(37, 64, *pattern)
    x, bias = torch.randn(tokens, 64), torch.randn(37)
    y = run_rows(kernel, spec, values, indices, x, bias, 0, 37)
    torch.testing.assert_close(y.double(), reference(x, values, indices, bias, *pattern, 64), rtol=1e-5, atol=1e-4)


def test_an_avx2_host_runs_the_avx2_form_for_fp32_only(avx2_host):
    if not nm_decode.mlir_available():
        pytest.skip("needs torch-mlir")
    assert runnable_spec("float32", 64, 2, 4, 1).isa == "avx2"
    assert runnable_spec("bfloat16", 64, 2, 4, 1) is None
    assert "avx512" not in host.host_target() and "avx2" in host.host_target()
    avx2_host.setattr(host, "host_features", lambda: AVX2_HOST - {"fma"})
    runnable_spec.cache_clear()
    assert runnable_spec("float32", 64, 2, 4, 1) is None


@needs_avx2
def test_nm_linear_on_an_avx2_host_matches(avx2_host):
    values, indices = make_layer(40, 96, 2, 4)
    x, bias = torch.randn(2, 96), torch.randn(40)
    assert nm_decode.decode_spec(x, values, 2, 4, 96).isa == "avx2"
    y = nm_linear_mlir(x, values, indices, bias, 2, 4, 96)
    torch.testing.assert_close(y.double(), reference(x, values, indices, bias, 2, 4, 96), rtol=1e-5, atol=1e-4)


def test_only_a_target_holding_the_avx2_form_builds_it():
    recorded = {("decode", DecodeSpec("float32", 64, 2, 4, 1)), ("decode", DecodeSpec("bfloat16", 64, 2, 4, 1))}
    sources = aot.kernel_sources(recorded, sweep_tokens=False)
    assert sorted(s.isa for s in sources) == ["avx2", "avx512", "avx512"]    # bf16 has no AVX2 form
    if not objects.available():
        pytest.skip("needs llvmlite")
    v4 = aot.build_cpu_kernels(sources, ["cpu:x86-64-v4"])
    assert [e["source"].isa for e in v4] == ["avx512", "avx512"]       # a form no target holds is left out
    both = {e["source"].name: e for e in aot.build_cpu_kernels(sources, ["cpu:x86-64-v4", "cpu:x86-64-v3"])}
    avx2 = both[DecodeSpec("float32", 64, 2, 4, 1, isa="avx2").name]
    assert list(avx2["objects"]) == ["cpu:x86-64-v3"] and "avx512 form" in avx2["skipped"]["cpu:x86-64-v4"]
    assert list(both[DecodeSpec("float32", 64, 2, 4, 1).name]["objects"]) == ["cpu:x86-64-v4"]


K, OUT = 224, 24     # a layer shape no other test compiles


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """A 2:4 layer saved for cpu, cpu:x86-64-v3 and cpu:x86-64-v4 (v3 listed first), signed; its decode path
    forced to the generated kernel."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPARSECC_NM_CPU_PATH", "generated")
        patch.setenv("SPARSECC_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels")))
        model, x = torch.nn.Sequential(torch.nn.Linear(K, OUT)).eval(), torch.randn(1, K)
        compiled = sparsecc.compile(model, (x,), sparsity="2:4", check=False)
        key, path = generate_key(), tmp_path_factory.mktemp("signed") / "artifact"
        targets_ = ["cpu", "cpu:x86-64-v3", "cpu:x86-64-v4"]
        manifest = compiled.save(path, targets=targets_, sign_with=key, progress=False)
        yield path, key.public_key(), manifest, compiled(x), x


def load_and_run(path, x, public):
    """A fresh start for the kernels (as in a new process), then load with the key and run; (model, y, origin)."""
    jit.clear_compiled()
    model = sparsecc.runtime.load(path, trusted_keys=[public])
    y = model(x)
    return model, y, jit.decode_kernel(runnable_spec("float32", K, 2, 4, 1, compact=True)).origin   # a small weight


@needs_objects
def test_the_v3_objects_are_the_avx2_form_of_each_fp32_decode_kernel(signed):
    _, _, manifest, _, _ = signed
    decode = [k for k in manifest["cpu_kernels"] if k["kernel"] == "decode" and k["dtype"] == "float32"]
    avx2 = [k for k in decode if k["isa"] == "avx2"]
    assert avx2 and len(avx2) * 2 == len(decode)
    assert all(list(k["binaries"]) == ["cpu:x86-64-v3"] for k in avx2)
    assert all(list(k["binaries"]) == ["cpu:x86-64-v4"] for k in decode if k["isa"] == "avx512")
    assert {k["source_sha256"] for k in avx2} == \
        {objects.source_sha256(decode_kernel_text(avx2_spec(K, 2, 4, 1, COMPACT_BLOCKING)))}


@needs_objects
def test_an_avx2_host_loads_the_v3_objects_and_matches(signed, avx2_host):
    path, public, _, expected, x = signed
    avx2_host.setenv("SPARSECC_NM_CPU_PATH", "generated")
    model, y, origin = load_and_run(path, x, public)
    assert model.cpu_kernels.startswith("cpu kernels: using the cpu:x86-64-v3 objects")
    assert origin == "artifact" and runnable_spec("float32", K, 2, 4, 1, compact=True).isa == "avx2"
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@needs_objects
def test_an_avx512_host_takes_the_v4_objects_though_v3_is_listed_first(signed, monkeypatch):
    path, public, _, expected, x = signed
    if targets.host_runs("x86-64-v4") or host.decode_isa("float32") != "avx512":
        pytest.skip("needs an AVX-512 VBMI host")
    monkeypatch.setenv("SPARSECC_NM_CPU_PATH", "generated")
    model, y, origin = load_and_run(path, x, public)
    assert model.cpu_kernels.startswith("cpu kernels: using the cpu:x86-64-v4 objects") and origin == "artifact"
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
