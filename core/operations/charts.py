"""Line charts as inline SVG, rendered on the server (no script, no library, no CDN).

`line_chart` draws series of points taken at the `times` of a `core.operations.history.History`; gaps
(None) break a line. Each line is a `<path class="line" data-series=... data-points=N>`, so a
test (or a curious operator) can see how many points a chart drew.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

Value = float | None
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")
WIDTH, HEIGHT = 460, 150
MAX_LINES = len(PALETTE)  # lines per chart: more would be unreadable (and each costs page size)
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 8, 8, 18


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above `value` (an axis maximum); 1 for nothing."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    scale = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * scale * (1 + 1e-9):
            return step * scale
    return 10 * scale


def _fmt(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.2g}" if value < 1 else f"{value:.1f}"


@dataclass
class Line:
    """One line of a chart; lines sharing `color` (an index into PALETTE) belong together (p50/p99)."""

    name: str
    points: Sequence[Value]
    color: int
    dashed: bool = False


def _path(points: Sequence[Value], xs: Sequence[float], y_of: Callable[[float], float]) -> tuple[str, int]:
    """SVG path data ("M x y L x y …", a new M after each gap) and the number of points drawn."""
    out: list[str] = []
    pen_down = False
    drawn = 0
    for x, value in zip(xs, points):
        if value is None:
            pen_down = False
            continue
        out.append(f"{'L' if pen_down else 'M'}{x:.0f} {y_of(value):.0f}")  # whole pixels: a smaller page
        pen_down = True
        drawn += 1
    return " ".join(out), drawn


def line_chart(chart_id: str, title: str, unit: str, times: Sequence[float], window: float, lines: Sequence[Line],
               *, limit: float | None = None, limit_label: str = "") -> str:
    """One chart: a titled `<figure>` with an SVG and a legend giving each line's latest value.

    The x axis spans the last `window` seconds up to the newest point; `limit` draws a horizontal
    reference (e.g. MAX_INFLIGHT) that is also part of the y range.
    """
    e = html.escape
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    values = [v for line in lines for v in line.points if v is not None]
    top = nice_ceiling(max(values + ([limit] if limit else []), default=0.0))
    end = times[-1] if times else 0.0
    xs = [_LEFT + plot_w * (1 - (end - t) / window) for t in times]

    def y_of(value: float) -> float:
        return _TOP + plot_h * (1 - min(value, top) / top)

    svg = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
           f'aria-label="{e(title)}">']
    for fraction in (0.0, 0.5, 1.0):
        y = _TOP + plot_h * (1 - fraction)
        svg.append(f'<line class="grid" x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/><text class="axis" '
                   f'x="{_LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(top * fraction)}</text>')
    minutes = window / 60
    svg.append(f'<text class="axis" x="{_LEFT}" y="{HEIGHT - 4}">−{minutes:g} min</text>'
               f'<text class="axis" x="{WIDTH - _RIGHT}" y="{HEIGHT - 4}" text-anchor="end">now</text>')
    if limit:
        y = y_of(limit)
        svg.append(f'<line class="limit" x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}">'
                   f'<title>{e(limit_label)} {_fmt(limit)}</title></line>')
    legend = []
    for line in lines:
        color = PALETTE[line.color % len(PALETTE)]
        d, drawn = _path(line.points, xs, y_of)
        latest = next((v for v in reversed(line.points) if v is not None), None)
        now_text = "—" if latest is None else f"{_fmt(latest)} {unit}"
        style = ' stroke-dasharray="4 3"' if line.dashed else ""
        swatch = f"border-top:2px {'dashed' if line.dashed else 'solid'} {color}"
        svg.append(f'<path class="line" data-series="{e(line.name)}" data-points="{drawn}" d="{d}" stroke="{color}"'
                   f'{style}><title>{e(line.name)}: {e(now_text)}</title></path>')
        legend.append(f'<li><span class="swatch" style="{swatch}"></span>{e(line.name)} <b>{e(now_text)}</b></li>')
    if not values:
        svg.append(f'<text class="axis" x="{_LEFT + plot_w / 2:.0f}" y="{_TOP + plot_h / 2:.0f}" '
                   'text-anchor="middle">no data yet</text>')
    svg.append("</svg>")
    if limit:
        legend.append(f'<li><span class="swatch limit"></span>{e(limit_label)} <b>{_fmt(limit)}</b></li>')
    return (f'<figure class="chart" id="{e(chart_id)}"><figcaption>{e(title)}</figcaption>{"".join(svg)}'
            f'<ul class="legend">{"".join(legend)}</ul></figure>')


Group = dict[str, dict[str, list[Value]]]  # name -> metric -> points, as in History.data()


def busiest(group: Group, metric: str, limit: int = MAX_LINES) -> Group:
    """The `limit` names with the largest sum of `metric` over the window, in name order."""
    def weight(name: str) -> float:
        return sum(v for v in group[name].get(metric, ()) if v is not None)

    chosen = sorted(group, key=lambda name: (-weight(name), name))[:limit]
    return {name: group[name] for name in sorted(chosen)}


def history_charts(history: dict[str, Any], max_inflight: int) -> str:
    """The status page's charts from `History.data()`: by route, by process, and the backlog.

    A chart draws at most MAX_LINES lines (the busiest routes or processes); /status.json has all.
    """
    times, window = history["times"], history["window"]

    def chart(chart_id: str, title: str, unit: str, group: Group, metric: str, **kw: Any) -> str:
        lines = [Line(name, series[metric], i) for i, (name, series) in enumerate(group.items())]
        return line_chart(chart_id, title, unit, times, window, lines, **kw)

    def latency(chart_id: str, title: str, group: Group) -> str:
        # Names that handled nothing in the window have no latency: left out of the legend too.
        lines = [Line(f"{name} {q}", series[q], i, dashed=q == "p50")
                 for i, (name, series) in enumerate(group.items()) for q in ("p99", "p50")
                 if any(v is not None for v in series["p99"])]
        return line_chart(chart_id, title, "ms", times, window, lines)

    def heading(what: str, group: dict[str, Any], total: int) -> str:
        shown = f' <span class="meta">the {len(group)} busiest of {total}</span>' if len(group) < total else ""
        return f"<h3>By {what}{shown}</h3>"

    routes, processes = busiest(history["routes"], "rate"), busiest(history["processes"], "rate")
    minutes = f"last {window / 60:g} min, a point every {history['interval']:g} s"
    parts = [f'<h2>Charts <span class="meta">{html.escape(minutes)}</span></h2>',
             heading("route", routes, len(history["routes"])), '<div class="charts">',
             chart("chart-route-rate", "messages/s by route", "msg/s", routes, "rate"),
             chart("chart-route-errors", "errors/s (dead letters) by route", "/s", routes, "errors"),
             latency("chart-route-latency", "handler latency by route, p99 (solid) and p50 (dashed), ms", routes),
             "</div>", heading("process", processes, len(history["processes"])), '<div class="charts">',
             chart("chart-process-rate", "messages/s by process", "msg/s", processes, "rate"),
             chart("chart-process-errors", "errors/s (dead letters) by process", "/s", processes, "errors"),
             latency("chart-process-latency", "handler latency by process, p99 (solid) and p50 (dashed), ms", processes),
             chart("chart-inflight", "in flight by process (highest per point)", "", processes, "inflight",
                   limit=max_inflight, limit_label="MAX_INFLIGHT"),
             "</div>"]
    if history["backlog"]:
        parts += ['<h3>Backlog</h3><div class="charts">',
                  chart("chart-backlog", "backlog (outbox rows, stream entries)", "",
                        busiest(history["backlog"], "value"), "value"),
                  "</div>"]
    return "".join(parts)
