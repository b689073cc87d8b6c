"""An artifact's N:M weights replaced at load by a pruned checkpoint's compressed tensors.

`sparsecc.prune_checkpoint` writes `out_dir/sparsecc_nm/` (index.json + safetensors files:
"<weight>.values", "<weight>.indices", documented in docs/scale.md). An artifact saved from a
compiled model records, for each N:M constant, the model weight it compresses (manifest
"nm_sources": {constant: {"weight", "part"}}). `sparsecc.runtime.load(artifact, compressed=out_dir)`
then takes those constants from the checkpoint instead of the artifact's weights file: the same
program with another pruning of the same model (another method, calibration or release), no rebuild.
Each tensor must have the artifact constant's dtype and shape (so no kernel reads past it); its
packed positions are checked by nm_linear before first use, as for any weight.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

import torch

from .artifact import artifact_path
from .errors import ArtifactError

COMPRESSED_DIR = "sparsecc_nm"
COMPRESSED_FORMAT = "sparsecc-nm"
MAX_INDEX_BYTES = 64 << 20
PARTS = ("values", "indices")


def checkpoint_constants(folder: Union[str, Path], manifest: dict[str, Any],
                         constants: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{constant: tensor from the checkpoint} for every N:M constant the artifact records a source for."""
    sources = manifest.get("nm_sources")
    if not isinstance(sources, dict) or not sources:
        raise ArtifactError("compressed=: this artifact records no N:M weight sources (its N:M weights include "
                            "stacked MoE experts, it has none, or it was saved by an older sparsecc)")
    root, index = _index(Path(folder))
    taken: dict[str, torch.Tensor] = {}
    for constant, source in sources.items():
        weight, part = _source(constant, source, constants)
        entry = index["weights"].get(weight)
        if not isinstance(entry, dict):
            raise ArtifactError(f"compressed=: the checkpoint {root} holds no weight '{weight}' (constant {constant})")
        tensor = _read(root, entry.get("file"), f"{weight}.{part}")
        want = constants[constant]
        if tensor.dtype != want.dtype or tensor.shape != want.shape:
            raise ArtifactError(f"compressed=: '{weight}.{part}' is {tensor.dtype} {list(tensor.shape)}, the artifact's "
                                f"{constant} is {want.dtype} {list(want.shape)} (another model or N:M pattern)")
        taken[constant] = tensor.to(want.device)
    return taken


def _index(root: Path) -> tuple[Path, dict[str, Any]]:
    root = root / COMPRESSED_DIR if (root / COMPRESSED_DIR).is_dir() else root
    path = root / "index.json"
    if not path.is_file() or path.stat().st_size > MAX_INDEX_BYTES:
        raise ArtifactError(f"compressed=: {root} has no index.json (not written by sparsecc.prune_checkpoint)")
    try:
        index = json.loads(path.read_text())
    except ValueError as err:
        raise ArtifactError(f"compressed=: {path} is not JSON: {err}") from None
    if not isinstance(index, dict) or index.get("format") != COMPRESSED_FORMAT or not isinstance(index.get("weights"), dict):
        raise ArtifactError(f"compressed=: {path} is not in the {COMPRESSED_FORMAT} format")
    return root, index


def _source(constant: str, source: Any, constants: dict[str, torch.Tensor]) -> tuple[str, str]:
    if (constant not in constants or not isinstance(source, dict) or not isinstance(source.get("weight"), str)
            or source.get("part") not in PARTS):
        raise ArtifactError(f"nm_sources: entry {constant!r} must name a constant, a weight and a part {PARTS}")
    return source["weight"], source["part"]


def _read(root: Path, file: Any, name: str) -> torch.Tensor:
    """Tensor `name` of a safetensors file directly inside `root` (the index is downloaded data)."""
    from safetensors import SafetensorError, safe_open
    if len(artifact_path(root, file)) != 1:   # the artifact's own rule for names read from data
        raise ArtifactError(f"compressed=: the index names the file {file!r}, not a plain file name in {root}")
    try:
        with safe_open(str(root / file), "pt") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"compressed=: cannot read '{name}' from {root / file}: {err}") from None
