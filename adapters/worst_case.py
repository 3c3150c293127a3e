"""Robustness as the worst case over several attacks (Croce et al., ICML 2022; AutoAttack).

`atpt eval --attack worst --attacks "pgd[steps=20],eot-pgd,square"` runs each attack as
its own resumable evaluation in `<out>/attacks/<attack>/` (transfer attacks made once and
shared by all adapters, adaptive ones per adapter, sanity checks as for a single attack),
then combines their per-sample records: a sample counts as robust for an adapter only if
the adapter classifies it correctly clean and under every attack. A killed run resumes
per (sample, adapter, attack), since each attack's folder resumes on its own; the
combination is recomputed from the records every time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from atpt_plugin.specs import parse_named_settings, split_top_level

from .resultlog import ResultLog
from .storage import atomic_write, make_dir

WORST = "worst"


@dataclass(frozen=True)
class AttackRun:
    """One attack of a worst-case run: as written, resolved name, its own settings, its folder."""

    label: str  # as the user wrote it, whitespace removed: "pgd[steps=20]"
    name: str
    settings: Dict[str, object]

    @property
    def folder(self) -> str:
        return re.sub(r"[^\w.-]+", "_", self.label).strip("_")


def parse_attacks(text: Optional[str], check: Optional[Callable[[AttackRun], None]] = None) -> List[AttackRun]:
    """--attacks "pgd[steps=20],eot-pgd,square[n_queries=500]" -> the attack runs, checked;
    `check(run)` validates each attack's parameters first, so a bad one is named before any count."""
    from .attacks import resolve_attack_name

    if not text or not text.strip():
        raise ValueError('--attack worst needs --attacks, e.g. --attacks "pgd[steps=20],eot-pgd,square"')
    runs = []
    for spec in split_top_level(text):
        if not spec.strip():
            continue
        name, settings = parse_named_settings(spec, "attack")
        runs.append(AttackRun("".join(spec.split()), resolve_attack_name(name), settings))
    for run in runs if check is not None else ():
        check(run)
    if any(run.name == "none" for run in runs):
        raise ValueError("--attacks lists attacks; clean accuracy is part of every worst case already")
    labels = [run.label for run in runs]
    if len(set(labels)) != len(labels) or len({run.folder for run in runs}) != len(runs):
        raise ValueError(f"--attacks names an attack twice: {', '.join(labels)}")
    if len(runs) < 2:
        raise ValueError("a worst case needs at least two attacks in --attacks")
    return runs


@dataclass
class AdapterOutcome:
    """One adapter's per-sample outcomes across the attacks of a worst-case run."""

    adapter: str
    labels: Dict[int, int] = field(default_factory=dict)  # position -> label
    clean: Dict[int, int] = field(default_factory=dict)  # position -> clean prediction
    adv: Dict[str, Dict[int, int]] = field(default_factory=dict)  # attack -> position -> prediction

    def positions(self) -> List[int]:
        common = set(self.clean)
        for predictions in self.adv.values():
            common &= set(predictions)
        return sorted(common)

    def survived(self, position: int) -> List[str]:
        return [attack for attack, predictions in self.adv.items() if predictions[position] == self.labels[position]]


def collect(out: Path, runs: Sequence[AttackRun]) -> Dict[str, AdapterOutcome]:
    """Per adapter, every attack's predictions from the attack folders' records."""
    outcomes: Dict[str, AdapterOutcome] = {}
    for run in runs:
        for record in ResultLog(out / "attacks" / run.folder).records():
            outcome = outcomes.setdefault(record["adapter"], AdapterOutcome(record["adapter"]))
            position = record["position"]
            outcome.labels[position] = record["label"]
            known = outcome.clean.setdefault(position, record["clean"])
            if known != record["clean"]:
                raise RuntimeError(
                    f"{record['adapter']} predicts sample {position} clean as {known} in one attack's run and as "
                    f"{record['clean']} in {run.label}'s: the runs do not share their settings"
                )
            outcome.adv.setdefault(run.label, {})[position] = record["adv"]
    return outcomes


