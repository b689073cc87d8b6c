"""Write an AOT artifact folder (format: `sparsecc.runtime.artifact`): data only, never pickle."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from safetensors.torch import save_file

import sparsecc
from sparsecc.runtime.artifact import (ARTIFACT_FORMAT, ARTIFACT_VERSION, MANIFEST, MANIFEST_HASH, WEIGHTS,
                                       sha256_file, target_dir)
from sparsecc.runtime.expert_shards import EXPERT_FILE, expert_file
from sparsecc.runtime.kernels.cpu.mlir.aot import manifest_entry
from sparsecc.runtime.kernels.triton.launch import KernelSpec
from sparsecc.runtime.program import Program
from sparsecc.runtime.signing import SIGNATURE_FILE, SigningKey, sign_manifest

from .errors import SparseccError
from .kernel_build import BuiltKernel, triton_version

LAUNCH_FIELDS = ("entry", "shared", "num_warps", "warp_size", "num_ctas", "num_stages", "global_scratch",
                 "profile_scratch", "launch_cooperative_grid", "launch_pdl", "param_bytes", "triton_hash",
                 "build_seconds")


def prepare_folder(root: Path) -> None:
    """An empty folder, or an earlier artifact (replaced); anything else is left alone with an error."""
    if root.exists() and any(root.iterdir()):
        if not (root / MANIFEST).is_file():
            raise SparseccError(f"{root} exists and is not a sparsecc artifact; refusing to overwrite it")
        for name in (MANIFEST, MANIFEST_HASH, SIGNATURE_FILE, WEIGHTS):   # a stale signature must not survive
            (root / name).unlink(missing_ok=True)
        for stale in root.glob(EXPERT_FILE.format(rank="*")):
            stale.unlink()
        shutil.rmtree(root / "kernels", ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)


def write_weights(path: Path, constants: dict[str, torch.Tensor]) -> None:
    """safetensors wants contiguous tensors that share no storage: give it private copies."""
    save_file({name: t.detach().to("cpu").contiguous().clone() for name, t in constants.items()}, str(path))


def kernel_table(root: Path, specs: Sequence[tuple[KernelSpec, list[str]]], built: Sequence[BuiltKernel]) -> list:
    by_spec = {}
    for b in built:
        by_spec.setdefault(b.spec.key(), []).append(b)
    table = []
    for index, (spec, users) in enumerate(specs):
        kernel_id = f"k{index}_{spec.entry}"
        binaries = {}
        for b in by_spec.get(spec.key(), []):
            kind = b.kernel.metadata["binary_file"].rpartition(".")[2]
            name = f"kernels/{target_dir(b.target)}/{kernel_id}.{kind}"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(b.kernel.binary)
            binaries[b.target] = {"file": name, "cache_key": b.key,
                                  **{k: b.kernel.metadata[k] for k in LAUNCH_FIELDS if k in b.kernel.metadata}}
        table.append({"id": kernel_id, **spec.to_dict(), "used_by": users, "binaries": binaries})
    return table


def cpu_kernel_table(root: Path, cpu_built: Sequence[dict[str, Any]]) -> list:
    """Write each generated CPU kernel's objects (kernels/cpu_x86_64_v4/<id>.o); their manifest records."""
    table = []
    for index, entry in enumerate(cpu_built):
        kernel_id = f"c{index}_{entry['source'].name}"
        files = {target: f"kernels/{target_dir(target)}/{kernel_id}.o" for target in entry["objects"]}
        for target, name in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(entry["objects"][target])
        table.append(manifest_entry(index, entry, files))
    return table


def write_artifact(root: Path, program: Program, constants: dict[str, torch.Tensor], targets: Sequence[str],
                   specs: Sequence[tuple[KernelSpec, list[str]]], built: Sequence[BuiltKernel],
                   sign_with: Optional[SigningKey] = None,
                   rank_constants: Sequence[dict[str, torch.Tensor]] = (),
                   described: Optional[dict[str, Any]] = None,
                   cpu_built: Sequence[dict[str, Any]] = (), borrowed: Iterable[str] = ()) -> dict[str, Any]:
    """Write the artifact; with `sign_with` (an Ed25519 private key or its PEM file) also manifest.sig.
    `borrowed`: constants not written here; the manifest lists their dtype and shape, and the loader takes
    them from the sibling program it is given (runtime/loaded.py `borrowed`).
    `rank_constants` (expert parallelism): each rank's expert constants, written to its own file.
    `described`: extra manifest sections (e.g. "generator"), hashed and signed with the rest."""
    prepare_folder(root)
    per_rank = {name for shard in rank_constants for name in shard}   # only those live in the rank files
    borrowed = sorted(borrowed)
    elsewhere = per_rank | set(borrowed)
    write_weights(root / WEIGHTS, {name: constants[name] for name in program.constant_names if name not in elsewhere})
    rank_files = [expert_file(rank) for rank in range(len(rank_constants))]
    for name, shard in zip(rank_files, rank_constants):
        write_weights(root / name, shard)
    kernels = kernel_table(root, specs, built)
    cpu_kernels = cpu_kernel_table(root, cpu_built)
    listed = [WEIGHTS, *rank_files] + [b["file"] for k in (*kernels, *cpu_kernels) for b in k["binaries"].values()]
    manifest = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "versions": {"sparsecc": sparsecc.__version__, "torch": torch.__version__, "triton": triton_version(),
                     "safetensors": importlib.metadata.version("safetensors")},
        "targets": list(targets),
        "program": program.to_dict(),
        "weights": WEIGHTS,
        **({"expert_parallel": {"world_size": len(rank_files), "files": rank_files}} if rank_files else {}),
        "kernels": kernels,
        **({"cpu_kernels": cpu_kernels} if cpu_kernels else {}),
        **({"borrowed_constants": {name: {"dtype": str(constants[name].dtype).removeprefix("torch."),
                                          "shape": list(constants[name].shape)} for name in borrowed}}
           if borrowed else {}),
        **(described or {}),
        "files": {name: {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
                  for name in listed},
    }
    text = json.dumps(manifest, indent=1, sort_keys=False).encode()
    (root / MANIFEST).write_bytes(text)
    for name in (WEIGHTS, *rank_files):   # safetensors writes 0600: follow the umask like the rest
        shutil.copymode(root / MANIFEST, root / name)
    (root / MANIFEST_HASH).write_text(hashlib.sha256(text).hexdigest() + "  " + MANIFEST + "\n")
    if sign_with is not None:
        (root / SIGNATURE_FILE).write_bytes(sign_manifest(text, sign_with))   # over the exact bytes written
    return manifest
