"""`sparsecc.compile(..., mode="generate")`: a prefill and a decode program over one static KV cache.

Both programs are captured from the same `CachedStep` and rewritten by the same passes. The
prefill program is compiled first (it prunes: magnitude, Wanda or SparseGPT on the calibration
prompts); the decode program is then captured from the model carrying those pruned weights and
pruned again by magnitude, which keeps exactly the weights already kept (a pruned group's
survivors are its largest entries), so both programs compute with the same weights. Equal
constants then share one storage and the decode program's state is the prefill program's
(runtime.program_sharing): one KV cache, one copy of the weights.
"""
from __future__ import annotations

import copy
import hashlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch.export import Dim
from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

from sparsecc.passes import build_pipeline, format_pipeline
from sparsecc.passes.nm.prune import PruneNM
from sparsecc.passes.tokens.decode import calibrated_thresholds, decode_routing, decode_routing_facts, prefill_routing
from sparsecc.runtime.artifact import MANIFEST
from sparsecc.runtime.errors import InputMismatchError
from sparsecc.runtime.generation import (GENERATOR_FILE, GENERATOR_FORMAT, MIN_PROMPT, PROGRAM_DIRS, GenerationSpec,
                                        Generator, mask_over_cache, prompt_tensors)
from sparsecc.runtime.program_sharing import share_programs

from .api import compile
from .config import parse_sparsity
from .errors import CaptureError, ConfigError
from .checkpoint_io import compressed_checkpoint
from .generation_cache import WindowCache, window_cache_policy
from .generation_step import CachedStep

PREFIX = "model."   # CachedStep keeps the user's model as its `model` attribute
REFINES = 4         # times the prompt range is narrowed to what torch.export proves one graph covers


def compile_generator(model: torch.nn.Module, example_inputs: Any, sparsity: Any = None,
                      calibration: Optional[Iterable] = None, *, max_length: Optional[int], batch_size: Optional[int] = None,
                      pipeline: Optional[str] = None, **options: Any) -> "CompiledGenerator":
    """See `sparsecc.compile`; `example_inputs` is a prompt: input_ids [B, P] (a tensor, `(input_ids,)`,
    `(input_ids, attention_mask)` or a dict with those keys). `batch_size` (default B) is the most rows
    one generate call runs together; `max_length` bounds prompt + new tokens."""
    ids, mask = _prompt(example_inputs)
    batch = ids.shape[0] if batch_size is None else batch_size
    if type(max_length) is not int or max_length <= MIN_PROMPT:
        raise ConfigError(f"mode='generate' needs max_length (an int > {MIN_PROMPT}: prompt + new tokens), "
                          f"got {max_length!r}")
    if type(batch) is not int or batch < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch!r}")
    passes = build_pipeline(pipeline) if pipeline is not None else parse_sparsity(sparsity).passes()
    window, passes = window_cache_policy(passes)   # a window policy becomes a ring cache, not a layout
    try:
        passes = prefill_routing(passes)   # token routing decides by calibrated threshold (passes/tokens/decode.py)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    step = CachedStep(model, batch, max_length, window)
    compressed = compressed_checkpoint(options.pop("compressed", None))   # the prefill takes the checkpoint's masks;
    prefill_options = {**options, "compressed": compressed.within(PREFIX) if compressed else None}   # decode keeps them
    prefill, prompts = _compile_prefill(step, ids, mask, batch, max_length, format_pipeline(passes), calibration,
                                        prefill_options)
    decode_step = CachedStep(_with_weights(model, prefill.pruned_state_dict()), batch, max_length, window)
    decode_inputs = (ids[:1, :1].expand(batch, 1).clone(), mask_over_cache(mask[:1].expand(batch, -1), max_length),
                     torch.tensor([ids.shape[1]]))
    decode_passes = decode_routing(_keeping_weights(passes), calibrated_thresholds(prefill.report().passes))
    decode = compile(decode_step, decode_inputs, pipeline=format_pipeline(decode_passes),
                     **{**options, "check": False})
    _reference_on_dense_weights(decode.captured.dense_gm, model)
    share_programs(prefill, decode, "generator")
    rings = isinstance(step.cache, WindowCache)   # a window policy, or the model's own sliding layers
    cache = step.cache.describe(max_length) if rings else {"kind": "static", "bytes": step.cache_bytes()}
    spec = GenerationSpec(batch, max_length, _vocab_size(prefill.graph_module), *_special_tokens(model), cache=cache)
    return CompiledGenerator(prefill, decode, spec)


