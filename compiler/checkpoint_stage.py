"""Prune one stage of a checkpoint (a decoder layer, or the head) with prune-nm's own code.

The stage module is captured as `compile` captures a model (capture_calibrated, then
prepare_for_passes), moe-dispatch runs as in `compile` (experts become sparsecc::moe's stacked
weights, mapped back to the checkpoint's per-expert tensors once pruned), prune-nm's rules pick
the weights they would rewrite (NMRules.targets: linear forms, K divisible by M, include/exclude,
not tied), and the method chooses the kept N of every M:
magnitude directly, Wanda and SparseGPT through prune_calibrated, which runs the captured graph
over the stage's input batches layer by layer, exactly as the whole-model pass does. The stage's
outputs (the next stage's inputs) are then computed by the captured graph with the pruned weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from sparsecc.passes import MoEDispatch, PassContext, PassManager, PruneNM
from sparsecc.passes.fake import resolve_attr
from sparsecc.passes.nm.methods import magnitude_prune, prune_calibrated
from sparsecc.passes.nm.prune import NMRules
from sparsecc.runtime.nm_format import compress_nm

from .calibrate import capture_calibrated
from .checkpoint_io import CheckpointFiles
from .checkpoint_layers import free_weights
from .errors import ConfigError
from .library_ops import prepare_for_passes
from .reference import parameters_of


ROW_BLOCK_WEIGHTS = 1 << 22   # weights per row block when masking and compressing (16 MB in fp32)


@dataclass
class StageResult:
    """A stage's compressed tensors and its outputs (its pruned dense weights went to the sink)."""
    compressed: dict[str, list[Tensor]] = field(default_factory=dict)   # "<name>.values" -> row-block pieces
    entries: dict[str, dict] = field(default_factory=dict)              # name -> {"shape", "in_features"}
    outputs: Optional[list[Tensor]] = None                              # one per input batch

    def add(self, name: str, values: Tensor, indices: Tensor, k: int) -> int:
        """Record one weight's compressed tensors, or a further row block of it; returns its first row."""
        first_row = self.entries[name]["shape"][0] if name in self.entries else 0
        self.compressed.setdefault(f"{name}.values", []).append(values)
        self.compressed.setdefault(f"{name}.indices", []).append(indices)
        self.entries[name] = {"shape": [first_row + values.shape[0], *values.shape[1:-1], k], "in_features": k}
        return first_row

    def joined(self) -> dict[str, Tensor]:
        return {key: pieces[0] if len(pieces) == 1 else torch.cat(pieces) for key, pieces in self.compressed.items()}


# (checkpoint name, first row, pruned tensor in the stored layout): writes it to the output shard
Sink = Callable[[str, int, Tensor], None]


class StagePruner:
    """prune-nm's options for every stage of one prune_checkpoint run."""

    def __init__(self, n: int, m: int, method: str, exclude: tuple[str, ...]):
        self.options = PruneNM(n=n, m=m, method=method, exclude=exclude)   # validates n:m and the method
        self.n, self.m, self.method, self.exclude = n, m, method, exclude

    def prune(self, stage: nn.Module, inputs: list[tuple], outputs: bool, names: dict[str, str],
              sink: Sink, files: CheckpointFiles) -> StageResult:
        """Prune `stage` (its parameters named as the model names them, or renamed by `names`: row blocks of one
        tensor) from its input batches, giving each pruned weight to `sink` under its name in `files` as soon as
        it is chosen; the stage's dense weights are released once pruned."""
        captured, batches = capture_calibrated(stage, inputs[0], None, None, inputs)
        gm = prepare_for_passes(captured.gm)
        del captured   # its dense reference holds the dense weights
        ctx = PassContext(example_inputs=batches[0], calibration=batches)
        gm = PassManager([MoEDispatch()], verify=False).run(gm, ctx)   # as compile: experts pruned in sparsecc::moe
        sources = {name: source for record in ctx.records for name, source in record.details.get("sources", {}).items()}
        targets = NMRules(self.options, gm, ctx).targets()
        pruned = {} if self.method == "magnitude" else prune_calibrated(self.options, gm, ctx, targets, {})[0]
        result, done = StageResult(), set()
        for target in targets:
            weight = target.weight.target
            if weight in done:   # a weight several targets share: pruned at its first
                continue
            done.add(weight)
            if self.method == "magnitude":
                pruned[weight] = _by_rows(lambda w: magnitude_prune(w, self.n, self.m),
                                          target.to_matrix(resolve_attr(gm, weight)))
            matrix, mask = pruned.pop(weight)
            pieces = _checkpoint_tensors(target, matrix, mask, sources.get(weight), names, files)
            for name, piece, kept, layout in pieces:
                values, indices = _by_rows(lambda w, k: compress_nm(w, self.n, self.m, mask=k), piece, kept)
                sink(name, result.add(name, values, indices, piece.shape[-1]), layout)
            stored = target.from_matrix(matrix)
            # the graph runs on with the pruned weight (or none, when no output is wanted): the dense one goes
            _set_attr(gm, weight, stored if outputs else stored.to("meta"))
            if weight not in sources:
                _set_attr(stage, weight, stored.to("meta"))
            del matrix, mask, stored
        free_weights(stage)
        if outputs:
            with torch.no_grad():   # as prune-nm's calibration runs it: an Interpreter over the flat placeholders
                result.outputs = [pytree.tree_leaves(torch.fx.Interpreter(gm).run(*b))[0] for b in batches]
        return result


