"""leaderboard.html: one self-contained page (inline style, a small inline script, SVG plots).

Nothing is fetched when the page is viewed. Each table sorts by any column (click its
header; again to reverse), worst-case cells are highlighted, and each table has a plot of
its ranking accuracy (worst case, else clean) against seconds per image with the adapters
on the accuracy/cost front marked. The commands and versions of every run close the page.
"""

from __future__ import annotations

import html
import math
from typing import List, Optional, Sequence

from .leaderboard_files import cell_text, columns, differs_line, footnotes, heading, number
from .merge import Cell, Table

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;cursor:pointer;user-select:none}
th.sorted-asc::after{content:" \\25B2"} th.sorted-desc::after{content:" \\25BC"}
td:first-child,th:first-child{text-align:left}
td.worst{background:#fde2c4;font-weight:bold}
tr.front td:first-child{font-weight:bold}
.ci{color:#777;font-size:11px}
.notes{font-size:12px;color:#444} code{font-size:12px}
svg text{font-size:11px}
"""

SCRIPT = """
document.querySelectorAll("table.leaderboard").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var ascending = !th.classList.contains("sorted-asc");
      table.querySelectorAll("th").forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
      th.classList.add(ascending ? "sorted-asc" : "sorted-desc");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[column].dataset.value, y = b.cells[column].dataset.value;
        var nx = parseFloat(x), ny = parseFloat(y);
        var missingX = x === undefined || x === "", missingY = y === undefined || y === "";
        if (missingX || missingY) { return missingX - missingY; }
        var order = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _td(text: str, value, css: str = "") -> str:
    sort = "" if value is None else html.escape(str(value), quote=True)
    cls = f' class="{css}"' if css else ""
    return f'<td data-value="{sort}"{cls}>{text}</td>'


def _cell(cell: Optional[Cell], metric: str) -> str:
    if cell is None or cell.value is None:
        return _td("-", None, "worst" if metric == "worst case" else "")
    main, _, interval = cell_text(cell, not metric.startswith("ECE")).partition(" ")
    text = html.escape(main) + (f' <span class="ci">{html.escape(interval)}</span>' if interval else "")
    return _td(text, cell.value, "worst" if metric == "worst case" else "")


def table_html(table: Table, index: int) -> str:
    cols = columns(table)
    head = [
        "adapter",
        *[f"{place}: {metric} (%)" for place, metric in cols],
        "s / image",
        "image passes / image",
        "device",
    ]
    lines = [f"<h2>{html.escape(heading(table, index))}</h2>"]
    if table.differs:
        lines.append(f"<p>{html.escape(differs_line(table))}</p>")
    lines.append(f'<table class="leaderboard" id="table-{index}"><thead><tr>')
    lines += [f"<th>{html.escape(h)}</th>" for h in head]
    lines.append("</tr></thead><tbody>")
    for row in table.rows:
        css = ' class="adapter-row front"' if row.on_front else ' class="adapter-row"'
        lines.append(f'<tr{css} data-adapter="{html.escape(row.adapter, quote=True)}">')
        lines.append(_td(html.escape(row.label) + (" &#9733;" if row.on_front else ""), row.label))
        lines += [_cell(row.cells.get(col), col[1]) for col in cols]
        lines.append(_td(number(row.seconds_per_image), row.seconds_per_image))
        lines.append(_td(number(row.passes_per_image, 4), row.passes_per_image))
        lines.append(_td(html.escape(", ".join(row.devices)), ", ".join(row.devices)))
        lines.append("</tr>")
    lines.append("</tbody></table>")
    lines.append(plot(table, index))
    lines.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in footnotes(table)) + "</ul>")
    return "\n".join(lines)


def plot(table: Table, index: int, width: int = 560, height: int = 320) -> str:
    """An SVG scatter of the ranking accuracy against seconds per image (log axis when the
    times span more than a factor of 10); the front's points are filled and joined."""
    metric = table.ranking_metric
    points = [
        (row, row.seconds_per_image, row.cells.get(("average", metric)).value)
        for row in table.rows
        if row.seconds_per_image
        and row.cells.get(("average", metric))
        and row.cells[("average", metric)].value is not None
    ]
    title = f"{metric} accuracy (%) vs seconds per image, table {index}"
    if not points:
        return f'<p id="plot-{index}">No plot: no adapter of this table has both a {metric} accuracy and a cost.</p>'
    left, right, top, bottom = 60, 20, 30, 45
    seconds = [s for _, s, _ in points]
    low, high = min(seconds), max(seconds)
    log = high > 10 * low
    if log:
        low, high = math.log10(low), math.log10(high)
    span = (high - low) or 1.0
    low, high = low - 0.08 * span, high + 0.08 * span

    def x(s: float) -> float:
        value = math.log10(s) if log else s
        return left + (value - low) / (high - low) * (width - left - right)

    def y(a: float) -> float:
        return top + (1 - a) * (height - top - bottom)

    parts = [
        f'<svg id="plot-{index}" class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{html.escape(title, quote=True)}">',
        f'<text x="{width / 2}" y="16" text-anchor="middle">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#444"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#444"/>',
        f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">seconds per image{" (log scale)" if log else ""}'
        "</text>",
        f'<text x="14" y="{height / 2}" text-anchor="middle" transform="rotate(-90 14 {height / 2})">'
        f"{html.escape(metric)} (%)</text>",
    ]
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{100 * tick:.0f}</text>')
        parts.append(f'<line x1="{left}" y1="{y(tick):.1f}" x2="{width - right}" y2="{y(tick):.1f}" stroke="#eee"/>')
    for value in _ticks(low, high):
        label = number(10**value if log else value, 2)
        parts.append(
            f'<text x="{x(10**value if log else value):.1f}" y="{height - bottom + 15}" '
            f'text-anchor="middle">{label}</text>'
        )
    front = sorted((s, a) for row, s, a in points if row.on_front)
    if len(front) > 1:
        path = " ".join(f"{x(s):.1f},{y(a):.1f}" for s, a in front)
        parts.append(
            f'<polyline class="front-line" points="{path}" fill="none" stroke="#d95f02" stroke-dasharray="4 3"/>'
        )
    for row, s, a in points:
        css = "point front" if row.on_front else "point"
        fill = "#d95f02" if row.on_front else "#ffffff"
        parts.append(
            f'<circle class="{css}" data-adapter="{html.escape(row.label, quote=True)}" '
            f'cx="{x(s):.1f}" cy="{y(a):.1f}" '
            f'r="5" fill="{fill}" stroke="#d95f02"><title>{html.escape(row.label)}: {100 * a:.1f}%, {s:.3g} s</title>'
            "</circle>"
        )
        parts.append(f'<text x="{x(s) + 7:.1f}" y="{y(a) - 6:.1f}">{html.escape(row.label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _ticks(low: float, high: float, count: int = 5) -> List[float]:
    step = (high - low) / (count - 1)
    return [low + i * step for i in range(count)]


def runs_html(tables: Sequence[Table]) -> str:
    lines = [
        "<h2>Runs</h2>",
        "<table><thead><tr><th>run</th><th>state</th><th>command</th><th>versions</th>"
        "<th>device</th><th>started / finished</th></tr></thead><tbody>",
    ]
    for table in tables:
        for run in table.runs:
            info = run.info
            command = " ".join(map(str, info.get("command") or []))
            versions = ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())
            state = "finished" if run.finished else f"partial: {run.images} images"
            lines.append(
                f"<tr><td>{html.escape(str(run.path))}</td><td>{html.escape(state)}</td>"
                f"<td><code>{html.escape(command)}</code></td><td>{html.escape(versions)}</td>"
                f"<td>{html.escape(run.device)}</td>"
                f"<td>{html.escape(str(info.get('started') or '-'))} / "
                f"{html.escape(str(run.finished_at or '-'))}</td></tr>"
            )
    lines.append("</tbody></table>")
    return "\n".join(lines)


def page(tables: Sequence[Table]) -> str:
    body = "\n".join(table_html(table, index) for index, table in enumerate(tables, 1))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>atpt leaderboard</title>'
        f"<style>{STYLE}</style></head><body>\n<h1>Leaderboard</h1>\n"
        "<p>Click a column header to sort by it (again to reverse). Accuracies in %, 95% interval in grey; "
        "worst-case cells highlighted; &#9733;: on the accuracy/cost front.</p>\n"
        f"{body}\n{runs_html(tables)}\n<script>{SCRIPT}</script>\n</body></html>\n"
    )
