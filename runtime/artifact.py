"""The AOT artifact: its format, its checks, and `load` (the runtime alone runs it; no pickle anywhere).

    DIR/manifest.json          {"format": "sparsecc-artifact", "format_version": 1,
                                "versions": {sparsecc, torch, triton}, "targets": [...],
                                "program": Program.to_dict(), "weights": "weights.safetensors",
                                "kernels": [{"id", "kernel", "signature", "constexprs", "options",
                                             "binaries": {target: {"file", "entry", "shared", "num_warps",
                                                                   "warp_size", "num_ctas", "global_scratch",
                                                                   "profile_scratch", ...}}}],
                                "files": {relative path: {"sha256", "bytes"}}}
    DIR/manifest.sha256        SHA-256 of manifest.json (the manifest cannot hold its own hash)
    DIR/weights.safetensors    every constant of the program (compressed N:M values/indices included)
    DIR/kernels/<cuda_90|hip_gfx942|...>/<id>.<cubin|hsaco>

`load` checks the manifest's hash, its format and version, then every listed
file's size and hash, before it reads weights or builds the executor; only
then does it resolve the program's ops (unknown ops and ops outside the
allowlist fail there), so a bad artifact executes nothing.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Union

import torch

from .errors import ArtifactError
from .program import Program

ARTIFACT_FORMAT = "sparsecc-artifact"
ARTIFACT_VERSION = 1
MANIFEST, MANIFEST_HASH, WEIGHTS = "manifest.json", "manifest.sha256", "weights.safetensors"
GPU_TARGETS = {"cuda": ("80", "86", "89", "90"), "hip": ("gfx942",)}
BINARY_SUFFIX = {"cuda": "cubin", "hip": "hsaco"}


def parse_target(text: str) -> tuple[str, str]:
    """'cpu' -> ("cpu", ""), 'cuda:90' -> ("cuda", "90"), 'hip:gfx942' -> ("hip", "gfx942")."""
    api, _, arch = str(text).partition(":")
    if api == "cpu" and not arch:
        return "cpu", ""
    if arch in GPU_TARGETS.get(api, ()):
        return api, arch
    known = ["cpu"] + [f"{a}:{x}" for a, archs in GPU_TARGETS.items() for x in archs]
    raise ArtifactError(f"unknown target {text!r} (known: {', '.join(known)})")


def target_dir(target: str) -> str:
    """Folder name of a target's binaries: 'cuda:90' -> 'cuda_90'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", target)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checked(root: Path, name: str, manifest: dict[str, Any]) -> bytes:
    """The bytes of `name`, checked against the manifest's SHA-256 for it after reading, so what
    was checked is what gets used (a file swapped after `verify_files` is refused)."""
    data = (root / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["files"][name]["sha256"]:
        raise ArtifactError(f"{root}: {name} does not match its SHA-256 (changed while loading)")
    return data


def read_manifest(root: Union[str, Path]) -> dict[str, Any]:
    """The manifest, after checking its own hash, the format name and the format version."""
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise ArtifactError(f"{root} is not a sparsecc artifact: {MANIFEST} is missing")
    try:
        expected = (root / MANIFEST_HASH).read_text().split()[0]
    except (OSError, IndexError):
        raise ArtifactError(f"{root}: {MANIFEST_HASH} is missing or empty; the manifest cannot be checked") from None
    text = (root / MANIFEST).read_bytes()   # hashed and parsed from the same bytes
    if hashlib.sha256(text).hexdigest() != expected:
        raise ArtifactError(f"{root}: {MANIFEST} does not match {MANIFEST_HASH} (modified or truncated)")
    try:
        manifest = json.loads(text)
    except ValueError as err:
        raise ArtifactError(f"{root}: {MANIFEST} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{root}: {MANIFEST} is not a {ARTIFACT_FORMAT} manifest")
    if manifest.get("format_version") != ARTIFACT_VERSION:
        raise ArtifactError(f"{root}: artifact format version {manifest.get('format_version')!r} is not supported "
                            f"by this runtime (it reads version {ARTIFACT_VERSION}); rebuild the artifact")
    return manifest


def verify_files(root: Union[str, Path], manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists with its size and SHA-256; every file it refers to is listed."""
    try:
        _verify_files(Path(root), manifest)
    except (KeyError, TypeError, AttributeError) as err:
        raise ArtifactError(f"{root}: malformed manifest ({type(err).__name__}: {err})") from None


def _verify_files(root: Path, manifest: dict[str, Any]) -> None:
    files = manifest.get("files", {})
    referenced = [manifest.get("weights", WEIGHTS)] + [b["file"] for k in manifest.get("kernels", [])
                                                       for b in k["binaries"].values()]
    unlisted = [f for f in referenced if f not in files]
    if unlisted:
        raise ArtifactError(f"{root}: the manifest refers to files without a hash: {', '.join(unlisted)}")
    for name, entry in files.items():
        path = (root / name).resolve()
        if root.resolve() not in path.parents:
            raise ArtifactError(f"{root}: manifest lists a file outside the artifact: {name!r}")
        if not path.is_file():
            raise ArtifactError(f"{root}: {name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"{root}: {name} has {size} bytes, the manifest says {entry['bytes']} (truncated or modified)")
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{root}: {name} does not match its SHA-256 in the manifest (modified)")


def gpu_arch(device: torch.device) -> str:
    """The GPU's own target name: 'cuda:90' for an H100/H200, 'hip:gfx942' for an MI300."""
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        return f"hip:{props.gcnArchName.split(':')[0]}"
    return f"cuda:{props.major}{props.minor}"


def device_target(device: torch.device, targets: list[str]) -> str:
    """The artifact target that runs on `device`: 'cpu', or the GPU's own arch (a cubin for sm_8x also
    runs on a later sm_8y). A missing target is an error that lists what the artifact holds."""
    have = ", ".join(targets) or "none"
    if device.type == "cpu":
        if "cpu" in targets:
            return "cpu"
        raise ArtifactError(f"the artifact was not built for target 'cpu' (it has: {have})")
    if device.type != "cuda":
        raise ArtifactError(f"cannot run an artifact on device type {device.type!r}")
    if not torch.cuda.is_available():
        raise ArtifactError(f"device {device} requested but torch sees no GPU (the artifact has: {have})")
    props = torch.cuda.get_device_properties(device)
    want = gpu_arch(device)
    candidates = [want]
    if not torch.version.hip:
        candidates += [f"cuda:{props.major}{m}" for m in range(props.minor - 1, -1, -1) if props.major != 9]
    for target in candidates:
        if target in targets:
            return target
    raise ArtifactError(f"the artifact has no binaries for this device ({props.name}, target {want}); "
                        f"it has: {have}. Rebuild with --target {want}")


def program_on(program: Program, device: torch.device) -> Program:
    """The program with every device argument (as captured, usually cpu) pointing at `device`."""
    def move(arg: Any) -> Any:
        if isinstance(arg, list):
            return [move(a) for a in arg]
        if isinstance(arg, dict) and set(arg) == {"device"}:
            return {"device": str(device)}
        return arg
    instructions = [replace(i, args=move(i.args), kwargs={k: move(v) for k, v in i.kwargs.items()})
                    for i in program.instructions]
    return replace(program, instructions=instructions)


def load(path: Union[str, Path], device: Union[str, torch.device] = "cpu"):
    """Load an artifact written by `CompiledModel.save` / `sparsecc build`; returns a callable LoadedModel."""
    from .loaded import load_artifact
    return load_artifact(Path(path), torch.device(device))