def _checkpoint_tensors(target, matrix: Tensor, mask: Tensor, source, names: dict[str, str],
                        files: CheckpointFiles) -> list[tuple[str, Tensor, Tensor, Tensor]]:
    """(checkpoint name, pruned [.., out, K] matrix, its mask, the tensor in the stored layout) of each checkpoint
    tensor that `target`'s pruned weight holds: the weight itself (renamed as transformers renames it), or, for
    stacked experts moe-dispatch built from parameters as `source` says, each expert's own tensors."""
    if source is None:
        name = names.get(target.weight.target, target.weight.target)
        return [(files.renamed.get(name, name), matrix, mask, target.from_matrix(matrix))]
    return [(name, piece, kept, piece) for name, piece, kept in _expert_pieces(source, matrix, mask, files)]


def _expert_pieces(source, matrix: Tensor, mask: Tensor, files: CheckpointFiles) -> list[tuple[str, Tensor, Tensor]]:
    """(checkpoint name, pruned [out, K] matrix, mask) of each checkpoint tensor a stacked expert weight
    [E, out, K] was built from (`source`: moe-dispatch's provenance, through the parameters transformers stacks)."""
    if _transposed(source):
        raise ConfigError(f"prune_checkpoint: the experts {source} are stored transposed (K is not their last dim); "
                          "prune_checkpoint writes only experts stored [.., out, K]")
    weights, masks = parameters_of(source, matrix), parameters_of(source, mask)
    return [(name, piece, kept) for param in weights
            for (name, piece), (_, kept) in zip(files.stored_as(param, weights[param]),
                                                files.stored_as(param, masks[param]))]


def _transposed(source) -> bool:
    """Whether moe-dispatch's provenance `source` transposes a parameter on the way to the stacked weight."""
    if isinstance(source, str):
        return False
    parts = source["of"] if isinstance(source["of"], list) else [source["of"]]
    return "transpose" in source or any(_transposed(part) for part in parts)


def _by_rows(fn: Callable[..., tuple[Tensor, Tensor]], *tensors: Tensor) -> tuple[Tensor, Tensor]:
    """fn over blocks of rows of [..., K] tensors, results joined: the same as fn on the whole, as
    masking and compressing treat each row alone, with a block's temporaries instead of the matrix's."""
    lead, k = tensors[0].shape[:-1], tensors[0].shape[-1]
    rows = max(1, ROW_BLOCK_WEIGHTS // k)
    flat = [t.reshape(-1, k) for t in tensors]
    parts = [fn(*(t[start:start + rows] for t in flat)) for start in range(0, flat[0].shape[0], rows)]
    return tuple(torch.cat(p).reshape(*lead, -1) for p in zip(*parts))


def _set_attr(gm: torch.fx.GraphModule, name: str, tensor: Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    if isinstance(getattr(module, attr), nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=False)
    setattr(module, attr, tensor)
