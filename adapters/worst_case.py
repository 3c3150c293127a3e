"""Robustness as the worst case over several attacks (Croce et al., ICML 2022; AutoAttack).

`atpt eval --attack worst --attacks "pgd[steps=20],eot-pgd,square"` first predicts every
(sample, adapter) clean once (`<out>/clean/`), then runs the attacks in the order given,
each as its own resumable evaluation in `<out>/attacks/<attack>/` (transfer attacks made
once and shared by all adapters, adaptive ones per adapter, sanity checks as for a single
attack). By default the attacks form a cascade (AutoAttack's): each one attacks, per
adapter, only the samples still robust after clean and every earlier attack, so put the
cheapest first. `--independent` attacks every sample with every attack (each attack's own
accuracy). Either way a sample counts as robust for an adapter only if the adapter
classifies it correctly clean and under every attack: per sample the worst case is the
same in both modes, since each sample is attacked alike whatever else is attacked. A killed
run resumes per (sample, adapter, attack), since each folder resumes on its own; the
combination is recomputed from the records every time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from atpt_plugin.specs import parse_named_settings, split_top_level

from .resultlog import ResultLog
from .storage import atomic_write, make_dir

WORST = "worst"
CLEAN = "clean"  # the folder of the run's one clean pass


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
    """One adapter's per-sample outcomes: clean (the run's one clean pass) and each attack's."""

    adapter: str
    labels: Dict[int, int] = field(default_factory=dict)  # position -> label
    clean: Dict[int, int] = field(default_factory=dict)  # position -> clean prediction
    adv: Dict[str, Dict[int, int]] = field(default_factory=dict)  # attack -> position -> prediction
    seconds: Dict[str, float] = field(default_factory=dict)  # attack -> measured seconds of its records

    def correct_clean(self, position: int) -> bool:
        return self.clean[position] == self.labels[position]

    def fooled_by(self, position: int, runs: Sequence[AttackRun]) -> List[str]:
        """The attacks that ran on the sample and changed its prediction from the label."""
        return [
            run.label
            for run in runs
            if position in self.adv.get(run.label, {}) and self.adv[run.label][position] != self.labels[position]
        ]


def record_seconds(record: dict) -> float:
    """What a record cost: the adapter's predictions, the adaptive attack and its sanity checks."""
    attack = record.get("attack") or {}
    return (
        float(record.get("seconds") or 0) + float(attack.get("seconds") or 0) + float(record.get("checks_seconds") or 0)
    )


def collect(out: Path, runs: Sequence[AttackRun], independent: bool = True) -> Dict[str, AdapterOutcome]:
    """Per adapter, the clean pass's and every attack's predictions from their folders' records
    (a cascade's: each attack's on the survivors of the earlier ones only, whatever else an
    earlier run left in the folders)."""
    outcomes: Dict[str, AdapterOutcome] = {}
    for record in ResultLog(out / CLEAN).records():
        outcome = outcomes.setdefault(record["adapter"], AdapterOutcome(record["adapter"]))
        outcome.labels[record["position"]] = record["label"]
        outcome.clean[record["position"]] = record["clean"]
    for done, run in enumerate(runs):
        targets = None if independent else survivors(outcomes, runs[:done])
        for record in ResultLog(out / "attacks" / run.folder).records():
            outcome = outcomes.get(record["adapter"])
            position = record["position"]
            if outcome is None or position not in outcome.clean:
                continue  # a sample or adapter this run does not evaluate (a smaller --n-examples)
            if targets is not None and position not in targets[record["adapter"]]:
                continue
            if outcome.clean[position] != record["clean"]:
                raise RuntimeError(
                    f"{record['adapter']} predicts sample {position} clean as {outcome.clean[position]} in the clean "
                    f"pass and as {record['clean']} in {run.label}'s run: the runs do not share their settings"
                )
            outcome.adv.setdefault(run.label, {})[position] = record["adv"]
            outcome.seconds[run.label] = outcome.seconds.get(run.label, 0.0) + record_seconds(record)
    return outcomes


def survivors(outcomes: Dict[str, AdapterOutcome], runs: Sequence[AttackRun]) -> Dict[str, Set[int]]:
    """Per adapter, the samples correct clean that no attack of `runs` fooled: a cascade's next targets."""
    return {
        adapter: {p for p in outcome.clean if outcome.correct_clean(p) and not outcome.fooled_by(p, runs)}
        for adapter, outcome in outcomes.items()
    }


