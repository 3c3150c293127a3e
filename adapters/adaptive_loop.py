"""The adapt phase of an adaptive attack (`runner.Evaluation`): each adapter attacked itself.

An adapter's pending samples go `attack_batch_size` at a time: the attack runs on all of
them at once when it is `batched` (each image with its own seed, `chunk_seed(seed,
position)`, so a sample's result does not depend on its batch: a cascade that attacks only
the survivors gets what an independent run gets), else one image at a time. On the first
`SanityChecks.n` positions the sanity checks' attacks run as well, and the deployed
adapter then predicts on the clean image (unless the run already knows it) and on its
adversarial image. Seconds and image passes of a batch are shared evenly by its samples.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
from torch import nn

from .adaptive import run_adaptive_each
from .attacks import AttackSpec, AttackStats, chunk_seed, run_attack

if TYPE_CHECKING:
    from .progress import PassCounter
    from .runner import Evaluation


def attack_adapter(
    evaluation: "Evaluation",
    spec: AttackSpec,
    adapter: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    positions: List[int],
    counter: Optional["PassCounter"] = None,
) -> tuple:
    """(adversarial images on the CPU, one AttackStats per image) of an adaptive attack on one adapter."""
    stats = [AttackStats() for _ in positions]
    if counter is not None:
        counter.count = 0
    seeds = [chunk_seed(evaluation.seed, p) for p in positions]
    adversarial = run_adaptive_each(spec, adapter, images, labels, seeds, stats)
    if counter is not None and counter.handles:
        for item in stats:
            item.image_passes = round(counter.count / len(positions))
    return adversarial.cpu(), stats


def run_checks(
    evaluation: "Evaluation",
    adapter: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    positions: List[int],
    transfer: Dict[int, torch.Tensor],
) -> List[dict]:
    """Per sample, {check: the deployed adapter's prediction under that check's attack}."""
    out: List[dict] = [{} for _ in positions]
    for name, spec in evaluation.checks.items():
        if name == "transfer":
            for position, image, label in zip(positions, images, labels):
                if position not in transfer:
                    transfer[position] = run_attack(
                        spec, evaluation.attacked, image[None], label[None], chunk_seed(evaluation.seed, position)
                    )[0]
            adversarial = torch.stack([transfer[p] for p in positions])
        else:
            adversarial, _ = attack_adapter(evaluation, spec, adapter, images, labels, positions)
        for record, prediction in zip(out, evaluation.predict(adapter, adversarial)):
            record[name] = prediction
    return out


def adapt_adaptive(
    evaluation: "Evaluation",
    name: str,
    adapter: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    positions: List[int],
    counter: "PassCounter",
    transfer_for_checks: Dict[int, torch.Tensor],
) -> List[dict]:
    """Records of a few samples under an adaptive attack on this adapter (clean and adversarial predictions)."""
    adversarial, stats = attack_adapter(evaluation, evaluation.attack, adapter, images, labels, positions, counter)
    extras = [{"attack": item.as_dict()} for item in stats]
    checked = [i for i, p in enumerate(positions) if evaluation.checks and p < evaluation.sanity.n]
    if checked:
        start = time.perf_counter()
        found = run_checks(
            evaluation, adapter, images[checked], labels[checked], [positions[i] for i in checked], transfer_for_checks
        )
        seconds = round((time.perf_counter() - start) / len(checked), 6)
        for i, checks in zip(checked, found):
            extras[i].update(checks=checks, checks_seconds=seconds)
    known = [evaluation.known_clean(name, p) for p in positions]
    cleans_needed = any(c is None for c in known)
    counter.count = 0
    start = time.perf_counter()
    predictions, confidences = evaluation.predict_with_confidence(
        adapter, torch.cat([images, adversarial]) if cleans_needed else adversarial
    )
    seconds = (time.perf_counter() - start) / len(positions)
    n = len(positions)
    adv, adv_confidence = (predictions[n:], confidences[n:]) if cleans_needed else (predictions, confidences)
    clean_confidence = confidences[:n] if cleans_needed else [None] * n  # else in the clean pass's folder
    return [
        {
            "position": position,
            "id": evaluation.source.sample_id(position),
            "label": int(label),
            "adapter": name,
            "clean": predictions[i] if cleans_needed else known[i],
            "adv": adv[i],
            "clean_confidence": clean_confidence[i],
            "adv_confidence": adv_confidence[i],
            "seconds": round(seconds, 6),
            "image_passes": counter.count / len(positions),
            "rank": evaluation.dist.rank,
            **extras[i],
        }
        for i, (position, label) in enumerate(zip(positions, labels))
    ]
