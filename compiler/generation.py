"""`sparsecc.compile(..., mode="generate")`: a prefill and a decode program over one static KV cache.

Both programs are captured from the same `CachedStep` and rewritten by the same passes. The
prefill program is compiled first (it prunes: magnitude, Wanda or SparseGPT on the calibration
prompts); the decode program is then captured from the model carrying those pruned weights and
pruned again by magnitude, which keeps exactly the weights already kept (a pruned group's
survivors are its largest entries), so both programs compute with the same weights. Equal
constants then share one storage and the decode program's state is the prefill program's
(runtime.generation.share_state): one KV cache, one copy of the weights.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch.export import Dim

from sparsecc.passes import build_pipeline, format_pipeline
from sparsecc.passes.nm.prune import PruneNM
from sparsecc.runtime.generation import GENERATOR_FILE, MIN_PROMPT, PROGRAM_DIRS, GenerationSpec, Generator
from sparsecc.runtime.loaded_generator import share_programs

from .api import compile
from .config import parse_sparsity
from .errors import ConfigError
from .generation_step import CachedStep

PREFIX = "model."   # CachedStep keeps the user's model as its `model` attribute


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
    step = CachedStep(model, batch, max_length)
    passes = build_pipeline(pipeline) if pipeline is not None else parse_sparsity(sparsity).passes()
    prompt = Dim("prompt", min=MIN_PROMPT, max=max_length)
    prefill = compile(step, _step_inputs(ids, mask, batch, max_length), pipeline=format_pipeline(passes),
                      calibration=_step_batches(calibration, batch, max_length), dynamic_shapes=({1: prompt}, None, {0: prompt}),
                      **options)
    decode_step = CachedStep(_with_weights(model, prefill.pruned_state_dict()), batch, max_length)
    decode_inputs = (ids[:1, :1].expand(batch, 1).clone(), _full_mask(mask[:1].expand(batch, -1), max_length),
                     torch.tensor([ids.shape[1]]))
    decode = compile(decode_step, decode_inputs, pipeline=format_pipeline(_keeping_weights(passes)),
                     **{**options, "check": False})
    share_programs(prefill, decode, "generator")
    spec = GenerationSpec(batch, max_length, _vocab_size(prefill.graph_module), *_special_tokens(model),
                          cache={"kind": "static", "bytes": step.cache_bytes()})
    return CompiledGenerator(prefill, decode, spec)


class CompiledGenerator(Generator):
    """`generate(...)` as in transformers; `prefill` and `decode` are the two CompiledModels."""

    def report(self):
        """The prefill program's report (what was rewritten, bytes, error vs dense) with the generator's facts."""
        report = self.prefill.report()
        report.generation = {"batch_size": self.spec.batch_size, "max_length": self.spec.max_length,
                             "cache": self.spec.cache, "decode_kernels": self.decode.report().kernels}
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
        manifest = self.prefill.save(str(root / "prefill"), targets, described={"generator": self.spec.to_dict()},
                                     **options)
        self.decode.save(str(root / "decode"), targets, **options)
        marker = {"format": "sparsecc-generator", "programs": list(PROGRAM_DIRS)}
        (root / GENERATOR_FILE).write_text(json.dumps(marker) + "\n")
        return manifest

    def __repr__(self) -> str:
        return (f"CompiledGenerator(batch_size={self.spec.batch_size}, max_length={self.spec.max_length}, "
                f"prefill: {self.prefill.program.summary()}, decode: {self.decode.program.summary()})")


def _prompt(example_inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(example_inputs, dict):
        ids, mask = example_inputs.get("input_ids"), example_inputs.get("attention_mask")
    elif isinstance(example_inputs, (tuple, list)):
        ids, mask = (list(example_inputs) + [None])[:2]
    else:
        ids, mask = example_inputs, None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ConfigError("mode='generate': example_inputs must be prompt ids, an integer tensor [batch, length] "
                          "(or (input_ids, attention_mask), or a dict with those keys)")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if mask.shape != ids.shape:
        raise ConfigError(f"mode='generate': attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}")
    return ids.long(), mask.long()


def _full_mask(mask: torch.Tensor, max_length: int) -> torch.Tensor:
    full = torch.ones(mask.shape[0], max_length, dtype=torch.long)
    full[:, :mask.shape[1]] = mask
    return full


def _step_inputs(ids: torch.Tensor, mask: torch.Tensor, batch: int, max_length: int) -> tuple:
    """A prompt as the prefill program's inputs: rows cut or filled to `batch`, at least MIN_PROMPT long."""
    if ids.shape[1] >= max_length:
        raise ConfigError(f"mode='generate': the example prompt has {ids.shape[1]} tokens, max_length is {max_length}")
    short = max(0, MIN_PROMPT - ids.shape[1])
    ids = torch.nn.functional.pad(ids, (short, 0))
    mask = torch.nn.functional.pad(mask, (short, 0))
    rows = torch.arange(batch) % ids.shape[0]
    return ids[rows], _full_mask(mask[rows], max_length), torch.arange(ids.shape[1])


def _step_batches(calibration: Optional[Iterable], batch: int, max_length: int) -> Optional[list]:
    if calibration is None:
        return None
    steps = []
    for prompt in calibration:
        ids, mask = _prompt(prompt)
        for start in range(0, ids.shape[0], batch):
            steps.append(_step_inputs(ids[start:start + batch], mask[start:start + batch], batch, max_length))
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