def _compile_prefill(step: CachedStep, ids: torch.Tensor, mask: torch.Tensor, batch: int, max_length: int,
                     pipeline: str, calibration: Optional[Iterable], options: dict) -> tuple[Any, list[int]]:
    """The prefill program for prompts of MIN_PROMPT..max_length tokens; where the model's graph differs
    by prompt length (a sliding-window layer branches on it), for the range torch.export proves one graph
    covers. Returns (program, [shortest, longest prompt]); shorter prompts are left-padded up to it."""
    prompt = _prompt_dim(step, max_length)
    dims = ({1: prompt}, None, {0: prompt})
    for attempt in range(REFINES + 1):
        lengths = [dims[0][1].min, dims[0][1].max]
        inputs = _step_inputs(ids, mask, batch, max_length, lengths[0])
        try:
            return compile(step, inputs, pipeline=pipeline, dynamic_shapes=dims,
                           calibration=_step_batches(calibration, (ids, mask), batch, max_length, lengths[0]),
                           **options), lengths
        except CaptureError as err:
            suggested = str(err.__cause__ or "")
            if attempt == REFINES or "Suggested fixes" not in suggested:
                raise
            dims = refine_dynamic_shapes_from_suggested_fixes(_suggested_fixes(suggested), dims)
    raise AssertionError("unreachable")


def _prompt_dim(step: CachedStep, max_length: int) -> Any:
    """The prefill's prompt dim. A window cache attends its slots plus the S new keys; where GQA repeats
    those heads torch.export cannot order the strides of a `slots + S` length (a guard like
    `Min(16*(s+c), 32*(s+c)) == 16*(s+c)`, true for every S) and refuses a named Dim; AUTO accepts it."""
    if isinstance(step.cache, WindowCache):
        return Dim.AUTO(min=MIN_PROMPT, max=max_length)
    return Dim("prompt", min=MIN_PROMPT, max=max_length)


def _suggested_fixes(message: str) -> str:
    """torch.export's "Suggested fixes:" block alone (the refining helper parses only `name = Dim(...)` lines)."""
    fixes = message.split("Suggested fixes:", 1)[1].strip().split("\n\n", 1)[0]
    return "Suggested fixes:\n" + "\n".join(line for line in fixes.splitlines() if " = " in line)


def shared_constants(prefill: Any, decode: Any) -> list[str]:
    """Decode constants that are the prefill constant of the same name (the weights and the cache, one storage:
    runtime/program_sharing.py); a name that is state in one program only is never among them."""
    one_sided = set(prefill.program.state_names) ^ set(decode.program.state_names)
    return [name for name, t in decode.constants.items() if name not in one_sided and name in prefill.constants
            and _same_tensor(t, prefill.constants[name])]


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())


class CompiledGenerator(Generator):
    """`generate(...)` as in transformers; `prefill` and `decode` are the two CompiledModels."""

    def report(self):
        """The prefill program's report (what was rewritten, bytes, error vs dense) with the generator's facts."""
        report = self.prefill.report()
        report.generation = {"batch_size": self.spec.batch_size, "max_length": self.spec.max_length,
                             "cache": self.spec.cache, "decode_kernels": self.decode.report().kernels,
                             "decode_token_routing": decode_routing_facts(self.decode.records)}
        return report

    def ir(self) -> str:
        return f"// prefill\n{self.prefill.ir()}\n// decode\n{self.decode.ir()}"

    def pruned_state_dict(self) -> dict[str, torch.Tensor]:
        """Dense weights equal to what both programs compute with, keyed by the model's own names."""
        return {name[len(PREFIX):]: value for name, value in self.prefill.pruned_state_dict().items()
                if name.startswith(PREFIX)}

    def save(self, path: str, targets: Iterable[str] = ("cpu",), **options: Any) -> dict:
        """DIR/prefill and DIR/decode artifacts and the DIR/generator.json marker (runtime.loaded_generator);
        `sparsecc.runtime.load(DIR)` returns a generator. The cache is saved empty."""
        root = Path(path)
        self.reset_state()
        self.decode.save(str(root / "decode"), targets, **options, borrowed=shared_constants(self.prefill, self.decode))
        decode_hash = hashlib.sha256((root / "decode" / MANIFEST).read_bytes()).hexdigest()
        manifest = self.prefill.save(str(root / "prefill"), targets, **options, described={
            "generator": self.spec.to_dict(), "decode_manifest_sha256": decode_hash})
        marker = {"format": GENERATOR_FORMAT, "programs": list(PROGRAM_DIRS)}
        (root / GENERATOR_FILE).write_text(json.dumps(marker) + "\n")
        return manifest

    def export_onnx(self, path: str, contrib: bool = False, opset: Optional[int] = None):
        """One ONNX decoder for prefill and decode: past_key_values.{i}.key/.value in, logits and
        present.{i}.* out (docs/onnx.md, "Generation"); `contrib` maps attention with its cache to
        com.microsoft.GroupQueryAttention where it fits. `sparsecc.onnx.runner.generate` runs it."""
        from .onnx.export.generator import export_generator   # onnx/onnxscript load only when exporting
        return export_generator(self, path, contrib=contrib, opset=opset)

    def __repr__(self) -> str:
        return (f"CompiledGenerator(batch_size={self.spec.batch_size}, max_length={self.spec.max_length}, "
                f"prefill: {self.prefill.program.summary()}, decode: {self.decode.program.summary()})")


