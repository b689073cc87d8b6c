"""Generated CPU kernels as objects on disk: a second process links them, not compiles; a bad entry is rebuilt."""
import contextlib
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sparsecc.runtime.kernel_cache import KernelCache
from sparsecc.runtime.kernels.cpu.mlir import jit, object_cache, objects
from sparsecc.runtime.kernels.cpu.mlir.codegen import DecodeSpec, decode_kernel_text
from sparsecc.runtime.kernels.cpu.mlir.decompress_kernel import decompress_kernel_name, decompress_kernel_text
from sparsecc.runtime.kernels.cpu.mlir.host import missing_features
from sparsecc.runtime.kernels.cpu.mlir.nm_decode import mlir_available
from sparsecc.runtime.nm_format import compress_nm, nm_mask

pytestmark = pytest.mark.skipif(not (objects.available() and mlir_available() and not missing_features("float32")),
                                reason="needs llvmlite, torch-mlir and AVX-512 VBMI")
SPEC = DecodeSpec("float32", 160, 2, 4, 3)      # a shape no other test compiles: the first use here builds it

# decode with SPEC, print where the kernel came from and the output's bytes (here, and in a fresh process)
DECODE_SCRIPT = textwrap.dedent("""
    import hashlib, torch
    from sparsecc.runtime.kernels.cpu.mlir.codegen import DecodeSpec
    from sparsecc.runtime.kernels.cpu.mlir.jit import decode_kernel
    from sparsecc.runtime.kernels.cpu.mlir.nm_decode import nm_linear_mlir
    from sparsecc.runtime.nm_format import compress_nm, nm_mask
    torch.manual_seed(1)
    weight = torch.randn(40, 160)
    values, indices = compress_nm(weight * nm_mask(weight.abs(), 2, 4), 2, 4)
    y = nm_linear_mlir(torch.randn(3, 160), values, indices, None, 2, 4, 160)
    print(decode_kernel(DecodeSpec("float32", 160, 2, 4, 3)).origin, hashlib.sha256(y.numpy().tobytes()).hexdigest())
""")


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_KERNEL_CACHE", str(tmp_path))
    return tmp_path


def run_decode_here() -> list[str]:
    jit.clear_compiled()            # as in a fresh process
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(DECODE_SCRIPT, {})
    return printed.getvalue().split()


def run_decode_in_a_new_process(cache_root) -> list[str]:
    env = {**os.environ, "SPARSECC_KERNEL_CACHE": str(cache_root)}
    done = subprocess.run([sys.executable, "-c", DECODE_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_second_process_links_the_cached_object_and_gets_the_same_numbers(cache_root):
    first_origin, first_sum = run_decode_here()
    second_origin, second_sum = run_decode_in_a_new_process(cache_root)
    assert (first_origin, second_origin) == ("compiled", "disk")
    assert first_sum == second_sum
    assert len(list(cache_root.glob("*/*/kernel.o"))) == 1


def entry_of(text, name) -> str:
    cpu, features = objects.host_cpu()
    return object_cache.object_cache_key(text, name, cpu, features)


@pytest.mark.parametrize("damage", ["object", "metadata"])
def test_a_corrupt_entry_is_rebuilt_and_replaced(cache_root, damage):
    text, name = decompress_kernel_text("float32", 96, 2, 4), decompress_kernel_name("float32", 96, 2, 4)
    obj, origin = object_cache.host_object(text, name)
    assert origin == "compiled"
    entry = cache_root / entry_of(text, name)[:2] / entry_of(text, name)
    if damage == "object":
        (entry / "kernel.o").write_bytes(obj[: len(obj) // 2])        # torn write
    else:
        (entry / "metadata.json").write_text("{not json")
    rebuilt, origin = object_cache.host_object(text, name)
    assert origin == "compiled" and rebuilt == obj                  # the build is deterministic
    assert KernelCache(cache_root).get(entry.name).binary == obj    # the bad entry was replaced
    assert object_cache.host_object(text, name)[1] == "disk"


def test_an_unwritable_cache_still_gives_a_kernel(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SPARSECC_KERNEL_CACHE", str(blocker / "cache"))
    text, name = decompress_kernel_text("float32", 64, 1, 4), decompress_kernel_name("float32", 64, 1, 4)
    assert object_cache.host_object(text, name)[1] == "compiled"


def test_objects_and_the_jit_agree(cache_root):
    text = decode_kernel_text(DecodeSpec("float32", 64, 2, 4, 1))
    name = DecodeSpec("float32", 64, 2, 4, 1).name
    weight = torch.randn(8, 64)
    values, indices = compress_nm(weight * nm_mask(weight.abs(), 2, 4), 2, 4)
    x, bias = torch.randn(1, 64), torch.randn(8)       # held here: the kernel reads them through raw pointers
    outputs = []
    for kernel in (jit.compile_text(text, name), jit.jit_text(text, name)):
        y = torch.empty(1, 8)
        kernel.call([(t.data_ptr(), t.numel()) for t in (values, indices, x, bias, y)], (0, 8, 8))
        outputs.append(y)
    assert torch.equal(outputs[0], outputs[1])


def test_packed_entry_names_a_missing_function():
    with pytest.raises(objects.ObjectBuildError, match="no function @absent"):
        objects.packed_entry("define void @present(ptr %0) {\n ret void\n}", "absent")
