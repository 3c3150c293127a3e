"""Durable files for long runs: atomic writes, whole appended lines, write errors one can act on.

An evaluation can be killed at any moment, fill its disk or write to a shared file system.
Every file it writes goes through here, so that a written file holds either its old or its
new content (temporary file, fsync, rename), an appended line is either whole or gone, and
a failed write stops the run with one message that names the file and says how to resume
(`StorageError`) instead of a traceback. Only `os` calls are used (`os.open`, `os.write`,
`os.fsync`, `os.replace`), so tests inject faults by patching them.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class StorageError(OSError):
    """A file could not be written; the message names it and says how to resume."""


def write_error(path, error: OSError) -> StorageError:
    """The `StorageError` for a failed write of `path`."""
    reason = error.strerror or str(error)
    if error.errno in DISK_FULL:
        advice = "free space on that disk and run the same command again"
    else:
        advice = "fix the cause and run the same command again"
    failure = StorageError(
        f"could not write {path}: {reason}; {advice}: finished results are kept and the run resumes where it stopped"
    )
    failure.errno = error.errno
    return failure


def warn(message: str) -> None:
    """One warning line on stderr (no traceback, no source line: the message says it all)."""
    print("atpt: warning: " + " ".join(str(message).split()), file=sys.stderr, flush=True)


def make_dir(path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(path, error) from error
    return path


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a nearly full disk writes short)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "the write made no progress")
        view = view[written:]


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # clean-up after a failed write; the failure itself is what is reported


def atomic_write(path, data: bytes) -> None:
    """Replace `path` by `data` in one step: a temporary file, fsync, rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as error:
        _remove_quietly(temporary)
        raise write_error(path, error) from error


def append(path, data: bytes) -> None:
    """Append `data` (whole lines) and fsync; after a failed write the file is cut back to its old end."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as error:
        raise write_error(path, error) from error
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as error:
            _truncate_quietly(fd, end)
            raise write_error(path, error) from error
    finally:
        os.close(fd)


def _truncate_quietly(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass  # a partial last line left behind is dropped when the run resumes


def truncate(path, size: int) -> None:
    """Cut `path` to `size` bytes, durably."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise write_error(path, error) from error
