"""Token routers: how each routed block scores its tokens (higher = more worth computing).

    norm        score = ||n||_2, n the block's normalised input (no data, no weights)
    calibrated  score = n . w + b, a linear probe fitted by least squares, per block,
                to predict ||f(h)||_2 (the size of the block's update) on calibration data
    weights     score = n . w + b with w, b read from a safetensors file (trained elsewhere)

Scores are computed in fp32. Router weights file format (safetensors, also what
`save_router_weights` writes): for a routed block at module path P,
`P.router.weight` [H] (or [1, H]) and optionally `P.router.bias` [] or [1]
(`router.weight` / `router.bias` for a block at the model's root).
The probe reads the same normalised input `n` as the `norm` router.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from ..calibration import calibration_batches
from ..manager import PassContext
from ..region import record_values
from ..rewriter import Rewriter
from .blocks import ResidualBlock

RIDGE = 1e-3    # x mean diagonal of X^T X: keeps the fit defined with fewer tokens than features
aten = torch.ops.aten


@dataclass
class Probe:
    weight: Tensor                 # [H] fp32
    bias: float
    fit_r2: float | None = None  # calibrated: R^2 of the fit on its calibration tokens


def scores(router: str, features: Tensor, probe: Probe | None) -> Tensor:
    """[B, S] fp32 scores from the features [B, S, H] (what the inserted nodes compute)."""
    features = features.float()
    if router == "norm":
        return torch.linalg.vector_norm(features, 2, dim=-1)
    bias = torch.tensor([probe.bias], dtype=torch.float32)
    return torch.nn.functional.linear(features, probe.weight.reshape(1, -1).float(), bias).squeeze(-1)


def insert_scores(rw: Rewriter, block: ResidualBlock, router: str, probe: Probe | None) -> Node:
    features = block.source
    if features.meta["val"].dtype != torch.float32:
        features = rw.call(aten.to.dtype, features, torch.float32)
    if router == "norm":
        return rw.call(aten.linalg_vector_norm.default, features, 2, [-1])
    weight = rw.add_constant(f"{block.path}.router_weight", probe.weight.reshape(1, -1).float().contiguous())
    bias = rw.add_constant(f"{block.path}.router_bias", torch.tensor([probe.bias], dtype=torch.float32))
    return rw.call(aten.squeeze.dim, rw.call(aten.linear.default, features, weight, bias), -1)


def fit_probe(features: Tensor, targets: Tensor) -> Probe:
    """Ridge least squares of targets [N] on [features, 1] [N, H+1], in float64."""
    x = torch.cat([features.double(), features.new_ones(features.shape[0], 1, dtype=torch.float64)], 1)
    t = targets.double()
    gram = x.T @ x
    ridge = RIDGE * gram.diagonal().mean().clamp_min(1e-12)
    solution = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), x.T @ t)
    residual = ((x @ solution - t) ** 2).sum()
    total = ((t - t.mean()) ** 2).sum().clamp_min(1e-30)
    return Probe(solution[:-1].float(), float(solution[-1]), float(1 - residual / total))


def fit_probes(gm: GraphModule, ctx: PassContext, blocks: list[ResidualBlock]) -> tuple[dict[str, Probe], str]:
    """Per block path, the probe predicting ||output - residual|| from the normalised input."""
    batches, source = calibration_batches(ctx, "token-routing")
    wanted = [n for b in blocks for n in (b.source, b.residual, b.output)]
    features = {b.path: [] for b in blocks}
    targets = {b.path: [] for b in blocks}
    for index, batch in enumerate(batches):
        try:
            values = record_values(gm, batch, wanted)
        except Exception as err:  # the graph's own error, re-raised naming the batch
            raise ValueError(f"token-routing: calibration batch {index} does not run through the captured "
                             f"graph (batches must have the example inputs' shapes): {err}") from err
        for b in blocks:
            width = values[b.source].shape[-1]
            features[b.path].append(values[b.source].reshape(-1, width).float())
            update = (values[b.output].float() - values[b.residual].float())
            targets[b.path].append(torch.linalg.vector_norm(update.flatten(2), dim=-1).reshape(-1))
    probes = {p: fit_probe(torch.cat(features[p]), torch.cat(targets[p])) for p in features}
    return probes, source


def router_key(block_path: str, name: str) -> str:
    """`P.router.weight` for the block at module path P; `router.weight` for a block at the root."""
    return f"{block_path}.router.{name}" if block_path else f"router.{name}"


def load_probes(weights_file: str, blocks: list[ResidualBlock]) -> dict[str, Probe]:
    """Per block path, the router read from `weights_file` (format in the module docstring)."""
    from safetensors.torch import load_file
    if not weights_file:
        raise ValueError("token-routing: router 'weights' needs weights_file (a .safetensors file)")
    if not Path(weights_file).is_file():
        raise ValueError(f"token-routing: router weights file {weights_file!r} does not exist")
    tensors = load_file(weights_file)
    probes = {}
    for b in blocks:
        key, width = router_key(b.path, "weight"), b.source.meta["val"].shape[-1]
        if key not in tensors:
            known = ", ".join(sorted(tensors)[:6]) or "none"
            raise ValueError(f"token-routing: {weights_file} has no {key!r} for block '{b.path}' (has: {known})")
        weight = tensors[key].float().reshape(-1)
        if weight.numel() != width:
            raise ValueError(f"token-routing: {key} has {weight.numel()} values, block '{b.path}' has width {width}")
        bias = tensors.get(router_key(b.path, "bias"))
        probes[b.path] = Probe(weight, float(bias.reshape(-1)[0]) if bias is not None else 0.0)
    return probes


def save_router_weights(path: str | Path, probes: dict[str, Probe]) -> None:
    """Write routers in the format `load_probes` reads (e.g. calibrated probes, to reuse them)."""
    from safetensors.torch import save_file
    tensors = {}
    for block_path, probe in probes.items():
        tensors[router_key(block_path, "weight")] = probe.weight.float().contiguous()
        tensors[router_key(block_path, "bias")] = torch.tensor([probe.bias], dtype=torch.float32)
    save_file(tensors, str(path))


__all__ = [
    "Probe",
    "fit_probe",
    "fit_probes",
    "insert_scores",
    "load_probes",
    "router_key",
    "save_router_weights",
    "scores",
]
