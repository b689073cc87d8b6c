"""The compile report: what was rewritten, what it saves, and the error it costs."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sparsecc.passes.records import RewriteRecord

from .numerics import NonFiniteSite
from .report_html import save_html


_NOOP_REASONS = 3   # distinct skip reasons a no-op line quotes
NOT_MEASURED = "not measured: planned without weights"


@dataclass
class Report:
    model: str
    pipeline: str
    backend: str
    layers: list[RewriteRecord]
    skipped: list[dict[str, str]]
    passes: dict[str, dict[str, Any]]
    model_bytes_before: int
    model_bytes_after: int
    error_vs_dense: Optional[float] = None        # relative L2 error of the outputs vs the dense model
    error_vs_reference: Optional[float] = None    # vs the dense model with the pruned weights (exactness)
    non_finite: Optional[NonFiniteSite] = None    # where a nan/inf error started (set only when one is non-finite)
    timings: dict[str, float] = field(default_factory=dict)
    noops: list[str] = field(default_factory=list)   # one line per request that rewrote nothing (noop_lines)
    constant_inputs: dict[str, Any] = field(default_factory=dict)   # keyword inputs baked in at capture
    dropped_outputs: list[str] = field(default_factory=list)        # model outputs the program does not return
    kernels: list[dict] = field(default_factory=list)   # per N:M layer: the CPU path measured fastest per bucket
    planned: bool = False   # made by sparsecc.plan from shapes alone: no value was computed or measured
    generation: dict = field(default_factory=dict)   # mode="generate": batch size, max_length, KV cache, decode paths

    def totals(self) -> dict[str, int]:
        """Sums over the rows, each weight and each FLOP counted once where rewrites compose: an MoE
        dispatch row leaves its expert weights' bytes to the N:M row that prunes them (if any); a
        pruned-expert row (expanded per call, so no FLOPs saved) leaves the FLOPs to the dispatch row;
        a routed block's row counts the FLOPs of everything inside the block."""
        pruned_experts = {r.layer.rpartition(".")[0] for r in self.layers if r.op.endswith("+nm_decompress")}
        routed = {r.layer for r in self.layers if r.op == "sparsecc.route"}

        def counted(r: RewriteRecord, kind: str) -> bool:
            if kind != "flops":
                return not (r.op == "sparsecc.moe" and r.layer in pruned_experts)
            inside_routed = r.op != "sparsecc.route" and any(
                r.layer == block or r.layer.startswith(block + ".") for block in routed)
            return not (inside_routed or r.op.endswith("+nm_decompress"))

        return {f"{kind}_{when}": sum(getattr(r, f"{kind}_{when}") for r in self.layers if counted(r, kind))
                for kind in ("params", "bytes", "flops") for when in ("before", "after")}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "pipeline": self.pipeline, "backend": self.backend,
            "layers": [r.to_dict() for r in self.layers], "skipped": self.skipped,
            "passes": self.passes, "totals": self.totals(),
            "model_bytes": {"before": self.model_bytes_before, "after": self.model_bytes_after},
            "error_vs_dense": self.error_vs_dense, "error_vs_reference": self.error_vs_reference,
            "non_finite": self.non_finite.to_dict() if self.non_finite else None,
            "timings": self.timings, "noops": self.noops,
            "constant_inputs": self.constant_inputs, "dropped_outputs": self.dropped_outputs,
            "kernels": self.kernels, "planned": self.planned,
        }

    def to_json(self, indent: int = 2) -> str:
        """Strict JSON: a non-finite float (an error, a block error) is written as the string "nan",
        "inf" or "-inf", since JSON has no NaN; `to_dict` keeps them as Python floats."""
        return json.dumps(_json_safe(self.to_dict()), indent=indent, default=str, allow_nan=False)

    def save_html(self, path: str | Path, sweeps: tuple = ()) -> Path:
        """Write the report as one self-contained HTML page (table, bars, layout pictures; the curves of
        `sweeps`, e.g. a `sweep_weights(...)` result, when given); returns the path."""
        return save_html(path, self.to_dict(), [sweep.to_dict() for sweep in sweeps])

    def __str__(self) -> str:
        return format_report(self)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.3f}x" if before else "-"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def format_report(report: Report) -> str:
    out = [f"sparsecc report: {report.model}", *report.noops, f"pipeline: {report.pipeline}",
           f"backend:  {report.backend}", *_call_lines(report), ""]
    if report.layers:
        rows = [[r.layer, r.op, r.pattern, "x".join(map(str, r.shape)),
                 f"{_count(r.params_before)} -> {_count(r.params_after)}",
                 f"{_size(r.bytes_before)} -> {_size(r.bytes_after)} ({_ratio(r.bytes_after, r.bytes_before)})",
                 f"{_count(r.flops_before)} -> {_count(r.flops_after)}"] for r in report.layers]
        out += _table(["layer", "op", "pattern", "shape", "params", "bytes", "FLOPs"], rows)
        t = report.totals()
        out += ["", f"rewritten layers: {len(report.layers)}",
                f"  weight bytes: {_size(t['bytes_before'])} -> {_size(t['bytes_after'])} "
                f"({_ratio(t['bytes_after'], t['bytes_before'])})",
                f"  FLOPs/call:   {_count(t['flops_before'])} -> {_count(t['flops_after'])} "
                f"({_ratio(t['flops_after'], t['flops_before'])}; FLOPs over kept weights)"]
    else:
        out.append("rewritten layers: 0")
    out.append(f"model constants: {_size(report.model_bytes_before)} -> {_size(report.model_bytes_after)} "
               f"({_ratio(report.model_bytes_after, report.model_bytes_before)})")
    out += _nm_method_lines(report.layers) + _moe_lines(report.layers) + _attention_lines(report.layers)
    out += _routing_lines(report.layers) + _kernel_lines(report.kernels)
    out += _skipped_lines(report.skipped) + _error_lines(report)
    out += _timing_lines(report.timings)
    return "\n".join(out)


