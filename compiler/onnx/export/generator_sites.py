"""Attention sites of a decoder graph that com.microsoft.GroupQueryAttention can compute with its cache.

A layer maps when its attention (`passes.attention.sites`: SDPA or eager softmax
attention, k and v read through repeat_kv) reads exactly the layer's two cache
writes, `index_copy_(cache, 2, index, new)`, and on sample steps run through the
graph (a prompt with left padding, a decode step after it, a decode step at the
last position without padding) the write index equals `cache_position` and the
mask lets query row s (at position p = cache_position[s]) see key j exactly when

    j <= p  and  j > p - W (W = local_window_size, -1: no window)  and  attention_mask[b, j] == 1

for every row that is not padding itself (padding rows' outputs only reach keys
that every real row masks). GroupQueryAttention applies the causal band from its
sequence lengths and takes the padding as an additive attention_bias. Each site
becomes extra graph outputs (q, new k, new v, the attention output) that the ONNX
rewrite finds by position (`generator_gqa`) and removes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from sparsecc.passes.attention.sites import NotAttention, attention_site
from .generator_graph import DecoderGraph, sample_steps

WRITE = torch.ops.aten.index_copy_.default
_FLOATS = (torch.float32, torch.float16)
aten = torch.ops.aten
_VIEWS = {aten.unsqueeze.default, aten.expand.default, aten.reshape.default, aten.view.default,
          aten.transpose.int, aten.slice.Tensor, aten.contiguous.default, aten.clone.default}


@dataclass
class CacheSite:
    layer: int
    root: Node            # the attention output [B, Hq, S, D]
    q: Node
    k: Node               # this step's keys [B, Hkv, S, D], before the cache write
    v: Node
    q_heads: int
    kv_heads: int
    head_dim: int
    scale: float
    softcap: float
    window: int = -1      # local_window_size, read off the mask on the sample steps


@dataclass
class SiteReport:
    """Per layer, a site that maps or why not (the export log says which)."""
    sites: list[CacheSite]
    reasons: dict[int, str]


def attention_sites(decoder: DecoderGraph, spec) -> SiteReport:
    """Find and check every layer's site; the mapped ones become extra outputs of decoder.gm."""
    writes = {_write_of(cache): index for index, cache in enumerate(decoder.caches)}
    writes.pop(None, None)
    sites, reasons, probes = [], {}, []
    for node in list(decoder.gm.graph.nodes):
        try:
            site = attention_site(node)
        except NotAttention as err:
            reasons.setdefault(_layer_read(node, writes), f"{node.name}: {err}")
            continue
        if site is None:
            continue
        found = _cache_site(site, writes)
        if isinstance(found, str):
            reasons.setdefault(_layer_read(node, writes), f"{node.name}: {found}")
            continue
        sites.append(found)
        probes.append((found, site.mask, site.k.args[2], site.v.args[2]))
    reasons.pop(-1, None)   # attention that reads no cache is not a site
    for layer in range(len(decoder.caches) // 2):
        if not any(s.layer == layer for s in sites):
            reasons.setdefault(layer, f"its cache is read by {_reader(decoder.caches[2 * layer])} (GroupQueryAttention "
                                      "replaces scaled_dot_product_attention or eager softmax attention)")
    checked = _check_on_samples(decoder, probes, spec)
    reasons.update({s.layer: checked[s.layer] for s in sites if isinstance(checked[s.layer], str)})
    sites = [s for s in sites if s.layer not in reasons]
    for s in sites:
        s.window = checked[s.layer]
    _mark_outputs(decoder, [n for s in sites for n in (s.q, s.k, s.v, s.root)])
    return SiteReport(sites, reasons)


def _write_of(cache: Node) -> Node | None:
    """The one index_copy_ into `cache` along the sequence dim, else None."""
    users = [u for u in cache.users if u.op != "output"]
    if len(users) == 1 and users[0].target is WRITE and users[0].args[0] is cache and users[0].args[1] in (2, -2):
        return users[0]
    return None


def _reader(cache: Node) -> str:
    """The first op past views that reads the cache's write (breadth first), for the export log."""
    todo = list(cache.users)
    while todo:
        node = todo.pop(0)
        if node.op == "call_function" and node.target not in _VIEWS and node.target is not WRITE:
            return str(node.target).removesuffix(".default")
        todo.extend(node.users)
    return "nothing"


def _layer_read(node: Node, writes: dict) -> int:
    """The layer whose cache write `node` reads (through views), -1 when none."""
    seen, todo = set(), list(node.all_input_nodes)
    while todo:
        current = todo.pop()
        if current in writes:
            return writes[current] // 2
        if current not in seen and current.op == "call_function":
            seen.add(current)
            todo.extend(current.all_input_nodes)
    return -1


def _cache_site(site, writes: dict) -> CacheSite | str:
    key, value = writes.get(site.k), writes.get(site.v)
    if key is None or value is None or key % 2 or value != key + 1:
        return "its k and v are not one layer's key and value cache writes (index_copy_ into the static cache)"
    q, k = site.q.meta["val"], site.k.meta["val"]
    new_k, new_v = (w.args[3].meta["val"] for w in (site.k, site.v))
    if site.sinks is not None:
        return "it has sink logits"
    if q.dtype not in _FLOATS or len({q.dtype, new_k.dtype, new_v.dtype}) != 1:
        return (f"q, k, v dtypes {q.dtype}, {new_k.dtype}, {new_v.dtype} (GroupQueryAttention takes one of "
                "float32, float16)")
    if q.shape[1] % k.shape[1] or new_v.shape[-1] != q.shape[-1] or site.scale == 0.0:
        return f"q heads {q.shape[1]} over {k.shape[1]} kv heads, v head dim {new_v.shape[-1]}, scale {site.scale}"
    return CacheSite(key // 2, site.root, site.q, site.k.args[3], site.v.args[3], int(q.shape[1]), int(k.shape[1]),
                     int(q.shape[-1]), site.scale, site.softcap)


def _check_on_samples(decoder: DecoderGraph, probes: list, spec) -> dict[int, int | str]:
    """Per layer probed: its local_window_size, or why its write index or mask is not what GQA does."""
    if not probes:
        return {}
    _mark_outputs(decoder, [n for _, mask, *index in probes for n in (mask, *index)])
    pasts = [torch.zeros(c.meta["val"].shape, dtype=c.meta["val"].dtype) for c in decoder.caches]
    runs = []
    with torch.no_grad():
        for ids, mask, position in sample_steps(spec):
            out = decoder.gm(ids, mask, position, *pasts)
            runs.append((mask, position, out[len(decoder.outputs):]))
    found = {}
    for number, (site, *_rest) in enumerate(probes):
        seen = [(mask, position, *run[3 * number: 3 * number + 3]) for mask, position, run in runs]
        found[site.layer] = window_of(seen)
    return found


def window_of(seen: list) -> int | str:
    """local_window_size, or why none fits. `seen` has per sample step (attention_mask [B, L],
    cache_position [S], the attention's mask [B|1, H|1, S, L], key write index, value write index); the
    last step is a decode step at position L - 1 without padding, where the mask's width is the window."""
    for _, position, _, key_index, value_index in seen:
        if not (torch.equal(key_index, position) and torch.equal(value_index, position)):
            return "the cache is not written at cache_position"
    last = _visible(*seen[-1][:3])
    if last is None:
        return "its mask is not one boolean mask shared by the heads"
    width = int(last[:, -1].sum(-1).max())
    window = -1 if width >= last.shape[-1] else width
    for mask, position, attended, _, _ in seen:
        visible = _visible(mask, position, attended)
        if visible is None or not torch.equal(visible[_real(mask, position)], _band(mask, position, window)[
                _real(mask, position)]):
            return (f"its mask is not the causal band (window {window}) with key padding from attention_mask "
                    f"at cache_position {position.tolist()[:4]}")
    return window


def _visible(mask: torch.Tensor, position: torch.Tensor, attended: torch.Tensor | None) -> torch.Tensor | None:
    """[B, S, L] bool from an attention mask [B|1, H|1, S|1, L] whose heads agree, None if it is not
    a boolean mask."""
    if attended is None or attended.dtype != torch.bool or not bool((attended == attended[:, :1]).all()):
        return None
    return attended[:, 0].expand(mask.shape[0], position.shape[0], -1)


def _band(mask: torch.Tensor, position: torch.Tensor, window: int) -> torch.Tensor:
    keys = torch.arange(mask.shape[1])[None, None, :]
    at = position[None, :, None]
    seen = (keys <= at) & (mask[:, None, :] != 0)
    return seen & (keys > at - window) if window > 0 else seen


def _real(mask: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """[B, S] True where the query row is a token (not left padding)."""
    return mask[:, position] != 0


def _mark_outputs(decoder: DecoderGraph, nodes: list[Node]) -> None:
    """The graph returns its decoder outputs, then `nodes` (replacing earlier extra outputs)."""
    output = next(n for n in reversed(decoder.gm.graph.nodes) if n.op == "output")
    output.args = (tuple(output.args[0][: len(decoder.outputs)]) + tuple(nodes),)
    decoder.gm.recompile()
