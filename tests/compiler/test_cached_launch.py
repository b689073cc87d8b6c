"""compile(backend="triton") launches through the sparsecc kernel cache, not Triton's JIT.

On this CPU machine the cache's device seams are replaced: the launcher treats CPU tensors as an H100
('cuda:90'), so every launch is cross-compiled into the cache and "loaded" by a recording stand-in for the
driver, while the interpreter computes the numbers. The GPU test at the end runs the real thing.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import sparsecc
import sparsecc.kernel_build as kernel_build
from sparsecc.cached_launch import CachedKernelLauncher
from sparsecc.runtime.executor import Executor
from sparsecc.runtime.kernels.triton.launch import bind_launch
from sparsecc.runtime.kernel_cache import KernelCache


class Loaded:
    """Stands in for `cuda_launch.load_function`: keeps what the launcher loaded and launched."""

    def __init__(self):
        self.functions, self.launches = [], []

    def __call__(self, api, binary, entry, metadata, device):
        self.functions.append((api, binary, entry, metadata))
        loaded = self

        class Function:
            def launch(self, grid, args, device):
                loaded.launches.append((entry, tuple(grid), [kind for kind, _ in args]))
        return Function()


def _compiled():
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    x = torch.randn(4, 64)
    return sparsecc.compile(model, (x,), sparsity="2:4", backend="triton", check=False), x


def _as_h100(cached):
    """The compiled model's hook: the cache path (recorded) and then the interpreter (the numbers)."""
    def hook(kernel, grid, *args, **kwargs):
        cached(kernel, grid, *args, **kwargs)
        kernel[grid](*args, **kwargs)
    return hook


@pytest.fixture(scope="module")
def h100_run(tmp_path_factory):
    """The compiled model's first run as an H100 over an empty cache folder: (folder, compiled, x, expected,
    output, loaded, launcher). Cross-compiling takes seconds: the fallback test reuses the folder's binaries."""
    folder = tmp_path_factory.mktemp("h100-cache")
    compiled, x = _compiled()
    expected = Executor(compiled.program, compiled.constants, "torch").run([x])[0]
    loaded = Loaded()
    cached = CachedKernelLauncher(folder, target_of=lambda device: "cuda:90", load=loaded)
    compiled.kernel_launcher = _as_h100(cached)
    return folder, compiled, x, expected, compiled(x), loaded, cached


@pytest.mark.interpreter
def test_launches_are_built_into_the_cache_and_run_from_it(h100_run, monkeypatch):
    tmp_path, compiled, x, expected, out, loaded, cached = h100_run
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)

    # one specialisation per layer: the 64-wide layer's index rows (8 bytes) are not divisible by 16
    assert cached.built == len(loaded.functions) == 2
    for api, binary, entry, metadata in loaded.functions:
        assert api == "cuda" and binary[:4] == b"\x7fELF" and entry == "nm_linear_kernel"
        assert metadata["num_warps"] > 0 and metadata["warp_size"] == 32 and "shared" in metadata
    assert [entry for entry, _, _ in loaded.launches] == ["nm_linear_kernel"] * 2
    assert len(list(tmp_path.glob("*/*/metadata.json"))) == 2

    compiled(x)                                                 # loaded functions are kept
    assert len(loaded.functions) == 2 and len(loaded.launches) == 4

    def no_builds(*args, **kwargs):
        raise AssertionError("a kernel was compiled although the cache holds it")
    monkeypatch.setattr(kernel_build, "run_workers", no_builds)
    again = CachedKernelLauncher(tmp_path, target_of=lambda device: "cuda:90", load=Loaded())
    compiled.kernel_launcher = _as_h100(again)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)
    assert again.built == 0


def _recorded_specs() -> list[dict]:
    from sparsecc.build import record_kernels
    compiled, x = _compiled()
    return [spec.to_dict() for spec, _ in record_kernels(compiled.program, compiled.constants, [x], variants=False)]


