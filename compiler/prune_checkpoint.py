"""Prune a transformers checkpoint to N:M one decoder layer at a time, without loading the model.

    sparsecc.prune_checkpoint("llama-7b/", "llama-7b-2of4/", sparsity="2:4", method="wanda",
                              calibration=[ids0, ids1, ...])      # each a LongTensor [batch, seq]

Stages run in order: the decoder layers, then the head (final norm + lm_head, unless it is tied to
the embedding, which `compile` keeps dense). Each stage loads only its own tensors from the shards,
is captured like `compile` captures a model (moe-dispatch included), and is pruned by prune-nm's own code (nm/methods.py,
nm/layerwise.py) on the hidden states the pruned stages before it produced; so every weight equals
what `sparsecc.compile(model, sparsity=..., calibration=same batches)` prunes. The stage's pruned
weights are written into the output shards (copies of the input shards, patched in place, renamed
when complete) and, compressed, into `sparsecc_nm/` (format: compiler/checkpoint_io.py).

Resuming: `out_dir/.work/progress.json` records the finished stages and, after each one, the
hidden states are saved to `.work/hidden-<slot>/`, so a killed run restarts at the first stage not
finished and writes the same bytes. Hidden states stay in memory unless they exceed `max_memory`
bytes; then they are read back memory-mapped from those files.
"""
from __future__ import annotations

import gc
import hashlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
from tqdm import tqdm

from .checkpoint_io import COMPRESSED_DIR, COMPRESSED_FORMAT, CheckpointFiles, ShardPatch, \
    save_atomic, write_json_atomic
from .checkpoint_layers import HeadCall, LayerCall, catch_layer_inputs, decoder_stack, empty_model, \
    free_weights, load_weights
from .checkpoint_stage import StagePruner, StageResult
from .config import parse_pattern
from .errors import ConfigError
from .prune_state import HiddenStore, ProgressState, parse_bytes, release_free_memory


@dataclass
class PruneSummary:
    """What one prune_checkpoint call did."""
    out_dir: str
    method: str
    pattern: str
    stages: int
    resumed_at: int           # stages already finished when the call started
    weights: int              # weights pruned and compressed, over all stages
    hidden_on_disk: bool
    seconds: float

    def __str__(self) -> str:
        where = "memory-mapped from disk" if self.hidden_on_disk else "in memory"
        resumed = f", resumed after {self.resumed_at}" if self.resumed_at else ""
        return (f"pruned {self.weights} weights to {self.pattern} ({self.method}) in {self.stages} stages"
                f"{resumed}, hidden states {where}, {self.seconds:.1f} s -> {self.out_dir}")


