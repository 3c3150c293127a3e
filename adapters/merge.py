"""`atpt leaderboard RUN_DIR...`: many `atpt eval` runs merged into the paper's table.

Rows are adapters (their settings named where two rows share a name), columns datasets
(clean, each attack, the worst case, ECE where recorded), then the average over datasets and
the cost. Runs that disagree on what is compared (backbone, eps, attacks and their settings,
number of images requested) are never averaged together: each such group is a table of its
own, headed by what it compares and by what it differs in from the others. Every accuracy
carries its 95% Wilson score interval over the images evaluated; a partial run's cells are
marked with how many images they cover.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .run_folders import AdapterResult, RunResult, find_runs, read_run

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
CLEAN, WORST = "clean", "worst case"
COMPARED = ("backbone", "eps", "attacks", "images")


def wilson(correct: float, n: int, z: float = Z95) -> Tuple[float, float]:
    """The Wilson score interval of a proportion `correct / n` (Wilson 1927); (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if correct <= 0 else max(0.0, centre - half)
    return low, 1.0 if correct >= n else min(1.0, centre + half)  # the ends exact where p is


@dataclass
class Cell:
    """One accuracy (or ECE) of one adapter on one dataset, or its average over datasets."""

    value: Optional[float]
    n: int = 0
    low: Optional[float] = None
    high: Optional[float] = None
    partial: bool = False

    @classmethod
    def accuracy(cls, value: Optional[float], n: int, partial: bool) -> "Cell":
        if value is None:
            return cls(None, n, partial=partial)
        low, high = wilson(round(value * n), n)
        return cls(value, n, low, high, partial)


@dataclass
class Row:
    """One adapter (with one set of settings) across the datasets of a table."""

    label: str
    adapter: str
    settings: Dict[str, object]
    results: Dict[str, Tuple[AdapterResult, RunResult]] = field(default_factory=dict)  # dataset -> result
    cells: Dict[Tuple[str, str], Cell] = field(default_factory=dict)  # (dataset or "average", metric) -> cell
    seconds_per_image: Optional[float] = None
    passes_per_image: Optional[float] = None
    devices: List[str] = field(default_factory=list)
    on_front: bool = False

    def sort_key(self, metric: str) -> float:
        cell = self.cells.get(("average", metric))
        return -1.0 if cell is None or cell.value is None else cell.value


@dataclass
class Table:
    """Runs that compare the same thing; `differs` names what sets it apart from the other tables."""

    compared: Dict[str, str]
    runs: List[RunResult]
    datasets: List[str]
    metrics: List[str]  # accuracy metrics: clean, each attack's label, worst case
    ece_metrics: List[str]
    rows: List[Row]
    differs: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ranking_metric(self) -> str:
        return WORST if WORST in self.metrics else CLEAN


def _eps_text(run: RunResult) -> str:
    from .attacks.eps import format_eps

    values = {format_eps(a.params.get("eps"), a.params.get("norm")) for a in run.attacks}
    return ", ".join(sorted(values)) or "-"


def _attacks_text(run: RunResult) -> str:
    if not run.attacks:
        return "none (clean only)"
    parts = []
    for attack in run.attacks:
        params = ", ".join(
            f"{k}={_param(k, v, attack.params)}" for k, v in sorted(attack.params.items()) if k not in ("name", "eps")
        )
        parts.append(f"{attack.label} ({attack.kind}; {params})")
    return "; ".join(parts)


def _param(key: str, value, params: dict) -> str:
    from .attacks.eps import format_eps

    return format_eps(value, params.get("norm")) if key == "alpha" and isinstance(value, float) else str(value)


def compared(run: RunResult) -> Dict[str, str]:
    """What a run compares: two runs are averaged together only when all of it is equal."""
    return {
        "backbone": f"{run.model} ({Path(run.pretrained).name})",  # weights by file name: paths differ by machine
        "eps": _eps_text(run),
        "attacks": _attacks_text(run),
        "images": "all" if run.n_examples is None else str(run.n_examples),
    }


WITHOUT_CONVENTION = {"domain_word": None, "augmix_ops": True}  # a dataset's settings when it sets none


def _settings_key(config: Optional[dict], dataset: str) -> str:
    """The adapter's identity across datasets: its settings, less those the dataset applies by
    convention (its domain word, ImageNet's crops-only views), which differ by dataset by design."""
    return json.dumps(own_settings(config, dataset), sort_keys=True, default=str)


def own_settings(config: Optional[dict], dataset: str) -> Optional[dict]:
    if config is None:
        return None
    from .datasets import dataset_info

    try:
        conventions = {**WITHOUT_CONVENTION, **dataset_info(dataset).adapter_overrides()}
    except (KeyError, ValueError):
        conventions = dict(WITHOUT_CONVENTION)
    return {k: "(the dataset's)" if k in conventions and conventions[k] == v else v for k, v in config.items()}


def _labels(keys: List[Tuple[str, str]], configs: Dict[Tuple[str, str], Optional[dict]]) -> Dict[Tuple, str]:
    """Row labels: the adapter's name, plus the settings that tell apart rows of the same name."""
    labels = {}
    for name, key in keys:
        twins = [configs[k] or {} for k in keys if k[0] == name]
        if len(twins) == 1:
            labels[(name, key)] = name
            continue
        mine = configs[(name, key)] or {}
        differing = sorted(
            k for k in set().union(*twins) if len({json.dumps(t.get(k), default=str) for t in twins}) > 1
        )
        labels[(name, key)] = f"{name} [" + ", ".join(f"{k}={mine.get(k)}" for k in differing) + "]"
    return labels


def build_table(runs: List[RunResult]) -> Table:
    """One table from runs that compare the same thing."""
    first = runs[0]
    metrics = [CLEAN, *[a.label for a in first.attacks]] + ([WORST] if first.attacks else [])
    datasets = list(dict.fromkeys(run.dataset for run in runs))
    notes: List[str] = []
    by_key: Dict[Tuple[str, str], Dict[str, Tuple[AdapterResult, RunResult]]] = {}
    configs: Dict[Tuple[str, str], Optional[dict]] = {}
    for run in runs:
        for result in run.adapters.values():
            key = (result.name, _settings_key(result.config, run.dataset))
            configs[key] = own_settings(result.config, run.dataset)
            held = by_key.setdefault(key, {}).get(run.dataset)
            if held is not None:
                keep, drop = (held, (result, run)) if held[0].n >= result.n else ((result, run), held)
                notes.append(
                    f"{result.name} on {run.dataset} is in both {held[1].path} and {run.path} with the same settings; "
                    f"the one with more images ({keep[1].path}, {keep[0].n}) is shown, {drop[1].path} is left out."
                )
                by_key[key][run.dataset] = keep
            else:
                by_key[key][run.dataset] = (result, run)
    labels = _labels(list(by_key), configs)
    ece_metrics = [
        m for m in ["clean", *metrics[1:-1]] if any(m in r.ece for run in runs for r in run.adapters.values())
    ]
    rows = []
    for key, results in by_key.items():
        row = Row(labels[key], key[0], configs[key] or {}, results)
        _fill(row, datasets, metrics, ece_metrics)
        rows.append(row)
    rows.sort(key=lambda r: (-r.sort_key(WORST if WORST in metrics else CLEAN), -r.sort_key(CLEAN), r.label))
    _mark_front(rows)
    for run in runs:
        if not run.finished:
            notes.append(f"partial run ({_coverage(run)}): {run.path}; its cells are marked *.")
    return Table(compared(first), runs, datasets, metrics, ece_metrics, rows, notes=notes)


def _coverage(run: RunResult) -> str:
    of = f" of {run.n_examples}" if run.n_examples else ""
    return f"{run.dataset}, {run.images}{of} images evaluated"


def _metric_value(result: AdapterResult, metric: str) -> Optional[float]:
    if metric == CLEAN:
        return result.clean_acc
    if metric == WORST:
        return result.worst_case_acc
    return result.adv_acc.get(metric)


def _fill(row: Row, datasets: List[str], metrics: List[str], ece_metrics: List[str]) -> None:
    """Per-dataset cells, the averages over datasets (only when the row has every dataset) and the cost."""
    for dataset, (result, run) in row.results.items():
        for metric in metrics:
            row.cells[(dataset, metric)] = Cell.accuracy(_metric_value(result, metric), result.n, not run.finished)
        for metric in ece_metrics:
            row.cells[(dataset, f"ECE {metric}")] = Cell(result.ece.get(metric), result.n, partial=not run.finished)
    complete = all(d in row.results for d in datasets)
    for metric in metrics + [f"ECE {m}" for m in ece_metrics]:
        cells = [row.cells.get((d, metric)) for d in datasets]
        if not complete or any(c is None or c.value is None for c in cells):
            row.cells[("average", metric)] = Cell(None)
            continue
        mean = sum(c.value for c in cells) / len(cells)
        if metric.startswith("ECE"):
            row.cells[("average", metric)] = Cell(mean, sum(c.n for c in cells))
            continue
        # the mean of independent binomial proportions: its normal-approximation 95% interval
        half = Z95 * math.sqrt(sum(c.value * (1 - c.value) / c.n for c in cells)) / len(cells)
        partial = any(c.partial for c in cells)
        row.cells[("average", metric)] = Cell(
            mean, sum(c.n for c in cells), max(0, mean - half), min(1, mean + half), partial
        )
    seconds = [r.seconds_per_image for r, _ in row.results.values() if r.seconds_per_image is not None]
    passes = [r.passes_per_image for r, _ in row.results.values() if r.passes_per_image is not None]
    row.seconds_per_image = sum(seconds) / len(seconds) if seconds else None
    row.passes_per_image = sum(passes) / len(passes) if passes else None
    row.devices = sorted({run.device for _, run in row.results.values() if run.device})


def _mark_front(rows: Sequence[Row]) -> None:
    """Rows on the accuracy/cost front: no other row is at least as fast and at least as
    robust (worst case, else clean), and strictly better in one of the two."""
    metric = WORST if any(("average", WORST) in r.cells for r in rows) else CLEAN
    points = [(r, r.seconds_per_image, r.cells.get(("average", metric), Cell(None)).value) for r in rows]
    points = [(r, s, a) for r, s, a in points if s is not None and a is not None]
    for row, seconds, accuracy in points:
        row.on_front = not any(
            s <= seconds and a >= accuracy and (s < seconds or a > accuracy)
            for other, s, a in points
            if other is not row
        )


def build_tables(runs: Sequence[RunResult]) -> List[Table]:
    """Group runs by what they compare; each group a table, naming what differs between groups."""
    groups: Dict[str, List[RunResult]] = {}
    for run in runs:
        groups.setdefault(json.dumps(compared(run), sort_keys=True), []).append(run)
    tables = [build_table(group) for group in groups.values()]
    for table in tables:
        table.differs = [key for key in COMPARED if any(other.compared[key] != table.compared[key] for other in tables)]
    return tables


def load_tables(paths: Sequence[Path]) -> List[Table]:
    """Every run under `paths` read and grouped into tables."""
    return build_tables([read_run(path) for path in find_runs([Path(p) for p in paths])])
