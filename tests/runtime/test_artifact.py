"""Loading checks every hash, the format version, the target and the program's ops before running anything."""
import hashlib
import json
import shutil

import pytest
import torch

import sparsecc
from sparsecc.runtime import ArtifactError
from safetensors.torch import load_file
from sparsecc.runtime import Instruction, Program
from sparsecc.runtime.artifact import GPU_TARGETS as GPU_TARGETS_BY_API
from sparsecc.runtime.artifact import device_target, program_on, read_manifest
from sparsecc.runtime.kernels.triton.launch import KernelSpec
from sparsecc.runtime.call_guard import CallGuard
from sparsecc.runtime.validate import validate_program
from sparsecc.runtime.loaded import LoadedModel, PrebuiltKernels, aligned

from ..compiler.build_models import GPU_TARGETS, compile_mixed, kernel_cache


@pytest.fixture(scope="module")
def built(request, tmp_path_factory):
    compiled, inputs = compile_mixed()
    path = tmp_path_factory.mktemp("built") / "artifact"
    compiled.save(path, targets=["cpu", *GPU_TARGETS], cache_dir=kernel_cache(request.config), progress=False)
    return compiled, inputs, path


@pytest.fixture
def artifact(built, tmp_path):
    """A private copy to tamper with."""
    return shutil.copytree(built[2], tmp_path / "artifact")


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite_manifest(root, edit):
    """Edit the manifest and re-sign it, as a careless tool (or a forger) would."""
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    text = json.dumps(manifest).encode()
    (root / "manifest.json").write_bytes(text)
    (root / "manifest.sha256").write_text(hashlib.sha256(text).hexdigest() + "  manifest.json\n")


def _kernel_file(root):
    return root / json.loads((root / "manifest.json").read_text())["kernels"][0]["binaries"]["cuda:90"]["file"]


def test_intact_artifact_loads_and_runs(built):
    compiled, inputs, path = built
    torch.testing.assert_close(sparsecc.runtime.load(path)(*inputs), compiled(*inputs), rtol=0, atol=0)


def test_flipped_byte_in_a_kernel(artifact):
    _flip_byte(_kernel_file(artifact))
    with pytest.raises(ArtifactError, match=r"k0_.*\.cubin does not match its SHA-256"):
        sparsecc.runtime.load(artifact)


def test_flipped_byte_in_the_weights(artifact):
    _flip_byte(artifact / "weights.safetensors")
    with pytest.raises(ArtifactError, match="weights.safetensors does not match its SHA-256"):
        sparsecc.runtime.load(artifact)


def test_truncated_weights(artifact):
    data = (artifact / "weights.safetensors").read_bytes()
    (artifact / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="weights.safetensors has .* bytes, the manifest says"):
        sparsecc.runtime.load(artifact)


def test_flipped_byte_in_the_manifest(artifact):
    _flip_byte(artifact / "manifest.json", offset=200)
    with pytest.raises(ArtifactError, match="manifest.json does not match manifest.sha256"):
        sparsecc.runtime.load(artifact)


@pytest.mark.parametrize("name", ["kernel", "weights.safetensors", "manifest.sha256"])
def test_deleted_file(artifact, name):
    path = _kernel_file(artifact) if name == "kernel" else artifact / name
    path.unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        sparsecc.runtime.load(artifact)


