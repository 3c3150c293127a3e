"""`atpt verify OUT [--n 10]`: recompute a seeded random sample of a results folder's records.

A checksum stops accidents; it does not stop someone who edits a record and computes its
checksum again (the formula is public). Recomputation does: the run is rebuilt from the
inputs run.json keeps (`run_inputs.py`), its rebuilt settings must equal the recorded ones
(model and data fingerprints included), and each sampled record is computed again the way
the evaluation loop computed it: the transfer attack on the record's whole attack batch
(same positions, same seed), or the adaptive attack on the adapter and the image (seeded
by the position), then the adapter's clean and adversarial predictions, and the sanity
checks' predictions where the record has them. The adversarial cache is not used: the
attack is made again.

Tolerance: predictions are class indices and must be equal. The one exception is a near
tie: where the recomputed logits of the stored class and of the recomputed class differ by
at most `TIE_TOLERANCE` (relative to the larger magnitude, at least 1), floating-point
order (a batch of one here, a batch there; another device) may pick either, so the record
is reported as reproduced within tolerance. Exit status 0 when every sampled record
reproduces, 1 otherwise (each differing record named with file and line), 2 on bad input.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

TIE_TOLERANCE = 1e-4
COMPARED = ("id", "label", "clean", "adv", "checks")


class VerifyError(ValueError):
    """The folder cannot be verified (no manifest, no recorded inputs, settings that do not rebuild)."""


def run_folders(out: Path) -> List[Path]:
    """The folders holding one attack's run: OUT itself, or each attack's folder of a worst case."""
    if (out / "run.json").is_file():
        return [out]
    folders = sorted(p.parent for p in out.glob("attacks/*/run.json"))
    if not folders:
        raise VerifyError(f"{out} holds no run.json (nor attacks/*/run.json): give the --out folder of `atpt eval`")
    return folders


def load_manifest(folder: Path) -> Tuple[dict, dict]:
    """(settings, inputs) recorded in `folder/run.json`."""
    try:
        manifest = json.loads((folder / "run.json").read_text())
        settings = manifest["settings"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise VerifyError(f"{folder / 'run.json'} is damaged ({type(error).__name__}: {error})") from None
    inputs = manifest.get("info", {}).get("inputs")
    if not isinstance(inputs, dict):
        raise VerifyError(
            f"{folder / 'run.json'} does not record the run's inputs (made by an older atpt eval): "
            "it cannot be rebuilt; run the evaluation again into a new --out to verify it"
        )
    return settings, inputs


def rebuild(folder: Path, device, data_root: Optional[str]):
    """The run of `folder`, rebuilt; `VerifyError` when its settings do not come out as recorded."""
    from .manifest import _changes
    from .run_inputs import prepare_run

    settings, inputs = load_manifest(folder)
    if data_root is not None:
        inputs = {**inputs, "data_root": data_root}
    prepared = prepare_run(inputs, device)
    rebuilt = json.loads(json.dumps(prepared.settings))
    ignored = {"data_root"} if data_root is not None else set()
    changes = [c for c in _changes(settings, rebuilt) if c[0].split(".")[0] not in ignored]
    if changes:
        shown = "; ".join(f"{key}: {old} (recorded) vs {new} (rebuilt)" for key, old, new in changes[:6])
        raise VerifyError(
            f"{folder} cannot be rebuilt as recorded: {shown}. The model weights, data or atpt version differ "
            "from the run's (give --data-root where the data lives on this machine)"
        )
    return prepared, settings


@dataclass
class Recomputed:
    """A record computed again, with the images its predictions were made on."""

    record: dict
    image: torch.Tensor
    adversarial: Optional[torch.Tensor]


def recompute(evaluation, spec, records: List[dict]) -> Dict[Tuple[str, int], Recomputed]:
    """{(adapter, position): the record computed again} for `records` of one run."""
    from .attacks import chunk_seed, run_attack
    from .progress import PassCounter

    counter = PassCounter(evaluation.adapters)
    out: Dict[Tuple[str, int], Recomputed] = {}
    try:
        by_batch: Dict[int, List[dict]] = {}
        for record in records:
            by_batch.setdefault(record["position"] // evaluation.batch * evaluation.batch, []).append(record)
        for start, group in sorted(by_batch.items()):
            batch = range(start, min(start + evaluation.batch, len(evaluation.source)))
            kept, images, labels = evaluation.load_batch(batch)
            adversarial = None
            if spec.is_attack and not spec.is_adaptive:
                adversarial = run_attack(spec, evaluation.attacked, images, labels, chunk_seed(evaluation.seed, start))
            for record in group:
                name, position = record["adapter"], record["position"]
                adapter, i = evaluation.adapters[name], kept.index(position)
                if spec.is_adaptive:
                    again = evaluation.adapt_adaptive(name, adapter, images[i], int(labels[i]), position, counter, {})
                    out[(name, position)] = Recomputed(again, images[i], None)  # its attack's image stays inside
                else:
                    again = evaluation.adapt_together(
                        name,
                        adapter,
                        images[i : i + 1],
                        labels[i : i + 1],
                        None if adversarial is None else adversarial[i : i + 1],
                        [position],
                        counter,
                    )[0]
                    attacked = None if adversarial is None else adversarial[i]
                    out[(name, position)] = Recomputed(again, images[i], attacked)
    finally:
        counter.close()
    return out


def near_tie(evaluation, adapter_name: str, image: torch.Tensor, stored: int, recomputed: int) -> bool:
    """Whether the stored and the recomputed class are tied within `TIE_TOLERANCE` on `image`."""
    adapter = evaluation.adapters[adapter_name]
    if evaluation.device is not None:
        image = image.to(evaluation.device)
    with torch.no_grad():
        logits = adapter(image.unsqueeze(0))[0].float()
    if not (0 <= stored < len(logits) and 0 <= recomputed < len(logits)):
        return False
    a, b = float(logits[stored]), float(logits[recomputed])
    return abs(a - b) <= TIE_TOLERANCE * max(1.0, abs(a), abs(b))


def differences(evaluation, record: dict, again: Recomputed) -> List[str]:
    """What of `record` does not reproduce (near ties of predictions on a known image forgiven)."""
    found = []
    for key in COMPARED:
        stored, value = record.get(key), again.record.get(key)
        if stored == value:
            continue
        image = {"clean": again.image, "adv": again.adversarial}.get(key)
        if image is not None and isinstance(stored, int) and isinstance(value, int):
            if near_tie(evaluation, record["adapter"], image, stored, value):
                continue
        found.append(f"{key}: stored {json.dumps(stored)}, recomputed {json.dumps(value)}")
    return found


def verify_folder(folder: Path, n: int, seed: int, device, data_root: Optional[str]) -> Tuple[int, List[str]]:
    """(records checked, one line per record that does not reproduce) for one attack's run folder."""
    from .resultlog import ResultLog, describe_damage

    prepared, settings = rebuild(folder, device, data_root)
    plan = prepared.plan
    evaluation = plan.evaluation(
        batch=settings["attack_batch_size"],
        cache_dir=None,
        log=ResultLog(None),
        device=device,
        sanity=prepared.sanity,
        on_bad_image="skip",
    )
    log = ResultLog(folder)
    log.expect(evaluation.log.rules)
    scan = log.scan()
    problems = [f"{item}" for item in scan.damage + scan.rejected]
    if scan.damage:
        raise VerifyError(describe_damage(scan.damage, len(scan.records)))
    chosen = random.Random(seed).sample(scan.records, min(n, len(scan.records)))
    again = recompute(evaluation, plan.spec, chosen)
    for record in sorted(chosen, key=lambda r: scan.lines[(r["adapter"], r["position"])]):
        key = (record["adapter"], record["position"])
        diff = differences(evaluation, record, again[key])
        if diff:
            path, line = scan.lines[key]
            problems.append(
                f"{path}:{line}: {record['adapter']} on sample {record['position']} does not reproduce: "
                + "; ".join(diff)
            )
    return len(chosen), problems


def run_verify(args) -> int:
    """`atpt verify`: 0 when every sampled record reproduces, 1 otherwise."""
    from .device import resolve_device

    if args.n < 1:
        raise ValueError(f"--n must be >= 1 (records to recompute), got {args.n}")
    out = Path(args.out).expanduser()
    if not out.is_dir():
        raise VerifyError(f"{out} is not a folder: give the --out folder of `atpt eval`")
    device = resolve_device(args.device)
    failed = False
    for folder in run_folders(out):
        checked, problems = verify_folder(folder, args.n, args.seed, device, args.data_root)
        for problem in problems:
            print(f"atpt verify: {problem}")
        failed = failed or bool(problems)
        verdict = f"{len(problems)} problem(s)" if problems else "all reproduce"
        print(f"{folder}: recomputed {checked} record(s) (seed {args.seed}): {verdict}", file=sys.stderr)
    return 1 if failed else 0
