"""The adversarial-image cache: one attack serves every adapter and every rerun.

Batches live under `root/<dataset>-<attack>-<hash of key>/` as `batch-<start>-<count>.pt`.
The key names the model (with a fingerprint of its weights), the dataset (with a
fingerprint of its samples), the attack with all its parameters, the attacked prompt and
the seed. Each entry stores that key, the sample ids and a digest of the clean images it
was made from, and a checksum of all of it with the adversarial tensor. On load:

- an entry that cannot be read, fails its checksum or holds another key is damaged (a
  killed copy, a flaky network disk): one warning line names the file, and the batch is
  recomputed (seeded, so identically) and replaced atomically; likewise an unreadable
  `key.json`;
- an entry for other sample ids or other clean images means the data changed: that is an
  error (`CacheMismatchError`), since results made from the old images would mix in.

`root=None` keeps batches in memory only.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .datasets import json_digest
from .storage import atomic_write, make_dir, warn


def tensor_digest(*tensors: torch.Tensor) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        shape = tensor.shape
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(str((tuple(shape), str(tensor.dtype))).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter and buffer: two models with one fingerprint compute the same."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor_digest(tensor).encode())
    return digest.hexdigest()


def entry_checksum(key: Dict, ids: List[str], clean_digest: str, adversarial: torch.Tensor) -> str:
    """blake2b of everything an entry stores: any flipped byte shows."""
    header = json.dumps([key, ids, clean_digest], sort_keys=True).encode()
    return hashlib.blake2b(header + tensor_digest(adversarial).encode(), digest_size=16).hexdigest()


class CacheMismatchError(RuntimeError):
    """A cached adversarial batch was made for something else than what is asked now."""


class AdversarialCache:
    """Adversarial batches on disk, keyed and checksummed (see the module docstring)."""

    def __init__(self, root, key: Dict[str, object]):
        self.key = json.loads(json.dumps(key, sort_keys=True))
        self.digest = json_digest(self.key, length=20)
        self.memory: Dict[Tuple[int, int], torch.Tensor] = {}
        self.made_seconds: Dict[Tuple[int, int], Optional[float]] = {}  # what making each batch took
        self.directory = None
        if root is not None:
            label = "-".join(str(self.key.get(k, "x")) for k in ("dataset", "attack_name"))
            self.directory = make_dir(Path(root).expanduser() / f"{label}-{self.digest}")
            self._check_key_file(self.directory / "key.json")

    def _check_key_file(self, key_file: Path) -> None:
        """A folder made for another key is an error; an unreadable key file is rewritten."""
        if key_file.exists():
            try:
                stored = json.loads(key_file.read_text())
                if not isinstance(stored, dict):
                    raise ValueError(f"it holds a {type(stored).__name__}, not the key")
            except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                warn(f"cache key file {key_file} is damaged ({error}); writing it again")
            else:
                if stored != self.key:
                    raise CacheMismatchError(_difference("cache folder " + str(self.directory), stored, self.key))
                return
        atomic_write(key_file, json.dumps(self.key, indent=2, sort_keys=True).encode())

    def _path(self, start: int, count: int) -> Path:
        return self.directory / f"batch-{start:08d}-{count:05d}.pt"

    def load(self, start: int, ids: List[str], clean_digest: str) -> Optional[torch.Tensor]:
        """The cached batch, or None when it is not there or damaged (then it is to be recomputed)."""
        if (start, len(ids)) in self.memory:
            return self.memory[(start, len(ids))]
        if self.directory is None:
            return None
        path = self._path(start, len(ids))
        if not path.exists():
            return None
        stored = _read_entry(path, self.key)
        if stored is None:
            return None
        seconds = stored.get("seconds")
        self.made_seconds[(start, len(ids))] = float(seconds) if isinstance(seconds, (int, float)) else None
        if stored["ids"] != ids:
            raise CacheMismatchError(
                f"{path} holds images {stored['ids'][:3]}..., not {ids[:3]}...: "
                "the dataset selection changed; delete the cache folder"
            )
        if stored["clean_digest"] != clean_digest:
            raise CacheMismatchError(
                f"{path} was made from other clean images than those on disk now "
                f"(ids {ids[:3]}...): the image files changed; delete {self.directory}"
            )
        return stored["adversarial"]

    def seconds(self, start: int, count: int) -> Optional[float]:
        """Seconds the attack took to make a loaded or saved batch (None: not recorded, an older entry)."""
        return self.made_seconds.get((start, count))

    def save(
        self, start: int, ids: List[str], clean_digest: str, adversarial: torch.Tensor, seconds: Optional[float] = None
    ) -> None:
        """Store a batch; `seconds` (what making it took) travels with it, so a resumed run still knows the cost."""
        self.made_seconds[(start, len(ids))] = seconds
        if self.directory is None:
            self.memory[(start, len(ids))] = adversarial
            return
        adversarial = adversarial.contiguous()
        buffer = io.BytesIO()
        torch.save(
            {
                "key": self.key,
                "ids": ids,
                "clean_digest": clean_digest,
                "adversarial": adversarial,
                "checksum": entry_checksum(self.key, ids, clean_digest, adversarial),
                "seconds": seconds,
            },
            buffer,
        )
        atomic_write(self._path(start, len(ids)), buffer.getvalue())


def _read_entry(path: Path, key: Dict) -> Optional[dict]:
    """The verified content of a cache entry, or None (after one warning line) when it is damaged."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file fails in torch.load with OSError, RuntimeError, EOFError, ...
        warn(f"cache entry {path} is unreadable ({type(error).__name__}: {error}); recomputing it")
        return None
    problem = _entry_problem(stored, key)
    if problem:
        warn(f"cache entry {path} {problem}; recomputing it")
        return None
    return stored


def _entry_problem(stored, key: Dict) -> Optional[str]:
    fields = ("key", "ids", "clean_digest", "adversarial", "checksum")
    if (
        not isinstance(stored, dict)
        or any(field not in stored for field in fields)
        or not isinstance(stored["adversarial"], torch.Tensor)
        or not isinstance(stored["key"], dict)
    ):
        return "is not a checksummed cache entry (damaged, or made by an older version)"
    if stored["checksum"] != entry_checksum(
        stored["key"], stored["ids"], stored["clean_digest"], stored["adversarial"]
    ):
        return "fails its checksum (damaged)"
    if stored["key"] != key:
        return f"was made for another key ({_changes(stored['key'], key)})"
    return None


def _changes(stored: Dict, wanted: Dict) -> str:
    keys = sorted(set(stored) | set(wanted))
    return "; ".join(
        f"{k}: {stored.get(k)!r} (cached) vs {wanted.get(k)!r} (now)" for k in keys if stored.get(k) != wanted.get(k)
    )


def _difference(where: str, stored: Dict, wanted: Dict) -> str:
    return f"{where} was made for a different key; {_changes(stored, wanted)}"
