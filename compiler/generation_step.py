"""One generation step of a causal LM over a static KV cache, as a module sparsecc captures.

`CachedStep(model, batch_size, max_length)` holds a transformers `StaticCache` whose tensors
are its buffers. Its forward takes what `sparsecc.runtime.generation` feeds both programs
(input_ids [B, S], attention_mask [B, max_length], cache_position [S]), writes the step's
keys and values at `cache_position`, and returns the last position's logits [B, V]. Position
ids come from the mask (a left-padded row counts from its first real token), as in
transformers' `generate`. The cache is sized by running the model once on a two-token
prompt (each layer allocates its own key/value shapes), then emptied.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from .capture import eval_mode
from .errors import ConfigError


class CachedStep(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, batch_size: int, max_length: int):
        super().__init__()
        self.model = model
        self.cache = _static_cache(model, batch_size, max_length)
        for index, layer in enumerate(self.cache.layers):
            for name, value in vars(layer).items():
                if isinstance(value, torch.Tensor):
                    self.register_buffer(f"cache_{index}_{name}", value, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache_position: torch.Tensor):
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(cache_position[0])
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions[:, cache_position],
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def cache_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name.startswith("cache_"))


def _static_cache(model: torch.nn.Module, batch_size: int, max_length: int) -> Any:
    import transformers
    config = getattr(model, "config", None)
    if config is None or "cache" not in _forward_parameters(model):
        raise ConfigError(f"mode='generate': {type(model).__name__} is not a transformers causal LM (its forward takes "
                          "no `cache`); generation needs a model with transformers' cache protocol")
    cache = transformers.StaticCache(config=config, max_cache_len=max_length)
    dummy = torch.zeros(batch_size, 2, dtype=torch.long, device=_device(model))
    with eval_mode(model), torch.no_grad():
        model(input_ids=dummy, cache=cache, use_cache=True, logits_to_keep=1)
    for layer in cache.layers:
        if not hasattr(layer, "cumulative_length") or not getattr(layer, "is_initialized", False):
            raise ConfigError(f"mode='generate': {type(model).__name__}'s cache layer {type(layer).__name__} is not a "
                              "static layer with a write position (cumulative_length)")
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                value.zero_()
    return cache


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
