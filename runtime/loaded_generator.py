"""A saved generator: DIR/generator.json marks it, DIR/prefill and DIR/decode are two artifacts.

    DIR/generator.json   {"format": "sparsecc-generator", "programs": ["prefill", "decode"]}  (a marker only)
    DIR/prefill/         an artifact whose manifest also holds "generator": GenerationSpec.to_dict() and
                         "decode_manifest_sha256": the SHA-256 of DIR/decode/manifest.json
    DIR/decode/          an artifact of the decode program; the weights and the cache it shares with prefill are
                         not stored again (its manifest lists them as borrowed; taken from the prefill's at load)

What the generator needs (batch size, max_length, eos ...) and which decode program belongs to it are
read from the prefill manifest, so they are covered by that manifest's hash and signature; the marker
file carries nothing to trust. The spec must also describe both programs' inputs (check_programs). On load the
decode program's state tensors are made to share the prefill program's storage (one KV cache), and its
weights equal to a prefill weight share that weight's storage (one copy in memory).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from .artifact import MANIFEST, MAX_MANIFEST_BYTES, MAX_SMALL_FILE_BYTES, read_file, read_manifest
from .errors import ArtifactError
from .generation import GENERATOR_FILE, GENERATOR_FORMAT, PROGRAM_DIRS, GenerationSpec, Generator
from .loaded import load
from .program import Program
from .program_sharing import share_programs
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
    decode_hash = hashlib.sha256(read_file(root / "decode", MANIFEST, MAX_MANIFEST_BYTES)).hexdigest()
    if manifest.get("decode_manifest_sha256") != decode_hash:   # the prefill manifest (signed) names its decode
        raise ArtifactError(f"{root / 'decode'}: its manifest is not the one this generator was saved with")
    prefill = load(root / "prefill", device, trusted_keys=keys, max_memory=max_memory)
    # decode borrows the prefill's weights and cache; share_programs then checks the state names are one list
    decode = load(root / "decode", device, trusted_keys=keys, max_memory=max_memory, borrowed=prefill.constants)
    check_programs(spec, prefill.program, decode.program, str(root))
    share_programs(prefill, decode, str(root))
    return LoadedGenerator(prefill, decode, spec)


def check_programs(spec: GenerationSpec, prefill: Program, decode: Program, what: str) -> None:
    """The spec must describe the programs: (input_ids, attention_mask, cache_position) with the batch
    size and max_length it names, one token per decode step; else generate would fail (or allocate for
    a batch no program takes) only at its first call."""
    batch, length = spec.batch_size, spec.max_length
    for name, program, tokens in (("prefill", prefill, None), ("decode", decode, 1)):
        shapes = [list(s.shape) for s in program.input_specs]
        if len(shapes) != 3 or shapes[0][0] != batch or shapes[1] != [batch, length] or len(shapes[2]) != 1 \
                or (tokens is not None and (shapes[0][1] != tokens or shapes[2] != [tokens])):
            raise ArtifactError(f"{what}: the {name} program takes inputs {shapes}, not (input_ids [{batch}, S], "
                                f"attention_mask [{batch}, {length}], cache_position [S]) as its generator says")


def _marker(root: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_file(root, GENERATOR_FILE, MAX_SMALL_FILE_BYTES))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{root / GENERATOR_FILE}: not JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != GENERATOR_FORMAT:
        raise ArtifactError(f"{root / GENERATOR_FILE}: not a sparsecc generator marker")
    return data
