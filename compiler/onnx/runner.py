"""Run an exported file in onnxruntime: feed the model's inputs, bind the buffers contrib ops share.

com.microsoft.SparseAttention (CPU, onnxruntime 1.32) refuses to run unless
its past_key and present_key (and past_value, present_value) are the same
buffer. `export_onnx(contrib=True)` gives each SparseAttention node graph
inputs `<node>.past_key`, `<node>.past_value` [B, Hkv, S, D] and graph outputs
`<node>.present_key`, `<node>.present_value`, and lists the [input, output]
pairs in the model metadata `sparsecc.shared_buffers`. OnnxRunner binds each
pair to one zeroed buffer through an IOBinding, so a caller feeds only the
model's own inputs and gets only its own outputs:

    runner = OnnxRunner("model.onnx")
    logits, = runner.run(ids)                 # positional, in graph-input order
    logits, = runner.run(tokens=ids)          # or by input name

Files without shared buffers run through `InferenceSession.run`.

A generator's decoder (`CompiledGenerator.export_onnx`, metadata `sparsecc.generator`) runs
as a greedy loop, prompt + new ids as `Generator.generate` returns them:

    ids = generate("decoder.onnx", input_ids, attention_mask, max_new_tokens=32)
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

SHARED_BUFFERS = "sparsecc.shared_buffers"
GENERATOR_META = "sparsecc.generator"   # JSON: batch_size, max_length, vocab_size, layers, pad/eos ids
_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _array(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class OnnxRunner:
    """An onnxruntime session over an exported file that binds its shared past/present buffers."""

    def __init__(self, path: str, providers: Sequence[str] = ("CPUExecutionProvider",)):
        self.session = ort.InferenceSession(path, providers=list(providers))
        pairs = json.loads(self.session.get_modelmeta().custom_metadata_map.get(SHARED_BUFFERS, "[]"))
        self.shared = [(str(past), str(present)) for past, present in pairs]
        bound_in, bound_out = {p for p, _ in self.shared}, {p for _, p in self.shared}
        self.inputs = [i.name for i in self.session.get_inputs() if i.name not in bound_in]
        self.outputs = [o.name for o in self.session.get_outputs() if o.name not in bound_out]
        self._buffers = {i.name: i for i in self.session.get_inputs() if i.name in bound_in}

    def feeds(self, *inputs: Any, **named: Any) -> dict[str, np.ndarray]:
        if len(inputs) > len(self.inputs):
            raise ValueError(f"{len(inputs)} inputs given, the model takes {len(self.inputs)}: {self.inputs}")
        feeds = {name: _array(x) for name, x in zip(self.inputs, inputs)}
        unknown = set(named) - set(self.inputs)
        if unknown:
            raise ValueError(f"unknown inputs {sorted(unknown)}; the model takes {self.inputs}")
        feeds.update({name: _array(x) for name, x in named.items()})
        missing = [name for name in self.inputs if name not in feeds]
        if missing:
            raise ValueError(f"missing inputs {missing}; the model takes {self.inputs}")
        return feeds

    def run(self, *inputs: Any, **named: Any) -> list[np.ndarray]:
        """The model's outputs (shared buffers left out), in graph-output order."""
        feeds = self.feeds(*inputs, **named)
        if not self.shared:
            return self.session.run(self.outputs, feeds)
        binding = self.session.io_binding()
        for name in self.outputs:
            binding.bind_output(name)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for past, present in self.shared:
            meta = self._buffers[past]
            if not all(isinstance(d, int) for d in meta.shape) or meta.type not in _NUMPY:
                raise ValueError(f"shared buffer '{past}' needs a static shape and a known type, "
                                 f"got {meta.shape} {meta.type}")
            buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros(meta.shape, _NUMPY[meta.type]))
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[: len(self.outputs)]


def run_onnx(path: str, *inputs: Any, **named: Any) -> list[np.ndarray]:
    """OnnxRunner(path).run(...) for one call."""
    return OnnxRunner(path).run(*inputs, **named)


