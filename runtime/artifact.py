"""The AOT artifact: its format and its checks (`sparsecc.runtime.loaded.load` runs it; no pickle anywhere).

    DIR/manifest.json          {"format": "sparsecc-artifact", "format_version": 2,
                                "versions": {sparsecc, torch, triton}, "targets": [...],
                                "program": Program.to_dict(), "weights": "weights.safetensors",
                                "kernels": [{"id", "kernel", "signature", "constexprs", "options",
                                             "binaries": {target: {"file", "entry", "shared", "num_warps",
                                                                   "warp_size", "num_ctas", "global_scratch",
                                                                   "profile_scratch", ...}}}],
                                "files": {relative path: {"sha256", "bytes"}}}
    DIR/manifest.sha256        SHA-256 of manifest.json (the manifest cannot hold its own hash)
    DIR/weights.safetensors    every constant of the program (compressed N:M values/indices included)
    DIR/experts-rank<r>.safetensors  saved with world_size W > 1: rank r's slice of each expert constant
                               (then absent from weights.safetensors; manifest "expert_parallel")
    DIR/kernels/<cuda_90|hip_gfx942|...>/<id>.<cubin|hsaco>
    DIR/kernels/cpu_x86_64_v4/<id>.o   generated CPU kernels (manifest "cpu_kernels", kernels/cpu/mlir/aot.py),
                               linked only from a signature-verified artifact

    DIR/manifest.sig           optional Ed25519 signature of manifest.json (`sparsecc.runtime.signing`)

`load` checks the signature (when given trusted keys), the manifest's hash,
its format and version, then every listed file's size and hash, before it
reads weights or builds the executor; only then does it validate the program,
so a bad artifact executes nothing. Every read goes through `read_file`: a
plain relative name inside the folder, no symbolic link on the way, a regular
file (opened non-blocking, so a FIFO cannot hang the load), a size limit, and
the bytes hashed are the bytes used.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from .errors import ArtifactError, InputMismatchError, RuntimeProgramError
from .kernels.cpu.mlir.targets import NAMED_CPUS
from .program import Program
from .signing import SIGNATURE_FILE, TrustedKey, verify_manifest

ARTIFACT_FORMAT = "sparsecc-artifact"
ARTIFACT_VERSION = 2   # 2: program format 2 (own tree schema, state), optional manifest.sig
MANIFEST, MANIFEST_HASH, WEIGHTS = "manifest.json", "manifest.sha256", "weights.safetensors"
MAX_SMALL_FILE_BYTES = 4 << 10          # manifest.sha256, manifest.sig
MAX_MANIFEST_BYTES = 64 << 20
MAX_KERNEL_BYTES = 256 << 20
MAX_NAME_CHARS = 1024
GPU_TARGETS = {"cuda": ("80", "86", "89", "90"), "hip": ("gfx942",)}
BINARY_SUFFIX = {"cuda": "cubin", "hip": "hsaco"}


def parse_target(text: str) -> tuple[str, str]:
    """'cpu' -> ("cpu", ""), 'cpu:x86-64-v4' -> ("cpu", "x86-64-v4"), 'cuda:90' -> ("cuda", "90"), ..."""
    api, _, arch = str(text).partition(":")
    if api == "cpu" and (not arch or arch in NAMED_CPUS):     # 'cpu:x86-64-v4': generated kernels for that CPU
        return "cpu", arch
    if arch in GPU_TARGETS.get(api, ()):
        return api, arch
    known = ["cpu", *(f"cpu:{x}" for x in NAMED_CPUS)]
    known += [f"{a}:{x}" for a, archs in GPU_TARGETS.items() for x in archs]
    raise ArtifactError(f"unknown target {text!r} (known: {', '.join(known)})")


def target_dir(target: str) -> str:
    """Folder name of a target's binaries: 'cuda:90' -> 'cuda_90'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", target)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file the compiler just wrote (the build side; loads go through `read_file`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_path(root: Path, name: Any) -> tuple[str, ...]:
    """The components of `name`, a plain relative path inside the artifact folder (no '..', not absolute)."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or "\\" in name or "\0" in name:
        raise ArtifactError(f"{root}: manifest names a file outside the artifact or not a plain path: {name!r}")
    parts = tuple(name.split("/"))
    if any(part in ("", ".", "..") for part in parts):   # also refuses an absolute name (it starts with "")
        raise ArtifactError(f"{root}: manifest lists a file outside the artifact: {name!r}")
    return parts


def read_file(root: Path, name: str, max_bytes: int, *, size: Optional[int] = None,
              sha256: Optional[str] = None) -> bytes:
    """The bytes of `root/name`, which must be a regular file reached without symbolic links, at most
    `max_bytes` long (exactly `size` when given) and, when given, matching `sha256`: the bytes checked are
    the bytes returned. Opened non-blocking, so a FIFO or device fails at fstat instead of hanging."""
    parts = artifact_path(root, name)
    fd = _open_inside(root, parts)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactError(f"{root}: {name} is not a regular file (it is a {_file_kind(info.st_mode)})")
        if size is not None and info.st_size != size:
            raise ArtifactError(f"{root}: {name} has {info.st_size} bytes, the manifest says {size} "
                                "(truncated or modified)")
        if info.st_size > max_bytes:
            raise ArtifactError(f"{root}: {name} has {info.st_size} bytes, more than the {max_bytes} allowed")
        data = _read_exactly(fd, info.st_size, root, name)
    except MemoryError:
        raise ArtifactError(f"{root}: {name} ({info.st_size} bytes) does not fit in memory") from None
    finally:
        os.close(fd)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ArtifactError(f"{root}: {name} does not match its SHA-256 in the manifest (modified)")
    return data


def _open_inside(root: Path, parts: tuple[str, ...]) -> int:
    """A read-only descriptor of root/parts..., refusing a symbolic link at every component."""
    name = "/".join(parts)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise ArtifactError(f"{root} is not a sparsecc artifact: cannot open the folder ({err.strerror})") from None
    try:
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            child = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError as err:
        os.close(fd)
        raise _open_error(root, name, err) from None
    return fd


def _open_error(root: Path, name: str, err: OSError) -> ArtifactError:
    if err.errno == errno.ENOENT:
        return ArtifactError(f"{root}: {name} is missing")
    if err.errno in (errno.ELOOP, errno.ENOTDIR):
        return ArtifactError(f"{root}: {name} is (or lies under) a symbolic link or not a plain path; "
                             "an artifact holds regular files only")
    return ArtifactError(f"{root}: cannot open {name}: {err.strerror}")


def _read_exactly(fd: int, size: int, root: Path, name: str) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 24))
        if not chunk:
            raise ArtifactError(f"{root}: {name} ended after {size - left} of {size} bytes (changed while loading)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISDIR: "folder", stat.S_ISFIFO: "FIFO", stat.S_ISCHR: "character device",
             stat.S_ISBLK: "block device", stat.S_ISSOCK: "socket"}
    return next((kind for test, kind in kinds.items() if test(mode)), "special file")


def read_optional(root: Path, name: str, max_bytes: int) -> Optional[bytes]:
    """`read_file`, or None when nothing of that name exists (a symbolic link or FIFO is still refused)."""
    try:
        os.lstat(root / name)
    except FileNotFoundError:
        return None
    return read_file(root, name, max_bytes)


@contextmanager
def malformed(root: Path, what: str = MANIFEST):
    """Turns the errors a wrong-typed or missing manifest field raises into ArtifactError."""
    try:
        yield
    except (ArtifactError, RuntimeProgramError, InputMismatchError):
        raise
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, RecursionError) as err:
        raise ArtifactError(f"{root}: malformed {what} ({type(err).__name__}: {err})") from None


def read_manifest(root: Union[str, Path], trusted_keys: Optional[Iterable[TrustedKey]] = None) -> dict[str, Any]:
    """The manifest, after checking its signature (when `trusted_keys` are given, before anything is
    parsed), its own hash, the format name and the format version."""
    root = Path(root)
    if not os.path.lexists(root / MANIFEST):
        raise ArtifactError(f"{root} is not a sparsecc artifact: {MANIFEST} is missing")
    text = read_file(root, MANIFEST, MAX_MANIFEST_BYTES)   # signed, hashed and parsed from the same bytes
    if trusted_keys is not None:
        verify_manifest(text, read_optional(root, SIGNATURE_FILE, MAX_SMALL_FILE_BYTES), trusted_keys)
    expected = read_file(root, MANIFEST_HASH, MAX_SMALL_FILE_BYTES).decode("ascii", "replace").split()
    if not expected:
        raise ArtifactError(f"{root}: {MANIFEST_HASH} is empty; the manifest cannot be checked")
    if hashlib.sha256(text).hexdigest() != expected[0]:
        raise ArtifactError(f"{root}: {MANIFEST} does not match {MANIFEST_HASH} (modified or truncated)")
    with malformed(root):
        manifest = json.loads(text)
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{root}: {MANIFEST} is not a {ARTIFACT_FORMAT} manifest")
    if manifest.get("format_version") != ARTIFACT_VERSION:
        raise ArtifactError(f"{root}: artifact format version {manifest.get('format_version')!r} is not supported "
                            f"by this runtime (it reads version {ARTIFACT_VERSION}); rebuild the artifact")
    return manifest


def listed_files(root: Path, manifest: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """name -> (bytes, sha256) of every file the manifest lists, each name and entry checked; every
    file the manifest refers to (weights, kernel binaries) must be listed."""
    with malformed(root):
        files = {}
        for name, entry in manifest["files"].items():
            artifact_path(root, name)
            size, digest = entry["bytes"], entry["sha256"]
            if type(size) is not int or size < 0 or not isinstance(digest, str):
                raise ArtifactError(f"{root}: malformed manifest entry for {name!r}: {entry!r}")
            files[name] = (size, digest)
        referenced = [weights_name(manifest), *rank_files(manifest)] + [b["file"] for b in kernel_binaries(manifest)]
    unlisted = [str(f) for f in referenced if f not in files]
    if unlisted:
        raise ArtifactError(f"{root}: the manifest refers to files without a hash: {', '.join(unlisted)}")
    return files


def weights_name(manifest: dict[str, Any]) -> str:
    return manifest.get("weights", WEIGHTS)


def rank_files(manifest: dict[str, Any]) -> list[str]:
    """The per-rank expert files of an expert-parallel artifact, rank order (`runtime/expert_shards.py`);
    none for a one-process artifact."""
    section = manifest.get("expert_parallel")
    if section is None:
        return []
    files, world_size = section["files"], section["world_size"]
    if type(world_size) is not int or not isinstance(files, list) or len(files) != world_size \
            or not all(isinstance(f, str) for f in files):
        raise ArtifactError(f"malformed expert_parallel section in the manifest: {section!r}")
    return files


def kernel_binaries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every binary the manifest names: Triton kernels per GPU target, generated CPU kernels per named CPU."""
    kernels = [*manifest.get("kernels", []), *manifest.get("cpu_kernels", [])]
    return [binary for kernel in kernels for binary in kernel["binaries"].values()]


