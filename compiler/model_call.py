"""How capture calls a stock model: constant keyword inputs are baked in, unreturnable outputs dropped.

A transformers model takes flags beside its tensors (`use_cache=False`,
`return_dict=True`, `output_attentions=False`) and returns a cache object
(`DynamicCache`) beside its logits. torch.export takes neither as they are, so
capture exports the model with its forward bound:

- every keyword input with no tensor in it (None, bool, int, float, str, or a
  tuple/list/dict of those) is a constant of the capture: the graph is
  specialised to it and does not take it as an input. At call time the same
  value (or leaving it out) is accepted; a different value is an
  InputMismatchError naming the keyword.
- a model that would build a fresh KV cache (a `use_cache` argument, no cache
  object among the inputs) is captured with `use_cache=False`: the program
  keeps no cache, and the cache's bookkeeping (concatenations onto empty
  tensors) stays out of the graph. `dropped_outputs` says so.
- every output field torch.export cannot return (a cache object, any value
  holding an object that is neither a tensor nor plain data) is dropped from the program's
  outputs; `dropped_outputs` names each one. The rest keeps the model's own
  output class, so `.logits`, `["logits"]` and `[0]` work as on the model.
"""
from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch.utils import _pytree as pytree

from sparsecc.runtime.inputs import CONSTANT_LEAVES, without_constants


@dataclass
class BoundCall:
    """What capture baked into the graph (`constants`) and took out of its outputs (`dropped_outputs`)."""
    constants: dict[str, Any] = field(default_factory=dict)
    dropped_outputs: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)   # applied in the capture only (use_cache=False)

    def graph_kwargs(self, kwargs: Optional[dict]) -> dict:
        """`kwargs` without the constants, which must equal the captured values (or be left out)."""
        return without_constants(self.constants, kwargs)


def bind_call(model: torch.nn.Module, kwargs: Optional[dict]) -> tuple[dict, BoundCall]:
    """(the keyword inputs torch.export takes, what capture binds) for calling `model` with `kwargs`."""
    tensors, constants = split_constants(kwargs)
    bound = BoundCall(constants)
    if _builds_cache(model, kwargs or {}):
        bound.overrides["use_cache"] = False
        bound.dropped_outputs.append("KV cache (captured with use_cache=False: the program returns no cache)")
    return tensors, bound


def _builds_cache(model: torch.nn.Module, kwargs: dict) -> bool:
    """The forward takes `use_cache`, is not handed a cache object, and would make one (given or config)."""
    if "use_cache" not in inspect.signature(model.forward).parameters or any(map(_is_cache, kwargs.values())):
        return False
    wanted = kwargs.get("use_cache", getattr(getattr(model, "config", None), "use_cache", None))
    return wanted is not False


def split_constants(kwargs: Optional[dict]) -> tuple[dict, dict]:
    """(tensor keyword inputs, constant keyword inputs) of `kwargs`."""
    tensors, constants = {}, {}
    for name, value in (kwargs or {}).items():
        (constants if is_constant(value) else tensors)[name] = value
    return tensors, constants


def graph_dynamic_shapes(dynamic_shapes: Any, constants: dict) -> Any:
    """`dynamic_shapes` given by argument name, without the constants (the graph does not take them)."""
    if not isinstance(dynamic_shapes, dict):
        return dynamic_shapes
    return {name: spec for name, spec in dynamic_shapes.items() if name not in constants}


def is_constant(value: Any) -> bool:
    """Plain data with no tensor in it: None, a scalar, a string, or a container of those."""
    return all(isinstance(leaf, CONSTANT_LEAVES) for leaf in pytree.tree_leaves(value))


@contextmanager
def bound_forward(model: torch.nn.Module, bound: BoundCall) -> Iterator[None]:
    """While active, `model.forward` adds `bound.constants` to every call and drops unreturnable
    outputs (recording them in `bound.dropped_outputs`). The model's own attributes are put back after."""
    original = model.forward
    had_own = "forward" in vars(model)

    @functools.wraps(original)   # torch.export reads the signature through __wrapped__
    def forward(*args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs, **{**bound.constants, **bound.overrides})
        return returnable(output, bound.dropped_outputs)

    # wraps copies a function's own __signature__ (the ONNX importer sets one, with `self`): the
    # bound method's signature is the one torch.export must bind the inputs to
    forward.__signature__ = inspect.signature(original)
    object.__setattr__(model, "forward", forward)
    try:
        yield
    finally:
        if had_own:
            object.__setattr__(model, "forward", original)
        else:
            object.__delattr__(model, "forward")


def returnable(output: Any, dropped: list[str]) -> Any:
    """`output` without the fields torch.export cannot return; appends each dropped field's name."""
    if isinstance(output, dict):     # a transformers ModelOutput is a dict subclass
        kept = {key: value for key, value in output.items() if _keep(value, str(key), dropped)}
        if len(kept) == len(output):
            return output
        return kept if type(output) is dict else type(output)(**kept)
    if isinstance(output, tuple) and not hasattr(output, "_fields"):   # return_dict=False
        return tuple(value for index, value in enumerate(output) if _keep(value, f"[{index}]", dropped))
    return output


def _keep(value: Any, name: str, dropped: list[str]) -> bool:
    # a cache object, or any other object that is neither a tensor nor plain data (what export cannot return)
    returnable_leaves = all(isinstance(leaf, (torch.Tensor, *CONSTANT_LEAVES)) for leaf in pytree.tree_leaves(value))
    if _is_cache(value) or not returnable_leaves:
        note = f"{name} ({type(value).__name__})"
        if note not in dropped:   # export may run the forward more than once
            dropped.append(note)
        return False
    return True


def _is_cache(value: Any) -> bool:
    """A transformers cache object (DynamicCache, StaticCache, ...): dropped even when registered as a pytree."""
    return any(cls.__name__ == "Cache" and cls.__module__.startswith("transformers.") for cls in type(value).__mro__)
