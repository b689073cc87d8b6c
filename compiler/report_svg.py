"""Inline SVG figures for the HTML report: paired bars, log-scale bars, line charts, block-layout grids.

Every string drawn is escaped here (layer names come from the user's model).
Colours are CSS classes (`bar-before`, `bar-after`, `bar`, `line-0` ..., `cell-0`
... `cell-2`), so the page's light and dark themes apply to the figures.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

WIDTH = 760          # viewBox width; the page scales it to the column
LABEL_WIDTH = 230    # room for layer names left of the bars
ROW = 22             # height of one bar row
NAME_CHARS = 34      # longer layer names are shortened (the full name is the row's tooltip)

Format = Callable[[float], str]


def _text(x: float, y: float, text: str, cls: str = "", anchor: str = "start") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" class="{cls}" text-anchor="{anchor}">{escape(text)}</text>')


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else "\u2026" + name[-(NAME_CHARS - 1):]


def _figure(title: str, height: float, body: list[str]) -> str:
    return (f'<svg viewBox="0 0 {WIDTH} {height:.0f}" width="{WIDTH}" height="{height:.0f}" role="img" aria-label="{escape(title)}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>{"".join(body)}</svg>')


def pair_bars(title: str, rows: Sequence[tuple[str, float, float]], fmt: Format) -> str:
    """One row per (label, before, after): a pale bar as long as `before`, a solid one as long as `after`."""
    top = max((max(before, after) for _, before, after in rows), default=0) or 1
    span = WIDTH - LABEL_WIDTH - 190
    body = []
    for i, (label, before, after) in enumerate(rows):
        y = i * ROW + 4
        saved = f" (\u2212{1 - after / before:.0%})" if before and after < before else ""
        body += [f'<g><title>{escape(label)}: {escape(fmt(before))} \u2192 {escape(fmt(after))}</title>',
                 _text(LABEL_WIDTH - 8, y + 14, _short(label), "label", "end"),
                 f'<rect class="bar-before" x="{LABEL_WIDTH}" y="{y}" width="{span * before / top:.1f}" height="16"/>',
                 f'<rect class="bar-after" x="{LABEL_WIDTH}" y="{y + 4}" width="{span * after / top:.1f}" height="8"/>',
                 _text(LABEL_WIDTH + span * max(before, after) / top + 6, y + 13,
                       f"{fmt(before)} \u2192 {fmt(after)}{saved}", "value"), "</g>"]
    return _figure(title, len(rows) * ROW + 8, body)


def log_bars(title: str, rows: Sequence[tuple[str, float]], fmt: Format = lambda v: f"{v:.2e}") -> str:
    """One bar per (label, value > 0) on a log10 axis with a tick per decade; zero and non-finite values
    get no bar, only their value."""
    shown = [v for _, v in rows if v > 0 and math.isfinite(v)]
    low = math.floor(math.log10(min(shown)) - 0.3) if shown else -1   # the smallest bar keeps some length
    high = max(math.ceil(math.log10(max(shown))), low + 1) if shown else 0
    span = WIDTH - LABEL_WIDTH - 100
    at = lambda v: LABEL_WIDTH + span * (math.log10(v) - low) / (high - low)
    height = len(rows) * ROW + 26
    body = [f'<line class="grid" x1="{at(10.0 ** d):.1f}" x2="{at(10.0 ** d):.1f}" y1="0" y2="{height - 20}"/>'
            + _text(at(10.0 ** d), height - 6, f"1e{d}", "tick", "middle") for d in range(low, high + 1)]
    for i, (label, value) in enumerate(rows):
        y = i * ROW + 4
        drawn = value > 0 and math.isfinite(value)
        end = at(value) if drawn else LABEL_WIDTH
        body += [f'<g><title>{escape(label)}: {escape(fmt(value))}</title>',
                 _text(LABEL_WIDTH - 8, y + 14, _short(label), "label", "end"),
                 f'<rect class="bar" x="{LABEL_WIDTH}" y="{y + 2}" width="{end - LABEL_WIDTH:.1f}" height="12"/>'
                 if drawn else "", _text(end + 6, y + 13, fmt(value), "value"), "</g>"]
    return _figure(title, height, body)


def line_chart(title: str, x_label: str, y_label: str, series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
               log_y: bool = False) -> str:
    """Series of (x, y) points joined by lines, a legend per series; on a log y axis points <= 0 are left out."""
    keep = lambda y: math.isfinite(y) and (y > 0 or not log_y)
    points = [(x, y) for _, pts in series for x, y in pts if keep(y)]
    if not points:
        return _figure(title, 40, [_text(10, 24, f"{title}: no finite values", "label")])
    ys = [math.log10(y) if log_y else y for _, y in points]
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    y0, y1 = (math.floor(min(ys)), math.ceil(max(ys))) if log_y else (min(0.0, min(ys)), max(ys))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 70, WIDTH - 160, 30, 220
    px = lambda x: left + (right - left) * (x - x0) / (x1 - x0)
    py = lambda y: bottom - (bottom - top) * ((math.log10(y) if log_y else y) - y0) / (y1 - y0)
    body = [f'<line class="axis" x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}"/>',
            f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{bottom}"/>',
            _text((left + right) / 2, bottom + 34, x_label, "label", "middle"),
            _text(left, top - 14, y_label, "label", "middle")]
    body += [_text(px(x), bottom + 16, f"{x:g}", "tick", "middle") for x in sorted({x for x, _ in points})]
    for tick in _ticks(y0, y1, log_y):
        y = bottom - (bottom - top) * (tick - y0) / (y1 - y0)
        body += [f'<line class="grid" x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}"/>',
                 _text(left - 6, y + 4, f"1e{tick:g}" if log_y else f"{tick:.3g}", "tick", "end")]
    for n, (name, pts) in enumerate(series):
        shown = sorted((x, y) for x, y in pts if keep(y))
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in shown)
        body += [f'<polyline class="line-{n % 4}" points="{path}"/>']
        body += [f'<circle class="dot-{n % 4}" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5"><title>{escape(name)}: '
                 f'{x:g} \u2192 {y:.3g}</title></circle>' for x, y in shown]
        body += [f'<rect class="dot-{n % 4}" x="{right + 16}" y="{top + 18 * n}" width="10" height="10"/>',
                 _text(right + 32, top + 18 * n + 9, name, "label")]
    return _figure(title, bottom + 44, body)


def _ticks(low: float, high: float, log: bool) -> list[float]:
    if log:
        return list(range(int(low), int(high) + 1))
    step = 10.0 ** math.floor(math.log10(high - low))
    while (high - low) / step < 4:   # at least four gridlines
        step /= 2
    return [low + i * step for i in range(int((high - low) / step) + 1)]


def block_grid(title: str, rows: Sequence[str], side: int = 256) -> str:
    """A layout picture (`passes.attention.layout_picture`): cells '0' absent, '1' partial, '2' full; a run
    of equal cells in a row is one rectangle. Query blocks go down, key blocks across."""
    nq, nk = len(rows), max((len(r) for r in rows), default=0)
    cell = max(3, side // max(nq, nk, 1))
    body = [f'<rect class="cell-frame" x="0" y="0" width="{cell * nk + 2}" height="{cell * nq + 2}"/>']
    for i, row in enumerate(rows):
        start = 0
        for j in range(1, len(row) + 1):
            if j == len(row) or row[j] != row[start]:
                state = row[start] if row[start] in "012" else "1"
                body.append(f'<rect class="cell-{state}" x="{1 + start * cell}" y="{1 + i * cell}" '
                            f'width="{(j - start) * cell}" height="{cell}"/>')
                start = j
    return (f'<svg viewBox="0 0 {cell * nk + 2} {cell * nq + 2}" width="{cell * nk + 2}" height="{cell * nq + 2}" '
            f'role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">'
            f'<title>{escape(title)}</title>{"".join(body)}</svg>')


__all__ = ["block_grid", "line_chart", "log_bars", "pair_bars"]