def file_limit(manifest: dict[str, Any], name: str, size: int) -> int:
    """The most bytes `name` may have: the weights their listed size (and no more than this machine's
    memory: a sparse file costs an attacker nothing), anything else a kernel binary's limit."""
    weights = name == weights_name(manifest) or name in rank_files(manifest)
    return min(size, physical_memory()) if weights else MAX_KERNEL_BYTES


def physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def verify_files(root: Union[str, Path], manifest: dict[str, Any], skip: Iterable[str] = ()) -> None:
    """Every file the manifest lists is a regular file inside the folder with its size and SHA-256
    (except `skip`: files the caller reads itself through `read_checked`)."""
    root = Path(root)
    for name, (size, digest) in listed_files(root, manifest).items():
        if name not in skip:
            read_file(root, name, file_limit(manifest, name, size), size=size, sha256=digest)


def read_checked(root: Path, name: str, manifest: dict[str, Any]) -> bytes:
    """The bytes of listed file `name`, checked against the manifest's size and SHA-256 for it: what was
    checked is what gets used."""
    files = listed_files(root, manifest)
    if name not in files:
        raise ArtifactError(f"{root}: {name!r} is not listed in the manifest")
    size, digest = files[name]
    return read_file(root, name, file_limit(manifest, name, size), size=size, sha256=digest)


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
        if "cpu" in targets or any(str(t).startswith("cpu:") for t in targets):   # cpu:x86-64-v4: 'cpu' + objects
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

