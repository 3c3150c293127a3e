"""Per-sample results files: append-only JSON lines that a killed or damaged run resumes from.

Each rank appends one line per (sample, adapter) to its own file (`samples.jsonl`,
`samples.rank<r>.jsonl`) as soon as it is known, whole and fsynced (`storage.append`).
Two kinds of damage are told apart:

- a half-written last line is what a kill mid-write leaves: it is dropped on resume;
- any other line that is not a whole record (bytes damaged on disk, an edit, a record
  written twice) is an error naming the file and line, because the results are no longer
  what the run computed. With `repair=True` (`atpt eval --repair-results`) the damaged
  lines are dropped, every other record is kept, and the dropped samples are recomputed.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .storage import append, atomic_write, truncate, warn

FIELDS = {"adapter": str, "position": int, "id": str, "label": int, "clean": int}


class DamagedResultsError(ValueError):
    """A results file holds lines that are not whole records."""


@dataclass(frozen=True)
class Damage:
    path: Path
    line: int
    why: str


def record_problem(record) -> Optional[str]:
    """Why `record` is not a per-sample record, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for field, kind in FIELDS.items():
        value = record.get(field)
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"its {field!r} is missing or not a {kind.__name__}"
    adv = record.get("adv")
    if adv is not None and (isinstance(adv, bool) or not isinstance(adv, int)):
        return "its 'adv' is not a class index"
    if record["position"] < 0:
        return "its 'position' is negative"
    return None


class ResultLog:
    """Append-only JSON lines, one file per rank; in memory when `directory` is None."""

    PATTERN = "samples*.jsonl"

    def __init__(self, directory=None, rank: int = 0):
        self.directory = Path(directory) if directory is not None else None
        self.rank = rank
        self.memory: List[dict] = []
        self.path = None
        if self.directory is not None:
            name = "samples.jsonl" if rank == 0 else f"samples.rank{rank}.jsonl"
            self.path = self.directory / name

    def files(self) -> List[Path]:
        return sorted(self.directory.glob(self.PATTERN)) if self.directory is not None else []

    def prepare(self, repair: bool = False) -> None:
        """Before a run (on one rank, while the others wait): drop half-written last lines of
        every rank's file and, with `repair`, every damaged line."""
        for path in self.files():
            data = _read(path)
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                truncate(path, keep)
        if repair:
            self._drop_damaged()

    def _drop_damaged(self) -> None:
        _, damage = self.scan()
        by_path: Dict[Path, set] = collections.defaultdict(set)
        for item in damage:
            by_path[item.path].add(item.line)
        for path, lines in by_path.items():
            kept = [
                line + b"\n"
                for number, line in enumerate(_read(path).split(b"\n")[:-1], 1)
                if number not in lines and line.strip()
            ]
            atomic_write(path, b"".join(kept))
            warn(f"dropped {len(lines)} damaged record(s) from {path} (line(s) {_numbers(lines)}); they are recomputed")

    def scan(self) -> Tuple[List[dict], List[Damage]]:
        """(whole records, damaged lines) of every rank's file; a partial last line is neither."""
        if self.directory is None:
            return list(self.memory), []
        found: List[Tuple[Path, int, dict]] = []
        damage: List[Damage] = []
        for path in self.files():
            data = _read(path)
            for number, line in enumerate(data[: data.rfind(b"\n") + 1].split(b"\n")[:-1], 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8
                    damage.append(Damage(path, number, f"not a JSON record ({error})"))
                    continue
                problem = record_problem(record)
                if problem:
                    damage.append(Damage(path, number, problem))
                else:
                    found.append((path, number, record))
        copies = collections.Counter((r["adapter"], r["position"]) for _, _, r in found)
        records = []
        for path, number, record in found:
            key = (record["adapter"], record["position"])
            if copies[key] > 1:
                damage.append(Damage(path, number, f"(adapter, sample) {key} is recorded {copies[key]} times"))
            else:
                records.append(record)
        return records, sorted(damage, key=lambda d: (str(d.path), d.line))

    def records(self) -> List[dict]:
        """Every whole record; `DamagedResultsError` when a line other than a partial last one is damaged."""
        records, damage = self.scan()
        if damage:
            raise DamagedResultsError(describe_damage(damage, len(records)))
        return records

    def append(self, record: dict) -> None:
        if self.path is None:
            self.memory.append(record)
            return
        append(self.path, (json.dumps(record, sort_keys=True) + "\n").encode())


def describe_damage(damage: List[Damage], kept: int) -> str:
    shown = [f"  {d.path}:{d.line}: {d.why}" for d in damage[:5]]
    if len(damage) > 5:
        shown.append(f"  ... and {len(damage) - 5} more")
    return (
        f"the per-sample results are damaged: {len(damage)} line(s) are not whole records "
        "(the files are append-only; a disk fault or an edit changed them):\n"
        + "\n".join(shown)
        + f"\nRun the same command again with --repair-results to drop the damaged records and recompute "
        f"those samples; the other {kept} records are kept."
    )


def _numbers(lines) -> str:
    ordered = sorted(lines)
    text = ", ".join(map(str, ordered[:10]))
    return text + (f", ... ({len(ordered)} in all)" if len(ordered) > 10 else "")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise DamagedResultsError(f"could not read the results file {path}: {error}") from None