def _prompt(example_inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt given as ids, (ids,), (ids, mask) or {"input_ids", "attention_mask"}: left-padded ids and mask."""
    if isinstance(example_inputs, dict):
        ids, mask = example_inputs.get("input_ids"), example_inputs.get("attention_mask")
    elif isinstance(example_inputs, (tuple, list)):
        ids, mask = (list(example_inputs) + [None])[:2]
    else:
        ids, mask = example_inputs, None
    if not isinstance(ids, torch.Tensor):
        raise ConfigError("mode='generate': example_inputs must be prompt ids, an integer tensor [batch, length] "
                          "(or (input_ids, attention_mask), or a dict with those keys)")
    try:
        return prompt_tensors(ids, mask)
    except InputMismatchError as err:
        raise ConfigError(f"mode='generate': the example prompt: {err}") from None


def _step_inputs(ids: torch.Tensor, mask: torch.Tensor, batch: int, max_length: int,
                 shortest: int = MIN_PROMPT) -> tuple:
    """A prompt as the prefill program's inputs: rows cut or filled to `batch`, at least `shortest` long."""
    if ids.shape[1] >= max_length:
        raise ConfigError(f"mode='generate': the example prompt has {ids.shape[1]} tokens, max_length is {max_length}")
    short = max(0, shortest - ids.shape[1])
    ids = torch.nn.functional.pad(ids, (short, 0))
    mask = torch.nn.functional.pad(mask, (short, 0))
    rows = torch.arange(batch) % ids.shape[0]
    return ids[rows], mask_over_cache(mask[rows], max_length), torch.arange(ids.shape[1])


def _step_batches(calibration: Optional[Iterable], example: tuple, batch: int, max_length: int,
                  shortest: int) -> list:
    """Calibration prompts (the example prompt when None) as prefill inputs, one real row at a time, repeated
    over the batch: no left padding and no filler row enters the statistics (a row repeated B times scales
    every activation norm and score count alike, so Wanda's ranking and a threshold's quantile are the row's)."""
    steps = []
    for prompt in ([example] if calibration is None else calibration):
        ids, mask = _prompt(prompt)
        for row, keep in zip(ids, mask.bool()):
            real = row[keep][None]
            steps.append(_step_inputs(real.expand(batch, -1), torch.ones_like(real).expand(batch, -1), batch,
                                      max_length, shortest))
    return steps


def _with_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `model` sharing every tensor except `weights` (by the model's names), which it holds
    as new parameters: the user's model is never written."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    copied = copy.deepcopy(model, memo=shared)
    for name, value in weights.items():
        owner, _, leaf = name.removeprefix(PREFIX).rpartition(".")
        module = copied.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[leaf] = value
    return copied


def _reference_on_dense_weights(dense_gm: torch.fx.GraphModule, model: torch.nn.Module) -> None:
    """The decode program's dense reference graph reads the user's dense weights, as the prefill's does,
    and no longer holds the pruned copies it was captured with (a second copy of every pruned weight)."""
    originals = dict(model.named_parameters())
    for name, value in list(dense_gm.named_parameters()):
        original = originals.get(name.removeprefix(PREFIX))
        if original is not None and original is not value and original.shape == value.shape:
            owner, _, leaf = name.rpartition(".")
            dense_gm.get_submodule(owner)._parameters[leaf] = original


def _keeping_weights(passes: list) -> list:
    """The passes again, pruning by magnitude: applied to weights already pruned, it keeps them as they are."""
    return [dataclasses.replace(p, method="magnitude") if isinstance(p, PruneNM) else p for p in passes]


def _vocab_size(gm: torch.fx.GraphModule) -> int:
    """The last dim of the step's output, the logits [B, V]."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    logits = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    return int(logits.meta["val"].shape[-1])


def _special_tokens(model: torch.nn.Module) -> tuple[Optional[int], list[int]]:
    config = getattr(model, "generation_config", None) or getattr(model, "config", None)
    eos = getattr(config, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = getattr(config, "pad_token_id", None)
    return (pad if isinstance(pad, int) else None), [int(e) for e in eos]
