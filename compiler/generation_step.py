"""One generation step of a causal LM over a static KV cache, as a module sparsecc captures.

`CachedStep(model, batch_size, max_length)` holds a transformers `StaticCache` whose tensors
are its buffers. Its forward takes what `sparsecc.runtime.generation` feeds both programs
(input_ids [B, S], attention_mask [B, max_length], cache_position [S]), writes the step's
keys and values at `cache_position`, and returns the last position's logits [B, V]. Position
ids come from the mask (a left-padded row counts from its first real token), as in
transformers' `generate`. The cache is sized by running the model once on a two-token
prompt (each layer allocates its own key/value shapes), then emptied.

With a `WindowPolicy`, or a model with sliding-window layers shorter than max_length, those layers'
cache is a ring of sinks + window slots instead (generation_cache.py): the step passes the model the
rings' own 4-D masks, built from the slots' positions and the step's.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from sparsecc.runtime.generation import MIN_PROMPT

from .capture import eval_mode
from .errors import ConfigError
from .generation_cache import WindowCache, WindowPolicy, layer_policies


class CachedStep(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, batch_size: int, max_length: int, window: Optional[WindowPolicy] = None):
        super().__init__()
        self.model = model
        policies = layer_policies(sliding_windows(model, max_length), window)
        if not any(policies):
            self.cache = _static_cache(model, batch_size, max_length)
        else:   # rings (generation_cache); an all-ring probe cache only gives the layers' shapes
            probe = _static_cache(model, batch_size, max_length if None in policies else MIN_PROMPT)
            types = getattr(model.config, "layer_types", None)
            self.cache = WindowCache(probe, policies, batch_size, model.config._attn_implementation,
                                     types if types is not None and len(set(types)) > 1 else None)
            for index, ring in enumerate(self.cache.rings.values()):
                name = "cache_slot_positions" + (f"_{index}" if index else "")
                self.register_buffer(name, ring.slot_positions, persistent=False)
        for index, layer in enumerate(self.cache.layers):
            for name, value in vars(layer).items():
                if isinstance(value, torch.Tensor):
                    self.register_buffer(f"cache_{index}_{name}", value, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache_position: torch.Tensor):
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, cache_position]
        if isinstance(self.cache, WindowCache):   # the rings' own 4-D masks: slots' positions vs the step's
            mask = self.cache.begin_step(positions, attention_mask[:, cache_position] != 0, cache_position,
                                         attention_mask)
        else:
            for layer in self.cache.layers:
                layer.cumulative_length.copy_(cache_position[0])
            mask = attention_mask
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        if isinstance(self.cache, WindowCache):
            self.cache.end_step()
        return out.logits[:, -1]

    def cache_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name.startswith("cache_"))


def sliding_windows(model: torch.nn.Module, max_length: int) -> list[Optional[int]]:
    """Each cache layer's own sliding window where it is shorter than max_length, else None (a layout only:
    transformers' static layers allocate on their first write)."""
    from transformers.cache_utils import StaticSlidingWindowLayer
    layout = _cache_layout(model, max_length)
    return [layer.max_cache_len if isinstance(layer, StaticSlidingWindowLayer) and layer.max_cache_len < max_length
            else None for layer in layout.layers]


def _cache_layout(model: torch.nn.Module, max_length: int) -> Any:
    """transformers' StaticCache for the model's config (no tensors yet), or a clear refusal."""
    import transformers
    config = getattr(model, "config", None)
    if config is None or "cache" not in _forward_parameters(model):
        raise ConfigError(f"mode='generate': {type(model).__name__} is not a transformers causal LM (its forward takes "
                          "no `cache`); generation needs a model with transformers' cache protocol")
    return transformers.StaticCache(config=config, max_cache_len=max_length)


def _static_cache(model: torch.nn.Module, batch_size: int, max_length: int) -> Any:
    from transformers.cache_utils import StaticLayer
    cache = _cache_layout(model, max_length)
    for index, layer in enumerate(cache.layers):
        if type(layer) is not StaticLayer:
            cache.layers[index] = _full_length_layer(model, index, layer, max_length)
    dummy = torch.zeros(batch_size, 2, dtype=torch.long, device=_device(model))
    with eval_mode(model), torch.no_grad():
        model(input_ids=dummy, cache=cache, use_cache=True, logits_to_keep=1)
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            raise ConfigError(f"mode='generate': {type(model).__name__}'s cache layer {type(layer).__name__} was not "
                              "written by a forward pass (not an attention cache layer sparsecc can own)")
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                value.zero_()
    return cache


def _full_length_layer(model: torch.nn.Module, index: int, layer: Any, max_length: int) -> Any:
    """A plain StaticLayer of max_length slots for a static variant (a sliding-window layer keeps a Python-int
    length and branches on it, which a captured program would freeze; CachedStep makes it a ring where its
    window is shorter than max_length). Other layer kinds (a recurrent state) are refused."""
    from transformers.cache_utils import StaticLayer
    if not isinstance(layer, StaticLayer):
        raise ConfigError(f"mode='generate': {type(model).__name__}'s cache layer {index} is a "
                          f"{type(layer).__name__}; generation supports attention caches (transformers StaticLayer)")
    return StaticLayer(max_cache_len=max_length)


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
