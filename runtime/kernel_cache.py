"""A content-addressed cache of compiled kernels, shared by every build on a machine.

    key   = sha256(kernel source, specialisation, target, triton version, entry format)
    entry = <root>/<key[:2]>/<key>/  holding  kernel.<cubin|hsaco|o>  and  metadata.json

An entry is written into a private temporary folder and renamed into place
(`os.replace`), so a reader sees a whole entry or none. When two processes
build the same kernel at once, one rename wins and the other process drops its
copy (both copies are valid). metadata.json records the binary's SHA-256; an
entry whose binary does not match is treated as absent and replaced.

Temporary folders are named `<root>/<key[:2]>/.tmp-<writer pid>-<host tag>-<random>`;
a lookup never sees them (keys are hex, never start with a dot). A writer killed
mid-write leaves one behind: opening the cache and every put remove those whose
writer (on this host: a cache on a shared disk has other hosts' pids) is dead,
or that are older than STALE_SECONDS (the pid may have been reused), so orphans
never pile up.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

BINARY_FILES = ("kernel.cubin", "kernel.hsaco", "kernel.o")   # .o: generated CPU kernels (kernels/cpu/mlir)
ENTRY_FORMAT = 2        # bump when the metadata an entry holds changes: older entries become misses
TMP_PREFIX = ".tmp-"
STALE_SECONDS = 3600    # a temp folder this old is an orphan even if its pid is alive (pids are reused)


def default_cache_dir() -> Path:
    explicit = os.environ.get("SPARSECC_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    if os.environ.get("SPARSECC_CACHE_DIR"):      # the root every sparsecc cache shares (tuning_cache.py)
        return Path(os.environ["SPARSECC_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsecc" / "kernels"


def cache_key(source_sha256: str, spec: dict[str, Any], target: str, triton_version: str) -> str:
    text = json.dumps({"source": source_sha256, "spec": spec, "target": target, "triton": triton_version,
                       "entry_format": ENTRY_FORMAT},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class CachedKernel:
    binary: bytes
    metadata: dict[str, Any]      # launch metadata: entry name, shared memory, warps, scratch, ...


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)              # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:          # alive, owned by another user
        return True
    except OSError:
        return False
    return True


def _is_orphan(tmp: Path, now: float) -> bool:
    """A temp folder whose writer is dead, or that is too old to still be written; every dot-folder of a
    shard is a temp folder (older versions named them `.<key prefix>-<random>`, without a pid)."""
    try:
        if now - tmp.lstat().st_mtime > STALE_SECONDS:
            return True
    except OSError:
        return False                 # already gone
    if not tmp.name.startswith(TMP_PREFIX):
        return False
    pid_text, host, *_ = tmp.name[len(TMP_PREFIX):].split("-") + [""]
    return host == _host_tag() and pid_text.isdigit() and not _writer_alive(int(pid_text))


def _host_tag() -> str:
    """Eight hex digits naming this host, so a pid is only checked where it means something."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix() -> str:
    """How this process's temp folders start: `.tmp-<pid>-<host tag>-`."""
    return f"{TMP_PREFIX}{os.getpid()}-{_host_tag()}-"


def remove_orphans(shard: Path) -> int:
    """Remove the orphaned temp folders of one `<root>/<key[:2]>` folder; returns how many."""
    now, removed = time.time(), 0
    try:
        candidates = [p for p in shard.iterdir() if p.name.startswith(".")]
    except OSError:
        return 0
    for tmp in candidates:
        if not _is_orphan(tmp, now):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed += 1
    return removed


class KernelCache:
    def __init__(self, root: Optional[os.PathLike] = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.clean()

    def clean(self) -> int:
        """Remove every orphaned temp folder a killed writer left; returns how many."""
        try:
            shards = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except OSError:
            return 0                 # no cache yet
        return sum(remove_orphans(shard) for shard in shards)

    def _entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> Optional[CachedKernel]:
        entry = self._entry(key)
        try:
            metadata = json.loads((entry / "metadata.json").read_text())
            if metadata["binary_file"] not in BINARY_FILES:  # never follow a path out of the entry
                return None
            binary = (entry / metadata["binary_file"]).read_bytes()
        except (OSError, ValueError, KeyError):
            return None
        if hashlib.sha256(binary).hexdigest() != metadata.get("binary_sha256"):
            return None
        return CachedKernel(binary, metadata)

    def put(self, key: str, binary: bytes, metadata: dict[str, Any], kind: str) -> CachedKernel:
        """Store atomically; returns the entry that ends up in the cache (ours or a concurrent writer's)."""
        metadata = {**metadata, "binary_file": f"kernel.{kind}", "binary_sha256": hashlib.sha256(binary).hexdigest()}
        entry = self._entry(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(entry.parent)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=entry.parent))
        try:
            (tmp / metadata["binary_file"]).write_bytes(binary)
            (tmp / "metadata.json").write_text(json.dumps(metadata, sort_keys=True, indent=1))
            self._publish(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.get(key) or CachedKernel(binary, metadata)

    def _publish(self, tmp: Path, entry: Path) -> None:
        if entry.exists() and not self._valid(entry):
            shutil.rmtree(entry, ignore_errors=True)      # a corrupt entry: replace it
        try:
            os.replace(tmp, entry)
        except OSError:
            if not entry.exists():                        # not a lost race: a real error
                raise

    def _valid(self, entry: Path) -> bool:
        return self.get(entry.name) is not None
