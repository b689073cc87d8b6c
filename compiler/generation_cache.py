"""A bounded KV cache for generation under the `window` attention policy: sinks plus a ring of window slots.

Semantics (token level, per row). Positions count from a row's first real token, as its position ids
(and RoPE) do. The query at position p attends the keys at positions j with

    j <= p  and  (j < sinks  or  p - j < window)

and never a left-padding key. Keys are stored after RoPE at their own position, as transformers stores
them, so the ring changes no number: it only drops keys no later query attends (StreamingLLM).

Layout, per layer: keys / values [B, Hkv, sinks + window, D], plus one slot-position tensor [B, slots]
int64 shared by the layers (the position each slot holds, -1 while empty); all of them are program state.
Position p lives in slot p when p < sinks, else in slot sinks + (p - sinks) % window, so a window slot is
overwritten by the position `window` later: the first query that no longer sees it.

A step of S tokens (positions differ per row, so slots do too):

    S == 1 (decode)   writes its key first, then attends the slots: mask [B, 1, 1, slots], no copy of the ring.
    S >= 2 (prefill)  attends the slots as they were plus its own keys (keys [.., slots + S, ..],
                      mask [B, 1, S, slots + S]); then each slot takes the latest of the step's positions that
                      maps to it (a gather: S may exceed window). The generator feeds a prompt in chunks of
                      `window` tokens (runtime.generation), so no step's mask exceeds window x (slots + window)
                      and every chunk is exact: the keys its queries need are in the ring or in the chunk.

The mask goes to the model as a 4-D mask, which transformers' mask functions pass through as given: boolean
(True = attend) for `sdpa`, additive (0 / dtype min) for `eager`.

Policies are per layer. A model's own sliding-window layers (GPT-OSS, Mistral, Gemma: `q - k < W`) are rings
of their window with no sinks, exact; a requested window policy rings the full-attention layers (and a
sliding layer whose window is larger than the request). Layers without a policy stay full static layers
(slot = cache position) under the causal + padding mask. Where the model takes one mask per layer type
(`config.layer_types`), the step passes the mapping {type: mask}; otherwise every layer must share one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from sparsecc.passes.attention.sparse_attention import SparseAttention

from .errors import ConfigError

MASK_FORMATS = ("sdpa", "eager")   # attention implementations that take a 4-D mask as given


@dataclass(frozen=True)
class WindowPolicy:
    window: int   # keys a query sees besides the sinks, itself included
    sinks: int    # first positions of a row, always seen

    @property
    def slots(self) -> int:
        return self.sinks + self.window

    def slot_of(self, positions: torch.Tensor) -> torch.Tensor:
        window_slot = self.sinks + (positions - self.sinks).remainder(self.window)
        return torch.where(positions < self.sinks, positions, window_slot)

    def sees(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Whether a query at position `query` attends a key at `key` (broadcast; -1 = no key)."""
        return (key >= 0) & (key <= query) & ((key < self.sinks) | (query - key < self.window))


def window_cache_policy(passes: list) -> tuple[Optional[WindowPolicy], list]:
    """The window policy a ring cache realises for `passes`, and the passes without that sparse-attention
    pass: the ring and its token-level mask are the policy (the pass's block-granular layout is not)."""
    windows = [p for p in passes if isinstance(p, SparseAttention) and p.policy == "window"]
    if not windows:
        return None, passes
    if len({(p.window, p.sinks) for p in windows}) > 1:
        raise ConfigError("mode='generate': two sparse-attention window passes with different windows; "
                          "one ring cache realises one window")
    return WindowPolicy(windows[0].window, windows[0].sinks), [p for p in passes if p not in windows]


@dataclass
class RingWrite:
    """Where one step's keys go. Decode: row b's key to `slot[b]`. Prefill: slot s of row b takes the step's
    key `source[b, s]` where `take[b, s]`, and keeps its own elsewhere."""
    slot: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    take: Optional[torch.Tensor] = None


