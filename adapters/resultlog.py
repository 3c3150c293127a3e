"""Per-sample results files: append-only JSON lines that a killed or damaged run resumes from.

Each rank appends one line per (sample, adapter) to its own file (`samples.jsonl`,
`samples.rank<r>.jsonl`) as soon as it is known, whole and fsynced (`storage.append`).
Every line carries a checksum of its content bound to the run's settings (`run.json`),
computed here, so code that appends records needs no change (docs/results_integrity.md).
Three kinds of damage are told apart:

- a half-written last line is what a kill mid-write leaves: it is dropped on resume;
- a line that is not a whole checksummed record (bytes damaged on disk, a renamed key, a
  line written before checksums existed, a record written twice) is an error naming the
  file and line, because the results are no longer what the run computed;
- a whole record that fails its checksum or contradicts the run (a label that is not the
  dataset's, an unknown position or sample id, an attacked run's record without its
  adversarial prediction: `RecordRules`) is rejected: reported with file and line, never
  counted, and recomputed.

With `repair=True` (`atpt eval --repair-results`) damaged and rejected lines are dropped,
every other record is kept, and the dropped samples are recomputed.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .storage import append, atomic_write, truncate, warn

FIELDS = {"adapter": str, "position": int, "id": str, "label": int, "clean": int}
CHECKSUM = "checksum"
MANIFEST = "run.json"


class DamagedResultsError(ValueError):
    """A results file holds lines that are not whole records."""


@dataclass(frozen=True)
class Damage:
    path: Path
    line: int
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.why}"


@dataclass
class Scan:
    """What the results files hold: accepted records, damaged lines (an error) and rejected
    records (reported, never counted, recomputed)."""

    records: List[dict] = dataclasses.field(default_factory=list)
    damage: List[Damage] = dataclasses.field(default_factory=list)
    rejected: List[Damage] = dataclasses.field(default_factory=list)
    lines: Dict[Tuple[str, int], Tuple[Path, int]] = dataclasses.field(default_factory=dict)  # accepted: where


@dataclass(frozen=True)
class RecordRules:
    """What a record of this run must agree with, besides its checksum (set by the evaluation loop)."""

    n: int  # positions 0..n-1
    label_of: Callable[[int], int]
    id_of: Callable[[int], str]
    adapters: Tuple[str, ...]
    attacked: bool

    def problem(self, record: dict) -> Optional[str]:
        position = record["position"]
        if position >= self.n:
            return f"position {position} does not exist (the run has {self.n} samples)"
        if record["adapter"] not in self.adapters:
            return f"adapter {record['adapter']!r} is not one of this run's ({', '.join(self.adapters)})"
        if record["id"] != self.id_of(position):
            return f"its id {record['id']!r} is not sample {position}'s ({self.id_of(position)!r})"
        if record["label"] != self.label_of(position):
            expected = self.label_of(position)
            return f"its label {record['label']} differs from the dataset's label {expected} for that sample"
        if self.attacked and record.get("adv") is None:
            return "the run is attacked but the record has no adversarial prediction ('adv')"
        return None


def record_checksum(record: dict, binding: str) -> str:
    """blake2b of the record's canonical JSON (without its checksum) and the run's settings digest."""
    content = json.dumps({k: v for k, v in record.items() if k != CHECKSUM}, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b((binding + "\n" + content).encode(), digest_size=16).hexdigest()


def settings_binding(directory: Optional[Path]) -> str:
    """The digest of the settings in `directory/run.json` that every record is bound to ("" without one)."""
    if directory is None or not (directory / MANIFEST).is_file():
        return ""
    try:
        settings = json.loads((directory / MANIFEST).read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""  # check_manifest reports a damaged run.json before any record is read
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16).hexdigest()


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
    if not isinstance(record.get(CHECKSUM), str):
        return (
            "it has no checksum (written before records were checksummed, or the key was removed): "
            "--repair-results drops and recomputes such records"
        )
    return None


class ResultLog:
    """Append-only JSON lines, one file per rank; in memory when `directory` is None."""

    PATTERN = "samples*.jsonl"

    def __init__(self, directory=None, rank: int = 0):
        self.directory = Path(directory) if directory is not None else None
        self.rank = rank
        self.memory: List[dict] = []
        self.path = None
        self.rules: Optional[RecordRules] = None
        self._binding: Optional[str] = None
        if self.directory is not None:
            name = "samples.jsonl" if rank == 0 else f"samples.rank{rank}.jsonl"
            self.path = self.directory / name

    def expect(self, rules: Optional[RecordRules]) -> None:
        """Check every record read back against `rules` (the evaluation loop's samples and attack)."""
        self.rules = rules

    @property
    def binding(self) -> str:
        """The run's settings digest, read once (run.json is written before the first record)."""
        if self._binding is None:
            self._binding = settings_binding(self.directory)
        return self._binding

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
        scan = self.scan()
        by_path: Dict[Path, set] = collections.defaultdict(set)
        for item in scan.damage + scan.rejected:
            by_path[item.path].add(item.line)
        for path, lines in by_path.items():
            kept = [
                line + b"\n"
                for number, line in enumerate(_read(path).split(b"\n")[:-1], 1)
                if number not in lines and line.strip()
            ]
            atomic_write(path, b"".join(kept))
            warn(f"dropped {len(lines)} damaged record(s) from {path} (line(s) {_numbers(lines)}); they are recomputed")

    def scan(self) -> Scan:
        """Every rank's file read and checked; a partial last line is none of records, damage, rejected."""
        if self.directory is None:
            return Scan(list(self.memory))
        found: List[Tuple[Path, int, dict]] = []
        scan = Scan()
        for path in self.files():
            data = _read(path)
            for number, line in enumerate(data[: data.rfind(b"\n") + 1].split(b"\n")[:-1], 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8
                    scan.damage.append(Damage(path, number, f"not a JSON record ({error})"))
                    continue
                problem = record_problem(record)
                if problem:
                    scan.damage.append(Damage(path, number, problem))
                    continue
                rejection = self._rejection(record)
                if rejection:
                    scan.rejected.append(Damage(path, number, rejection))
                else:
                    found.append((path, number, record))
        copies = collections.Counter((r["adapter"], r["position"]) for _, _, r in found)
        for path, number, record in found:
            key = (record["adapter"], record["position"])
            if copies[key] > 1:
                scan.damage.append(Damage(path, number, f"(adapter, sample) {key} is recorded {copies[key]} times"))
            else:
                scan.records.append(record)
                scan.lines[key] = (path, number)
        scan.damage.sort(key=lambda d: (str(d.path), d.line))
        return scan

    def _rejection(self, record: dict) -> Optional[str]:
        """Why a whole record must not count: a failed checksum, or a contradiction of the run."""
        if record[CHECKSUM] != record_checksum(record, self.binding):
            return "fails its checksum (its content was changed after it was written, or it belongs to another run)"
        return self.rules.problem(record) if self.rules is not None else None

    def records(self) -> List[dict]:
        """Every accepted record; `DamagedResultsError` when a line other than a partial last one is damaged."""
        return self.checked().records

    def checked(self) -> Scan:
        """`scan`, raising `DamagedResultsError` on damaged lines (rejected records are the caller's to report)."""
        scan = self.scan()
        if scan.damage:
            raise DamagedResultsError(describe_damage(scan.damage, len(scan.records)))
        return scan

    def append(self, record: dict) -> None:
        if self.path is None:
            self.memory.append(record)
            return
        record = {**record, CHECKSUM: record_checksum(record, self.binding)}
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


def describe_rejected(rejected: List[Damage]) -> str:
    """One warning: which records do not count, and how to drop them for good."""
    shown = "; ".join(map(str, rejected[:5])) + (f"; ... and {len(rejected) - 5} more" if len(rejected) > 5 else "")
    return (
        f"{len(rejected)} record(s) in the results files do not count and are recomputed: {shown}. "
        "--repair-results drops them from the files"
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
