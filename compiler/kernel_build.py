"""Cross-compile kernel specialisations for GPU targets, through the kernel cache, in parallel processes.

Each job (spec, target) has a cache key over the kernel module's source, the
spec, the target and the triton version. Misses are split over worker
processes (`python -m sparsecc.build_worker`, started without TRITON_INTERPRET
so Triton compiles rather than interprets); each worker compiles its jobs
with `triton.compile(ASTSource(...), target=GPUTarget(...))`, stores them in
the cache and reports one JSON line per job, which drives the progress bar.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

from tqdm import tqdm

from sparsecc.runtime.kernel_cache import CachedKernel, KernelCache, cache_key
from sparsecc.runtime.kernels.triton.launch import KERNEL_MODULE_PREFIX, KernelSpec

from .errors import SparseccError


@dataclass(frozen=True)
class KernelJob:
    spec: KernelSpec
    target: str
    key: str


@dataclass(frozen=True)
class BuiltKernel:
    spec: KernelSpec
    target: str
    key: str
    kernel: CachedKernel
    from_cache: bool


def triton_version() -> str:
    return importlib.metadata.version("triton")


def source_sha256(kernel: str) -> str:
    """SHA-256 of the file that defines `kernel` ("module:function"): any edit there invalidates its entries."""
    module = kernel.partition(":")[0]
    if not module.startswith(KERNEL_MODULE_PREFIX):
        raise SparseccError(f"{kernel} is not a sparsecc Triton kernel")
    origin = importlib.util.find_spec(module).origin
    with open(origin, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def kernel_jobs(specs: Sequence[KernelSpec], targets: Sequence[str]) -> list[KernelJob]:
    """One job per (spec, target); the key covers the source, spec, target, triton version and FP fusion."""
    version = f"{triton_version()}+fp_fusion={int(os.environ.get('TRITON_DEFAULT_FP_FUSION', '1') != '0')}"
    jobs = []
    for spec in specs:
        source = source_sha256(spec.kernel)
        jobs += [KernelJob(spec, t, cache_key(source, spec.to_dict(), t, version)) for t in targets]
    return jobs


def build_kernels(specs: Sequence[KernelSpec], targets: Sequence[str], *, cache_dir: Optional[os.PathLike] = None,
                  workers: Optional[int] = None, progress: bool = True) -> list[BuiltKernel]:
    """Every (spec, target) compiled or taken from the cache; misses compile in worker processes, or in this
    one with workers=0 (not under TRITON_INTERPRET=1, where Triton interprets instead of compiling)."""
    cache = KernelCache(cache_dir)
    jobs = kernel_jobs(specs, targets)
    cached = {job.key: cache.get(job.key) for job in jobs}
    misses = list({job.key: job for job in jobs if cached[job.key] is None}.values())
    if misses and workers == 0:
        compile_here(misses, cache)
    elif misses:
        run_workers(misses, cache, workers, progress)
    built = []
    for job in jobs:
        entry = cached[job.key] or cache.get(job.key)
        if entry is None:
            raise SparseccError(f"kernel {job.spec.entry} for {job.target} is missing from the cache after building")
        built.append(BuiltKernel(job.spec, job.target, job.key, entry, cached[job.key] is not None))
    return built


def compile_here(jobs: Sequence[KernelJob], cache: KernelCache) -> None:
    """Compile in this process; a kernel whose source file changed since it was imported (the key hashes
    the file, this process would compile the old code) goes to a worker process, which imports it anew."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SparseccError("kernels cannot be compiled in a process running TRITON_INTERPRET=1; use workers")
    from .build_worker import compile_one
    stale = [job for job in jobs if not _imported_as_on_disk(job.spec.kernel)]
    if stale:
        run_workers(stale, cache, 1, progress=False)
    for job in (job for job in jobs if job not in stale):
        try:
            compile_one({"key": job.key, "target": job.target, "spec": job.spec.to_dict()}, cache)
        except Exception as err:
            raise SparseccError(f"kernel build failed: {job.spec.entry} for {job.target}: {err}") from err


def _imported_as_on_disk(kernel: str) -> bool:
    module_name, _, name = kernel.partition(":")
    fn = getattr(getattr(importlib.import_module(module_name), name), "fn", None)
    return getattr(fn, "sparsecc_source_sha256", None) == source_sha256(kernel)


def run_workers(jobs: Sequence[KernelJob], cache: KernelCache, workers: Optional[int], progress: bool) -> None:
    count = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    chunks = [list(jobs[i::count]) for i in range(count)]
    bar = tqdm(total=len(jobs), desc="sparsecc build", unit="kernel", disable=not progress, file=sys.stderr)
    try:
        with ThreadPoolExecutor(count) as pool:
            failures = [f for result in pool.map(lambda chunk: _run_worker(chunk, cache, bar), chunks) for f in result]
    finally:
        bar.close()
    if failures:
        raise SparseccError("kernel build failed:\n" + "\n".join(failures))


def worker_env() -> dict[str, str]:
    """The environment of a kernel-build worker process: the real compiler (never the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # Triton 3.9's default, stated so it does not warn
    return env


def _run_worker(chunk: list[KernelJob], cache: KernelCache, bar: tqdm) -> list[str]:
    request = {"cache_dir": str(cache.root),
               "jobs": [{"key": j.key, "target": j.target, "spec": j.spec.to_dict()} for j in chunk]}
    done, failures = set(), []
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "sparsecc.build_worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=worker_env())
        proc.stdin.write(json.dumps(request))
        proc.stdin.close()
        for line in proc.stdout:
            report = json.loads(line)
            done.add(report["key"])
            if "error" in report:
                failures.append(f"  {report['entry']} for {report['target']}: {report['error']}")
            bar.set_postfix_str(f"{report['entry']} {report['target']} {report.get('seconds', 0):.1f}s")
            bar.update(1)
        proc.wait()
        stderr.seek(0)
        tail = stderr.read()[-2000:]
    lost = [j for j in chunk if j.key not in done]
    if proc.returncode != 0 or lost:
        failures.append(f"  a build worker exited with status {proc.returncode} before finishing "
                        f"{len(lost)} kernel(s):\n{tail}")
    return failures