def _compiling_child(script: str, *argv: str):
    """Run `script` in a Python process where Triton compiles (no TRITON_INTERPRET); its last line, as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


CHILD = """
import json, sys
import sparsecc.kernel_build as kernel_build
from sparsecc.cached_launch import CachedKernelLauncher
from sparsecc.runtime.kernels.triton.launch import KernelSpec

def no_workers(*args, **kwargs):
    raise AssertionError("a worker process was started")
kernel_build.run_workers = no_workers
specs = [KernelSpec.from_dict(d) for d in json.loads(sys.argv[2])]
launcher = CachedKernelLauncher(sys.argv[1])
first = launcher.build(specs, "cuda:90")
launcher.build(specs, "cuda:90")
print(json.dumps({"built": launcher.built, "binary": first[0].kernel.binary[:4].hex()}))
"""


@pytest.mark.interpreter
def test_a_miss_compiles_in_process_when_triton_is_not_interpreting(tmp_path):
    report = _compiling_child(CHILD, str(tmp_path), json.dumps(_recorded_specs()))
    assert report == {"built": 2, "binary": b"\x7fELF".hex()}
    assert len(list(tmp_path.glob("*/*/kernel.cubin"))) == 2


def test_cpu_tensors_keep_triton_and_cpu_backends_have_no_launcher():
    model = nn.Linear(16, 16).eval()
    torch_backend = sparsecc.compile(model, (torch.randn(2, 16),), sparsity="2:4", backend="torch", check=False)
    assert torch_backend.kernel_launcher is None
    launcher = CachedKernelLauncher()
    assert launcher.target(torch.device("cpu")) is None        # CPU launches go to Triton (the interpreter)


def test_jit_can_be_forced(monkeypatch):
    monkeypatch.setenv("SPARSECC_TRITON_JIT", "1")
    model = nn.Linear(16, 16).eval()
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    compiled = sparsecc.compile(model, (torch.randn(2, 16),), sparsity="2:4", backend="triton", check=False)
    assert compiled.kernel_launcher is None


@pytest.mark.gpu
def test_gpu_compile_runs_cached_binaries_and_never_jits(tmp_path, monkeypatch):
    from triton.runtime.jit import JITFunction
    monkeypatch.setenv("SPARSECC_KERNEL_CACHE", str(tmp_path))

    def no_jit(*args, **kwargs):
        raise AssertionError("Triton's JIT compiled or launched a kernel")
    monkeypatch.setattr(JITFunction, "run", no_jit)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda().half().eval()
    x = torch.randn(8, 256, device="cuda", dtype=torch.half)
    compiled = sparsecc.compile(model, (x,), sparsity="2:4", backend="triton")
    assert compiled.report().error_vs_reference < 2e-2
    assert any(tmp_path.glob("*/*/kernel.cubin"))
    again = sparsecc.compile(model, (x,), sparsity="2:4", backend="triton")
    torch.testing.assert_close(again(x), compiled(x))
    assert again.kernel_launcher.built == 0


@pytest.mark.interpreter
def test_a_binary_that_fails_to_load_falls_back_to_triton_with_a_warning(h100_run):
    compiled, x = _compiled()
    expected = Executor(compiled.program, compiled.constants, "torch").run([x])[0]

    def broken_driver(api, binary, entry, metadata, device):
        raise RuntimeError("cuda driver: loading the module failed with error 209")
    compiled.kernel_launcher = CachedKernelLauncher(h100_run[0], load=broken_driver,   # the binaries are built
                                                    target_of=lambda device: "cuda:90")
    with pytest.warns(UserWarning, match="nm_linear_kernel could not run from the kernel cache.*error 209"):
        out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_launch_keys_carry_triton_divisibility_but_not_on_per_call_sizes():
    from sparsecc.runtime.kernels.triton.launch import bind_launch
    from sparsecc.runtime.kernels.triton.nm_linear import nm_linear_kernel
    x, y = torch.zeros(32, 64), torch.zeros(32, 48)
    values, indices = torch.zeros(48, 32), torch.zeros(48, 8, dtype=torch.uint8)
    args = (x, values, indices, None, y, 32, 48, 64, 64, 32, 8, 48)
    constexprs = dict(N=2, M=4, BITS=2, PACKED=True, HAS_BIAS=False, INPUT_PRECISION="ieee", SPLIT_K=1,
                      BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)
    spec, _ = bind_launch(nm_linear_kernel, args, constexprs)
    assert {"x_ptr", "in_features", "stride_x", "stride_y"} <= set(spec.divisible)
    assert "tokens" not in spec.divisible                       # 32 tokens, but token counts vary per call
    assert "stride_indices" not in spec.divisible and "out_features" in spec.divisible
    with pytest.raises(TypeError, match="unknown launch arguments"):
        bind_launch(nm_linear_kernel, args, {**constexprs, "maxnreg": 128})


DIVISIBILITY_CHILD = """
import json, re, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sparsecc.build_worker import divisibility_attrs
from sparsecc.runtime.kernels.triton import nm_linear
from sparsecc.runtime.kernels.triton.launch import KernelSpec
spec = KernelSpec.from_dict(json.loads(sys.argv[1]))
target = GPUTarget("cuda", 90, 32)

