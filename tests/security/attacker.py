"""The attacker's toolkit: a real saved artifact, and edits to it with every hash recomputed.

The attacker can write the artifact folder. Hashes in the manifest are unkeyed, so after any
edit they recompute them exactly as `compiler/artifact_writer.py` does (the files table, then
`manifest.sha256`); only a signature checked against a trusted key would notice. The pristine
artifact is compiled once per process from `examples/tiny_moe.py` (small sizes) with every
sparse rewrite: N:M weights (nm_linear, nm_decompress), MoE dispatch, mask-derived block
attention and token routing (route, route_gather, unroute).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from sparsecc.runtime.artifact import MANIFEST, MANIFEST_HASH, WEIGHTS

ROOT = Path(__file__).resolve().parents[2]
SPARSITY = {"moe": "dispatch", "attention": {"policy": "mask", "block": 64}, "weights": "2:4",
            "tokens": {"capacity": 0.5, "layers": ["*"]}}
BATCH, SEQ, VOCAB = 2, 128, 64
INPUTS, REFERENCE = "inputs.safetensors", "reference.safetensors"


@dataclass(frozen=True)
class Pristine:
    """A saved artifact that loads and runs, the inputs to call it with and what it returns."""
    folder: Path
    inputs: Path       # safetensors: "0", "1", ... the flat positional tensor inputs
    reference: Path    # safetensors: "0", ... the flat outputs of the intact artifact

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.folder / MANIFEST).read_text())


_PRISTINE: list[Pristine] = []


def pristine_artifact() -> Pristine:
    """Compiled and saved once per process (about 5 s), in a temporary folder removed at exit."""
    if not _PRISTINE:
        base = Path(tempfile.mkdtemp(prefix="sparsecc-attack-"))
        atexit.register(shutil.rmtree, base, True)
        _PRISTINE.append(build_pristine(base))
    return _PRISTINE[0]


def build_pristine(base: Path) -> Pristine:
    import sparsecc
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from examples.tiny_moe import TinyMoE
    torch.manual_seed(0)
    model = TinyMoE(vocab=VOCAB, dim=32, heads=2, hidden=64, layers=1, experts=4, top_k=2).eval()
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    compiled = sparsecc.compile(model, (tokens,), sparsity=SPARSITY, check=False)
    folder = base / "pristine"
    compiled.save(folder, targets=["cpu"])
    save_file({"0": tokens}, str(base / INPUTS))
    save_file({"0": compiled(tokens).contiguous()}, str(base / REFERENCE))
    return Pristine(folder, base / INPUTS, base / REFERENCE)


def copy_artifact(pristine: Pristine, dest: Path) -> Path:
    """A private copy to attack."""
    return Path(shutil.copytree(pristine.folder, dest))


def rehash(root: Path, manifest: dict[str, Any] | None = None) -> None:
    """Recompute every listed regular file's size and SHA-256, then the manifest's own hash."""
    if manifest is None:
        manifest = json.loads((root / MANIFEST).read_text())
    for name, entry in manifest.get("files", {}).items():
        path = root / name
        if isinstance(entry, dict) and path.is_file() and not path.is_symlink():
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            entry["bytes"] = path.stat().st_size
    write_manifest_text(root, json.dumps(manifest, indent=1).encode())


def write_manifest_text(root: Path, text: bytes) -> None:
    """The manifest bytes as given, and a matching manifest.sha256."""
    (root / MANIFEST).write_bytes(text)
    (root / MANIFEST_HASH).write_text(hashlib.sha256(text).hexdigest() + "  " + MANIFEST + "\n")


def rewrite_manifest(root: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """`edit` mutates the manifest dict in place; every hash is then recomputed."""
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    rehash(root, manifest)


def rewrite_program(root: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    rewrite_manifest(root, lambda manifest: edit(manifest["program"]))


def replace_file(root: Path, name: str, data: bytes) -> None:
    """Write `name` (listing it in the files table if new) and rehash."""
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
    rewrite_manifest(root, lambda m: m.setdefault("files", {}).setdefault(name, {"sha256": "", "bytes": 0}))


def rewrite_weights(root: Path, edit: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    """`edit` mutates the name -> tensor dict of the weights file; the file is rewritten and rehashed."""
    weights = load_file(str(root / WEIGHTS))
    edit(weights)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(root / WEIGHTS))
    rehash(root)


def add_constants(root: Path, tensors: dict[str, torch.Tensor]) -> None:
    """New constants in the weights file, listed in the program's constant_names."""
    rewrite_weights(root, lambda weights: weights.update(tensors))
    rewrite_program(root, lambda p: p["constant_names"].extend(tensors))


def instruction(op: str, args: list, outputs: list[int], kwargs: dict | None = None, unpack: bool = False) -> dict:
    return {"op": op, "args": args, "kwargs": kwargs or {}, "outputs": outputs, "unpack": unpack, "name": "attack"}


def append_and_return(program: dict[str, Any], make: Callable[[int], list[dict]]) -> None:
    """Append the instructions `make(first_free_register)` builds; the program then returns the
    last one's first output (a single tensor, so the out_spec still fits)."""
    first = program["num_registers"]
    extra = make(first)
    program["instructions"].extend(extra)
    program["num_registers"] = max([first] + [r + 1 for i in extra for r in i["outputs"]])
    program["outputs"] = [{"r": extra[-1]["outputs"][0]}]


def find(program: dict[str, Any], op: str) -> dict[str, Any]:
    """The first instruction calling `op` (the attacks edit the real program's own instructions)."""
    return next(i for i in program["instructions"] if i["op"] == op)


def plant_payload(folder: Path, marker: Path) -> None:
    """payload.py: imported by anything that resolves the name `payload`; it leaves `marker` behind."""
    (folder / "payload.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('payload.py was imported')\n"
        "class Evil:\n    A = 1\n")
