"""The prefill program's graph as an ONNX decoder graph: its KV cache made inputs and outputs.

A generator's prefill program writes its state in place (`index_copy_` into each
StaticCache layer's keys and values, `copy_`/`add_` of the layers' write
positions). ONNX has no state, so the graph is copied and each state tensor is
replaced according to how the step first touches it:

    carried  (read before it is overwritten: the KV cache)  -> a graph input (past), cloned; the clone is
                                                                written in place and returned (present)
    scratch  (first overwritten whole by `copy_`: a write   -> a clone of the constant, written in place,
              position the step recomputes from its inputs)     not returned

torch.export (run by the ONNX exporter) functionalises writes into clones, so
the exported graph reads past and returns present. Carried tensors pair up in
graph order as (keys, values) per layer, the order StaticCache writes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from sparsecc.passes.state import state_targets
from sparsecc.runtime.generation import MIN_PROMPT

from .exporter import OnnxExportError

CLONE = torch.ops.aten.clone.default
OVERWRITE = torch.ops.aten.copy_.default


@dataclass
class DecoderGraph:
    """The decoder graph and what its extra inputs and outputs are."""
    gm: GraphModule
    inputs: list[str]                    # forward inputs: the program's, then past keys/values per layer
    outputs: list[str]                   # logits, then present keys/values per layer
    caches: list[Node] = field(default_factory=list)   # the clone of each carried tensor, in input order


def past_names(layers: int) -> list[str]:
    """The names transformers/optimum ONNX decoders give their cache inputs."""
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def decoder_graph(gm: GraphModule) -> DecoderGraph:
    """A copy of the step graph `gm` (returning logits) with its state as past inputs / present outputs."""
    graph = torch.fx.Graph()
    returned = graph.graph_copy(gm.graph, {})
    program_inputs = [n.name for n in graph.nodes if n.op == "placeholder"]
    carried, scratch = [], []
    for target in state_targets(gm):
        node = next(n for n in graph.nodes if n.op == "get_attr" and n.target == target)
        if not _overwritten_first(node) and not _cache_write(node):
            raise OnnxExportError(f"generator export: the program state {target!r} is not a KV cache written by "
                                  "index_copy_ (e.g. Quest page summaries): a decoder carries only key/value caches")
        (scratch if _overwritten_first(node) else carried).append(node)
    if len(carried) % 2:
        raise OnnxExportError(f"generator export: {len(carried)} cache tensors are read before written; expected "
                              "a key and a value per layer")
    names = past_names(len(carried) // 2)
    caches = [_as_input(graph, node, name.replace(".", "_")) for node, name in zip(carried, names)]
    for node in scratch:
        _private_copy(graph, node)
    outputs = returned if isinstance(returned, (tuple, list)) else (returned,)
    if len(outputs) != 1:
        raise OnnxExportError(f"generator export: the step returns {len(outputs)} values, expected the logits")
    graph.output((outputs[0], *caches))
    # built last: a GraphModule copies only the constants its graph still reads (not the old caches)
    return DecoderGraph(GraphModule(gm, graph), program_inputs + names, ["logits", *present_names(len(names) // 2)],
                        caches)


def _cache_write(node: torch.fx.Node) -> bool:
    """A KV cache tensor: the step writes it with index_copy_ at its positions."""
    return any(user.target is torch.ops.aten.index_copy_.default and user.args[0] is node for user in node.users)


def sample_steps(spec) -> list[tuple]:
    """(input_ids, attention_mask, cache_position) of three steps from an empty cache: a prompt with left
    padding (rows padded by different amounts), a decode step after it, and a decode step at the last
    position without padding (its own cache, zeros)."""
    batch, length = spec.batch_size, spec.max_length
    shortest = getattr(spec, "prompt_lengths", None) or [MIN_PROMPT]
    prompt = max(shortest[0], min(length - 1, 12))
    padded = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        padded[row, : (row * 5) % prompt] = 0
    ids = torch.randint(0, spec.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    return [(ids, padded, torch.arange(prompt)), (ids[:, :1], padded, torch.tensor([prompt])),
            (ids[:, :1], torch.ones(batch, length, dtype=torch.long), torch.tensor([length - 1]))]


def check_against_programs(decoder: DecoderGraph, generator) -> None:
    """The decoder graph's logits for a prompt and the decode step after it equal the generator's own
    prefill and decode programs' (relative max error 1e-4, 2e-2 in 16-bit floats: the two programs may
    run different kernels), or the export stops naming the step."""
    (ids, mask, position), (token, _, next_position), _ = sample_steps(generator.spec)
    caches = [torch.zeros(c.meta["val"].shape, dtype=c.meta["val"].dtype) for c in decoder.caches]
    with torch.no_grad():
        generator.reset_state()
        try:
            want = [generator.prefill(ids, mask, position).clone(), generator.decode(token, mask, next_position)]
        finally:
            generator.reset_state()
        first = decoder.gm(ids, mask, position, *caches)
        second = decoder.gm(token, mask, next_position, *first[1:len(decoder.outputs)])
    tolerance = 1e-4 if want[0].dtype in (torch.float32, torch.float64) else 2e-2
    for step, got, expected in (("prompt", first[0], want[0]), ("decode", second[0], want[1])):
        error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
        if not error <= tolerance:
            raise OnnxExportError(f"generator export: the decoder graph's {step} logits differ from the compiled "
                                  f"{step} program's by {error:.2e} (relative max); it cannot stand in for them")


def _overwritten_first(node: Node) -> bool:
    """The first use of the state tensor writes all of it (copy_ into it, src broadcast), so its old value
    is never read."""
    first = min(node.users, key=_position, default=None)
    return first is not None and first.target is OVERWRITE and first.args[0] is node


def _position(node: Node) -> int:
    return next(i for i, n in enumerate(node.graph.nodes) if n is node)


def _as_input(graph: torch.fx.Graph, node: Node, name: str) -> Node:
    """Replace a carried state tensor by a placeholder (after the program's inputs) and a clone of it."""
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        past = graph.placeholder(name)
    past.meta["val"] = node.meta["val"]
    return _private_copy(graph, node, source=past)


def _private_copy(graph: torch.fx.Graph, node: Node, source: Node | None = None) -> Node:
    """A clone of `source` (default: the constant itself) in place of `node` for every use; `node` is
    erased when `source` replaces it."""
    with graph.inserting_before(min(node.users, key=_position)):
        clone = graph.call_function(CLONE, (source or node,))
    clone.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(clone, delete_user_cb=lambda user: user is not clone)
    if source is not None:
        graph.erase_node(node)
    return clone
