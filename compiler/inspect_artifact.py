"""`sparsecc inspect DIR`: what an artifact holds (targets, kernels, sizes, the program), after checking it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsecc.runtime.artifact import MAX_SMALL_FILE_BYTES, malformed, read_manifest, read_optional, verify_files
from sparsecc.runtime.kernels.cpu.mlir.aot import cpu_objects_decision
from sparsecc.runtime.loaded_generator import PROGRAM_DIRS, is_generator
from sparsecc.runtime.program import Program
from sparsecc.runtime.signing import SIGNATURE_FILE, signature_key_id


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _constexprs(kernel: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kernel["constexprs"].items())


def _signature(root: Path, verified: bool) -> str:
    record = read_optional(root, SIGNATURE_FILE, MAX_SMALL_FILE_BYTES)
    if record is None:
        return "signature: none (unsigned; hashes give integrity, not authenticity)"
    how = "verified against a trusted key" if verified else "not verified: pass --trusted-key"
    return f"signature: Ed25519, key id {signature_key_id(record)} ({how})"


def _cpu_kernel_lines(manifest: dict[str, Any], verified: bool) -> list[str]:
    """The generated CPU kernels built for named CPUs, and whether a load here would use them."""
    kernels = manifest.get("cpu_kernels", [])
    lines = [f"cpu kernels: {len(kernels)} generated kernels prebuilt"] if kernels else []
    for kernel in kernels:
        lines.append(f"  {kernel['id']}  {kernel['kernel']} {kernel['dtype']}")
        lines += [f"    {target:16s} {binary['file']}" for target, binary in kernel["binaries"].items()]
        lines += [f"    {target:16s} not built: {why}" for target, why in kernel.get("skipped", {}).items()]
    return lines + [cpu_objects_decision(manifest, verified)[1].replace("cpu kernels: ", "cpu kernels here: ", 1)]


def describe_artifact(path: str, trusted_keys: list | None = None) -> str:
    """The artifact's description; a saved generator folder (prefill + decode) describes both programs."""
    root = Path(path)
    if is_generator(root):
        return "\n\n".join(f"generator {root}: {name} program\n" + describe_artifact(str(root / name), trusted_keys)
                           for name in PROGRAM_DIRS)
    manifest = read_manifest(root, trusted_keys)
    with malformed(root):
        verify_files(root, manifest)      # a wrong-typed field is an ArtifactError, as at load
        return _describe(root, manifest, trusted_keys is not None)


def _borrowed(manifest: dict[str, Any]) -> str:
    borrowed = manifest.get("borrowed_constants") or {}
    return f" ({len(borrowed)} borrowed from the generator's prefill program, not stored here)" if borrowed else ""


def _describe(root: Path, manifest: dict[str, Any], verified: bool) -> str:
    program = Program.from_dict(manifest["program"])
    files = manifest["files"]
    versions = ", ".join(f"{k} {v}" for k, v in manifest["versions"].items())
    lines = [f"sparsecc artifact {root} (format {manifest['format_version']}; built with {versions})",
             f"hashes: {len(files)} files verified",
             _signature(root, verified),
             f"targets: {', '.join(manifest['targets'])}",
             f"program: {program.summary()}",
             f"weights: {manifest['weights']} {_size(files[manifest['weights']]['bytes'])}, "
             f"{len(program.constant_names)} tensors" + _borrowed(manifest),
             f"kernels: {len(manifest['kernels'])} specialisations"]
    for kernel in manifest["kernels"]:
        lines.append(f"  {kernel['id']}  used by {', '.join(kernel['used_by'])}")
        lines.append(f"    {_constexprs(kernel)}")
        for target, binary in kernel["binaries"].items():
            lines.append(f"    {target:11s} {binary['file']}  {_size(files[binary['file']]['bytes'])}, "
                         f"shared {binary['shared']} B, {binary['num_warps']} warps, "
                         f"{binary.get('num_stages', '?')} stages, entry {binary['entry']}")
    lines += _cpu_kernel_lines(manifest, verified)
    total = sum(f["bytes"] for f in files.values())
    lines.append(f"total: {_size(total)} in {len(files)} files (+ manifest)")
    return "\n".join(lines)
