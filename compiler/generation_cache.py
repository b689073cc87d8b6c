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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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


class RingLayer(CacheLayerMixin):
    """One layer's keys and values in the ring; `update` follows the step's RingWrite."""
    is_compileable = True
    is_sliding = False

    def __init__(self, cache: "WindowCache", keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.cache, self.keys, self.values = cache, keys, values
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise ConfigError("window cache: ring tensors are allocated up front, never lazily")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        write = self.cache.write
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
        return int((self.cache.slot_positions[0] >= 0).sum())

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
    """transformers' cache protocol over RingLayers. `begin_step` plans the step's writes and returns the
    4-D mask to pass to the model; `end_step` records the slots' new positions."""

    def __init__(self, probe: Cache, policy: WindowPolicy, batch_size: int, mask_format: str):
        if mask_format not in MASK_FORMATS:
            raise ConfigError(f"window cache: attention implementation {mask_format!r} does not take a 4-D mask "
                              f"as given (use one of {', '.join(MASK_FORMATS)})")
        layers = [RingLayer(self, _ring(layer.keys, policy.slots), _ring(layer.values, policy.slots))
                  for layer in probe.layers]
        super().__init__(layers=layers)
        self.policy, self.mask_format = policy, mask_format
        self.slot_positions = torch.full((batch_size, policy.slots), -1, dtype=torch.long,
                                         device=layers[0].keys.device)
        self.write, self.next_positions = RingWrite(), self.slot_positions

    def begin_step(self, positions: torch.Tensor, real: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """positions [B, S] (each row's own), real [B, S] (False on left padding), cache_position [S]
        -> the model's 4-D mask. A step at cache position 0 starts a sequence: the ring counts as empty."""
        query = positions[:, None, :, None]
        held = torch.where(cache_position[0] == 0, -1, self.slot_positions)
        if positions.shape[1] == 1:
            slot = self.policy.slot_of(positions[:, 0])
            self.write = RingWrite(slot=slot)
            self.next_positions = held.scatter(1, slot[:, None], positions)
            return self._mask(self.policy.sees(query, self.next_positions[:, None, None, :]))
        keys = torch.cat([held, torch.where(real, positions, -1)], 1)[:, None, None, :]
        self.write, self.next_positions = self._prefill_write(positions, real, held)
        return self._mask(self.policy.sees(query, keys))

    def end_step(self) -> None:
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

    def _mask(self, visible: torch.Tensor) -> torch.Tensor:
        if self.mask_format == "sdpa":
            return visible
        dtype = self.layers[0].keys.dtype
        return (~visible).to(dtype) * torch.finfo(dtype).min

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values))

    def describe(self, max_length: int) -> dict:
        """The generator spec's cache entry; dense_bytes is a static cache of max_length for comparison."""
        policy, kv = self.policy, self.kv_bytes()
        state = kv + self.slot_positions.numel() * self.slot_positions.element_size()
        return {"kind": "window", "window": policy.window, "sinks": policy.sinks, "slots": policy.slots,
                "bytes": state, "dense_bytes": kv // policy.slots * max_length, "chunk": policy.window}


def _ring(like: torch.Tensor, slots: int) -> torch.Tensor:
    batch, heads, _, dim = like.shape
    return torch.zeros(batch, heads, slots, dim, dtype=like.dtype, device=like.device)
