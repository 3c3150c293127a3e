"""The evaluation loop behind `benchmark()` and `atpt eval`: attack once, adapt per sample.

1. Attack: the selected samples are cut into fixed batches of consecutive positions;
   batch b is attacked by rank b % world (seeded by the seed and its first position, so it
   is the same images whichever rank makes it) and cached. Every rank waits for all.
2. Adapt: rank r owns positions r, r + world, r + 2 world, ... (no padding, no
   duplicates). For each owned sample that is not done yet, every adapter predicts on the
   clean and on the adversarial image, and one line per (sample, adapter) is appended to
   the rank's results file as soon as it is known.
3. Reduce: per-adapter counts are summed over ranks; rank 0 also merges the files and
   checks that every (sample, adapter) is there exactly once and agrees with the sums.

An adaptive attack (`eot-pgd`, `square`: `adaptive.py`) has no attack phase: in the adapt
phase each adapter is attacked itself (`adaptive_loop.py`), each sample seeded by the seed
and its position (batched when the attack allows), and the deployed adapter predicts on
its own adversarial image. On the first
`SanityChecks.n` samples the sanity checks' attacks run as well; their predictions are
stored with the sample's record, so they shard and resume like everything else, and the
reduced counts are judged into `checks` and `warnings` on every row.

A worst-case run (`worst_case.py`) passes the clean predictions of its one clean pass
(`clean`: they are not recomputed) and, in a cascade, the samples each adapter still has
to be attacked on (`targets`: its survivors); only those are evaluated, recorded and counted.

A run that is killed resumes from the results files: finished (sample, adapter) pairs
are skipped, a half-written last line is dropped, and the attack batches come from the
cache (or are recomputed identically). Each adapter adapts every image on its own from
a seed and the image alone, so the results do not depend on the number of processes.
Damaged results lines stop the run unless `repair_results` (`resultlog.py`); a failed
write stops it with a `storage.StorageError`, and the rerun resumes.

An image that cannot be read stops the run with a `BadImageError` naming the file and the
sample (`on_bad_image="error"`, before any adapter works on its batch), or, with
`on_bad_image="skip"`, leaves the sample out of the attack batch, of every count and of
the results files; `Evaluation.skipped` lists such samples (gathered over the ranks).
"""

from __future__ import annotations

import time
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch import nn

from .adaptive import SanityChecks, check_attacks, judge, zero_gradient_warning
from .adaptive_loop import adapt_adaptive
from .attacks import AttackSpec, ZeroShotClassifier, chunk_seed, run_attack
from .cache import AdversarialCache, tensor_digest
from .calibration import DEFAULT_BINS, CalibrationBins
from .datasets import BadImageError
from .distributed import DistContext
from .progress import PassCounter, progress_bar, progress_postfix
from .resultlog import RecordRules, ResultLog, describe_rejected
from .rows import FIELDS, FLOAT_FIELDS, Row
from .storage import warn

BAD_IMAGE_POLICIES = ("error", "skip")


