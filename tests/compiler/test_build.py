"""AOT builds on a CPU-only machine: cross-compiled binaries for cuda:80, cuda:90 and hip:gfx942, their launch
metadata, and a CPU load that matches the compiled model."""
import json

import pytest
import torch

import sparsecc
from sparsecc.build import BuildError, record_kernels
from sparsecc.cli import main
from sparsecc.runtime.artifact import read_manifest

from .build_models import GPU_TARGETS, compile_mixed, compile_tiny, kernel_cache

LAUNCH_FIELDS = {"file", "entry", "shared", "num_warps", "warp_size", "num_ctas", "global_scratch",
                 "profile_scratch", "launch_cooperative_grid", "launch_pdl"}


@pytest.fixture(scope="module")
def tiny(request, tmp_path_factory):
    compiled, inputs = compile_tiny()
    path = tmp_path_factory.mktemp("tiny") / "artifact"
    manifest = compiled.save(path, targets=["cpu", *GPU_TARGETS], cache_dir=kernel_cache(request.config),
                             progress=False)
    return compiled, inputs, path, manifest


@pytest.fixture(scope="module")
def mixed(request, tmp_path_factory):
    compiled, inputs = compile_mixed()
    path = tmp_path_factory.mktemp("mixed") / "artifact"
    manifest = compiled.save(path, targets=["cpu", *GPU_TARGETS], cache_dir=kernel_cache(request.config),
                             progress=False)
    return compiled, inputs, path, manifest


def _check_binaries(path, manifest):
    assert manifest["kernels"]
    for kernel in manifest["kernels"]:
        assert set(kernel["binaries"]) == set(GPU_TARGETS)
        for target, binary in kernel["binaries"].items():
            assert LAUNCH_FIELDS <= set(binary), target
            assert binary["entry"] == kernel["kernel"].rpartition(":")[2]
            assert binary["warp_size"] == (64 if target.startswith("hip") else 32)
            assert binary["num_warps"] == kernel["options"].get("num_warps", 4)
            data = (path / binary["file"]).read_bytes()
            assert data[:4] == b"\x7fELF" and manifest["files"][binary["file"]]["bytes"] == len(data)


def test_tiny_transformer_builds_for_three_gpu_targets(tiny):
    compiled, _, path, manifest = tiny
    assert manifest["targets"] == ["cpu", *GPU_TARGETS]
    assert [k["kernel"].rpartition(":")[2] for k in manifest["kernels"]] == ["nm_decompress_kernel"]
    _check_binaries(path, manifest)
    assert sorted(p.name for p in (path / "kernels").iterdir()) == ["cuda_80", "cuda_90", "hip_gfx942"]
    assert read_manifest(path)["program"] == compiled.program.to_dict()


def test_tiny_transformer_loads_on_cpu_and_matches(tiny):
    compiled, inputs, path, _ = tiny
    loaded = sparsecc.runtime.load(path)
    assert loaded.target == "cpu"
    torch.testing.assert_close(loaded(*inputs), compiled(*inputs), rtol=0, atol=0)


def test_mixed_model_builds_every_kernel_it_uses(mixed):
    compiled, _, path, manifest = mixed
    entries = sorted(k["kernel"].rpartition(":")[2] for k in manifest["kernels"])
    assert entries == ["block_attention_kernel", "count_kernel", "moe_down_kernel", "moe_gate_up_kernel",
                       "nm_decompress_kernel", "offsets_kernel", "scatter_kernel"]
    _check_binaries(path, manifest)
    attention = next(k for k in manifest["kernels"] if k["id"].endswith("block_attention_kernel"))
    # the model's causal mask is read as a rule (one "ge" term), never loaded as a mask tile
    assert attention["constexprs"]["RULE_TERMS"] == 1 and not attention["constexprs"]["HAS_MASK"]
    assert attention["constexprs"]["BLOCK_Q"] == 64
    assert attention["used_by"] == ["sparsecc::block_attention"]


def test_mixed_model_loads_on_cpu_and_matches(mixed):
    compiled, inputs, path, _ = mixed
    loaded = sparsecc.runtime.load(path, device="cpu")
    torch.testing.assert_close(loaded(*inputs), compiled(*inputs), rtol=0, atol=0)


