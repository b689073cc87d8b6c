"""Shared by the tests in this folder: capture a model the way the compiler does, tiny models."""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from sparsecc.passes.printer import op_name


def capture(model: nn.Module, args: tuple, **export_kwargs) -> GraphModule:
    """`torch.export` -> unlifted GraphModule without the `_guards_fn` call, as the compiler hands it to passes."""
    gm = torch.export.export(model, args, strict=False, **export_kwargs).module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def call_targets(gm: GraphModule) -> list[str]:
    """The printed op names of the call nodes, in graph order."""
    return [op_name(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def outputs(gm: GraphModule, *args) -> tuple:
    result = gm(*args)
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


class TinyLinear(nn.Module):
    """`y = fc(x)` with an optional bias, inside a named submodule `l`."""

    def __init__(self, bias: bool = True, d_in: int = 8, d_out: int = 4):
        super().__init__()
        self.l = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x):
        return self.l(x)


class Block(nn.Module):
    """`x + fc2(relu(relu(fc1(x))))`; fc2 has no bias."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d, bias=False)

    def forward(self, x):
        return x + self.fc2(torch.relu(torch.relu(self.fc1(x))))


class TwoLayer(nn.Module):
    """Two `Block`s in `layers`, so module paths read `layers.0.fc1`."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def check_snapshot(module_file: str, name: str, actual: str) -> None:
    """Assert `actual` equals the triple-quoted constant `name` in `module_file`.

    With SPARSECC_UPDATE_SNAPSHOTS=1 the constant is rewritten in place instead.
    """
    import os
    import re
    from pathlib import Path

    path = Path(module_file)
    source = path.read_text()
    found = re.search(rf'^{name} = """\\\n(.*?)"""$', source, flags=re.S | re.M)
    assert found, f"snapshot constant {name} not found in {path.name}"
    if os.environ.get("SPARSECC_UPDATE_SNAPSHOTS") == "1":
        path.write_text(source[:found.start(1)] + actual + source[found.end(1):])
        return
    assert actual == found.group(1), f"IR differs from snapshot {name} (refresh: SPARSECC_UPDATE_SNAPSHOTS=1)"