def prune_checkpoint(model_dir: str, out_dir: str, sparsity: str = "2:4", method: str = "magnitude",
                     calibration: Optional[Iterable] = None, max_memory: int | str | None = None, *,
                     exclude: Iterable[str] = (), progress: bool = True) -> PruneSummary:
    """Prune the checkpoint in `model_dir` to `sparsity` ("N:M") with `method` and write it to `out_dir`."""
    start = time.perf_counter()
    source, target = Path(model_dir).resolve(), Path(out_dir).resolve()
    if source == target or source in target.parents or target in source.parents:
        raise ConfigError(f"prune_checkpoint: the output folder {out_dir} must be outside the checkpoint "
                          f"{model_dir} (and not contain it): pruning writes shards the run still reads")
    n, m = parse_pattern(sparsity)
    pruner = StagePruner(n, m, method, tuple(exclude))
    files = CheckpointFiles(model_dir)
    batches = _token_batches(calibration, method)
    out, model = Path(out_dir), empty_model(model_dir)
    stack_path, stack = decoder_stack(model)
    prefixes = _stage_prefixes(model, stack_path, len(stack), files, pruner)   # stage -> names it may rewrite
    stages = list(prefixes)
    state = ProgressState.open(out / ".work", _run_key(files, pruner, batches, sparsity))
    patches = _shard_patches(files, out, state)
    caught = _caught_inputs(model, stack_path, stack, files, batches)
    store = HiddenStore(out / ".work", parse_bytes(max_memory), state)
    unfinished = len(state.done) < len(stages)
    hidden = store.restore(len(batches)) if state.done and unfinished else [c.hidden for c in caught]
    resumed_at = len(state.done)
    bar = tqdm(stages, desc=f"prune {method} {sparsity}", unit="stage", file=sys.stderr, disable=not progress,
               initial=resumed_at, mininterval=0)
    for index, stage in enumerate(stages[resumed_at:], resumed_at):
        result = _run_stage(model, stage, stack, stack_path, files, caught, hidden, pruner,
                            sink=lambda name, row, tensor: patches[files.weight_map[name]].write(name, row, tensor))
        hidden = _record_stage(stage, result, out, state, store, last=index + 1 == len(stages)) or hidden
        _finish_shards(patches, files, prefixes, state)
        del result
        gc.collect()   # the stage's graph modules hold reference cycles
        release_free_memory()
        bar.update(1)
    bar.close()
    _finish_checkpoint(files, out, patches, state, pruner, sparsity)
    return PruneSummary(str(out), method, sparsity, len(stages), resumed_at, len(state.compressed),
                        store.on_disk, time.perf_counter() - start)


def _record_stage(stage: str, result: StageResult, out: Path, state: ProgressState, store: HiddenStore,
                  last: bool) -> Optional[list[torch.Tensor]]:
    """Write the stage's compressed tensors and the next stage's inputs, then mark the stage finished;
    returns those inputs (None after the last stage)."""
    file = f"{stage.replace('.', '-')}.safetensors"
    save_atomic(result.joined(), out / COMPRESSED_DIR / file)
    state.compressed.update({name: {**entry, "file": file} for name, entry in result.entries.items()})
    hidden, slot = store.save(result.outputs) if result.outputs is not None and not last else (None, None)
    state.finish_stage(stage, slot)
    return hidden


def _token_batches(calibration: Optional[Iterable], method: str) -> list[torch.Tensor]:
    """The calibration batches as LongTensors [batch, seq]; magnitude needs none (one short batch then
    only drives the stages through their capture)."""
    if calibration is None:
        if method != "magnitude":
            raise ConfigError(f"prune_checkpoint: method '{method}' needs calibration batches (token ids)")
        return [torch.arange(8)[None]]
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calibration]
    if not batches or any(not isinstance(b, torch.Tensor) or b.dim() != 2 or b.is_floating_point()
                          for b in batches):
        raise ConfigError("prune_checkpoint: calibration must be a non-empty iterable of token id tensors "
                          "[batch, seq] (or 1-tuples of them)")
    return batches


def _head_path(model: torch.nn.Module) -> str:
    head = model.get_output_embeddings()
    return next((name for name, mod in model.named_modules() if mod is head and head is not None), "")


def _norm_path(stack_path: str) -> str:
    """The final norm beside the decoder stack ('model.layers' -> 'model.norm')."""
    return f"{stack_path.rpartition('.')[0]}.norm".lstrip(".")


def _stage_prefixes(model: torch.nn.Module, stack_path: str, layers: int, files: CheckpointFiles,
                    pruner: StagePruner) -> dict[str, tuple[str, ...]]:
    """Stage -> the name prefixes of the tensors it may rewrite. The head is a stage when the LM head has its
    own weight in the checkpoint (a head tied to the embedding stays dense, as in `compile`) and is not
    excluded (it is pruned in row blocks, whose paths the globs would not match)."""
    stages = {f"{stack_path}.{i}": (f"{stack_path}.{i}.",) for i in range(layers)}
    head = _head_path(model)
    if head and f"{head}.weight" in files.weight_map and pruner.options.selects(head):
        stages["head"] = (f"{head}.", f"{_norm_path(stack_path)}.")
    return stages


