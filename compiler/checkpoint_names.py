"""The model's parameter names against a checkpoint's tensor names, where transformers converts them on load.

transformers 5 stacks MoE experts into one parameter per projection while checkpoints keep one tensor per
expert (its `conversion_mapping`): Mixtral's `block_sparse_moe.experts.<e>.w1.weight` and `.w3.weight`
become `mlp.experts.gate_up_proj` [E, 2I, H] (stacked over experts, w1 rows then w3 rows), `w2` becomes
`mlp.experts.down_proj` [E, H, I]; Qwen2/3-MoE and OLMoE do the same with gate/up/down_proj. `Stacked`
builds such a parameter from its checkpoint tensors and splits a tensor of its layout back into them, so
prune_checkpoint reads and writes the checkpoint's own names. Only renames and the stack-then-concatenate
conversion are understood; a checkpoint needing another conversion is refused with its name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .errors import ConfigError


@dataclass
class Stacked:
    """A parameter [E, rows, ...] whose expert e is cat(parts[0][e], parts[1][e], ...) along rows."""
    name: str
    parts: list[list[str]]   # [source pattern][expert] -> checkpoint tensor name

    def build(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        experts = zip(*self.parts)
        return torch.stack([torch.cat([read(name) for name in names]) for names in experts])

    def split(self, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, its rows) of `tensor`, which has this parameter's [E, rows, ...] layout."""
        per_part = tensor.shape[1] // len(self.parts)
        for j, names in enumerate(self.parts):
            for e, name in enumerate(names):
                yield name, tensor[e, j * per_part:(j + 1) * per_part]


def parameter_names(model_type: str, names: list[str]) -> tuple[dict[str, str], dict[str, Stacked]]:
    """For the checkpoint tensors `names` of a `model_type` model: (parameter name -> the checkpoint name it was
    renamed from, where they differ; parameter name -> Stacked, where transformers stacks tensors into it).
    Names are renamed by transformers' own conversions (`rename_source_key`), in their order."""
    from transformers.conversion_mapping import WeightConverter, WeightRenaming, get_checkpoint_conversion_mapping

    conversions = get_checkpoint_conversion_mapping(model_type) or []
    for conversion in conversions:
        _check_readable(conversion, model_type, WeightRenaming, WeightConverter)
    renamed: dict[str, str] = {}
    found: dict[str, list[dict[int, str]]] = {}   # parameter -> per source pattern: expert -> checkpoint name
    for name in names:
        key = name
        for conversion in conversions:
            before = key
            key, pattern = conversion.rename_source_key(key)
            if pattern is not None and isinstance(conversion, WeightConverter):
                expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), before)
                by_pattern = found.setdefault(key, [{} for _ in conversion.source_patterns])
                by_pattern[conversion.source_patterns.index(pattern)][_expert_index(expert, name, pattern)] = name
                break
        else:
            if key != name:
                renamed[key] = name
    return renamed, {param: _stacked(param, by_pattern) for param, by_pattern in found.items()}


_STACKING = (["MergeModulelist"], ["MergeModulelist", "Concatenate"])


def _check_readable(conversion, model_type: str, renaming: type, converter: type) -> None:
    """Refuse a conversion other than a rename or stacking experts (then concatenating their projections)."""
    if isinstance(conversion, renaming):
        return
    ops = [type(op).__name__ for op in getattr(conversion, "operations", [])]
    if not isinstance(conversion, converter) or ops not in _STACKING or \
            [getattr(op, "dim", 0) for op in conversion.operations] != [0, 1][:len(ops)]:
        raise ConfigError(f"prune_checkpoint: {model_type} checkpoints convert {conversion.source_patterns} with "
                          f"{type(conversion).__name__} {ops}, which prune_checkpoint does not read (it reads "
                          "renames, and experts stacked along dim 0, then concatenated along dim 1)")


def _expert_index(hit, name: str, pattern: str) -> int:
    if hit is None:
        raise ConfigError(f"prune_checkpoint: checkpoint tensor {name} matches {pattern} without an expert number")
    return int(hit[1])


def _stacked(param: str, by_pattern: list[dict[int, str]]) -> Stacked:
    """The Stacked parameter from its checkpoint names by source pattern and expert; refused when incomplete."""
    experts = [sorted(names) for names in by_pattern]
    if any(not e or e != list(range(len(experts[0]))) for e in experts):
        raise ConfigError(f"prune_checkpoint: the checkpoint's experts of {param} are incomplete "
                          f"({[len(e) for e in experts]} per projection, numbered from 0)")
    return Stacked(param, [[names[e] for e in sorted(names)] for names in by_pattern])
