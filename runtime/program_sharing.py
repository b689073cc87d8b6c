"""Two programs of one model made to share memory: the decode program's state tensors use the prefill
program's storage (one KV cache), and its weights equal to a prefill weight use that weight's storage.

State is paired by name: both programs are captured from one step module, so their state names are the
same; a pair that differs in name, count, dtype or shape is refused. Storage is shared in place
(`Tensor.set_`), so executors already holding the tensors see it. A name that is state in either program
is never shared as a weight: a weight must not alias what a program writes.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .errors import ArtifactError
from .loaded import LoadedModel


def share_programs(prefill: Any, decode: Any, what: str) -> None:
    """One KV cache and one copy of each weight for the two programs (CompiledModels or LoadedModels)."""
    prefill_state, decode_state = list(prefill.program.state_names), list(decode.program.state_names)
    if prefill_state != decode_state:
        raise ArtifactError(f"{what}: the decode program's state {decode_state[:4]}... is not the prefill program's "
                            f"{prefill_state[:4]}... (the two programs are not of one generator)")
    moved: dict[int, torch.Tensor] = {}   # a decode storage given up -> the prefill tensor now used instead
    with torch.no_grad():
        for name in prefill_state:
            src, dst = prefill.constants[name], decode.constants[name]
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ArtifactError(f"{what}: state {name!r} is {dst.dtype} {list(dst.shape)} in decode but "
                                    f"{src.dtype} {list(src.shape)} in prefill")
            moved[dst.untyped_storage().data_ptr()] = src
            dst.set_(src)
    share_weights(prefill.constants, decode.constants, set(prefill_state), moved)
    for gm in getattr(decode, "graph_modules", lambda: [])():   # a CompiledModel's graphs read them too
        _repoint(gm, moved)
    if isinstance(decode, LoadedModel):
        decode.storages_changed()


def share_weights(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], state: set[str],
                  moved: Optional[dict[int, torch.Tensor]] = None) -> int:
    """Target constants equal (name, dtype, shape, values) to a source constant use its storage; returns
    how many. Equality is checked on the values, so a differing constant keeps its own storage. `moved`
    collects {the target's old storage: the source tensor} of each."""
    shared = 0
    with torch.no_grad():
        for name, tensor in target.items():
            src = source.get(name)
            if name in state or src is None or src is tensor or src.dtype != tensor.dtype or src.shape != tensor.shape:
                continue
            if src.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() or torch.equal(src, tensor):
                if moved is not None:
                    moved[tensor.untyped_storage().data_ptr()] = src
                tensor.set_(src)
                shared += 1
    return shared


def _repoint(gm: torch.nn.Module, moved: dict[int, torch.Tensor]) -> None:
    """Every tensor of `gm` on a storage in `moved` takes the replacing tensor's storage (same offset, sizes
    and strides: the storages hold equal values): else the graph keeps the given-up copy alive."""
    tensors = [t for _, t in gm.named_parameters()] + [t for _, t in gm.named_buffers()]
    graph = getattr(gm, "graph", None)
    read = [_attr(gm, node.target) for node in (graph.nodes if graph is not None else ()) if node.op == "get_attr"]
    tensors += [t for t in read if isinstance(t, torch.Tensor)]   # constants kept as plain attributes
    with torch.no_grad():
        for t in tensors:
            src = moved.get(t.untyped_storage().data_ptr())
            if src is not None and src.untyped_storage().nbytes() == t.untyped_storage().nbytes():
                t.set_(src.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _attr(module: torch.nn.Module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value
