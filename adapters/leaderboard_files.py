"""The merged leaderboard's files: leaderboard.md, .csv (one line per value), .json (entries), .html.

The JSON holds one RobustBench-style entry per adapter and dataset: the run's own entry
(model_info/...json) when it wrote one, else one built from the run's rows, plus a
`leaderboard` block (table, run folder, images, partial, 95% intervals) and `autoattack_acc`,
which RobustBench ranks by: it is filled when an APGD attack with EOT through the defence
(AutoAttack's attack for randomized defences; attack names starting "apgd") was among the
run's attacks, and otherwise left empty with the reason in the footnote.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .merge import Cell, Row, Table
from .run_folders import AdapterResult, RunResult

AUTOATTACK_PREFIX = "apgd"
WHY_NO_AUTOATTACK = (
    "autoattack_acc is empty: no APGD attack with EOT through the defence (AutoAttack's version for "
    "randomized defences) was among this run's attacks ({attacks}); entries here rank by worst_case_acc."
)


def percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def cell_text(cell: Optional[Cell], interval: bool = True) -> str:
    """'63.0 [53.2, 71.8]' (percent, 95% interval), '*' when from a partial run, '-' when absent."""
    if cell is None or cell.value is None:
        return "-"
    text = percent(cell.value)
    if interval and cell.low is not None:
        text += f" [{percent(cell.low)}, {percent(cell.high)}]"
    return text + ("*" if cell.partial else "")


def number(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def columns(table: Table) -> List[tuple]:
    """(dataset or 'average', metric) in the order of the table's columns."""
    metrics = table.metrics + [f"ECE {m}" for m in table.ece_metrics]
    places = table.datasets + (["average"] if len(table.datasets) > 1 else [])
    return [(place, metric) for place in places for metric in metrics]


def heading(table: Table, number_: int) -> str:
    text = f"Table {number_}: " + "; ".join(f"{key}: {value}" for key, value in table.compared.items())
    return text


def differs_line(table: Table) -> str:
    return "Differs from the other tables in: " + ", ".join(table.differs) + "." if table.differs else ""


def markdown(tables: Sequence[Table]) -> str:
    out = ["# Leaderboard", ""]
    for index, table in enumerate(tables, 1):
        cols = columns(table)
        head = ["adapter", *[f"{place}: {metric} (%)" for place, metric in cols], "s / image", "image passes / image"]
        out += [f"## {heading(table, index)}", ""]
        if table.differs:
            out += [differs_line(table), ""]
        out += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---:|"]
        for row in table.rows:
            cells = [cell_text(row.cells.get(col), not col[1].startswith("ECE")) for col in cols]
            cells = [f"**{c}**" if col[1] == "worst case" and c != "-" else c for c, col in zip(cells, cols)]
            label = row.label + (" (front)" if row.on_front else "")
            out.append(
                f"| {label} | " + " | ".join(cells) + f" | {number(row.seconds_per_image)} | "
                f"{number(row.passes_per_image, 4)} |"
            )
        out += [""] + [f"- {note}" for note in footnotes(table)] + [""]
    return "\n".join(out)


def footnotes(table: Table) -> List[str]:
    devices = sorted({d for row in table.rows for d in row.devices})
    notes = [
        "Accuracies in %, with the 95% Wilson score interval over the images evaluated in brackets; the average "
        "over datasets (only for adapters evaluated on every dataset of the table) with the normal-approximation "
        "interval of a mean of independent proportions. ECE x100 where the runs recorded it.",
        "Cost: seconds and image-tower passes per prediction, averaged over the datasets"
        + (f"; device: {', '.join(devices)}. " if devices else ". ")
        + "(front): on the accuracy/cost front (no other adapter is as fast and as robust).",
        "worst case: a sample counts only if classified correctly clean and under every attack of the run.",
    ]
    if not any(a.name.startswith(AUTOATTACK_PREFIX) for run in table.runs for a in run.attacks):
        notes.append(WHY_NO_AUTOATTACK.format(attacks=", ".join(table.metrics[1:-1]) or "none"))
    notes += table.notes
    notes += [f"Run {run.path}: {' '.join(map(str, run.info.get('command') or []))}" for run in table.runs]
    return notes