class RingState:
    """One policy's ring bookkeeping, shared by its layers: the position each slot holds ([B, slots] int64,
    -1 while empty; program state) and the current step's writes."""

    def __init__(self, policy: WindowPolicy, batch_size: int, device: torch.device):
        self.policy = policy
        self.slot_positions = torch.full((batch_size, policy.slots), -1, dtype=torch.long, device=device)
        self.write, self.next_positions = RingWrite(), self.slot_positions

    def begin(self, positions: torch.Tensor, real: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """Plan the step's writes; the boolean [B, 1, S, keys] visibility of the keys the ring's layers return.
        A step at cache position 0 starts a sequence: the ring counts as empty."""
        query = positions[:, None, :, None]
        held = torch.where(cache_position[0] == 0, -1, self.slot_positions)
        if positions.shape[1] == 1:
            slot = self.policy.slot_of(positions[:, 0])
            self.write = RingWrite(slot=slot)
            self.next_positions = held.scatter(1, slot[:, None], positions)
            return self.policy.sees(query, self.next_positions[:, None, None, :])
        keys = torch.cat([held, torch.where(real, positions, -1)], 1)[:, None, None, :]
        self.write, self.next_positions = self._prefill_write(positions, real, held)
        return self.policy.sees(query, keys)

    def end(self) -> None:
        self.slot_positions.copy_(self.next_positions)
        self.write = RingWrite()

    def _prefill_write(self, positions: torch.Tensor, real: torch.Tensor,
                       held: torch.Tensor) -> tuple[RingWrite, torch.Tensor]:
        """Each slot's latest step position: for window slot s, the largest p <= last with p = s (mod window);
        real tokens are the step's last `count` (left padding), so step index = S - 1 - (last - p)."""
        policy, length = self.policy, positions.shape[1]
        slot = torch.arange(policy.slots, device=positions.device)[None, :]
        last, count = positions[:, -1:], real.sum(1, keepdim=True)
        latest = torch.where(slot < policy.sinks, slot, last - (last - slot).remainder(policy.window))
        take = ((count > 0) & (latest > last - count) & (latest <= last)
                & ((slot < policy.sinks) | (latest >= policy.sinks)))
        source = (length - 1 - (last - latest)).clamp(0, length - 1)
        return RingWrite(source=source, take=take), torch.where(take, latest, held)


class RingLayer(CacheLayerMixin):
    """One layer's keys and values in the ring; `update` follows the step's RingWrite."""
    is_compileable = True
    is_sliding = False

    def __init__(self, ring: RingState, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.ring, self.keys, self.values = ring, keys, values
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise ConfigError("window cache: ring tensors are allocated up front, never lazily")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        write = self.ring.write
        if write.slot is None and write.source is None:
            raise ConfigError("window cache: a layer was updated outside a step (CachedStep plans each step's writes)")
        if write.slot is not None:   # decode: the evicted key is one this query no longer sees
            _scatter(self.keys, write.slot, key_states)
            _scatter(self.values, write.slot, value_states)
            return self.keys, self.values
        seen = torch.cat([self.keys, key_states], 2), torch.cat([self.values, value_states], 2)
        _take(self.keys, write, key_states)
        _take(self.values, write, value_states)
        return seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        slots = self.keys.shape[2]
        return (slots, 0) if query_length == 1 else (slots + query_length, 0)

    def get_seq_length(self) -> int:
        return int((self.ring.slot_positions[0] >= 0).sum())

    def get_max_length(self) -> int:
        return -1   # positions are unbounded: the ring keeps the last window


def _scatter(ring: torch.Tensor, slot: torch.Tensor, states: torch.Tensor) -> None:
    batch, heads, _, dim = states.shape
    ring.scatter_(2, slot.view(batch, 1, 1, 1).expand(batch, heads, 1, dim), states)


def _take(ring: torch.Tensor, write: RingWrite, states: torch.Tensor) -> None:
    batch, heads, _, dim = ring.shape
    source = write.source[:, None, :, None].expand(batch, heads, -1, dim)
    ring.copy_(torch.where(write.take[:, None, :, None], states.gather(2, source), ring))


class WindowCache(Cache):
    """transformers' cache protocol over RingLayers (and full static layers where a layer has no policy).
    `begin_step` plans the step's writes and returns what to pass the model as its mask; `end_step`
    records the slots' new positions."""

    def __init__(self, probe: Cache, policies: list[Optional[WindowPolicy]], batch_size: int, mask_format: str,
                 layer_types: Optional[list[str]] = None):
        if mask_format not in MASK_FORMATS:
            raise ConfigError(f"window cache: attention implementation {mask_format!r} does not take a 4-D mask "
                              f"as given (use one of {', '.join(MASK_FORMATS)})")
        if len(policies) != len(probe.layers):
            raise ConfigError(f"window cache: {len(policies)} layer policies for {len(probe.layers)} cache layers")
        device = probe.layers[0].keys.device
        self.rings = {p: RingState(p, batch_size, device) for p in dict.fromkeys(p for p in policies if p)}
        layers = [probe.layers[i] if p is None else
                  RingLayer(self.rings[p], _ring(probe.layers[i].keys, p.slots), _ring(probe.layers[i].values, p.slots))
                  for i, p in enumerate(policies)]
        super().__init__(layers=layers)
        self.policies, self.mask_format = policies, mask_format
        self.mask_keys = _mask_keys(policies, layer_types)

    @property
    def slot_positions(self) -> torch.Tensor:
        """The first ring's slot positions (the only ring unless layers differ in window)."""
        return next(iter(self.rings.values())).slot_positions

    def begin_step(self, positions: torch.Tensor, real: torch.Tensor, cache_position: torch.Tensor,
                   attention_mask: torch.Tensor) -> Any:
        """positions [B, S] (each row's own), real [B, S] (False on left padding), cache_position [S],
        attention_mask [B, L] (the static layers' slots) -> the model's 4-D mask, or {layer type: mask}."""
        visible = {p: ring.begin(positions, real, cache_position) for p, ring in self.rings.items()}
        if None in self.policies:   # full static layers: slot = cache position, causal + padding
            slots = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            visible[None] = ((slots[None, None, None, :] <= cache_position[None, None, :, None])
                             & (attention_mask[:, None, None, :] != 0))
            for layer, policy in zip(self.layers, self.policies):
                if policy is None:
                    layer.cumulative_length.copy_(cache_position[0])
        if isinstance(self.mask_keys, dict):
            return {kind: self._mask(visible[policy]) for kind, policy in self.mask_keys.items()}
        return self._mask(visible[self.mask_keys])

    def end_step(self) -> None:
        for ring in self.rings.values():
            ring.end()

    def _mask(self, visible: torch.Tensor) -> torch.Tensor:
        if self.mask_format == "sdpa":
            return visible
        dtype = self.layers[0].keys.dtype
        return (~visible).to(dtype) * torch.finfo(dtype).min

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values))

    def describe(self, max_length: int) -> dict:
        """The generator spec's cache entry; dense_bytes is a static cache of max_length for comparison, chunk
        the prefill chunk (the smallest window: no chunk's keys outrun a ring)."""
        state = self.kv_bytes() + sum(r.slot_positions.numel() * r.slot_positions.element_size()
                                      for r in self.rings.values())
        dense = sum((layer.keys.numel() + layer.values.numel()) // layer.keys.shape[2] * layer.keys.element_size()
                    * max_length for layer in self.layers)
        entry = {"kind": "window", "bytes": state, "dense_bytes": dense, "chunk": min(p.window for p in self.rings)}
        if len(self.rings) == 1 and None not in self.policies:
            policy = next(iter(self.rings))
            return {**entry, "window": policy.window, "sinks": policy.sinks, "slots": policy.slots}
        rings = [{"window": p.window, "sinks": p.sinks, "slots": p.slots,
                  "layers": [i for i, q in enumerate(self.policies) if q == p]} for p in self.rings]
        return {**entry, "rings": rings, "full_layers": [i for i, p in enumerate(self.policies) if p is None]}


