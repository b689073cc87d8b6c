"""The kernel cache: content-addressed, atomic, and safe when two processes build the same kernel at once."""
import json
import subprocess
import sys

import torch

from sparsecc.kernel_build import worker_env, kernel_jobs
from sparsecc.runtime.kernel_cache import KernelCache, cache_key
from sparsecc.runtime.kernels.triton.nm_linear import nm_decompress_triton
from sparsecc.runtime.kernels.triton.launch import bind_launch, use_launcher

SPEC = {"kernel": "k", "signature": {"x": "*fp16"}, "constexprs": {}, "options": {"num_warps": 4}}


def test_key_changes_with_every_part():
    base = cache_key("src", SPEC, "cuda:90", "3.9.0")
    others = [cache_key("src2", SPEC, "cuda:90", "3.9.0"), cache_key("src", {**SPEC, "options": {}}, "cuda:90", "3.9.0"),
              cache_key("src", SPEC, "cuda:80", "3.9.0"), cache_key("src", SPEC, "cuda:90", "3.10.0")]
    assert len({base, *others}) == 5


def test_put_get_and_corrupt_entries_are_misses(tmp_path):
    cache = KernelCache(tmp_path)
    key = cache_key("src", SPEC, "cuda:90", "3.9.0")
    assert cache.get(key) is None
    cache.put(key, b"\x7fELF binary", {"entry": "k"}, "cubin")
    entry = cache.get(key)
    assert entry.binary == b"\x7fELF binary" and entry.metadata["entry"] == "k"
    (tmp_path / key[:2] / key / "kernel.cubin").write_bytes(b"\x7fELF bin")   # a torn or edited binary
    assert cache.get(key) is None
    cache.put(key, b"\x7fELF binary", {"entry": "k"}, "cubin")                 # replaced
    assert cache.get(key).binary == b"\x7fELF binary"
    assert [p.name for p in (tmp_path / key[:2]).iterdir()] == [key]           # no temporary folders left


def _decompress_spec():
    """The spec nm_decompress_triton launches for a small fp16 2:4 weight (recorded, not run)."""
    specs = []
    values, indices = torch.zeros(8, 16, dtype=torch.float16), torch.full((8, 4), 0xE4, dtype=torch.uint8)
    with use_launcher(lambda kernel, grid, *a, **k: specs.append(bind_launch(kernel, a, k)[0])):
        nm_decompress_triton(values, indices, 2, 4, 32)
    return specs[0]


def test_two_processes_building_the_same_kernel_at_once(tmp_path):
    job = kernel_jobs([_decompress_spec()], ["cuda:80"])[0]
    request = json.dumps({"cache_dir": str(tmp_path), "jobs": [{"key": job.key, "target": job.target,
                                                                 "spec": job.spec.to_dict()}]})
    procs = [subprocess.Popen([sys.executable, "-m", "sparsecc.build_worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env())
             for _ in range(2)]
    outputs = [p.communicate(request, timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
        assert "error" not in json.loads(out.strip().splitlines()[-1]), err[-2000:]
    entry = KernelCache(tmp_path).get(job.key)
    assert entry is not None and entry.binary[:4] == b"\x7fELF"
    assert entry.metadata["entry"] == "nm_decompress_kernel" and entry.metadata["target"] == "cuda:80"
    assert [p.name for p in (tmp_path / job.key[:2]).iterdir()] == [job.key]