def _run_key(files: CheckpointFiles, pruner: StagePruner, batches: list[torch.Tensor], sparsity: str) -> str:
    """A hash of what decides the output: settings, calibration data, the input's tensors and shard sizes."""
    digest = hashlib.sha256(repr((sparsity, pruner.method, pruner.exclude, sorted(files.weight_map.items()),
                                  [(s, (files.root / s).stat().st_size) for s in files.shards])).encode())
    for batch in batches:
        digest.update(repr((batch.dtype, tuple(batch.shape))).encode())
        digest.update(batch.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _shard_patches(files: CheckpointFiles, out: Path, state: ProgressState) -> dict[str, ShardPatch]:
    """Each output shard not yet finished, as a copy of its input shard (kept from a previous run if whole)."""
    patches = {}
    for shard in files.shards:
        patch = ShardPatch(files.root / shard, out / shard)
        if shard in state.finished or (shard in state.copied and patch.target.exists()
                                       and not patch.partial.exists()):   # renamed just before a kill
            state.shard_finished(shard)
            continue
        patch.open(copy=shard not in state.copied or not patch.partial.exists())
        state.copy_done(shard)
        patches[shard] = patch
    return patches


def _caught_inputs(model, stack_path: str, stack, files: CheckpointFiles, batches: list[torch.Tensor]):
    """Decoder layer 0's inputs per batch, with only the weights outside the stack and the head loaded."""
    skip = (f"{stack_path}.", f"{_head_path(model)}.") if _head_path(model) else (f"{stack_path}.",)
    load_weights(model, files, skip)
    try:
        return catch_layer_inputs(model, stack, batches)
    finally:
        free_weights(model)


def _run_stage(model, stage: str, stack, stack_path: str, files: CheckpointFiles, caught, hidden,
               pruner: StagePruner, sink) -> StageResult:
    if stage == "head":
        head_path, norm_path = _head_path(model), _norm_path(stack_path)
        call = HeadCall(norm_path, model.get_submodule(norm_path), head_path, files.read(f"{head_path}.weight"))
        load_weights(call, files, skip=(f"{head_path}.rows.",))
        inputs, names = [(h,) for h in hidden], call.block_names
    else:
        call = LayerCall(stage, stack[int(stage.rpartition(".")[2])], caught[0].kwargs)
        load_weights(call, files)
        inputs, names = [(h, LayerCall.tensors(c.kwargs)) for h, c in zip(hidden, caught)], {}
    try:
        return pruner.prune(call, inputs, outputs=stage != "head", names=names, sink=sink, files=files)
    finally:
        free_weights(call)


def _finish_shards(patches: dict[str, ShardPatch], files: CheckpointFiles, prefixes: dict[str, tuple[str, ...]],
                   state: ProgressState) -> None:
    """Rename every output shard whose tensors no unfinished stage will rewrite."""
    waiting = tuple(p for stage, stage_prefixes in prefixes.items() if stage not in state.done for p in stage_prefixes)
    pending = {files.weight_map[name] for name in files.weight_map if name.startswith(waiting)} if waiting else set()
    for shard in list(patches):
        if shard not in pending:
            patches.pop(shard).finish()
            state.shard_finished(shard)


def _finish_checkpoint(files: CheckpointFiles, out: Path, patches: dict[str, ShardPatch], state: ProgressState,
                       pruner: StagePruner, sparsity: str) -> None:
    """Rename what is left, copy config/tokenizer files and the shard index, write the compressed index."""
    for shard, patch in list(patches.items()):
        patch.finish()
        state.shard_finished(shard)
    for path in files.root.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and not path.name.startswith("."):
            shutil.copyfile(path, out / path.name)
    write_json_atomic({"format": COMPRESSED_FORMAT, "version": 1, "n": pruner.n, "m": pruner.m,
                       "method": pruner.method, "pattern": sparsity, "weights": state.compressed},
                      out / COMPRESSED_DIR / "index.json")
    shutil.rmtree(out / ".work")
