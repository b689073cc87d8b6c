"""Read expert weights out of an MoE region as the stacked tensors `sparsecc::moe` takes.

    w_gate_up [E, 2I, H]  gate rows first (gated experts), or [E, I, H] (plain)
    w_down    [E, H, I]

Stacked 3-D constants may come in either orientation; per-expert linears are
told apart by the graph: `down` reads what the others produced, `gate` feeds
the activation, `up` is the rest.

Each stacked tensor carries its provenance, how it was built from the graph's
constants (the model's parameters), so the pruned values can be put back under
the model's names (compiler/reference.py inverts it). A provenance is a constant's
name, or {"transpose": [a, b], "of": p}, {"cat": dim, "sizes": [..], "of": [p, ..]},
{"stack": dim, "of": [p, ..]}, {"swap_halves": dim, "of": p}.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, NamedTuple, Optional

import torch
from torch.fx import GraphModule, Node

from ..graph import module_path
from .regions import ACTIVATIONS, MLPWeights, NotAnMoE, constant_of, expert_index, users_through

aten = torch.ops.aten


class Candidate(NamedTuple):
    """One reading of the expert weights; `swapped`: gate_up's halves were exchanged (up rows first
    in the model), so a gate_up bias must be exchanged the same way."""
    gate_up: torch.Tensor
    down: torch.Tensor
    gated: bool
    swapped: bool = False
    gate_up_from: Any = None           # provenance (module docstring) of gate_up, and of down
    down_from: Any = None


class Sourced(NamedTuple):
    """A tensor and its provenance."""
    tensor: torch.Tensor
    source: Any


def _oriented(weight: Sourced, width: int, axis: int) -> list[Sourced]:
    """Views of a stacked [E, a, b] weight with `width` on `axis` (1 or 2); both when a == b."""
    views = []
    if weight.tensor.shape[axis] == width:
        views.append(weight)
    if weight.tensor.shape[3 - axis] == width:
        views.append(Sourced(weight.tensor.transpose(1, 2), {"transpose": [1, 2], "of": weight.source}))
    return views


def stacked_candidates(consts: dict[str, torch.Tensor], num_experts: int, width: int) -> list[Candidate]:
    """Every (gate_up, down, gated) reading of two stacked constants (by name) consistent with the shapes."""
    stacked = [Sourced(c, name) for name, c in consts.items() if c.dim() == 3 and c.shape[0] == num_experts]
    if len(stacked) != 2:
        raise NotAnMoE(f"expected 2 stacked expert weights [E={num_experts}, ., .], found {len(stacked)}")
    found = []
    for gate_up, down in (stacked, stacked[::-1]):
        for d in _oriented(down, width, 1):
            for g in _oriented(gate_up, width, 2):
                found += _readings(g, d)
    if not found:
        shapes = [list(c.tensor.shape) for c in stacked]
        raise NotAnMoE(f"stacked expert weights {shapes} do not fit hidden size {width}")
    return found


def _readings(gate_up: Sourced, down: Sourced) -> list[Candidate]:
    inner, rows = down.tensor.shape[2], gate_up.tensor.shape[1]
    if rows == 2 * inner:
        gate, up = gate_up.tensor[:, :inner], gate_up.tensor[:, inner:]
        swapped = {"swap_halves": 1, "of": gate_up.source}
        return [Candidate(gate_up.tensor, down.tensor, True, False, gate_up.source, down.source),
                Candidate(torch.cat([up, gate], 1), down.tensor, True, True, swapped, down.source)]
    return [Candidate(gate_up.tensor, down.tensor, False, False, gate_up.source, down.source)] if rows == inner else []


def mlp_provenance(mlp: MLPWeights) -> tuple[Any, Any]:
    """Provenance of an MLP's gate_up ([gate; up] rows, or the one first linear) and of its down."""
    firsts, down = mlp.sources[:-1], mlp.sources[-1]
    if len(firsts) == 1:
        return firsts[0], down
    half = mlp.gate_up.shape[0] // 2   # gate and up multiply elementwise: same rows
    return {"cat": 0, "sizes": [half, half], "of": firsts}, down


