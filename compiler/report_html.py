"""The compile report (and sweeps) as one self-contained HTML page: table, bars, curves, layout pictures.

Input is plain data, `Report.to_dict()` and the sweeps' `to_dict()`, so this
module depends on no compiler class. The page loads nothing (no script, font,
image or style from elsewhere; a Content-Security-Policy forbids it), draws its
figures as inline SVG (`report_svg`) and escapes every string that came from
the model. Themes follow the reader's `prefers-color-scheme`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any, Optional

from .report_svg import block_grid, line_chart, log_bars, pair_bars

_STYLE = """
:root { color-scheme: light dark; --fg: #1d2430; --muted: #5b6576; --bg: #ffffff; --panel: #f4f6f9;
  --rule: #d5dae2; --before: #c9d3e3; --after: #2f6fd0; --bar: #c2522d; --cell0: #eef1f5; --cell1: #f0b43c;
  --cell2: #2f6fd0; --l0: #2f6fd0; --l1: #c2522d; --l2: #2e9b5f; --l3: #8a52c2; }
@media (prefers-color-scheme: dark) { :root { --fg: #e3e7ee; --muted: #9aa4b5; --bg: #15181d; --panel: #1e232b;
  --rule: #343b47; --before: #3a4557; --after: #6ea2f0; --bar: #e58a62; --cell0: #232933; --cell1: #d9a23a;
  --cell2: #6ea2f0; --l0: #6ea2f0; --l1: #e58a62; --l2: #5cc98c; --l3: #b690e6; } }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg);
  margin: 0 auto; padding: 24px; max-width: 1100px; }
h1 { font-size: 1.5em; margin: 0 0 8px; } h2 { font-size: 1.2em; margin: 32px 0 8px; }
code, td.num, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.9em; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dt { color: var(--muted); } dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; font-size: 0.92em; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--rule); vertical-align: top; }
th { color: var(--muted); font-weight: 600; } td.num { text-align: right; white-space: nowrap; }
td.layer { overflow-wrap: anywhere; }
figure { margin: 12px 0 20px; } figcaption { color: var(--muted); font-size: 0.9em; margin-top: 4px; }
svg { max-width: 100%; height: auto; } svg text { fill: var(--fg); font-size: 12px; }
svg text.tick { fill: var(--muted); font-size: 11px; } svg .grid { stroke: var(--rule); stroke-width: 1; }
svg .axis { stroke: var(--muted); } .bar-before { fill: var(--before); } .bar-after { fill: var(--after); }
.bar { fill: var(--bar); } .cell-frame { fill: none; stroke: var(--rule); } .cell-0 { fill: var(--cell0); }
.cell-1 { fill: var(--cell1); } .cell-2 { fill: var(--cell2); }
.line-0, .line-1, .line-2, .line-3 { fill: none; stroke-width: 2; }
.line-0 { stroke: var(--l0); } .line-1 { stroke: var(--l1); } .line-2 { stroke: var(--l2); } .line-3 { stroke: var(--l3); }
.dot-0 { fill: var(--l0); } .dot-1 { fill: var(--l1); } .dot-2 { fill: var(--l2); } .dot-3 { fill: var(--l3); }
.layouts { display: flex; flex-wrap: wrap; gap: 24px; } .layouts figure { margin: 0; max-width: 300px; }
.key { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; }
.panel { background: var(--panel); padding: 12px 16px; border-radius: 6px; }
.muted { color: var(--muted); }
"""
_POLICY = "default-src 'none'; style-src 'unsafe-inline'"   # no script, no network, inline styles only


def _scaled(value: float, base: int, units: Sequence[str]) -> str:
    """value / base**k with the first unit that keeps it under base ("3.2 MiB", "201.3M")."""
    for k, unit in enumerate(units):
        if abs(value) < base ** (k + 1) or k == len(units) - 1:
            return f"{value / base ** k:.{0 if k == 0 else 1}f}{unit}"
    return str(value)


def _bytes(value: float) -> str:
    return _scaled(value, 1024, (" B", " KiB", " MiB", " GiB"))


def _flops(value: float) -> str:
    return _scaled(value, 1000, ("", "k", "M", "G", "T"))


def _error(value: Optional[float]) -> str:
    return "\u2014" if value is None else f"{value:.2e}" if math.isfinite(value) else str(value)


def layer_error(layer: dict[str, Any]) -> Optional[float]:
    """The error a record reports for its own layer: attention vs dense attention, a routed block vs dense."""
    details = layer["details"]
    return details.get("error_vs_dense", details.get("block_error"))


def _summary(report: dict[str, Any]) -> str:
    totals, constants = report["totals"], report["model_bytes"]
    items = [("pipeline", f"<code>{escape(report['pipeline'])}</code>"), ("backend", escape(report["backend"])),
             ("rewritten layers", str(len(report["layers"]))),
             ("weight bytes", f"{_bytes(totals['bytes_before'])} \u2192 {_bytes(totals['bytes_after'])}"),
             ("FLOPs per call", f"{_flops(totals['flops_before'])} \u2192 {_flops(totals['flops_after'])}"),
             ("model constants", f"{_bytes(constants['before'])} \u2192 {_bytes(constants['after'])}"),
             ("error vs dense model", f"{_error(report['error_vs_dense'])} (relative L2, example inputs)"),
             ("error vs pruned dense", f"{_error(report['error_vs_reference'])} (exactness of the rewrite)")]
    items += [("request", escape(line)) for line in report["noops"]]
    if report["timings"]:
        items.append(("time", ", ".join(f"{escape(k)} {v:.2f} s" for k, v in report["timings"].items())))
    return "<dl class='panel'>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _layer_table(layers: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("layer", "op", "pattern", "bytes before", "bytes after",
                                             "FLOPs before", "FLOPs after", "error"))
    rows = "".join(
        f"<tr><td class='layer mono'>{escape(r['layer'])}</td><td>{escape(r['op'])}</td>"
        f"<td>{escape(r['pattern'])}</td><td class='num'>{_bytes(r['bytes_before'])}</td>"
        f"<td class='num'>{_bytes(r['bytes_after'])}</td><td class='num'>{_flops(r['flops_before'])}</td>"
        f"<td class='num'>{_flops(r['flops_after'])}</td><td class='num'>{_error(layer_error(r))}</td></tr>"
        for r in layers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"


def _layer_charts(layers: list[dict[str, Any]]) -> str:
    weights = [(r["layer"], r["bytes_before"], r["bytes_after"]) for r in layers if r["bytes_before"]]
    flops = [(r["layer"], r["flops_before"], r["flops_after"]) for r in layers if r["flops_before"]]
    errors = [(r["layer"], layer_error(r)) for r in layers if layer_error(r) is not None]
    out = ["<h2>Bytes, FLOPs and error per layer</h2>"]
    if weights:
        out.append(_figure(pair_bars("weight bytes per layer", weights, _bytes),
                           "Weight bytes per layer: pale bar before, solid bar after (values + index metadata)."))
    if flops:
        out.append(_figure(pair_bars("FLOPs per call per layer", flops, _flops),
                           "FLOPs per call on the example inputs: pale bar dense, solid bar after the rewrite."))
    if errors:
        out.append(_figure(log_bars("error per layer", errors),
                           "Relative L2 error of each layer's output against the dense layer (log scale). "
                           "N:M layers show their cost in the model error; <code>sparsecc sweep weights</code> "
                           "measures it per layer."))
    return "".join(out)


def _layouts(layers: list[dict[str, Any]]) -> str:
    sites = [r for r in layers if r["details"].get("layout_blocks")]
    figures = []
    for r in sites:
        d, (batch, heads, seq, keys) = r["details"], r["shape"]
        rows = d["layout_blocks"]
        pooled = -(-seq // d["block"]) > len(rows) or -(-keys // d["block"]) > len(rows[0])
        caption = (f"<span class='mono'>{escape(r['layer'])}</span><br>policy {escape(str(d['policy']))}, "
                   f"block {d['block']}, {seq} queries \u00d7 {keys} keys, density {d['density']:.3f}"
                   + (" (cells pool several blocks)" if pooled else ""))
        figures.append(_figure(block_grid(f"block layout of {r['layer']}", rows), caption))
    if not figures:
        return ""
    legend = "".join(f"<span class='key cell-{s}' style='background: var(--cell{s})'></span>{name}"
                     for s, name in ((0, "absent (never visited)"), (1, "partial (masked)"), (2, "full")))
    return ("<h2>Attention block layouts</h2><p class='muted'>Key blocks across, query blocks down; batch 0, "
            f"head 0, on the example inputs.{legend}</p><div class='layouts'>{''.join(figures)}</div>")


def _skipped(report: dict[str, Any]) -> str:
    if not report["skipped"]:
        return ""
    items = "".join(f"<li><span class='mono'>{escape(s['layer'])}</span>: {escape(s['reason'])} "
                    f"<span class='muted'>[{escape(s['rule'])}]</span></li>" for s in report["skipped"])
    return f"<h2>Skipped layers ({len(report['skipped'])})</h2><ul>{items}</ul>"


def _weight_sweep(sweep: dict[str, Any]) -> str:
    groups = [(g["group"], g["error"]) for g in sweep["groups"]]
    whole = [(w["pattern"], w["error"]) for w in sweep["whole_model"]]
    return (f"<h2>Sensitivity: weights ({escape(sweep['pattern'])}, {escape(sweep['method'])})</h2>"
            + _figure(log_bars("error with only this group pruned", groups),
                      "Output error vs the dense model with only this group pruned (log scale).")
            + _figure(log_bars("whole-model error per pattern", whole),
                      "Output error vs the dense model with every layer pruned, per pattern (log scale)."))


def _token_sweep(sweep: dict[str, Any]) -> str:
    rows = sweep["rows"]
    errors = [(r["capacity"], r["error_vs_dense"]) for r in rows if r["error_vs_dense"] is not None]
    ratios = [(r["capacity"], r["flops_after"] / r["flops_before"]) for r in rows if r["flops_before"]]
    return (f"<h2>Sensitivity: token routing (router {escape(sweep['router'])}, where {escape(sweep['where'])})</h2>"
            + _figure(line_chart("error vs capacity", "capacity (kept fraction of tokens)", "error vs dense",
                                 [("error", errors)], log_y=True),
                      "Output error vs the dense model (log scale; an error of 0 has no point on it).")
            + _figure(line_chart("routed FLOPs vs capacity", "capacity (kept fraction of tokens)", "FLOPs ratio",
                                 [("routed / dense FLOPs", ratios)]),
                      "Matmul FLOPs of the routed blocks, routed over dense (router included)."))


def _sweep(sweep: dict[str, Any]) -> str:
    if "groups" in sweep:
        return _weight_sweep(sweep)
    if "rows" in sweep:
        return _token_sweep(sweep)
    raise ValueError(f"report html: a sweep has 'groups' (sweep weights) or 'rows' (sweep tokens), "
                     f"got keys {sorted(sweep)}")


def render_html(report: Optional[dict[str, Any]] = None, sweeps: Sequence[dict[str, Any]] = ()) -> str:
    """The page for a report's `to_dict()` and/or sweeps' `to_dict()` (either may be absent)."""
    named = [s["model"] for s in sweeps if "model" in s]   # a token sweep carries no model name
    title = f"sparsecc report: {report['model']}" if report else \
        f"sparsecc sweep: {named[0]}" if named else "sparsecc sweep"
    parts = [f"<h1>{escape(title)}</h1>"]
    if report:
        parts += [_summary(report), "<h2>Rewritten layers</h2>", _layer_table(report["layers"]),
                  _layer_charts(report["layers"]), _layouts(report["layers"]), _skipped(report)]
    parts += [_sweep(s) for s in sweeps]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{_POLICY}\">"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def save_html(path: str | Path, report: Optional[dict[str, Any]] = None,
              sweeps: Sequence[dict[str, Any]] = ()) -> Path:
    """Write `render_html(report, sweeps)` to `path` (UTF-8); returns the path."""
    path = Path(path)
    path.write_text(render_html(report, sweeps), encoding="utf-8")
    return path


__all__ = ["layer_error", "render_html", "save_html"]
