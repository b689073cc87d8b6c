"""Reading a transformers checkpoint tensor by tensor, patching pruned tensors into its shards, and the
N:M-compressed tensors that `sparsecc.prune_checkpoint` writes beside the dense ones.

A checkpoint directory holds `config.json` and either one `model.safetensors` or shards listed by
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file). A safetensors file is
`u64 header length | JSON header | data`; the header maps each tensor to its dtype, shape and
`data_offsets` [begin, end) inside the data. Pruning keeps every name, dtype and shape, so a pruned
shard is the input shard with some byte ranges rewritten: `ShardPatch` copies the shard to
`<name>.partial`, writes pruned tensors at their offsets, and `finish` renames it (atomic).

The compressed tensors (`out_dir/sparsecc_nm/`) are runtime/nm_format.py's layout:

    sparsecc_nm/index.json        {"format": "sparsecc-nm", "version": 1, "n", "m", "method",
                                   "weights": {name: {"file", "shape", "in_features"}}}
    sparsecc_nm/<stage>.safetensors   "<name>.values"  [..., K*N/M]  the weight's dtype
                                      "<name>.indices" [..., ceil(K*N/M*bits/8)] uint8

`name` is the dense tensor's checkpoint name, `shape` its dense [..., out, K] matrix shape (rows are
output features, K the reduction dim). `load_compressed(path)` reads them back.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sparsecc.passes import PruneNM
from sparsecc.passes.nm.given import GivenNM
from sparsecc.runtime.artifact import artifact_path
from sparsecc.runtime.checkpoint_weights import COMPRESSED_DIR, COMPRESSED_FORMAT
from sparsecc.runtime.errors import ArtifactError
from sparsecc.runtime.nm_format import decompress_nm

from .checkpoint_names import parameter_names
from .errors import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def plain_file_name(name: object, where: str) -> str:
    """`name` when it names a file directly inside its folder (artifact_path's rules, one component), else
    ConfigError: a checkpoint's index is downloaded data, and its names decide where pruned shards are written."""
    try:
        parts = artifact_path(Path(where), name)
    except ArtifactError:
        parts = ()
    if len(parts) != 1:
        raise ConfigError(f"prune_checkpoint: {where} names the file {name!r}, which is not a plain file name "
                          "in the checkpoint folder")
    return name


class CheckpointFiles:
    """The tensors of a checkpoint directory and the shard each lives in, read one tensor at a time."""

    def __init__(self, model_dir: str | os.PathLike):
        self.root = Path(model_dir)
        if not (self.root / "config.json").is_file():
            raise ConfigError(f"prune_checkpoint: {self.root} has no config.json (not a transformers checkpoint)")
        if (self.root / INDEX_FILE).is_file():
            self.index = json.loads((self.root / INDEX_FILE).read_text())
            self.weight_map: dict[str, str] = dict(self.index["weight_map"])
        elif (self.root / SINGLE_FILE).is_file():
            self.index = None
            with safe_open(self.root / SINGLE_FILE, "pt") as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise ConfigError(f"prune_checkpoint: {self.root} has neither {INDEX_FILE} nor {SINGLE_FILE}")
        for shard in set(self.weight_map.values()):
            plain_file_name(shard, f"{self.root / INDEX_FILE}")
        self.shards = sorted(set(self.weight_map.values()))
        model_type = json.loads((self.root / "config.json").read_text()).get("model_type", "")
        self.renamed, self.stacked = parameter_names(model_type, list(self.weight_map))

    def holds(self, param: str) -> bool:
        """Whether the model's parameter `param` is in the checkpoint (under its name, renamed or stacked)."""
        return param in self.weight_map or param in self.renamed or param in self.stacked

    def read(self, name: str) -> torch.Tensor:
        """One tensor by the model's parameter name (built from the tensors transformers stacks into it),
        copied out of its shards (each shard is mapped only while it is read)."""
        if name in self.stacked:
            return self.stacked[name].build(self.read)
        name = self.renamed.get(name, name)
        with safe_open(self.root / self.weight_map[name], "pt") as f:
            return f.get_tensor(name)

    def stored_as(self, param: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor) pairs that hold `tensor`, which has parameter `param`'s layout."""
        if param in self.stacked:
            yield from self.stacked[param].split(tensor)
        else:
            yield self.renamed.get(param, param), tensor

    def with_prefix(self, prefix: str) -> list[str]:
        return [name for name in self.weight_map if name.startswith(prefix)]


def safetensors_layout(path: Path) -> tuple[int, dict[str, dict]]:
    """(byte offset of the data section, the header's tensor entries) of a safetensors file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


@dataclass
class ShardPatch:
    """An output shard under construction: a copy of the input shard at `<name>.partial`."""
    source: Path
    target: Path
    data_start: int = 0
    entries: dict[str, dict] = field(default_factory=dict)

    @property
    def partial(self) -> Path:
        return self.target.with_name(self.target.name + ".partial")

    def open(self, copy: bool) -> None:
        """Read the layout; with `copy`, (re)start the partial file as a copy of the input shard."""
        self.data_start, self.entries = safetensors_layout(self.source)
        if copy:
            shutil.copyfile(self.source, self.partial)

    def write(self, name: str, first_row: int, tensor: torch.Tensor) -> None:
        """Overwrite rows [first_row, first_row + len(tensor)) of tensor `name` in the partial shard
        (same dtype and row shape as the input's)."""
        begin, end = self.entries[name]["data_offsets"]
        rows = self.entries[name]["shape"][0] if self.entries[name]["shape"] else 1
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        row_bytes = (end - begin) // max(rows, 1)
        if data.nbytes % max(row_bytes, 1) or first_row * row_bytes + data.nbytes > end - begin:
            raise ValueError(f"prune_checkpoint: rows {first_row}.. of {name} ({data.nbytes} bytes) do not fit "
                             f"its shard slot of {end - begin} bytes")
        with open(self.partial, "r+b") as f:
            f.seek(self.data_start + begin + first_row * row_bytes)
            f.write(memoryview(data))   # no copy of the tensor's bytes
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        os.replace(self.partial, self.target)


def save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file under a temporary name, then rename it: never a half-written file."""
    temp = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(temp), metadata={"format": "pt"})
    with open(temp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temp, path)


def write_json_atomic(data: dict, path: Path) -> None:
    temp = path.with_name(path.name + ".partial")
    temp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(temp, path)


@dataclass
class CompressedCheckpoint:
    """N:M-compressed weights: name -> (values, indices) in runtime/nm_format.py's layout."""
    n: int
    m: int
    method: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    shapes: dict[str, list[int]]
    source: str = "(in memory)"    # the folder it was read from
    model_type: str = ""           # config.json's, beside the folder: how transformers renames and stacks names
    prefix: str = ""               # the model's attribute path inside the compiled module (a generator's step)

    def dense(self, name: str) -> torch.Tensor:
        """The pruned dense matrix [..., out, K] of weight `name`."""
        values, indices = self.weights[name]
        return decompress_nm(values, indices, self.n, self.m, self.shapes[name][-1])

    def given(self, passes: list) -> GivenNM:
        """These weights as the masks the request's prune-nm passes take (`compile(..., compressed=)`);
        ConfigError when the request prunes nothing or with another N:M or method than the checkpoint's."""
        runs = [p for p in passes if isinstance(p, PruneNM)]
        if not runs:
            raise ConfigError(f"compile: compressed={self.source} gives N:M weights, but the request prunes no "
                              "weights (ask for a weights section, e.g. sparsity='2:4')")
        given = GivenNM(self.n, self.m, self.method, *self._by_parameter(), self.source)
        problem = next(filter(None, (given.problem(run.n, run.m, run.method) for run in runs)), None)
        if problem:
            raise ConfigError(f"compile: {problem}")
        return given

    def _by_parameter(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, int]]:
        """(values, indices) and K by the model's parameter names: renamed, and per-expert tensors stacked as
        transformers stacks them (their rows are compressed independently, so the compressed tensors stack too)."""
        renamed, stacked = parameter_names(self.model_type, list(self.weights))
        param_of = {name: param for param, name in renamed.items()}
        consumed = {name for parts in stacked.values() for part in parts.parts for name in part}
        weights, k = {}, {}
        for name in set(self.weights) - consumed:
            weights[param_of.get(name, name)], k[param_of.get(name, name)] = self.weights[name], self.shapes[name][-1]
        for param, parts in stacked.items():
            weights[param] = tuple(parts.build(lambda name, i=i: self.weights[name][i]) for i in (0, 1))
            k[param] = self.shapes[parts.parts[0][0]][-1]
        return ({self.prefix + p: w for p, w in weights.items()}, {self.prefix + p: v for p, v in k.items()})

    def within(self, prefix: str) -> "CompressedCheckpoint":
        """These weights for a module that holds the checkpoint's model at attribute path `prefix`."""
        return dataclasses.replace(self, prefix=prefix)


def compressed_checkpoint(compressed) -> Optional[CompressedCheckpoint]:
    """None, a checkpoint folder or a CompressedCheckpoint, as `compile(..., compressed=)` takes it."""
    if compressed is None or isinstance(compressed, CompressedCheckpoint):
        return compressed
    if isinstance(compressed, (str, os.PathLike)):
        return load_compressed(compressed)
    raise ConfigError("compile: compressed= takes the folder sparsecc.prune_checkpoint wrote or "
                      f"sparsecc.load_compressed's result, got {type(compressed).__name__}")


def load_compressed(path: str | os.PathLike) -> CompressedCheckpoint:
    """The compressed tensors of a checkpoint `sparsecc.prune_checkpoint` wrote (its out_dir, or the
    sparsecc_nm folder inside it)."""
    root = Path(path)
    root = root / COMPRESSED_DIR if (root / COMPRESSED_DIR).is_dir() else root
    index_path = root / "index.json"
    if not index_path.is_file():
        raise ConfigError(f"load_compressed: {root} has no index.json (not written by sparsecc.prune_checkpoint)")
    index = json.loads(index_path.read_text())
    if index.get("format") != COMPRESSED_FORMAT:
        raise ConfigError(f"load_compressed: {index_path} is not in the {COMPRESSED_FORMAT} format")
    weights, shapes = {}, {}
    for name, entry in index["weights"].items():
        with safe_open(root / plain_file_name(entry["file"], str(index_path)), "pt") as f:
            weights[name] = (f.get_tensor(name + ".values"), f.get_tensor(name + ".indices"))
        shapes[name] = list(entry["shape"])
    config = root.parent / "config.json"   # the pruned checkpoint's, which names the model type
    model_type = json.loads(config.read_text()).get("model_type", "") if config.is_file() else ""
    return CompressedCheckpoint(index["n"], index["m"], index["method"], weights, shapes, str(path), model_type)


def given_masks(compressed, passes: list) -> Optional[GivenNM]:
    """What `compile(..., compressed=)` hands prune-nm: None, a checkpoint folder or a CompressedCheckpoint."""
    compressed = compressed_checkpoint(compressed)
    return None if compressed is None else compressed.given(passes)