def _call_lines(report: Report) -> list[str]:
    """What capture fixed about the call: keyword inputs baked in, outputs left out."""
    out = []
    if report.constant_inputs:
        values = ", ".join(f"{k}={v!r}" for k, v in report.constant_inputs.items())
        out.append(f"constant inputs: {values} (baked in: a call may repeat them or leave them out)")
    out += [f"dropped output: {what}" for what in report.dropped_outputs]
    return out


def _kernel_lines(kernels: list[dict]) -> list[str]:
    """Which CPU path each N:M (and dense) linear took per token bucket, and the times that chose it."""
    if not kernels:
        return []
    out = ["Linear kernels (CPU, measured on the first call of each token bucket):"]
    for k in kernels:
        times = ", ".join(f"{path} {ms:.3f} ms" if isinstance(ms, float) else f"{path} {ms}"
                          for path, ms in k["ms"].items())
        out.append(f"  {k['layer']}: <= {k['tokens']} tokens -> {k['path']}" + (f" ({times})" if times else ""))
    return out


def noop_lines(requests: list[tuple[str, Any]]) -> list[str]:
    """'<request>: rewrote nothing (N layers skipped: reasons)' for each (request, its pass's PassStats)
    that rewrote nothing, so a request that applies to nothing in the model is never silent."""
    lines = []
    for request, stats in requests:
        if stats.rewritten:
            continue
        reasons: dict[str, int] = {}
        for skip in stats.skipped:
            reasons[skip.reason] = reasons.get(skip.reason, 0) + 1
        shown = "; ".join(f"{reason} (x{count})" if count > 1 else reason
                          for reason, count in list(reasons.items())[:_NOOP_REASONS])
        more = f"; {len(reasons) - _NOOP_REASONS} more reasons" if len(reasons) > _NOOP_REASONS else ""
        count = f"{len(stats.skipped)} layer{'s' if len(stats.skipped) > 1 else ''} skipped"
        why = f"{count}: {shown}{more}" if stats.skipped else \
            "nothing in the model has the form it rewrites"
        lines.append(f"{request}: rewrote nothing ({why})")
    return lines


def _nm_method_lines(layers: list[RewriteRecord]) -> list[str]:
    """How N:M masks were chosen: method per count of layers, and where the activations came from."""
    methods: dict[str, int] = {}
    for r in layers:
        if "method" in r.details:
            methods[r.details["method"]] = methods.get(r.details["method"], 0) + 1
    if not methods:
        return []
    sources = sorted({r.details["calibration"] for r in layers if "calibration" in r.details})
    line = "N:M mask method: " + ", ".join(f"{name} ({count} layers)" for name, count in methods.items())
    fallbacks = [f"  {r.layer}: experts {r.details['magnitude_experts']} got no calibration token, pruned by magnitude"
                 for r in layers if r.details.get("magnitude_experts")]
    return [line] + [f"  activations from {source}" for source in sources] + fallbacks


