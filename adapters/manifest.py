"""The run folder's manifest (run.json) and lock: a folder holds one run, resumed, never mixed."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Dict


class RunConflict(ValueError):
    """The output folder holds a run with other settings."""


def check_manifest(out: Path, settings: dict, info: dict, write: bool) -> bool:
    """Refuse a folder holding another run; True when resuming. Rank 0 writes the manifest."""
    path = out / "run.json"
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as stored
    if path.exists():
        try:
            old = json.loads(path.read_text())["settings"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RunConflict(
                f"{path} is damaged ({type(error).__name__}: {error}); it records the settings the "
                f"results in {out} were made with, so they cannot be checked: restore it, or use "
                "another --out"
            ) from None
        if old != settings:
            changed = [
                f"  {k}: {_short(a)} (in the folder) -> {_short(b)} (now)" for k, a, b in _changes(old, settings)
            ]
            if len(changed) > 12:
                changed = changed[:12] + [f"  ... and {len(changed) - 12} more"]
            raise RunConflict(
                f"{out} holds a run with other settings; its results would mix with this one's:\n"
                + "\n".join(changed)
                + f"\nUse another --out, or delete {out} to start over."
            )
        return True
    if any(out.glob("samples*.jsonl")):
        raise RunConflict(
            f"{out} has results files but no run.json; it was not made by this command "
            "(or run.json was deleted): use another --out"
        )
    if write:
        from .storage import atomic_write

        atomic_write(path, json.dumps({"settings": settings, "info": info}, indent=2, sort_keys=True).encode())
    return False


def lock_folder(out: Path, rank: int):
    """An exclusive lock per rank on the folder: two runs never append to one results file."""
    from .storage import write_error

    path = out / f".lock.rank{rank}"
    try:
        handle = open(path, "w")
    except OSError as error:
        raise write_error(path, error) from error
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RunConflict(
            f"another `atpt eval` is writing to {out} (rank {rank}); wait for it or use another --out"
        ) from None
    return handle


ABSENT = "(absent)"


def _changes(old, new, prefix: str = "") -> list:
    """[(dotted key, old value, new value)] where two nested settings differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}.{key}" if prefix else str(key)
            out += _changes(old.get(key, ABSENT), new.get(key, ABSENT), name)
        return out
    return [] if old == new else [(prefix, old, new)]


def _short(value) -> str:
    text = value if value == ABSENT else json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


def manifest_config(name: str, config) -> dict:
    """The adapter's settings as run.json records them; an unregistered component object
    cannot be recorded by name, so a resumable run refuses it."""
    record = config.record()
    for field, value in record.items():
        if isinstance(value, dict) and value.get("name") is None:
            raise ValueError(
                f"adapter {name!r} has {field}={getattr(config, field)!r}, an object of an unregistered class: "
                "a resumable run records components by name; register it (@<KIND>.register or an entry point)"
            )
    return record


def versions() -> Dict[str, str]:
    """The versions a run was made with, for run.json."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("atpt-plugin", "torch", "open_clip_torch", "timm", "torchattacks"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out
