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
    moved: dict[int, tuple] = {}   # a decode storage given up -> (its tensor's layout, the decode constant now)
    with torch.no_grad():
        for name in prefill_state:
            src, dst = prefill.constants[name], decode.constants[name]
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ArtifactError(f"{what}: state {name!r} is {dst.dtype} {list(dst.shape)} in decode but "
                                    f"{src.dtype} {list(src.shape)} in prefill")
            _note_move(moved, dst, src)
            dst.set_(src)
    share_weights(prefill.constants, decode.constants, set(prefill_state), moved)
    for gm in getattr(decode, "graph_modules", lambda: [])():   # a CompiledModel's graphs read them too
        _repoint(gm, moved)
    if isinstance(decode, LoadedModel):
        decode.storages_changed()


def share_weights(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], state: set[str],
                  moved: Optional[dict[int, tuple]] = None) -> int:
    """Target constants equal (name, dtype, shape, values) to a source constant use its storage; returns
    how many. Equality is checked on the values, so a differing constant keeps its own storage. `moved`
    collects the storages given up (_note_move)."""
    shared = 0
    with torch.no_grad():
        for name, tensor in target.items():
            src = source.get(name)
            if name in state or src is None or src is tensor or src.dtype != tensor.dtype or src.shape != tensor.shape:
                continue
            if src.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() or torch.equal(src, tensor):
                if moved is not None:
                    _note_move(moved, tensor, src)
                tensor.set_(src)
                shared += 1
    return shared


def _note_move(moved: dict[int, tuple], tensor: torch.Tensor, src: torch.Tensor) -> None:
    """Record that `tensor` gives up its storage for `src`'s: {old storage: (old layout, tensor)}. A storage
    another constant of the program also lives on (views) is marked ambiguous: nothing re-points to it."""
    old = tensor.untyped_storage().data_ptr()
    if old == 0 or old == src.untyped_storage().data_ptr():
        return
    layout = (tensor.dtype, tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
    moved[old] = None if old in moved else (layout, tensor)


def _repoint(gm: torch.nn.Module, moved: dict[int, tuple]) -> None:
    """The graph's constants (get_attr targets, not parameters) that were exactly a given-up decode constant
    (same storage and layout) become that constant, now on the shared storage: else the graph keeps the
    given-up copy alive. The attribute is replaced on its module; no tensor object is changed."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_name, _, name = node.target.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        value = getattr(owner, name, None)
        if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter):
            continue
        entry = moved.get(value.untyped_storage().data_ptr())
        layout = (value.dtype, value.storage_offset(), tuple(value.shape), value.stride())
        if entry is not None and entry[0] == layout:
            setattr(owner, name, entry[1])