def worst_case_rows(
    outcomes: Dict[str, AdapterOutcome], runs: Sequence[AttackRun], attack_rows: Dict[str, Dict[str, dict]]
) -> Tuple[List[dict], List[dict]]:
    """(rows, per-sample records): per adapter the accuracy clean, under each attack and in
    the worst case (correct clean and under every attack), with each attack's warnings."""
    rows, samples = [], []
    for adapter, outcome in outcomes.items():
        positions = outcome.positions()
        n = len(positions)
        clean = sum(outcome.clean[p] == outcome.labels[p] for p in positions)
        per_attack, kinds, warnings = {}, {}, []
        for run in runs:
            row = attack_rows[run.label].get(adapter, {})
            predictions = outcome.adv.get(run.label, {})
            per_attack[run.label] = sum(predictions[p] == outcome.labels[p] for p in positions) / n if n else None
            kinds[run.label] = row.get("attack_kind")
            warnings += [f"{run.label}: {w}" for w in row.get("warnings") or []]
        robust = 0
        for position in positions:
            survived = outcome.survived(position)
            correct = outcome.clean[position] == outcome.labels[position] and len(survived) == len(runs)
            robust += correct
            samples.append(
                {
                    "adapter": adapter,
                    "position": position,
                    "label": outcome.labels[position],
                    "clean": outcome.clean[position],
                    "adv": {run.label: outcome.adv[run.label][position] for run in runs},
                    "survived": survived,
                    "worst_case_correct": bool(correct),
                }
            )
        rows.append(
            {
                "adapter": adapter,
                "n": n,
                "clean_acc": clean / n if n else None,
                "adv_acc_by_attack": per_attack,
                "attack_kinds": kinds,
                "worst_case_acc": robust / n if n else None,
                "worst_case_correct": robust,
                "transfer_only": all(kind == "transfer" for kind in kinds.values()),
                "warnings": warnings,
            }
        )
    return rows, samples


def markdown(rows: Sequence[dict], runs: Sequence[AttackRun], caption: str = "") -> str:
    """The worst-case table: clean, each attack, worst case (sorted by worst case), warnings."""
    labels = [run.label for run in runs]
    head = ["adapter", "n", "clean (%)", *[f"{label} (%)" for label in labels], "worst case (%)"]
    lines = ([f"{caption}", ""] if caption else []) + [
        "| " + " | ".join(head) + " |",
        "|" + "---|" + "---:|" * (len(head) - 1),
    ]
    for row in sorted(rows, key=lambda r: -(r["worst_case_acc"] or 0)):
        cells = [
            row["adapter"],
            str(row["n"]),
            _percent(row["clean_acc"]),
            *[_percent(row["adv_acc_by_attack"][label]) for label in labels],
            f"**{_percent(row['worst_case_acc'])}**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    warnings = [f"- {w}" for row in rows for w in row["warnings"]]
    if warnings:
        lines += ["", "Sanity-check warnings (the attack may not work on that adapter):", *warnings]
    return "\n".join(lines) + "\n"


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def write(
    out: Path, rows: List[dict], samples: List[dict], runs: Sequence[AttackRun], caption: str, extra: Dict[str, object]
) -> List[Path]:
    """summary.json, results.md and the per-sample worst-case records (rewritten whole)."""
    make_dir(out)
    table = markdown(rows, runs, caption)
    summary = {"rows": rows, "caption": caption, "attacks": [run.label for run in runs], **extra}
    atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write(out / "results.md", table.encode())
    atomic_write(
        out / "worst_case_samples.jsonl", "".join(json.dumps(s, sort_keys=True) + "\n" for s in samples).encode()
    )
    return [out / "summary.json", out / "results.md", out / "worst_case_samples.jsonl"]
