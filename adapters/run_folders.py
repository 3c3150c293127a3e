"""What an `atpt eval` output folder holds, read back for `atpt leaderboard`.

A folder is a single-attack run (run.json, samples*.jsonl, summary.json once finished) or a
worst-case run (attacks/<attack>/ each a single-attack run, summary.json once combined). A
folder without its summary is a partial run (killed, or still running): its rows are
recounted from the per-sample records, and it says how many images they cover. Only the
fields every version of the summary keeps are relied on (`adapter`, `n`, `clean_acc`,
`adv_acc`, `worst_case_acc`, `adv_acc_by_attack`, costs); `clean_ece` / `adv_ece` are read
when present. Nothing is written here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .worst_case import CLEAN as WORST_CASE_CLEAN


class NotARun(ValueError):
    """A folder given to `atpt leaderboard` holds no `atpt eval` run."""


@dataclass(frozen=True)
class AttackInfo:
    """One attack of a run: its label in the tables, kind, and parameters (RobustBench's eps inside)."""

    label: str
    name: str
    kind: str
    params: Dict[str, object]


@dataclass
class AdapterResult:
    """One adapter on one run: accuracies in [0,1] over `n` images, ECE where recorded, cost."""

    name: str
    config: Optional[dict]
    n: int
    clean_acc: Optional[float]
    adv_acc: Dict[str, Optional[float]]  # attack label -> accuracy
    worst_case_acc: Optional[float]
    ece: Dict[str, Optional[float]] = field(default_factory=dict)  # "clean" or attack label -> ECE
    seconds_per_image: Optional[float] = None
    passes_per_image: Optional[float] = None
    entry: Optional[dict] = None  # the run's own leaderboard entry (model_info/...json), when written


@dataclass
class RunResult:
    """One run folder, finished or partial."""

    path: Path
    kind: str  # "single" or "worst"
    finished: bool
    dataset: str
    model: str
    pretrained: str
    n_examples: Optional[int]
    attacks: List[AttackInfo]
    adapters: Dict[str, AdapterResult]
    device: str = ""
    info: Dict[str, object] = field(default_factory=dict)  # run.json "info": command, versions, started
    finished_at: Optional[str] = None

    @property
    def images(self) -> int:
        return max((result.n for result in self.adapters.values()), default=0)


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise NotARun(f"{path} cannot be read as JSON ({error}): restore it or leave its folder out") from None
    if not isinstance(value, dict):
        raise NotARun(f"{path} holds a {type(value).__name__}, not a run's record: leave its folder out")
    return value


def is_run(path: Path) -> bool:
    return (path / "run.json").is_file() or (path / "attacks").is_dir()


def find_runs(paths: List[Path]) -> List[Path]:
    """The run folders among `paths`; a folder that is not a run is searched for runs below it
    (the clean and attack folders of a worst-case run belong to it and are not listed on their own)."""
    found: List[Path] = []
    for path in paths:
        if not path.is_dir():
            raise NotARun(f"{path} is not a folder: give the --out folders of `atpt eval` runs")
        if is_run(path):
            found.append(path)
            continue
        below = sorted({p.parent for p in path.rglob("run.json")})
        runs = []
        for candidate in below:
            if candidate.parent.name == "attacks":  # a worst case's attack run
                owner = candidate.parent.parent
            else:  # a worst case's clean pass, or a run of its own
                owner = candidate.parent if candidate.name == WORST_CASE_CLEAN else None
            runs.append(owner if owner is not None and is_run(owner) else candidate)
        if not runs:
            raise NotARun(f"{path} holds no `atpt eval` run (no run.json below it): give the --out folders of runs")
        found += [run for run in dict.fromkeys(runs) if run not in found]
    return list(dict.fromkeys(found))


def read_run(path: Path) -> RunResult:
    """A run folder as a RunResult; a worst-case folder when it has attacks/."""
    return _read_worst(path) if (path / "attacks").is_dir() else _read_single(path)


def _attack_of(summary_attack: dict, label: Optional[str] = None) -> List[AttackInfo]:
    params = dict(summary_attack.get("params") or {})
    name = str(summary_attack.get("name") or params.get("name") or "none")
    if name == "none":
        return []
    kind = str(summary_attack.get("kind") or ("adaptive" if name in ("eot-pgd", "square") else "transfer"))
    return [AttackInfo(label or name, name, kind, params)]


def _read_single(path: Path) -> RunResult:
    manifest = _json(path / "run.json")
    settings, info = manifest.get("settings") or {}, manifest.get("info") or {}
    summary = _json(path / "summary.json") if (path / "summary.json").is_file() else None
    attack = summary["attack"] if summary and "attack" in summary else {"params": settings.get("attack") or {}}
    attacks = _attack_of(attack)
    label = attacks[0].label if attacks else None
    configs = settings.get("adapters") or {}
    if summary is not None:
        rows = summary.get("rows") or []
    else:
        rows = _recount(path, bool(attacks))
    adapters = {}
    for row in rows:
        adapters[row["adapter"]] = AdapterResult(
            name=row["adapter"],
            config=configs.get(row["adapter"]),
            n=int(row.get("n") or 0),
            clean_acc=row.get("clean_acc"),
            adv_acc={label: row.get("adv_acc")} if label else {},
            worst_case_acc=row.get("worst_case_acc"),
            ece={
                k: v for k, v in (("clean", row.get("clean_ece")), (label, row.get("adv_ece"))) if k and v is not None
            },
            seconds_per_image=row.get("seconds_per_image"),
            passes_per_image=row.get("image_passes_per_image"),
            entry=_entry(row.get("model_info")),
        )
    return RunResult(
        path=path,
        kind="single",
        finished=summary is not None,
        dataset=str(settings.get("dataset")),
        model=str(settings.get("model")),
        pretrained=str(settings.get("pretrained")),
        n_examples=settings.get("n_examples"),
        attacks=attacks,
        adapters=adapters,
        device=str((summary or {}).get("device") or info.get("device") or ""),
        info=info,
        finished_at=(summary or {}).get("finished"),
    )


def _recount(path: Path, attacked: bool) -> List[dict]:
    """Rows of a partial run from its per-sample records (`rows.Row`, as the run itself counts)."""
    from .resultlog import ResultLog
    from .rows import Row

    rows: Dict[str, Row] = {}
    for record in ResultLog(path).records():
        rows.setdefault(record["adapter"], Row(record["adapter"], attacked=attacked)).add(record)
    return [row.as_dict() for row in rows.values()]


def _entry(location) -> Optional[dict]:
    if not location or not Path(location).is_file():
        return None
    try:
        return _json(Path(location))
    except NotARun:
        return None


def _read_worst(path: Path) -> RunResult:
    folders = sorted(p for p in (path / "attacks").iterdir() if (p / "run.json").is_file())
    if not folders:
        raise NotARun(f"{path}/attacks holds no attack's run.json: the worst-case run has not started")
    parts = {folder.name: _read_single(folder) for folder in folders}
    summary = _json(path / "summary.json") if (path / "summary.json").is_file() else None
    if summary is not None:
        labels = list(summary.get("attacks") or [])
        runs = summary.get("attack_runs") or {}
        attacks = [a for label in labels for a in _attack_of(runs.get(label) or {}, label)]
        rows = summary.get("rows") or []
    else:
        attacks = _planned_attacks(parts)
        rows = _recount_worst(path, attacks)
    first = (
        parts[_folder(attacks[0].label)]
        if attacks and _folder(attacks[0].label) in parts
        else next(iter(parts.values()))
    )
    adapters = {}
    for row in rows:
        name = row["adapter"]
        base = first.adapters.get(name)
        ece = {"clean": base.ece.get("clean")} if base else {}
        for attack in attacks:
            part = parts.get(_folder(attack.label))
            if part is not None and part.attacks and name in part.adapters:
                ece[attack.label] = part.adapters[name].ece.get(part.attacks[0].label)
        ece = {key: value for key, value in ece.items() if value is not None}
        adapters[name] = AdapterResult(
            name=name,
            config=base.config if base else None,
            n=int(row.get("n") or 0),
            clean_acc=row.get("clean_acc"),
            adv_acc={a.label: (row.get("adv_acc_by_attack") or {}).get(a.label) for a in attacks},
            worst_case_acc=row.get("worst_case_acc"),
            ece=ece,
            seconds_per_image=base.seconds_per_image if base else None,
            passes_per_image=base.passes_per_image if base else None,
            entry=_worst_entry(path, name),
        )
    return RunResult(
        path=path,
        kind="worst",
        finished=summary is not None and all(run.finished for run in parts.values()),
        dataset=first.dataset,
        model=first.model,
        pretrained=first.pretrained,
        n_examples=first.n_examples,
        attacks=attacks,
        adapters=adapters,
        device=first.device,
        info={**first.info, "attack_runs": {name: run.info.get("command") for name, run in parts.items()}},
        finished_at=(summary or {}).get("finished") or first.finished_at,
    )


def _planned_attacks(parts: Dict[str, RunResult]) -> List[AttackInfo]:
    """A partial worst case's attacks: all of them from its command's --attacks (those not yet
    started with the settings written there), else the attack folders found."""
    from .attacks.base import attack_named
    from .worst_case import parse_attacks

    command = [str(arg) for arg in next(iter(parts.values())).info.get("command") or []]
    text = next((c.split("=", 1)[1] for c in command if c.startswith("--attacks=")), None)
    if text is None and "--attacks" in command[:-1]:
        text = command[command.index("--attacks") + 1]
    try:
        planned = parse_attacks(text) if text else []
    except ValueError:
        planned = []
    if not planned:
        return [
            AttackInfo(name, run.attacks[0].name, run.attacks[0].kind, run.attacks[0].params)
            for name, run in parts.items()
            if run.attacks
        ]
    started = next((p.attacks[0].params for p in parts.values() if p.attacks), {})
    shared = {k: started[k] for k in ("eps", "norm") if k in started}  # --eps applies to every attack
    attacks = []
    for run in planned:
        part = parts.get(run.folder)
        if part is not None and part.attacks:
            attacks.append(AttackInfo(run.label, run.name, part.attacks[0].kind, part.attacks[0].params))
        else:
            attacks.append(
                AttackInfo(
                    run.label, run.name, attack_named(run.name).kind, {"name": run.name, **shared, **run.settings}
                )
            )
    return attacks


def _folder(label: str) -> str:
    from .worst_case import AttackRun

    return AttackRun(label, "", {}).folder


def _recount_worst(path: Path, attacks: List[AttackInfo]) -> List[dict]:
    """A partial worst case: the samples every attack has finished, combined as the run does."""
    from .worst_case import AttackRun, collect, worst_case_rows

    runs = [AttackRun(a.label, a.name, {}) for a in attacks]
    outcomes = collect(path, runs)
    started = {name: outcome for name, outcome in outcomes.items() if len(outcome.adv) == len(runs)}
    rows, _ = worst_case_rows(started, runs, {run.label: {} for run in runs})
    return rows + [{"adapter": name, "n": 0} for name in outcomes if name not in started]  # an attack not begun


def _worst_entry(path: Path, adapter: str) -> Optional[dict]:
    """The worst-case run's own entry for `adapter` (model_info/<dataset>/<threat>/<prefix>_worst_case_<adapter>)."""
    from .leaderboard import entry_name

    suffix = entry_name("worst_case", adapter)
    for candidate in sorted((path / "model_info").glob("*/*/*.json")):
        if candidate.stem.endswith(suffix):
            return _entry(candidate)
    return None