def worst_case_rows(
    outcomes: Dict[str, AdapterOutcome],
    runs: Sequence[AttackRun],
    attack_rows: Dict[str, Dict[str, dict]],
    independent: bool = True,
) -> Tuple[List[dict], List[dict]]:
    """(rows, per-sample records): per adapter the accuracy clean, after each attack
    (cumulative), under each attack on its own (`independent` only: a cascade attacks only
    the survivors) and in the worst case (correct clean and under every attack); per attack
    how many samples it attacked, how many it alone fooled, its seconds; its warnings."""
    rows, samples = [], []
    for adapter, outcome in outcomes.items():
        positions = sorted(outcome.clean)
        n = len(positions)
        robust = {p for p in positions if outcome.correct_clean(p)}
        after, stats, own, kinds, warnings = {}, {}, {}, {}, []
        fooled = {p: outcome.fooled_by(p, runs) for p in positions}
        for run in runs:
            predictions = outcome.adv.get(run.label, {})
            expected = positions if independent else robust
            missing = [p for p in expected if p not in predictions]
            if missing:
                raise RuntimeError(
                    f"{adapter} has no {run.label} result for samples {missing[:3]}: run the command again"
                )
            robust = {p for p in robust if predictions[p] == outcome.labels[p]}
            after[run.label] = len(robust) / n if n else None
            own[run.label] = (
                sum(predictions[p] == outcome.labels[p] for p in positions) / n if n and independent else None
            )
            stats[run.label] = {
                "attacked": len(predictions),
                "fooled_only": sum(fooled[p] == [run.label] and outcome.correct_clean(p) for p in positions),
                "seconds": round(outcome.seconds.get(run.label, 0.0), 3),
            }
            row = attack_rows[run.label].get(adapter, {})
            kinds[run.label] = row.get("attack_kind")
            warnings += [f"{run.label}: {w}" for w in row.get("warnings") or []]
        for position in positions:
            samples.append(
                {
                    "adapter": adapter,
                    "position": position,
                    "label": outcome.labels[position],
                    "clean": outcome.clean[position],
                    "adv": {
                        run.label: outcome.adv[run.label][position]
                        for run in runs
                        if position in outcome.adv.get(run.label, {})
                    },
                    "fooled_by": fooled[position],
                    "worst_case_correct": position in robust,
                }
            )
        rows.append(
            {
                "adapter": adapter,
                "n": n,
                "clean_acc": sum(map(outcome.correct_clean, positions)) / n if n else None,
                "adv_acc_by_attack": own,
                "robust_acc_after_attack": after,
                "attack_stats": stats,
                "attack_kinds": kinds,
                "worst_case_acc": len(robust) / n if n else None,
                "worst_case_correct": len(robust),
                "transfer_only": all(kind == "transfer" for kind in kinds.values()),
                "warnings": warnings,
            }
        )
    return rows, samples


def markdown(rows: Sequence[dict], runs: Sequence[AttackRun], caption: str = "", independent: bool = True) -> str:
    """The worst-case table (sorted by worst case), then each attack's cost and the warnings.

    Cascade: the robust accuracy after each attack, cumulative (AutoAttack's log);
    independent: each attack's own accuracy. Then the worst case."""
    labels = [run.label for run in runs]
    field, heads = (
        ("adv_acc_by_attack", [f"{label} (%)" for label in labels])
        if independent
        else ("robust_acc_after_attack", [f"after {label} (%)" for label in labels])
    )
    head = ["adapter", "n", "clean (%)", *heads, "worst case (%)"]
    lines = ([f"{caption}", ""] if caption else []) + [
        "| " + " | ".join(head) + " |",
        "|" + "---|" + "---:|" * (len(head) - 1),
    ]
    ordered = sorted(rows, key=lambda r: -(r["worst_case_acc"] or 0))
    for row in ordered:
        cells = [
            row["adapter"],
            str(row["n"]),
            _percent(row["clean_acc"]),
            *[_percent(row[field][label]) for label in labels],
            f"**{_percent(row['worst_case_acc'])}**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    only = (
        "fooled by it and by no other attack" if independent else "fooled by it (the cascade's later attacks skip them)"
    )
    lines += ["", f"Per attack and adapter: samples attacked / {only} / seconds.", ""]
    lines += ["| adapter | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for row in ordered:
        cells = [
            f"{s['attacked']} / {s['fooled_only']} / {s['seconds']:.1f}" for s in map(row["attack_stats"].get, labels)
        ]
        lines.append(f"| {row['adapter']} | " + " | ".join(cells) + " |")
    warnings = [f"- {w}" for row in rows for w in row["warnings"]]
    if warnings:
        lines += ["", "Sanity-check warnings (the attack may not work on that adapter):", *warnings]
    return "\n".join(lines) + "\n"


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def write(
    out: Path,
    rows: List[dict],
    samples: List[dict],
    runs: Sequence[AttackRun],
    caption: str,
    extra: Dict[str, object],
    independent: bool = True,
) -> List[Path]:
    """summary.json, results.md and the per-sample worst-case records (rewritten whole)."""
    make_dir(out)
    table = markdown(rows, runs, caption, independent)
    mode = "independent" if independent else "cascade"
    summary = {"rows": rows, "caption": caption, "attacks": [run.label for run in runs], "mode": mode, **extra}
    atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write(out / "results.md", table.encode())
    atomic_write(
        out / "worst_case_samples.jsonl", "".join(json.dumps(s, sort_keys=True) + "\n" for s in samples).encode()
    )
    return [out / "summary.json", out / "results.md", out / "worst_case_samples.jsonl"]
