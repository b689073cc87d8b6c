"""A saved generator: DIR/generator.json marks it, DIR/prefill and DIR/decode are two artifacts.

    DIR/generator.json   {"format": "sparsecc-generator", "programs": ["prefill", "decode"]}  (a marker only)
    DIR/prefill/         an artifact whose manifest also holds "generator": GenerationSpec.to_dict()
    DIR/decode/          an artifact of the decode program (same weights, saved again)

What the generator needs (batch size, max_length, eos ...) is read from the prefill manifest, so it is
covered by that manifest's hash and signature; the marker file carries nothing to trust. On load the
decode program's state tensors are made to share the prefill program's storage (one KV cache), and its
weights equal to a prefill weight share that weight's storage (one copy in memory).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from .artifact import MAX_SMALL_FILE_BYTES, read_file, read_manifest
from .errors import ArtifactError
from .generation import GENERATOR_FILE, PROGRAM_DIRS, GenerationSpec, Generator, share_state
from .loaded import LoadedModel, load
from .signing import TrustedKey


def is_generator(path: Union[str, Path]) -> bool:
    return (Path(path) / GENERATOR_FILE).is_file()


class LoadedGenerator(Generator):
    """`generate(...)` like the compiled generator; `prefill` / `decode` are the two LoadedModels."""

    def __repr__(self) -> str:
        return (f"LoadedGenerator(batch_size={self.spec.batch_size}, max_length={self.spec.max_length}, "
                f"target={self.prefill.target!r})")


def load_any(path: Union[str, Path], device: Union[str, torch.device] = "cpu", **options: Any) -> Any:
    """`sparsecc.runtime.load`: a generator folder gives a LoadedGenerator, an artifact a LoadedModel."""
    return load_generator(path, device, **options) if is_generator(path) else load(path, device, **options)


def load_generator(path: Union[str, Path], device: Union[str, torch.device] = "cpu", *,
                   trusted_keys: Optional[Iterable[TrustedKey]] = None,
                   max_memory: Optional[int] = None) -> LoadedGenerator:
    root = Path(path)
    marker = _marker(root)
    if marker.get("programs") != list(PROGRAM_DIRS):
        raise ArtifactError(f"{root / GENERATOR_FILE}: expected programs {list(PROGRAM_DIRS)}")
    for name in PROGRAM_DIRS:
        if (root / name).is_symlink():
            raise ArtifactError(f"{root / name}: a symbolic link; a generator's programs are folders inside it")
    keys = list(trusted_keys) if trusted_keys is not None else None
    manifest = read_manifest(root / "prefill", keys)
    spec = GenerationSpec.from_dict(manifest.get("generator"))
    prefill = load(root / "prefill", device, trusted_keys=keys, max_memory=max_memory)
    decode = load(root / "decode", device, trusted_keys=keys, max_memory=max_memory)
    share_programs(prefill, decode, str(root))
    return LoadedGenerator(prefill, decode, spec)


def share_programs(prefill: Any, decode: Any, what: str) -> None:
    """One KV cache and one copy of each weight for two programs of one model (either kind of model)."""
    share_state(prefill.constants, prefill.program.state_names, decode.constants, decode.program.state_names, what)
    share_weights(prefill.constants, decode.constants, set(decode.program.state_names))
    if isinstance(decode, LoadedModel):
        decode.storages_changed()


def share_weights(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], state: set[str]) -> int:
    """Target constants equal (name, dtype, shape, values) to a source constant use its storage; returns
    how many. Equality is checked on the values, so a differing constant keeps its own storage."""
    shared = 0
    with torch.no_grad():
        for name, tensor in target.items():
            src = source.get(name)
            if name in state or src is None or src is tensor or src.dtype != tensor.dtype or src.shape != tensor.shape:
                continue
            if src.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() or torch.equal(src, tensor):
                tensor.set_(src)
                shared += 1
    return shared


def _marker(root: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_file(root, GENERATOR_FILE, MAX_SMALL_FILE_BYTES))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{root / GENERATOR_FILE}: not JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != "sparsecc-generator":
        raise ArtifactError(f"{root / GENERATOR_FILE}: not a sparsecc generator marker")
    return data
