"""What lets a killed `prune_checkpoint` run continue: its progress file and the saved hidden states.

    out_dir/.work/progress.json   {"key": hash of settings + calibration + input, "done": [stages],
                                   "copied": [shards copied to .partial], "finished": [shards renamed],
                                   "hidden": slot of the hidden states after the last done stage,
                                   "compressed": {weight: index entry}}
    out_dir/.work/hidden-<0|1>/batch-<i>.pt   the hidden states per calibration batch (torch.save)

Hidden states after stage k go to the slot stage k-1 did not use, and progress.json (written
atomically) points to the new slot only once all of them are on disk, so a kill at any point leaves
one complete set matching the recorded stages.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from .checkpoint_io import write_json_atomic
from .errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def parse_bytes(size: int | str | None) -> Optional[int]:
    """None, a byte count, or text such as '2GB' / '512 MB' (binary units)."""
    if size is None or isinstance(size, int):
        return size
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", str(size).upper())
    if not found:
        raise ConfigError(f"prune_checkpoint: max_memory must be a byte count or like '4GB', got {size!r}")
    return int(float(found[1]) * _UNITS[found[2] if found[2] != "K" else "KB"])


_M_MMAP_THRESHOLD = -3          # glibc mallopt parameter
_MMAP_THRESHOLD = 1 << 20       # blocks of >= 1 MB: their own mappings, unmapped when freed


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:   # not glibc: nothing to tune
        return None


def map_large_blocks() -> None:
    """Make glibc give every block of >= 1 MB its own mapping, returned to the system when freed. By default
    glibc raises that threshold to the largest block freed (up to 32 MB), so a stage's row-block
    temporaries land on the heap and its pages stay resident after they are freed."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim) between stages."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class ProgressState:
    """progress.json of one output directory; every change is written before the call returns."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @classmethod
    def open(cls, work: Path, key: str) -> "ProgressState":
        path = work / "progress.json"
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("key") != key:
                raise ConfigError(f"prune_checkpoint: {work.parent} holds an unfinished run with other settings, "
                                  "calibration or input; delete it or choose another out_dir")
            return cls(path, data)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        state = cls(path, {"key": key, "done": [], "copied": [], "finished": [], "hidden": None,
                           "compressed": {}})
        state.save()
        return state

    def save(self) -> None:
        write_json_atomic(self.data, self.path)

    @property
    def done(self) -> list[str]:
        return self.data["done"]

    @property
    def copied(self) -> list[str]:
        return self.data["copied"]

    @property
    def finished(self) -> list[str]:
        return self.data["finished"]

    @property
    def compressed(self) -> dict[str, dict]:
        return self.data["compressed"]

    def copy_done(self, shard: str) -> None:
        if shard not in self.copied:
            self.copied.append(shard)
            self.save()

    def finish_stage(self, stage: str, hidden_slot: Optional[int]) -> None:
        self.done.append(stage)
        if hidden_slot is not None:
            self.data["hidden"] = hidden_slot
        self.save()

    def shard_finished(self, shard: str) -> None:
        if shard not in self.finished:
            self.finished.append(shard)
            self.save()


class HiddenStore:
    """The hidden states between stages: saved after every stage; kept in memory up to `max_memory` bytes,
    beyond that read back memory-mapped."""

    def __init__(self, work: Path, max_memory: Optional[int], state: ProgressState):
        self.work, self.max_memory, self.state = work, max_memory, state
        self.on_disk = False

    def _dir(self, slot: int) -> Path:
        return self.work / f"hidden-{slot}"

    def save(self, hidden: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        """Write `hidden` to the free slot; returns the tensors to go on with and the slot to record."""
        slot = 1 - (self.state.data["hidden"] or 0) if self.state.data["hidden"] is not None else 0
        folder = self._dir(slot)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for index, tensor in enumerate(hidden):
            path = folder / f"batch-{index}.pt"
            torch.save(tensor.contiguous(), path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        total = sum(t.numel() * t.element_size() for t in hidden)
        if self.max_memory is not None and total > self.max_memory:
            self.on_disk = True
            return self._load(slot, len(hidden)), slot
        return hidden, slot

    def restore(self, count: int) -> list[torch.Tensor]:
        """The hidden states recorded in progress.json (a resumed run)."""
        slot = self.state.data["hidden"]
        if slot is None:
            raise ConfigError(f"prune_checkpoint: {self.work} records finished stages but no hidden states")
        hidden = self._load(slot, count)
        total = sum(t.numel() * t.element_size() for t in hidden)
        self.on_disk = self.max_memory is not None and total > self.max_memory
        return hidden if self.on_disk else [t.clone() for t in hidden]

    def _load(self, slot: int, count: int) -> list[torch.Tensor]:
        return [torch.load(self._dir(slot) / f"batch-{i}.pt", mmap=True, weights_only=True) for i in range(count)]
