"""`CompiledGenerator.export_onnx`: one ONNX decoder that serves prefill and decode.

The file is the prefill program's graph (dynamic sequence length S) with its KV
cache as inputs and outputs (`generator_graph`):

    input_ids                  int64 [B, S]          B = the compiled batch size (static)
    attention_mask             int64 [B, L]          L = max_length; 0 on left padding, 1 elsewhere
                                                     (future positions too: the causal rule hides them)
    cache_position             int64 [S]             the positions this step writes: start .. start + S - 1
    past_key_values.{i}.key    float [B, Hkv, L, D]  layer i's static cache (zeros before the prompt)
    past_key_values.{i}.value
 -> logits                     float [B, V]          the last position's
    present.{i}.key, present.{i}.value               the cache after this step: the next step's past

A prompt is one call (S = prompt length, cache_position 0 .. S - 1), each new
token one more (S = 1). The model metadata `sparsecc.generator` (JSON) holds
batch_size, max_length, vocab_size, layers, pad_token_id, eos_token_id and prompt_lengths
([shortest, longest] prompt the prefill graph was captured for), so
`sparsecc.onnx.runner.generate` needs only the file. Before writing, the decoder graph's logits
are checked against the generator's prefill and decode programs on a padded prompt and one
decode step (the decode step runs the prefill graph at S = 1). With `contrib=True` each
attention site with its cache write becomes com.microsoft.GroupQueryAttention
where it computes the same thing (`generator_gqa`); sparse ops keep their
export rules either way.
"""
from __future__ import annotations

import json

from onnxscript import ir

from ..runner import GENERATOR_META
from .exporter import DEFAULT_OPSET, ExportResult, OnnxExportError, export_graph
from .generator_gqa import map_cache_attention
from .generator_graph import DecoderGraph, check_against_programs, decoder_graph
from .generator_sites import attention_sites


def export_generator(generator, path: str, contrib: bool = False, opset: int | None = None) -> ExportResult:
    """Write `generator` (a CompiledGenerator) as one ONNX decoder at `path` (see the module docstring)."""
    kind = generator.spec.cache.get("kind", "static")
    if kind != "static":
        raise OnnxExportError(f"generator export: the '{kind}' cache (ring caches of a window attention policy or of "
                              "the model's own sliding-window layers) has no ONNX decoder form; it takes the static "
                              "cache: compile without a window policy, with max_length <= the model's sliding window")
    prefill = generator.prefill
    decoder = decoder_graph(prefill.graph_module)
    check_against_programs(decoder, generator)
    sites = attention_sites(decoder, generator.spec) if contrib else None
    meta = {**generator.spec.to_dict(), "layers": len(decoder.caches) // 2,
            "inputs": decoder.inputs, "outputs": decoder.outputs}

    def prepare(model: ir.Model, result: ExportResult) -> None:
        name_values(model, decoder)
        if contrib:
            map_cache_attention(model, sites, result)
        model.metadata_props[GENERATOR_META] = json.dumps(meta)

    return export_graph(decoder.gm, None, path, contrib, opset or DEFAULT_OPSET,
                        prefill.captured.symbol_ranges, prepare)


def name_values(model: ir.Model, decoder: DecoderGraph) -> None:
    """Graph inputs and the leading graph outputs get the decoder's names (extra outputs keep theirs)."""
    graph = model.graph
    if len(graph.inputs) != len(decoder.inputs) or len(graph.outputs) < len(decoder.outputs):
        raise OnnxExportError(f"generator export: the exported graph has {len(graph.inputs)} inputs and "
                              f"{len(graph.outputs)} outputs, expected {decoder.inputs} -> {decoder.outputs}")
    for value, name in zip(graph.inputs, decoder.inputs):
        value.name = name
    for value, name in zip(graph.outputs, decoder.outputs):
        value.name = name