def _feeds_activation(node: Node) -> Optional[Node]:
    return next((u for u in users_through(node) if u.target in ACTIVATIONS), None)


def _depends_on(node: Node, targets: set[Node], depth: int = 8) -> bool:
    frontier = [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes]
        if any(n in targets for n in frontier):
            return True
    return False


def mlp_from_linears(gm: GraphModule, linears: list[Node]) -> MLPWeights:
    """The MLP two or three linears form (see the module docstring)."""
    downs = [l for l in linears if _depends_on(l.args[0], set(linears) - {l})]
    firsts = [l for l in linears if l not in downs]
    gates = [l for l in firsts if _feeds_activation(l) is not None]
    if len(downs) != 1 or len(gates) != 1 or len(firsts) not in (1, 2):
        raise NotAnMoE(f"linears {[module_path(l) for l in linears]} do not form a (gated) MLP")
    gate, down = gates[0], downs[0]
    up = next((l for l in firsts if l is not gate), None)
    weights = [constant_of(gm, l.args[1]) for l in (gate, up, down) if l is not None]
    activation = ACTIVATIONS[_feeds_activation(gate).target]
    gate_up = torch.cat(weights[:2], 0) if up is not None else weights[0]
    sources = [l.args[1].target for l in (gate, up, down) if l is not None]
    return MLPWeights(gate_up, weights[-1], up is not None, activation, sources)


def per_expert_linears(region: list[Node], block_path: str, router: Node) -> tuple[dict[str, list[Node]], list[Node]]:
    """Linears grouped by expert module (`mlp.experts.3`), and the linears outside any expert."""
    experts, others = defaultdict(list), []
    for node in region:
        if node.target is aten.linear.default and node is not router:
            key = expert_index(module_path(node), block_path)
            (experts[key] if key else others).append(node)
    numbered = sorted(experts, key=lambda k: int(re.findall(r"\d+", k)[-1]))
    return {k: experts[k] for k in numbered}, others


def per_expert_candidates(gm: GraphModule, groups: dict[str, list[Node]], num_experts: int) -> tuple[Candidate, list[str]]:
    if len(groups) != num_experts:
        raise NotAnMoE(f"router has {num_experts} outputs but {len(groups)} expert modules were found")
    mlps = [mlp_from_linears(gm, linears) for linears in groups.values()]
    if len({(m.gate_up.shape, m.down.shape, m.gated, m.activation) for m in mlps}) != 1:
        raise NotAnMoE("experts differ in shape or activation")
    gate_ups, downs = zip(*(mlp_provenance(m) for m in mlps))
    stacked = Candidate(torch.stack([m.gate_up for m in mlps]), torch.stack([m.down for m in mlps]), mlps[0].gated,
                        False, {"stack": 0, "of": list(gate_ups)}, {"stack": 0, "of": list(downs)})
    return stacked, [s for m in mlps for s in m.sources]


def shared_expert(gm: GraphModule, linears: list[Node], width: int) -> tuple[Optional[MLPWeights], Optional[torch.Tensor]]:
    """The shared expert's MLP and its sigmoid gate [1, H] from the linears outside the experts."""
    gates = [l for l in linears if constant_of(gm, l.args[1]) is not None and constant_of(gm, l.args[1]).shape[0] == 1
             and any(u.target is aten.sigmoid.default for u in users_through(l))]
    rest = [l for l in linears if l not in gates]
    if len(gates) > 1 or (gates and not rest):
        raise NotAnMoE("found a shared-expert gate without exactly one shared expert")
    mlp = mlp_from_linears(gm, rest) if rest else None
    if mlp is not None and mlp.gate_up.shape[1] != width:
        raise NotAnMoE(f"extra linears {[module_path(l) for l in rest]} are not a shared expert of width {width}")
    return mlp, (constant_of(gm, gates[0].args[1]) if gates else None)