def csv_text(tables: Sequence[Table]) -> str:
    """One line per (table, adapter, dataset or average, metric): value and interval in [0,1]."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["table", "adapter", "settings", "dataset", "metric", "value", "ci95_low", "ci95_high", "n", "partial", "run"]
    )
    for index, table in enumerate(tables, 1):
        for row in table.rows:
            for place, metric in columns(table):
                cell = row.cells.get((place, metric))
                if cell is None:
                    continue
                run = str(row.results[place][1].path) if place in row.results else ""
                writer.writerow(
                    [
                        index,
                        row.label,
                        json.dumps(row.settings, sort_keys=True, default=str),
                        place,
                        metric,
                        _plain(cell.value),
                        _plain(cell.low),
                        _plain(cell.high),
                        cell.n,
                        int(cell.partial),
                        run,
                    ]
                )
            for metric, value in (
                ("seconds_per_image", row.seconds_per_image),
                ("image_passes_per_image", row.passes_per_image),
            ):
                writer.writerow([index, row.label, "", "average", metric, _plain(value), "", "", "", "", ""])
    return buffer.getvalue()


def _plain(value) -> str:
    return "" if value is None else repr(float(value))


def entries(tables: Sequence[Table]) -> List[dict]:
    """One RobustBench-style entry per adapter and dataset, with the merge's own block."""
    out = []
    for index, table in enumerate(tables, 1):
        for row in table.rows:
            for dataset, (result, run) in row.results.items():
                out.append(entry(result, run, row, dataset, index, table))
    return out


def entry(result: AdapterResult, run: RunResult, row: Row, dataset: str, index: int, table: Table) -> dict:
    from .leaderboard import MODEL_INFO_FIELDS

    info = dict(result.entry) if result.entry else {field: None for field in MODEL_INFO_FIELDS}
    pct = lambda v: None if v is None else str(round(100 * v, 2))
    info.update(name=info.get("name") or result.name, dataset=dataset, clean_acc=pct(result.clean_acc))
    info.setdefault("architecture", run.model)
    if run.attacks:
        info["worst_case_acc"] = pct(result.worst_case_acc)
        info.setdefault("eps", run.attacks[0].params.get("eps"))
    apgd = [a for a in run.attacks if a.name.startswith(AUTOATTACK_PREFIX)]
    footnote = info.get("footnote") or f"Test-time defence ({result.name}) on {result.n} images of {dataset}."
    if apgd:
        values = [result.adv_acc.get(a.label) for a in apgd]
        worst = min((v for v in values if v is not None), default=None)
        info["autoattack_acc"] = pct(worst)
        footnote += (
            f" autoattack_acc: robust accuracy under {', '.join(a.label for a in apgd)} (APGD with EOT through "
            "the defence, AutoAttack's attack for randomized defences)."
        )
    else:
        info["autoattack_acc"] = None
        footnote += " " + WHY_NO_AUTOATTACK.format(attacks=", ".join(a.label for a in run.attacks) or "none")
    if not run.finished:
        footnote += f" Partial run: {result.n} images evaluated" + (f" of {run.n_examples}." if run.n_examples else ".")
    info["footnote"] = footnote
    info["leaderboard"] = {
        "table": index,
        "row": row.label,
        "run": str(run.path),
        "n": result.n,
        "partial": not run.finished,
        "compared": table.compared,
        "ci95": {
            metric: [cell.low, cell.high]
            for (place, metric), cell in row.cells.items()
            if place == dataset and cell.low is not None
        },
        "seconds_per_image": result.seconds_per_image,
        "image_passes_per_image": result.passes_per_image,
        "device": run.device,
    }
    return info


def write_leaderboard(tables: Sequence[Table], out: Path) -> List[Path]:
    """leaderboard.md, .csv, .json and .html under `out`, each written atomically."""
    from .leaderboard_page import page
    from .storage import atomic_write, make_dir

    make_dir(out)
    files: Dict[str, str] = {
        "leaderboard.md": markdown(tables),
        "leaderboard.csv": csv_text(tables),
        "leaderboard.json": json.dumps(entries(tables), indent=2) + "\n",
        "leaderboard.html": page(tables),
    }
    for name, text in files.items():
        atomic_write(out / name, text.encode())
    return [out / name for name in files]
