"""A transformers causal LM as stages that run one at a time: the decoder layers, then the head.

The model is built from its config with every parameter on the meta device
(buffers such as rotary frequencies are real: they are computed, not stored).
The embedding runs once per calibration batch with a catcher in place of
decoder layer 0, which records the layer's inputs (hidden states, and the
keyword tensors the model computes for every layer: position embeddings,
mask, positions). Each stage is then wrapped as a module whose tree mirrors
the checkpoint's names (`model.layers.3.self_attn.q_proj.weight`), so the
captured graph's weight attributes are the checkpoint's tensor names and the
include/exclude globs read as they do in `sparsecc.compile`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .checkpoint_io import CheckpointFiles
from .errors import ConfigError


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: Any) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(model_dir: str) -> nn.Module:
    """The checkpoint's causal LM with no weights loaded (eval mode, no KV cache)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.use_cache = False
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def decoder_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(module path, ModuleList) of the decoder layers: the ModuleList holding the most parameters."""
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod)]
    if not lists:
        raise ConfigError(f"prune_checkpoint: {type(model).__name__} has no stack of decoder layers (ModuleList)")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def load_weights(module: nn.Module, files: CheckpointFiles, skip: tuple[str, ...] = ()) -> None:
    """Give each parameter of `module` (named as in the checkpoint) its tensor, except names under `skip`."""
    for name, param in list(module.named_parameters()):
        if name.startswith(skip):
            continue
        if not files.holds(name):
            raise ConfigError(f"prune_checkpoint: the checkpoint has no tensor '{name}' the model needs")
        _set_parameter(module, name, files.read(name))


def free_weights(module: nn.Module) -> None:
    """Put every parameter of `module` back on the meta device (buffers stay): its memory is released."""
    for name, param in list(module.named_parameters()):
        if param.device.type != "meta":
            _set_parameter(module, name, param.to("meta"))


def _set_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, attr, nn.Parameter(tensor, requires_grad=False))


class _Caught(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("decoder layer 0 reached")
        self.args, self.kwargs = args, kwargs


class _Catcher(nn.Module):
    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise _Caught(args, kwargs)


@dataclass
class LayerInputs:
    """What decoder layer 0 receives for one batch: the hidden states and the keyword arguments."""
    hidden: torch.Tensor
    kwargs: dict


def catch_layer_inputs(model: nn.Module, stack: nn.ModuleList, batches: list[torch.Tensor]) -> list[LayerInputs]:
    """Run the model up to decoder layer 0 on each batch of token ids."""
    first, caught = stack[0], []
    stack[0] = _Catcher()
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids)
                except _Caught as got:
                    caught.append(LayerInputs(got.args[0] if got.args else got.kwargs.pop("hidden_states"),
                                              got.kwargs))
                else:
                    raise ConfigError("prune_checkpoint: the model ran to the end without reaching decoder layer 0")
    finally:
        stack[0] = first
    return caught


def mirror(root: nn.Module, paths: dict[str, nn.Module]) -> None:
    """Hold each module at its dotted path under `root`, so parameter names match the checkpoint's."""
    for path, module in paths.items():
        parent, *parts = root, *path.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], module)


_GIVEN = object()   # a leaf the caller passes as a tensor (None is a value a keyword may have)


class LayerCall(nn.Module):
    """Calls one decoder layer as the model does: `forward(hidden, tensors)`, the tensors being the
    tensor leaves of the keyword arguments caught for the layer (the other leaves are fixed)."""

    def __init__(self, path: str, layer: nn.Module, kwargs: dict):
        super().__init__()
        mirror(self, {path: layer})
        self.layer = [layer]           # a list: not registered twice
        leaves, self.spec = pytree.tree_flatten(kwargs)
        self.fixed = [_GIVEN if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

    @staticmethod
    def tensors(kwargs: dict) -> tuple[torch.Tensor, ...]:
        return tuple(leaf for leaf in pytree.tree_leaves(kwargs) if isinstance(leaf, torch.Tensor))

    def forward(self, hidden: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        given = iter(tensors)
        leaves = [next(given) if leaf is _GIVEN else leaf for leaf in self.fixed]
        out = self.layer[0](hidden, **pytree.tree_unflatten(leaves, self.spec))
        return out[0] if isinstance(out, tuple) else out


HEAD_BLOCK_WEIGHTS = 1 << 23   # weights per row block of the LM head (32 MB in fp32)


class HeadCall(nn.Module):
    """The final norm and the LM head, as the model applies them after the last decoder layer.

    The head [vocab, hidden] runs as row blocks `<head>.rows.<i>` whose outputs are concatenated:
    Wanda and SparseGPT choose each row from statistics of the input every block shares, so the
    blocks prune exactly as the whole matrix would, while the scores and sorts of one block take a
    fraction of the memory the whole matrix's would. `block_names` maps each block's weight to the
    checkpoint's head weight, whose rows the blocks hold in order."""

    def __init__(self, norm_path: str, norm: nn.Module, head_path: str, head_weight: torch.Tensor):
        super().__init__()
        rows = max(1, HEAD_BLOCK_WEIGHTS // head_weight.shape[1])
        blocks = nn.ModuleList()
        for piece in head_weight.split(rows):
            block = nn.Linear(piece.shape[1], piece.shape[0], bias=False, device="meta")
            block.weight = nn.Parameter(piece, requires_grad=False)
            blocks.append(block)
        mirror(self, {norm_path: norm, f"{head_path}.rows": blocks})
        self.parts = [norm, blocks]
        self.block_names = {f"{head_path}.rows.{i}.weight": f"{head_path}.weight" for i in range(len(blocks))}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.parts[0](hidden)
        return torch.cat([block(x) for block in self.parts[1]], dim=-1)
