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

from sparsecc.runtime.generation import GenerationSpec, Generator

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
             providers: Sequence[str] = ("CPUExecutionProvider",), **options: Any) -> Any:
    """Generation over an exported generator decoder: [b, P] left-padded prompt ids -> [b, P + new] (a torch
    tensor for a torch input, else a numpy array), with `Generator.generate`'s options (greedy by default;
    do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id, streamer, generator)."""
    ids = OnnxDecoder(onnx_path, providers).generate(torch.as_tensor(_array(input_ids)),
                                                     None if attention_mask is None else torch.as_tensor(
                                                         _array(attention_mask)),
                                                     max_new_tokens=max_new_tokens, **options)
    return ids if isinstance(input_ids, torch.Tensor) else ids.numpy()


class OnnxDecoder(Generator):
    """An exported generator decoder driven by the runtime's generation loop: the decoder serves as both
    programs (a prompt is a step of S = its length, a new token a step of S = 1)."""

    def __init__(self, path: str, providers: Sequence[str] = ("CPUExecutionProvider",)):
        session = ort.InferenceSession(path, providers=list(providers))
        described = session.get_modelmeta().custom_metadata_map.get(GENERATOR_META)
        if described is None:
            raise ValueError(f"onnx runner: {path} is not a generator decoder (no '{GENERATOR_META}' metadata; "
                             "write one with CompiledGenerator.export_onnx)")
        step = OnnxStep(session)
        super().__init__(step, step, GenerationSpec.from_dict(json.loads(described)))


class OnnxStep:
    """One decoder call; its present.* outputs are kept as the next call's past_key_values.* (the cache)."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.outputs = [o.name for o in session.get_outputs()]
        self.empty = {i.name: np.zeros(i.shape, _NUMPY[i.type]) for i in session.get_inputs()
                      if i.name.startswith("past_key_values.")}
        self.past = dict(self.empty)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.session.run(self.outputs, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                              "cache_position": positions.numpy(), **self.past})
        self.past.update({name.replace("present.", "past_key_values.", 1): value
                          for name, value in zip(self.outputs, out) if name.startswith("present.")})
        return torch.from_numpy(out[self.outputs.index("logits")])

    def reset_state(self) -> None:
        self.past = dict(self.empty)