def test_other_format_version(artifact):
    _rewrite_manifest(artifact, lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format version 99 is not supported"):
        sparsecc.runtime.load(artifact)


def test_manifest_may_not_point_outside_the_artifact(artifact):
    _rewrite_manifest(artifact, lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0", "bytes": 0}}))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        sparsecc.runtime.load(artifact)


def test_malformed_manifest(artifact):
    _rewrite_manifest(artifact, lambda m: m["kernels"][0].pop("binaries"))
    with pytest.raises(ArtifactError, match="malformed manifest"):
        sparsecc.runtime.load(artifact)


def _set_first_op(op):
    def edit(manifest):
        manifest["program"]["instructions"][0]["op"] = op
    return edit


@pytest.mark.parametrize("op", ["sparsecc::no_such_op", "os::system", "aten::from_file.default",
                                "aten::_sparse_csr_tensor_unsafe.default",
                                "aten::_sparse_coo_tensor_with_dims_and_tensors.default", "aten::_unsafe_index.Tensor",
                                "aten::set_.source_Tensor", "aten::no_such_op.default"])
def test_ops_outside_the_allowlist_fail_before_running(artifact, op):
    _rewrite_manifest(artifact, _set_first_op(op))
    with pytest.raises(ArtifactError, match=rf"instruction 0 \({op}, node .*not in the sparsecc runtime's op table"):
        sparsecc.runtime.load(artifact)


def test_missing_target_lists_what_the_artifact_has(artifact):
    _rewrite_manifest(artifact, lambda m: m.update(targets=["cuda:90", "hip:gfx942"]))
    with pytest.raises(ArtifactError, match=r"not built for target 'cpu' \(it has: cuda:90, hip:gfx942\)"):
        sparsecc.runtime.load(artifact, device="cpu")


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not a sparsecc artifact"):
        sparsecc.runtime.load(tmp_path)


def test_cpu_target_choice():
    assert device_target(torch.device("cpu"), ["cuda:90", "cpu"]) == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_gpu_requested_without_a_gpu(built):
    with pytest.raises(ArtifactError, match=r"sees no GPU \(the artifact has: cpu, cuda:80, cuda:90, hip:gfx942\)"):
        sparsecc.runtime.load(built[2], device="cuda")


def _prebuilt_model(path, drop=None):
    """The artifact loaded as on a GPU (Triton launchers, launches routed by spec) but on CPU, every launch
    recorded by a stand-in for the loaded binary instead of run."""
    manifest = read_manifest(path)
    served = []

    class StandIn:
        def __init__(self, kernel_id):
            self.kernel_id = kernel_id

        def launch(self, grid, args, device):
            served.append(self.kernel_id)
    functions = {KernelSpec.from_dict(k).key(): StandIn(k["id"]) for k in manifest["kernels"] if k["id"] != drop}
    program = Program.from_dict(manifest["program"])
    stored = load_file(str(path / "weights.safetensors"))
    constants = dict(zip(stored, aligned(tuple(stored.values()))))   # as the loader does
    cpu = torch.device("cpu")
    limit = 1 << 30
    guard = CallGuard(program, constants, cpu, limit, validate_program(program, constants, device=cpu, max_bytes=limit))
    kernels = PrebuiltKernels(functions, cpu, "cuda:90")
    return LoadedModel(manifest, program, constants, cpu, "cuda:90", kernels, guard), manifest, served


def test_every_launch_of_the_loaded_program_finds_its_binary(built):
    _, inputs, path = built
    model, manifest, served = _prebuilt_model(path)
    model(*inputs)
    assert sorted(set(served)) == sorted(k["id"] for k in manifest["kernels"])


def test_a_launch_the_artifact_lacks_is_a_clear_error(built):
    _, inputs, path = built
    model, _, _ = _prebuilt_model(path, drop="k1_block_attention_kernel")
    with pytest.raises(ArtifactError, match="block_attention_kernel was launched with a specialisation the "
                                            "artifact does not hold for cuda:90.*BLOCK_Q"):
        model(*inputs)


def test_device_arguments_follow_the_device():
    program = Program([0], [], [Instruction("aten::arange.default", [4], {"device": {"device": "cpu"}}, [0])],
                      [{"r": 0}], 1, [])
    moved = program_on(program, torch.device("cuda", 1))
    assert moved.instructions[0].kwargs == {"device": {"device": "cuda:1"}}
    assert program.instructions[0].kwargs == {"device": {"device": "cpu"}}


@pytest.mark.gpu
def test_cuda_binaries_load_and_run_without_triton_jit(request, tmp_path, monkeypatch):
    """On a GPU: every kernel runs from the artifact's cubins (built here for this GPU's target only);
    Triton's JIT is never entered."""
    import triton.runtime.jit as jit

    major, minor = torch.cuda.get_device_capability()
    if str(major * 10 + minor) not in GPU_TARGETS_BY_API["cuda"]:
        pytest.skip(f"no AOT target for sm_{major}{minor}")
    compiled, inputs = compile_mixed()
    path = tmp_path / "artifact"
    compiled.save(path, targets=["cpu", f"cuda:{major}{minor}"], cache_dir=kernel_cache(request.config),
                  progress=False)

    def no_jit(*args, **kwargs):
        raise AssertionError("Triton JIT was called while running a loaded artifact")
    monkeypatch.setattr(jit.JITFunction, "run", no_jit)
    loaded = sparsecc.runtime.load(path, device="cuda")
    assert loaded.target.startswith("cuda:") and loaded.kernels.functions
    got = loaded(*(x.cuda() for x in inputs))
    torch.cuda.synchronize()
    torch.testing.assert_close(got.cpu(), compiled(*inputs), rtol=2e-3, atol=2e-3)


def test_misaligned_inputs_are_copied_before_prebuilt_kernels_see_them():
    from sparsecc.runtime.loaded import aligned
    base = torch.randn(40)
    view, whole = base[1:33], base[:32]
    out_view, out_whole = aligned((view, whole))
    assert out_view.data_ptr() % 16 == 0 and torch.equal(out_view, view) and out_view.data_ptr() != view.data_ptr()
    assert out_whole is whole
