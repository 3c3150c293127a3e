"""The results table (Markdown, CSV) and a bar chart of clean and adversarial accuracy.

"clean and adv" is the per-sample worst case over {clean, the attack}: images classified
correctly both ways. "ECE" is the expected calibration error of the top-1 confidences, clean
and under the attack (`calibration.py`; 20 bins unless --ece-bins), in percent. Rows of an
attacked run also say the attack's kind (transfer: made once on zero-shot CLIP and shared by
all adapters; adaptive: made on each adapter) and its cost per image; rows of an adaptive
attack carry sanity checks, listed under the table, and warnings. Notes (e.g. how many images
could not be read) follow the table. Files are written atomically.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import List, Optional, Sequence

from .storage import atomic_write

COLUMNS = (
    "adapter",
    "n",
    "clean_acc",
    "adv_acc",
    "worst_case_acc",
    "clean_ece",
    "adv_ece",
    "seconds_per_image",
    "image_passes_per_image",
    "attack",
    "attack_kind",
    "attack_forward_per_image",
    "attack_backward_per_image",
    "attack_image_passes_per_image",
    "attack_seconds_per_image",
    "warnings",
)
HEADERS = (
    "adapter",
    "n",
    "clean acc (%)",
    "adv acc (%)",
    "clean and adv (%)",
    "clean ECE (%)",
    "adv ECE (%)",
    "s / image",
    "image passes / image",
    "attack (kind)",
    "attack fwd / bwd per image",
    "attack image passes / image",
    "attack s / image",
)


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _number(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def markdown_table(rows: Sequence[dict], caption: str = "", notes: Sequence[str] = ()) -> str:
    lines = [f"{caption}\n" if caption else ""]
    lines.append("| " + " | ".join(HEADERS) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|")
    for row in rows:
        cells = [
            row["adapter"],
            str(row["n"]),
            _percent(row["clean_acc"]),
            _percent(row["adv_acc"]),
            _percent(row.get("worst_case_acc")),
            _percent(row.get("clean_ece")),
            _percent(row.get("adv_ece")),
            _number(row["seconds_per_image"]),
            _number(row["image_passes_per_image"], 4),
            _attack(row),
            _passes(row),
            _number(row.get("attack_image_passes_per_image"), 4),
            _number(row.get("attack_seconds_per_image")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _checks_section(rows)
    if notes:
        lines += [""] + list(notes)
    return "\n".join(lines).lstrip("\n") + "\n"


def _attack(row: dict) -> str:
    if not row.get("attack"):
        return "-"
    kind = row.get("attack_kind") or "-"
    if row.get("attack_shared") and kind == "transfer":
        kind = "transfer, shared"
    return f"{row['attack']} ({kind})"


def _passes(row: dict) -> str:
    forward, backward = row.get("attack_forward_per_image"), row.get("attack_backward_per_image")
    if forward is None and backward is None:
        return "-"
    unit = row.get("attack_pass_unit")
    text = f"{_number(forward, 4)} / {_number(backward, 4)}"
    return f"{text} ({unit})" if unit else text


def _checks_section(rows: Sequence[dict]) -> List[str]:
    """Sanity checks of adaptive attacks (one line per adapter and check), then the warnings."""
    lines: List[str] = []
    adaptive = [row for row in rows if row.get("attack_kind") == "adaptive"]
    if not adaptive:
        return lines
    checked = [row for row in adaptive if row.get("sanity_checks")]
    lines.append("")
    if not checked:
        lines.append("Sanity checks of the adaptive attack: not run (enable them with --sanity-checks N).")
    else:
        lines.append("Sanity checks of the adaptive attack (Carlini et al. 2019; Croce et al. 2022):")
        lines.append("")
        lines.append("| adapter | check | expectation | measured | result |")
        lines.append("|---|---|---|---|---|")
        for row in checked:
            for check in row["sanity_checks"]:
                lines.append(
                    f"| {row['adapter']} | {check['check']} | {check['expect']} | {check['measured']} | "
                    f"{'pass' if check['passed'] else '**FAIL**'} |"
                )
    warnings = [w for row in rows for w in row.get("warnings") or []]
    if warnings:
        lines.append("")
        lines += [f"**Warning**: {w}" for w in warnings]
    return lines


def csv_table(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values = {k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS}
        values["warnings"] = " | ".join(row.get("warnings") or [])
        writer.writerow(values)
    return buffer.getvalue()


def bar_chart(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    """Grouped bars: clean and adversarial accuracy (%) per adapter, values printed on top."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    names = [row["adapter"] for row in rows]
    clean = [100 * (row["clean_acc"] or 0) for row in rows]
    adv = [None if row["adv_acc"] is None else 100 * row["adv_acc"] for row in rows]
    attacked = any(a is not None for a in adv)
    figure = Figure(figsize=(max(4.0, 1.1 * len(names) + 2), 3.6), dpi=120)
    axes = figure.subplots()
    width = 0.38 if attacked else 0.6
    positions = range(len(names))
    offset = width / 2 if attacked else 0.0
    bars = [axes.bar([p - offset for p in positions], clean, width, label="clean", color="#4C72B0")]
    if attacked:
        bars.append(
            axes.bar(
                [p + offset for p in positions], [a or 0 for a in adv], width, label="adversarial", color="#DD8452"
            )
        )
    for group in bars:
        axes.bar_label(group, fmt="%.1f", fontsize=7, padding=1)
    axes.set_xticks(list(positions))
    axes.set_xticklabels(names, rotation=20 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_ylim(0, 105)
    import textwrap

    axes.set_title(textwrap.fill(title, width=int(14 * figure.get_figwidth())), fontsize=8)
    axes.legend(fontsize=8, loc="upper right")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png")
    atomic_write(path, image.getvalue())
    return path


def skipped_note(skipped: Sequence[dict]) -> List[str]:
    """The results table's line on samples whose image could not be read (none: no line)."""
    if not skipped:
        return []
    count = len(skipped)
    images = "image" if count == 1 else "images"
    return [
        f"{count} {images} could not be read and {'is' if count == 1 else 'are'} left out of every count "
        f'(--on-bad-image skip; listed in summary.json under "skipped"), e.g. {skipped[0]["path"]}.'
    ]


def write_reports(rows: Sequence[dict], directory: Path, caption: str = "", notes: Sequence[str] = ()) -> List[Path]:
    directory = Path(directory)
    written = []
    for name, text in (("results.md", markdown_table(rows, caption, notes)), ("results.csv", csv_table(rows))):
        atomic_write(directory / name, text.encode())
        written.append(directory / name)
    written.append(bar_chart(rows, directory / "results.png", caption))
    return written