def _mask_keys(policies: list[Optional[WindowPolicy]], layer_types: Optional[list[str]]) -> Any:
    """{layer type: its policy} where the model takes a mask per layer type, else the one policy all share."""
    if layer_types is None:
        if len(set(policies)) > 1:
            raise ConfigError("window cache: layers with different windows need a model that takes one mask per "
                              "layer type (config.layer_types)")
        return policies[0]
    keys: dict[str, Optional[WindowPolicy]] = {}
    for kind, policy in zip(layer_types, policies):
        if keys.setdefault(kind, policy) != policy:
            raise ConfigError(f"window cache: layers of type {kind!r} have different windows")
    return keys


def layer_policies(windows: list[Optional[int]], requested: Optional[WindowPolicy]) -> list[Optional[WindowPolicy]]:
    """Each cache layer's ring policy. `windows`: a layer's own sliding window (None: full attention). A
    sliding layer keeps its own window (no sinks) unless the request is narrower; full layers take the request."""
    policies = []
    for own in windows:
        if own is None or (requested is not None and requested.window <= own):
            policies.append(requested)
        else:
            policies.append(WindowPolicy(own, 0))
    return policies


def _ring(like: torch.Tensor, slots: int) -> torch.Tensor:
    batch, heads, _, dim = like.shape
    return torch.zeros(batch, heads, slots, dim, dtype=like.dtype, device=like.device)
