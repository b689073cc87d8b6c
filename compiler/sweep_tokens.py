"""`sparsecc sweep tokens`: output error and FLOPs of token routing over a list of capacities.

    sparsecc sweep tokens MODULE:FACTORY --capacities 1,0.75,0.5,0.25 [--router norm]

Each capacity compiles the model once with `{"tokens": {...}}` (plus `--sparsity`
sections given as JSON, e.g. `{"moe": "dispatch"}`) and reads the report: the
relative L2 error of the outputs against the dense model on the example inputs
and the matmul FLOPs of the routed blocks, so a user can pick the knee of the
curve. API: `sweep_tokens(model, example_inputs, capacities, ...)`.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from sparsecc.passes import TokenRouting

from .factory import FACTORY_HELP
from .report_html import save_html

DEFAULT_CAPACITIES = (1.0, 0.75, 0.5, 0.25)


@dataclass
class SweepRow:
    capacity: float
    blocks: int                  # routed blocks
    kept: int                    # tokens kept per sequence
    tokens: int                  # sequence length
    flops_before: int            # matmul FLOPs of the routed blocks, dense
    flops_after: int             # ... routed (router included)
    error_vs_dense: float | None


@dataclass
class TokenSweep:
    router: str
    where: str
    rows: list[SweepRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"router": self.router, "where": self.where, "rows": [asdict(r) for r in self.rows],
                "skipped": self.skipped}

    def __str__(self) -> str:
        lines = [f"token routing sweep: router {self.router}, where {self.where}",
                 f"{'capacity':>8}  {'blocks':>6}  {'kept/seq':>9}  {'routed FLOPs':>22}  {'ratio':>6}  error vs dense"]
        for r in self.rows:
            ratio = r.flops_after / r.flops_before if r.flops_before else 1.0
            error = "-" if r.error_vs_dense is None else f"{r.error_vs_dense:.3e}"
            lines.append(f"{r.capacity:>8g}  {r.blocks:>6}  {f'{r.kept}/{r.tokens}':>9}  "
                         f"{f'{r.flops_before:,} -> {r.flops_after:,}':>22}  {ratio:>6.3f}  {error}")
        return "\n".join(lines + [f"  kept dense: {s}" for s in self.skipped])


def sweep_tokens(model, example_inputs, capacities: Iterable[float] = DEFAULT_CAPACITIES, router: str = "norm",
                 where: str = "mlp", layers: list | None = None, weights_file: str | None = None,
                 calibration: Iterable | None = None, sparsity: dict | None = None, example_kwargs: dict | None = None,
                 progress: bool = False) -> TokenSweep:
    """Compile `model` at each capacity and collect error vs dense and routed-block FLOPs; `progress` shows
    a bar of the compiles on stderr."""
    from .api import compile as compile_model

    calibration = list(calibration) if calibration is not None else None
    sweep = TokenSweep(router, where)
    for capacity in tqdm(list(capacities), desc="sparsecc sweep tokens", unit="compile", disable=not progress,
                         file=sys.stderr, leave=False):
        tokens = {"capacity": float(capacity), "where": where, "router": router, "layers": layers,
                  "weights_file": weights_file}
        request = {**(sparsity or {}), "tokens": {k: v for k, v in tokens.items() if v is not None}}
        report = compile_model(model, example_inputs, sparsity=request, calibration=calibration,
                               example_kwargs=example_kwargs).report()
        routed = [r for r in report.layers if r.op == "sparsecc.route"]
        sweep.rows.append(SweepRow(
            capacity=float(capacity), blocks=len(routed), kept=routed[0].details["kept"] if routed else 0,
            tokens=routed[0].details["tokens"] if routed else 0,
            flops_before=sum(r.flops_before for r in routed), flops_after=sum(r.flops_after for r in routed),
            error_vs_dense=report.error_vs_dense))
        sweep.skipped = [f"{s['layer']}: {s['reason']}" for s in report.skipped if s["rule"] == "token-routing"]
    return sweep


def _capacities(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,0.5,0.25, got {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"capacities must be in (0, 1], got {text!r}")
    return values


def add_sweep_tokens_parser(kinds) -> None:
    """Register `sweep tokens` on the `sweep` sub-subcommands."""
    p = kinds.add_parser("tokens", help="error and FLOPs of token routing for a list of capacities")
    p.add_argument("factory", help=FACTORY_HELP)
    p.add_argument("--capacities", type=_capacities, default=list(DEFAULT_CAPACITIES),
                   help="comma-separated kept fractions (default 1,0.75,0.5,0.25)")
    p.add_argument("--router", choices=TokenRouting.option_choices("router"), default=TokenRouting.router)
    p.add_argument("--where", choices=TokenRouting.option_choices("where"), default=TokenRouting.where)
    p.add_argument("--layers", help="comma-separated block indices or module globs (default: all but first/last)")
    p.add_argument("--weights-file", help="router weights (.safetensors) for --router weights")
    p.add_argument("--sparsity", type=json.loads, help='other sections as JSON, e.g. \'{"moe": "dispatch"}\'')
    p.add_argument("--json", action="store_true", help="print the sweep as JSON")
    p.set_defaults(run=run_sweep_tokens)


def run_sweep_tokens(args) -> int:
    from .factory import load_factory

    call = load_factory(args.factory)
    layers = [v.strip() for v in args.layers.split(",")] if args.layers else None
    sweep = sweep_tokens(call.model, call.args, args.capacities, example_kwargs=call.kwargs, router=args.router, where=args.where, layers=layers,
                         weights_file=args.weights_file, sparsity=args.sparsity, progress=args.progress)
    print(json.dumps(sweep.to_dict(), indent=2) if args.json else sweep)
    if args.html:
        save_html(args.html, sweeps=[sweep.to_dict()])
    return 0


__all__ = ["SweepRow", "TokenSweep", "add_sweep_tokens_parser", "run_sweep_tokens", "sweep_tokens"]