def generate(onnx_path: str, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: int = 20,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """Greedy generation over an exported generator decoder: [b, P] left-padded prompt ids -> [b, P + new]
    (a torch tensor for a torch input, else a numpy array). Rows run in groups of the compiled batch;
    finished rows are padded with `pad_token_id` (default: the file's, else the first eos id, else 0)."""
    return OnnxDecoder(onnx_path, providers).generate(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                                      eos_token_id=eos_token_id, pad_token_id=pad_token_id)


class OnnxDecoder:
    """An exported generator decoder: one call per prompt (S = its length), one per new token (S = 1),
    each step's present.* fed back as the next step's past_key_values.*."""

    def __init__(self, path: str, providers: Sequence[str] = ("CPUExecutionProvider",)):
        self.session = ort.InferenceSession(path, providers=list(providers))
        described = self.session.get_modelmeta().custom_metadata_map.get(GENERATOR_META)
        if described is None:
            raise ValueError(f"onnx runner: {path} is not a generator decoder (no '{GENERATOR_META}' metadata; "
                             "write one with CompiledGenerator.export_onnx)")
        self.meta = json.loads(described)
        self.pasts = {i.name: i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")}

    def generate(self, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: int = 20,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> Any:
        ids = _array(input_ids).astype(np.int64)
        ids = ids[None] if ids.ndim == 1 else ids
        mask = np.ones_like(ids) if attention_mask is None else _array(attention_mask).astype(np.int64)
        mask = mask[None] if mask.ndim == 1 else mask
        self._check(ids, mask, max_new_tokens)
        stops = _token_ids(self.meta.get("eos_token_id") if eos_token_id is None else eos_token_id)
        pad = next(p for p in (pad_token_id, self.meta.get("pad_token_id"), *stops[:1], 0) if p is not None)
        batch = self.meta["batch_size"]
        groups = [self._group(ids[i:i + batch], mask[i:i + batch], max_new_tokens, stops, pad)
                  for i in range(0, ids.shape[0], batch)]
        width = max(g.shape[1] for g in groups)
        out = np.concatenate([np.pad(g, ((0, 0), (0, width - g.shape[1])), constant_values=pad) for g in groups])
        return _like(out, input_ids)

    def _check(self, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int) -> None:
        if ids.ndim != 2 or ids.size == 0 or mask.shape != ids.shape:
            raise ValueError(f"onnx runner: input_ids must be [batch, length], attention_mask the same shape; "
                             f"got {list(ids.shape)} and {list(mask.shape)}")
        if (mask[:, -1] == 0).any() or (np.diff(mask, axis=1) < 0).any():
            raise ValueError("onnx runner: prompts must be left-padded "
                             "(attention_mask zeros only before the first token)")
        if type(max_new_tokens) is not int or max_new_tokens < 1:
            raise ValueError(f"onnx runner: max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if max(ids.shape[1], self._shortest()) + max_new_tokens > self.meta["max_length"]:
            raise ValueError(f"onnx runner: prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                             f"the decoder's max_length {self.meta['max_length']}")

    def _group(self, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, stops: list[int], pad: int) -> np.ndarray:
        """Up to batch_size rows (filled with copies of the first, whose output is dropped)."""
        prompt, short = ids.shape[1], max(0, self._shortest() - ids.shape[1])
        if short:   # the prefill graph was captured for longer prompts: left padding, masked out
            ids, mask = np.pad(ids, ((0, 0), (short, 0)), constant_values=pad), np.pad(mask, ((0, 0), (short, 0)))
        rows, start = ids.shape
        batch = self.meta["batch_size"]
        fill = np.zeros(batch, np.int64)    # row index into the group: its own, or 0 for a filler row
        fill[:rows] = np.arange(rows)
        full_mask = np.ones((batch, self.meta["max_length"]), np.int64)
        full_mask[:, :start] = mask[fill]
        past = {name: np.zeros(i.shape, _NUMPY[i.type]) for name, i in self.pasts.items()}
        logits = self._step(ids[fill], full_mask, np.arange(start), past)
        new, finished = [], np.zeros(rows, bool)
        for step in range(max_new_tokens):
            token = np.where(finished, pad, logits[:rows].argmax(-1))
            new.append(token)
            finished |= np.isin(token, stops)
            if finished.all() or step + 1 == max_new_tokens:
                break
            fed = np.zeros((batch, 1), np.int64)
            fed[:rows, 0] = token
            logits = self._step(fed, full_mask, np.array([start + step]), past)
        return np.concatenate([ids[:, start - prompt:], np.stack(new, 1)], axis=1)

    def _shortest(self) -> int:
        return self.meta.get("prompt_lengths", [1])[0]

    def _step(self, ids: np.ndarray, mask: np.ndarray, position: np.ndarray, past: dict) -> np.ndarray:
        """The last position's logits; `past` becomes this step's present."""
        names = [o.name for o in self.session.get_outputs()]
        out = self.session.run(names, {"input_ids": ids, "attention_mask": mask, "cache_position": position, **past})
        past.update({name.replace("present.", "past_key_values.", 1): value
                     for name, value in zip(names, out) if name.startswith("present.")})
        return out[names.index("logits")]


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, (int, np.integer)) else [int(v) for v in value]


def _like(ids: np.ndarray, given: Any) -> Any:
    """`ids` as a torch tensor when the prompt was one."""
    return torch.from_numpy(ids) if isinstance(given, torch.Tensor) else ids