def async_copies(attrs):
    source = ASTSource(fn=nm_linear.nm_linear_kernel, signature=spec.signature, constexprs=spec.constexprs,
                       attrs=attrs)
    return len(re.findall(r"cp\\.async", triton.compile(source, target=target, options=spec.options).asm["ptx"]))
print(json.dumps([async_copies({}), async_copies(divisibility_attrs(spec.to_dict(), target))]))
"""


@pytest.mark.interpreter
def test_divisibility_reaches_the_compiled_kernel():
    """The fused fp16 2:4 kernel pipelines its loads (cp.async) only when Triton knows the pointers and
    strides are 16-aligned, as the JIT does: the cache must build with the same attributes."""
    from sparsecc.runtime.kernels.triton.launch import use_launcher
    from sparsecc.runtime.kernels.triton.nm_linear import nm_linear_triton
    specs = []
    x = torch.randn(8, 512, dtype=torch.float16)
    values, indices = torch.randn(512, 256, dtype=torch.float16), torch.full((512, 64), 0xE4, dtype=torch.uint8)
    with use_launcher(lambda kernel, grid, *a, **k: specs.append(bind_launch(kernel, a, k)[0])):
        nm_linear_triton(x, values, indices, None, 2, 4, 512)
    without, with_attrs = _compiling_child(DIVISIBILITY_CHILD, json.dumps(specs[0].to_dict()))
    assert with_attrs > without


STALE_CHILD = """
import json, sys
import sparsecc.kernel_build as kernel_build
from sparsecc.runtime.kernels.triton import nm_linear
from sparsecc.runtime.kernels.triton.launch import KernelSpec
started = []
kernel_build.run_workers = lambda jobs, cache, workers, progress: started.extend(jobs)
nm_linear.nm_linear_kernel.fn.sparsecc_source_sha256 = "0" * 64      # as if the file changed after import
specs = [KernelSpec.from_dict(d) for d in json.loads(sys.argv[2])]
try:
    kernel_build.build_kernels(specs, ["cuda:90"], cache_dir=sys.argv[1], workers=0, progress=False)
except Exception:
    pass                                                              # the stub worker built nothing
print(json.dumps(len(started)))
"""


@pytest.mark.interpreter
def test_a_kernel_edited_since_import_is_built_by_a_worker(tmp_path):
    specs = _recorded_specs()
    assert _compiling_child(STALE_CHILD, str(tmp_path), json.dumps(specs)) == len(specs)


@pytest.mark.interpreter
def test_a_triton_compiled_model_can_be_copied():
    import copy
    compiled, x = _compiled()
    twin = copy.deepcopy(compiled)
    torch.testing.assert_close(twin(x), compiled(x))
