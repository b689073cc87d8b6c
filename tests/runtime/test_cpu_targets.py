"""Named CPU targets in artifacts: objects for cpu:x86-64-v4 are used only from a signed, trusted artifact."""
import json
from dataclasses import replace

import pytest
import torch

import sparsecc
from sparsecc.errors import SparseccError
from sparsecc.inspect_artifact import describe_artifact
from sparsecc.runtime import ArtifactError
from sparsecc.runtime.artifact import parse_target
from sparsecc.runtime.kernels.cpu.mlir import aot, jit, objects, targets
from sparsecc.runtime.kernels.cpu.mlir.codegen import COMPACT_BLOCKING, MAX_TOKENS, DecodeSpec
from sparsecc.runtime.kernels.cpu.mlir.host import missing_features
from sparsecc.runtime.kernels.cpu.mlir.nm_decode import mlir_available, runnable_spec
from sparsecc.runtime.signing import generate_key

runs_here = objects.available() and mlir_available() and not missing_features("float32") \
    and not targets.host_runs("x86-64-v4")
needs_objects = pytest.mark.skipif(not runs_here, reason="needs llvmlite, torch-mlir and an AVX-512 VBMI host")
K, OUT = 96, 40     # a layer shape no other test compiles


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """A 2:4 layer saved for cpu + cpu:x86-64-v4, signed; its decode path forced to the generated kernel."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPARSECC_NM_CPU_PATH", "generated")
        patch.setenv("SPARSECC_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels")))
        torch.manual_seed(0)
        model, x = torch.nn.Sequential(torch.nn.Linear(K, OUT)).eval(), torch.randn(1, K)
        compiled = sparsecc.compile(model, (x,), sparsity="2:4", check=False)
        key, path = generate_key(), tmp_path_factory.mktemp("signed") / "artifact"
        manifest = compiled.save(path, targets=["cpu", "cpu:x86-64-v4"], sign_with=key, progress=False)
        yield path, key.public_key(), manifest, compiled(x), x


def load_and_run(path, x, **load_args):
    """A fresh start for the kernels (as in a new process), then load and run; (model, output, origin)."""
    jit.clear_compiled()
    model = sparsecc.runtime.load(path, **load_args)
    y = model(x)
    return model, y, jit.decode_kernel(runnable_spec("float32", K, 2, 4, 1, compact=True)).origin   # a small weight


@needs_objects
def test_the_manifest_lists_objects_for_the_named_cpu(signed):
    path, _, manifest, _, _ = signed
    decode = [k for k in manifest["cpu_kernels"] if k["kernel"] == "decode"]
    assert decode and all("cpu:x86-64-v4" in k["binaries"] for k in decode)
    assert all(manifest["files"][b["file"]]["bytes"] == (path / b["file"]).stat().st_size
               for k in decode for b in k["binaries"].values())


@needs_objects
def test_signed_and_trusted_uses_the_objects(signed, monkeypatch):
    path, public, _, expected, x = signed
    monkeypatch.setenv("SPARSECC_NM_CPU_PATH", "generated")
    model, y, origin = load_and_run(path, x, trusted_keys=[public])
    assert model.cpu_kernels.startswith("cpu kernels: using the cpu:x86-64-v4 objects")
    assert origin == "artifact"
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert "cpu kernels here: using the cpu:x86-64-v4 objects" in describe_artifact(str(path), [public])


@needs_objects
def test_without_trusted_keys_the_objects_are_ignored(signed, monkeypatch, tmp_path):
    path, _, _, expected, x = signed
    monkeypatch.setenv("SPARSECC_NM_CPU_PATH", "generated")
    monkeypatch.setenv("SPARSECC_KERNEL_CACHE", str(tmp_path))      # nothing on disk: the host builds it
    with monkeypatch.context() as patch:
        patch.setattr(aot, "use_prebuilt", lambda objects: pytest.fail("objects offered without a signature"))
        model, y, origin = load_and_run(path, x)
    assert "ignored" in model.cpu_kernels and "trusted_keys" in model.cpu_kernels
    assert origin == "compiled"
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert "cpu kernels here: cpu:x86-64-v4 objects ignored" in describe_artifact(str(path))


@needs_objects
def test_a_host_without_the_features_ignores_the_objects(signed, monkeypatch):
    path, public, manifest, _, _ = signed
    monkeypatch.setattr(targets, "host_features", lambda: frozenset({"avx2"}))
    target, why = aot.cpu_objects_decision(manifest, verified=True)
    assert target is None and "lacks" in why and "avx512f" in why


@needs_objects
def test_a_changed_object_is_refused_at_load(signed, tmp_path):
    import shutil
    path, public, manifest, _, _ = signed
    copy = shutil.copytree(path, tmp_path / "artifact")
    name = manifest["cpu_kernels"][0]["binaries"]["cpu:x86-64-v4"]["file"]
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 1
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="hash|sha256|modified"):
        sparsecc.runtime.load(copy, trusted_keys=[public])


def test_kernels_a_target_cannot_hold_are_listed_not_built():
    recorded = {("decode", DecodeSpec("bfloat16", 64, 2, 4, 1)), ("decode", DecodeSpec("float32", 64, 2, 4, 1)),
                ("decompress", ("float32", 64, 2, 4))}
    sources = aot.kernel_sources(recorded, sweep_tokens=False)
    if not objects.available():
        pytest.skip("needs llvmlite")
    built = {entry["source"].name: entry for entry in aot.build_cpu_kernels(sources, ["cpu:x86-64-v3"])}
    held = [name for name, entry in built.items() if entry["objects"]]
    assert held == [DecodeSpec("float32", 64, 2, 4, 1, isa="avx2").name]     # fp32 decode, in its AVX2 form
    assert all("needs avx512f" in entry["skipped"]["cpu:x86-64-v3"] for name, entry in built.items() if name not in held)
    bf16 = [s for s in sources if s.dtype == "bfloat16"]
    assert "avx512_bf16" in json.dumps(aot.build_cpu_kernels(bf16, ["cpu:x86-64-v4"])[0]["skipped"])


def test_sweeping_tokens_builds_each_count_blocked_as_the_runtime_asks_for_it():
    """A recorded compact one-token kernel: at one token both blockings (the runtime picks by the weight's
    size), elsewhere the default; every AVX-512 spec also in its AVX2 form."""
    recorded = DecodeSpec("float32", 64, 2, 4, 1, *COMPACT_BLOCKING)
    names = {s.name for s in aot.kernel_sources({("decode", recorded)}, sweep_tokens=True) if s.isa == "avx512"}
    assert recorded.name in names and DecodeSpec("float32", 64, 2, 4, 1).name in names
    assert DecodeSpec("float32", 64, 2, 4, 8).name in names and len(names) == MAX_TOKENS + 1
    assert {s.name for s in aot.kernel_sources({("decode", recorded)}, sweep_tokens=False)} == \
        {recorded.name, replace(recorded, isa="avx2").name}


def test_unknown_cpu_targets_are_refused_with_the_names():
    assert parse_target("cpu:x86-64-v4") == ("cpu", "x86-64-v4")
    with pytest.raises(ArtifactError, match="cpu:x86-64-v4"):
        parse_target("cpu:x86-64-v9")
    with pytest.raises(ValueError, match="named CPU targets are x86-64-v3, x86-64-v4"):
        aot.named_cpu("cpu:skylake")


def test_save_refuses_an_unknown_cpu_target(tmp_path):
    compiled = sparsecc.compile(torch.nn.Linear(64, 8).eval(), (torch.randn(1, 64),), sparsity="2:4", check=False)
    with pytest.raises(SparseccError, match="unknown target 'cpu:znver9'"):
        compiled.save(tmp_path / "a", targets=["cpu:znver9"], progress=False)


def test_objects_of_another_kernel_form_are_not_reported_as_used(monkeypatch):
    """An AVX-512 VBMI host runs the avx512 texts: a v3-only artifact's AVX2 objects would never match them."""
    if not objects.available():
        pytest.skip("needs llvmlite")
    from sparsecc.runtime.kernels.cpu.mlir import host
    avx512_host = frozenset(targets.NAMED_CPUS["x86-64-v4"] + host.DECODE_FEATURES)
    monkeypatch.setattr(host, "host_features", lambda: avx512_host)
    monkeypatch.setattr(targets, "host_features", lambda: avx512_host)
    manifest = {"targets": ["cpu", "cpu:x86-64-v3"],
                "cpu_kernels": [{"binaries": {"cpu:x86-64-v3": {"file": "k.o", "cpu": "x86-64-v3"}}}]}
    target, why = aot.cpu_objects_decision(manifest, verified=True)
    assert target is None and "holds the avx2 kernel form" in why and "runs the avx512 form" in why
    manifest["targets"].append("cpu:x86-64-v4")
    manifest["cpu_kernels"].append({"binaries": {"cpu:x86-64-v4": {"file": "j.o", "cpu": "x86-64-v4"}}})
    assert aot.cpu_objects_decision(manifest, verified=True)[0] == "cpu:x86-64-v4"