def _moe_lines(layers: list[RewriteRecord]) -> list[str]:
    blocks = [r for r in layers if r.op == "sparsecc.moe"]
    lines = [f"MoE blocks: {len(blocks)}"] if blocks else []
    for r in blocks:
        d, t = r.details, r.details["tokens_per_expert"]
        routed = (f"tokens/expert min {t['min']} / median {t['median']:g} / max {t['max']}" if t
                  else f"tokens/expert {NOT_MEASURED}")
        lines.append(f"  {r.layer}: form {d['form']}, E={d['experts']}, k={d['top_k']}"
                     f"{', shared expert' if d['shared_expert'] else ''}; {routed}; FLOPs {_count(r.flops_before)} -> "
                     f"{_count(r.flops_after)}")
        if d["capacity_factor"] and d["dropped_pairs"] is not None:
            lines.append(f"    capacity factor {d['capacity_factor']:g}: dropped {d['dropped_pairs']} of "
                         f"{d['pairs']} (token, expert) pairs")
    return lines


def _attention_lines(layers: list[RewriteRecord]) -> list[str]:
    sites = [r for r in layers if r.op == "sparsecc.block_attention"]
    lines = [f"attention layers: {len(sites)}"] if sites else []
    for r in sites:
        d = r.details
        measured = (f"block density {d['density']:.3f} on the example inputs, error vs dense attention "
                    f"{d['error_vs_dense']:.1e}" if d["density"] is not None else f"block density {NOT_MEASURED}")
        lines.append(f"  {r.layer}: policy {d['policy']}{_policy_params(d)}, block {d['block']}, {measured}"
                     + (f"; mask {d['mask']}" if "mask" in d else ""))
    return lines


def _policy_params(d: dict[str, Any]) -> str:
    if d["policy"] == "window":
        return f" ({d['window']} keys + {d['sinks']} sinks)"
    if d["policy"] == "topk":
        keep = f"{d['topk']:.0%} of visible" if d["topk"] < 1 else f"{d['topk']:g}"
        return f" ({keep} key blocks + {d['sinks']} sinks)"
    return f" ({d['threshold']:g})" if d["policy"] == "threshold" else ""


def _routing_lines(layers: list[RewriteRecord]) -> list[str]:
    """Token routing: per routed block, router, capacity, tokens kept, FLOPs saved, block error."""
    blocks = [r for r in layers if r.op == "sparsecc.route"]
    lines = [f"token-routed blocks: {len(blocks)}"] if blocks else []
    for r in blocks:
        d = r.details
        fit = f", probe fit R^2 {d['probe_r2']:.2f}" if "probe_r2" in d else ""
        kept = (f"threshold {d['threshold']:.4g}: {d['kept']} of {d['tokens']} tokens passed"
                if d.get("decision") == "threshold" else f"{d['kept']} of {d['tokens']} tokens per sequence")
        lines.append(f"  {r.layer}: router {d['router']}{fit}, capacity {d['capacity']:g}: {kept}; "
                     f"FLOPs {_count(r.flops_before)} -> {_count(r.flops_after)} (saved {_count(d['flops_saved'])}); "
                     f"block error vs dense {d['block_error']:.2e}")
    sources = sorted({r.details["router_data"] for r in blocks if r.details.get("router_data")})
    return lines + [f"  routers from {source}" for source in sources]


def _skipped_lines(skipped: list[dict[str, str]]) -> list[str]:
    if not skipped:
        return ["skipped layers: 0"]
    return [f"skipped layers: {len(skipped)}"] + [f"  {s['layer']}: {s['reason']} [{s['rule']}]" for s in skipped]


def _error_lines(report: Report) -> list[str]:
    if report.planned:
        return [f"error vs dense model: {NOT_MEASURED}",
                "  (which layers each request rewrites and their sizes follow from shapes; N:M masks, MoE "
                "readings, routed tokens and attention block densities come from values at compile time: "
                "attention FLOPs after are counted dense)"]
    lines = []
    if report.error_vs_dense is not None:
        lines.append(f"error vs dense model:         {report.error_vs_dense:.3e} (relative L2, example inputs)")
    if report.error_vs_reference is not None:
        lines.append(f"error vs pruned dense model:  {report.error_vs_reference:.3e} (exactness of the rewrite)")
    errors = (report.error_vs_dense, report.error_vs_reference)
    if any(e is not None and not math.isfinite(e) for e in errors):
        where = (report.non_finite.describe() if report.non_finite
                 else "not located (no op turned finite inputs non-finite)")
        lines.append(f"first non-finite output: {where}")
    return lines


def _timing_lines(timings: dict[str, float]) -> list[str]:
    if not timings:
        return []
    return ["time: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())]