def test_runtime_argument_packing_matches_every_binary(mixed):
    """The launcher packs each non-constexpr argument by its type, then two scratch pointers: the sizes must be
    the parameters the cubin's PTX entry / the hsaco's kernel metadata declare (checked without a GPU)."""
    sizes = {"i32": 4, "fp32": 4, "i64": 8}
    for kernel in mixed[3]["kernels"]:
        packed = [8 if t.startswith("*") else sizes[t] for t in kernel["signature"].values() if t != "constexpr"]
        for target, binary in kernel["binaries"].items():
            assert binary["param_bytes"] == packed + [8, 8], (kernel["id"], target)


def test_dynamic_programs_also_record_other_token_counts(mixed):
    """A program with dynamic dims also builds the tile configurations other token counts pick."""
    compiled = mixed[0]
    static = record_kernels(compiled.program, compiled.constants, compiled.example_inputs)
    dynamic = record_kernels(compiled.program, compiled.constants, compiled.example_inputs, variants=True)
    entries = [spec.entry for spec, _ in dynamic]
    assert len(static) == 7 and entries.count("moe_gate_up_kernel") >= 3 and "nm_linear_kernel" in entries


def test_unknown_target_is_refused(tiny, tmp_path):
    compiled = tiny[0]
    with pytest.raises(BuildError, match="unknown target 'cuda:75'.*cuda:90"):
        compiled.save(tmp_path / "a", targets=["cpu", "cuda:75"])
    assert not (tmp_path / "a").exists()


def test_cli_build_and_inspect(request, tmp_path, capsys):
    out = tmp_path / "artifact"
    argv = ["build", "examples.tiny_transformer:build", "--sparsity", "2:4", "--target", "cuda:90",
            "--target", "cpu", "-o", str(out), "--cache-dir", str(kernel_cache(request.config)), "--no-check"]
    assert main(argv) == 0
    assert json.loads((out / "manifest.json").read_text())["targets"] == ["cuda:90", "cpu"]
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "targets: cuda:90, cpu" in text and "k0_nm_decompress_kernel" in text and "verified" in text
    (out / "weights.safetensors").write_bytes(b"x")
    assert main(["inspect", str(out)]) == 2
    assert "weights.safetensors has 1 bytes" in capsys.readouterr().err


def test_dynamic_token_count_records_both_nm_linear_paths():
    from torch.export import Dim

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).eval()
    compiled = sparsecc.compile(model, (torch.randn(8, 64),), sparsity="2:4",
                                dynamic_shapes=({0: Dim("tokens", min=1, max=1024)},))
    assert compiled.program.symbol_ranges
    entries = sorted(spec.entry for spec, _ in record_kernels(compiled.program, compiled.constants,
                                                              compiled.example_inputs))
    assert entries == ["nm_decompress_kernel", "nm_linear_kernel"]    # fused up to 16 tokens, decompress above


SHARED_MEMORY_LIMIT = {"cuda:80": 163 * 1024, "cuda:90": 227 * 1024}   # max dynamic shared memory per block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_moe_tiles_fit_shared_memory_on_a100_and_h100(request, dtype):
    """The cross-compiled default tiles of every regime report the shared memory they need: it must fit."""
    from sparsecc.kernel_build import build_kernels
    from sparsecc.runtime.kernels.triton.launch import bind_launch, use_launcher
    from sparsecc.runtime.kernels.triton.moe import moe_triton

    specs = []
    with use_launcher(lambda kernel, grid, *args, **kwargs: specs.append(bind_launch(kernel, args, kwargs)[0])):
        for tokens in (1, 128, 1024, 8192):  # 0.25, 32, 256 and 2048 pairs per expert: every default_blocks regime
            hidden, logits = torch.zeros(tokens, 64, dtype=dtype), torch.randn(tokens, 8)
            moe_triton(hidden, logits, torch.zeros(8, 128, 64, dtype=dtype), torch.zeros(8, 64, 64, dtype=dtype),
                       None, None, None, 2, True, "softmax", "silu", True)
    gemms = list({spec.key(): spec for spec in specs if "moe_" in spec.entry}.values())
    built = build_kernels(gemms, list(SHARED_MEMORY_LIMIT), cache_dir=kernel_cache(request.config), progress=False)
    for kernel in built:
        assert kernel.kernel.metadata["shared"] <= SHARED_MEMORY_LIMIT[kernel.target], (kernel.spec.constexprs,
                                                                                        kernel.target)