# ---- the loop -----------------------------------------------------------------------------------
class Evaluation:
    """Evaluate `adapters` ({name: module mapping [0,1] images to logits}) on `source`."""

    def __init__(
        self,
        adapters: Dict[str, nn.Module],
        source,
        attack: AttackSpec,
        attacked: Optional[ZeroShotClassifier],
        cache: Optional[AdversarialCache],
        *,
        seed: int = 0,
        attack_batch_size: int = 32,
        log: Optional[ResultLog] = None,
        dist: Optional[DistContext] = None,
        device=None,
        progress: bool = False,
        sanity: Optional[SanityChecks] = None,
        backbone_kind: str = "vit",
        image_size: Optional[int] = None,
        on_bad_image: str = "error",
        repair_results: bool = False,
        clean: Optional[Dict[Tuple[str, int], int]] = None,
        targets: Optional[Dict[str, Set[int]]] = None,
        ece_bins: int = DEFAULT_BINS,
    ):
        if not adapters:
            raise ValueError("no adapters to evaluate")
        if attack.is_attack and not attack.is_adaptive and attacked is None:
            raise ValueError("a transfer attack needs the attacked (zero-shot) model")
        if cache is None:
            cache = AdversarialCache(None, {})
        if attack_batch_size < 1:
            raise ValueError(f"attack_batch_size must be >= 1, got {attack_batch_size}")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
        self.adapters = dict(adapters)
        self.source = source
        self.attack = attack
        self.attacked = attacked
        self.cache = cache
        self.seed = seed
        self.batch = attack_batch_size
        self.dist = dist or DistContext()
        self.log = log or ResultLog(None, self.dist.rank)
        rules = RecordRules(len(source), source.label, source.sample_id, tuple(self.adapters), attack.is_attack)
        self.log.expect(rules)
        self.device = torch.device(device) if device is not None else None
        self.progress = progress
        self.merged: Optional[List[dict]] = None
        self.sanity = sanity if attack.is_adaptive else None
        self.checks = check_attacks(attack, sanity, backbone_kind, image_size) if self.sanity else {}
        if attacked is None:
            self.checks.pop("transfer", None)
        self.made_now: set = set()  # starts of the attack batches this process made
        self.integrity: Dict[str, object] = {}  # what the final check of the results files found
        self.on_bad_image = on_bad_image
        self.repair_results = repair_results
        CalibrationBins(ece_bins)  # checks the bin count before anything runs
        self.ece_bins = ece_bins
        self.unreadable: Dict[int, dict] = {}  # position -> what this rank could not read
        self.skipped: List[dict] = []  # every rank's, by position, after run()
        self.clean = clean or {}  # (adapter, position) -> clean prediction known from the run's clean pass
        self.targets = targets  # adapter -> the positions to evaluate (None: all)

    def needed(self, name: str, position: int) -> bool:
        """Whether this run evaluates the sample for the adapter (a cascade: only its survivors)."""
        return self.targets is None or position in self.targets.get(name, ())

    def known_clean(self, name: str, position: int) -> Optional[int]:
        return self.clean.get((name, position))

    # -- helpers
    def _batches(self) -> List[range]:
        n = len(self.source)
        return [range(start, min(start + self.batch, n)) for start in range(0, n, self.batch)]

    def _mine(self, position: int) -> bool:
        return position % self.dist.world == self.dist.rank

    def load_batch(self, positions: Iterable[int]) -> Tuple[List[int], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(positions read, their images, their labels); unreadable images raise or are skipped."""
        kept, items = [], []
        for p in positions:
            try:
                items.append(self.source.get(p))
            except BadImageError as error:
                error.position = p
                if self.on_bad_image == "error":
                    raise
                self.unreadable[p] = error.as_dict()
                continue
            kept.append(p)
        if not items:
            return kept, None, None
        images = torch.stack([image for image, _ in items])
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return kept, images, labels

    def _cache_key(self, start: int, kept: List[int], images, labels) -> Tuple[int, List[str], str]:
        """(start, sample ids, digest of the clean batch): what a cached adversarial batch is checked against."""
        return start, [self.source.sample_id(p) for p in kept], tensor_digest(images, labels)

    def _done(self) -> Dict[Tuple[str, int], dict]:
        """The finished (adapter, position) records this run needs; rejected ones are reported once and recomputed."""
        scan = self.log.checked()
        if scan.rejected and self.dist.rank == 0:
            warn(describe_rejected(scan.rejected))
        return {
            (record["adapter"], record["position"]): record
            for record in scan.records
            if self.needed(record["adapter"], record["position"])
        }

    # -- phases
    def attack_phase(self, todo: set) -> None:
        if not self.attack.is_attack or self.attack.is_adaptive:
            return
        batches = [
            b
            for i, b in enumerate(self._batches())
            if i % self.dist.world == self.dist.rank and any(p in todo for p in b)
        ]
        bar = progress_bar(self.progress and bool(batches), len(batches), f"attack {self.attack.name}", "batch")
        for batch in batches:
            kept, images, labels = self.load_batch(batch)
            key = self._cache_key(batch.start, kept, images, labels) if kept else None
            if key is not None and self.cache.load(*key) is None:
                start = time.perf_counter()
                adversarial = run_attack(self.attack, self.attacked, images, labels, chunk_seed(self.seed, batch.start))
                self.cache.save(*key, adversarial, seconds=time.perf_counter() - start)
                self.made_now.add(batch.start)
            bar.update(1)
        bar.close()

    @torch.no_grad()
    def predict(self, adapter: nn.Module, images: torch.Tensor) -> List[int]:
        return self.predict_with_confidence(adapter, images)[0]

    @torch.no_grad()
    def predict_with_confidence(self, adapter: nn.Module, images: torch.Tensor) -> Tuple[List[int], List[float]]:
        """(top-1 classes, their softmax probabilities): the prediction and its confidence (for ECE)."""
        if self.device is not None:
            images = images.to(self.device)
        confidence, predicted = adapter(images).float().softmax(dim=-1).max(dim=-1)
        return predicted.tolist(), confidence.tolist()

    def adapt_phase(self, todo: set, rows: Dict[str, Row], done: Dict) -> None:
        pending = {
            name: [p for p in sorted(todo) if self._mine(p) and self.needed(name, p) and (name, p) not in done]
            for name in self.adapters
        }
        bar = progress_bar(self.progress, sum(map(len, pending.values())), "adapt", "sample")
        counter = PassCounter(self.adapters)
        try:
            for name, records, earlier in self._adapted(pending, counter):
                for record in records:
                    self.log.append(record)
                    rows[name].add(record, earlier=earlier)
                bar.set_description_str(f"adapt {name}", refresh=False)
                bar.set_postfix_str(progress_postfix(rows, self.attack.is_attack), refresh=False)
                bar.update(len(records))
        finally:
            counter.close()
            bar.close()

    def _adapted(self, pending: Dict[str, List[int]], counter: PassCounter):
        """(adapter, records) as each adapter finishes a few samples:
        adaptive attacks take each adapter's pending samples `batch` at a time; the others go
        by the fixed attack batches, whose adversarial images come from the cache."""
        if self.attack.is_adaptive:
            transfer_for_checks: Dict[int, torch.Tensor] = {}  # the checks' transfer images, shared by adapters
            for name, adapter in self.adapters.items():
                for start in range(0, len(pending[name]), self.batch):
                    kept, images, labels = self.load_batch(pending[name][start : start + self.batch])
                    if kept:
                        records = adapt_adaptive(
                            self, name, adapter, images, labels, kept, counter, transfer_for_checks
                        )
                        yield name, records, False
            return
        wanted = {p for positions in pending.values() for p in positions}
        for batch in self._batches():
            if not wanted.intersection(batch):
                continue
            kept, images, labels = self.load_batch(batch)
            row_of = {p: i for i, p in enumerate(kept)}
            adversarial, attack_seconds = None, None
            if self.attack.is_attack and kept:
                adversarial = self.cache.load(*self._cache_key(batch.start, kept, images, labels))
                if adversarial is None:
                    raise RuntimeError(
                        f"adversarial batch at position {batch.start} is missing from the cache after the attack phase"
                    )
                made = self.cache.seconds(batch.start, len(kept))
                attack_seconds = None if made is None else round(made / len(kept), 6)
            earlier = batch.start not in self.made_now  # its attack time was measured by an earlier process
            for name, adapter in self.adapters.items():
                here = [p for p in pending[name] if p in row_of]
                if not here:
                    continue
                rows_here = [row_of[p] for p in here]
                records = self.adapt_together(
                    name,
                    adapter,
                    images[rows_here],
                    labels[rows_here],
                    None if adversarial is None else adversarial[rows_here],
                    here,
                    counter,
                    attack_seconds,
                )
                yield name, records, earlier

    def adapt_together(
        self,
        name: str,
        adapter: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        adversarial: Optional[torch.Tensor],
        positions: List[int],
        counter: "PassCounter",
        attack_seconds: Optional[float] = None,
    ) -> List[dict]:
        """Clean (unless known from the run's clean pass) and adversarial images of a batch in one
        adapter call (the adapter batches them, e.g. `image_batch`); per-sample seconds and image
        passes are the call's, shared evenly. `attack_seconds`: each image's share of the time the
        transfer attack took on its batch."""
        known = [self.known_clean(name, p) for p in positions]
        if adversarial is not None and all(c is not None for c in known):
            both, cleans = adversarial, known
        else:
            both, cleans = (images if adversarial is None else torch.cat([images, adversarial])), None
        counter.count = 0
        start = time.perf_counter()
        predictions, confidences = self.predict_with_confidence(adapter, both)
        share = len(positions)
        seconds = (time.perf_counter() - start) / share
        if cleans is not None:  # the clean pass's folder holds their confidences
            predictions, confidences = cleans + predictions, [None] * share + confidences
        return [
            {
                "position": p,
                "id": self.source.sample_id(p),
                "label": int(label),
                "adapter": name,
                "clean": predictions[i],
                "adv": None if adversarial is None else predictions[share + i],
                "clean_confidence": confidences[i],
                "adv_confidence": None if adversarial is None else confidences[share + i],
                "seconds": round(seconds, 6),
                "image_passes": counter.count / share,
                "rank": self.dist.rank,
                **({} if adversarial is None else {"attack_seconds": attack_seconds}),
            }
            for i, (p, label) in enumerate(zip(positions, labels))
        ]

    def run(self) -> List[Row]:
        """Attack, adapt, reduce; returns one `Row` per adapter (the same on every rank)."""
        if self.dist.rank == 0:
            self.log.prepare(repair=self.repair_results)
        self.dist.barrier()
        done = self._done()
        n = len(self.source)
        todo = {p for p in range(n) if any(self.needed(name, p) and (name, p) not in done for name in self.adapters)}
        self.attack_phase(todo)
        self.dist.barrier()
        rows = {name: Row(name, attacked=self.attack.is_attack, ece_bins=self.ece_bins) for name in self.adapters}
        for (name, p), record in sorted(done.items(), key=lambda item: item[0][1]):
            if self._mine(p):
                rows[name].add(record, earlier=True)
        self.adapt_phase(todo, rows, done)
        self.dist.barrier()
        self.skipped = self._gather_skipped()
        totals = torch.tensor(
            [[getattr(rows[name], f) for f in FIELDS] + rows[name].calibration_vector() for name in self.adapters],
            dtype=torch.float64,
        )
        totals = self.dist.sum(totals)
        reduced = []
        for name, values in zip(self.adapters, totals.tolist()):
            row = Row(name, attacked=self.attack.is_attack, attack=self.attack, ece_bins=self.ece_bins)
            row.load_calibration_vector(values[len(FIELDS) :])
            for f, value in zip(FIELDS, values):
                setattr(row, f, value if f in FLOAT_FIELDS else int(round(value)))
            if self.attack.is_adaptive:
                checks, warnings = judge(
                    self.attack,
                    self.checks,
                    self.sanity or SanityChecks(n=0),
                    row.checks_n,
                    row.checks_adv_correct,
                    {k: v for k, v in row.check_counts().items() if k in self.checks},
                    adapter=name,
                )
                zero = zero_gradient_warning(self.attack, row.attack_zero_gradients, row.attack_backward, name)
                row.report = {"checks": checks, "warnings": ([zero] if zero else []) + warnings}
            reduced.append(row)
        if self.dist.rank == 0:
            self.merged = self._merge(reduced)
        return reduced

    def _gather_skipped(self) -> List[dict]:
        """Every rank's unreadable samples, once each, by position."""
        everything: Dict[int, dict] = {}
        for part in self.dist.gather(self.unreadable):
            everything.update(part)
        return [everything[p] for p in sorted(everything)]

    def _merge(self, reduced: List[Row]) -> List[dict]:
        """All records, checked: none missing (each is there once: `ResultLog.records`), equal to the sums."""
        scan = self.log.checked()
        records = [r for r in scan.records if self.needed(r["adapter"], r["position"])]
        self.integrity = {
            "checksummed": self.log.directory is not None,
            "verified": len(records),
            "rejected": [str(item) for item in scan.rejected],
        }
        skipped = {item["position"] for item in self.skipped}
        expected = {
            (name, p)
            for name in self.adapters
            for p in range(len(self.source))
            if p not in skipped and self.needed(name, p)
        }
        missing = sorted(expected - {(r["adapter"], r["position"]) for r in records})
        if missing:
            raise RuntimeError(f"{len(missing)} (adapter, sample) results are missing, e.g. {missing[:3]}")
        by_adapter = {name: Row(name, attacked=self.attack.is_attack, ece_bins=self.ece_bins) for name in self.adapters}
        for record in sorted(records, key=lambda r: (r["position"], r["adapter"])):
            by_adapter[record["adapter"]].add(record)
        for row in reduced:
            merged = by_adapter[row.adapter]
            if (merged.n, merged.clean_correct, merged.adv_correct, merged.robust_correct) != (
                row.n,
                row.clean_correct,
                row.adv_correct,
                row.robust_correct,
            ):
                raise RuntimeError(
                    f"results files and reduced counts disagree for {row.adapter}: "
                    f"{merged.as_dict()} vs {row.as_dict()}"
                )
        return sorted(records, key=lambda r: (r["position"], r["adapter"]))
