"""Expected calibration error (ECE) exactly as the C-TPT / O-TPT code computes it.

B equal-width bins of the top-1 softmax confidence, each (lower, upper]: a confidence on an
interior edge goes to the bin ending at it, 1.0 to the last bin. The bin index is
ceil(B c) - 1 clamped to [0, B-1] (the repositories' float32 edges can differ from k/B in the
last bit; this index is exact where the edge is). ECE = sum_k (n_k / N) |acc_k - conf_k|,
empty bins adding nothing; the repositories report it with B = 20. Counts per bin are
additive, so processes sum them and one ECE comes out (docs/method.md, "ECE").
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional

DEFAULT_BINS = 20


def bin_index(confidence: float, bins: int) -> int:
    """The (lower, upper] bin of `confidence` among `bins` equal-width bins of [0, 1]."""
    return min(max(math.ceil(bins * confidence) - 1, 0), bins - 1)


class CalibrationBins:
    """Per bin: how many predictions, how many correct, the sum of their confidences."""

    def __init__(self, bins: int = DEFAULT_BINS):
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"the ECE bin count must be an integer >= 1 (the repositories use 20), got {bins!r}")
        self.bins = bins
        self.count = [0.0] * bins
        self.correct = [0.0] * bins
        self.confidence = [0.0] * bins

    def add(self, confidence: float, correct: bool) -> None:
        k = bin_index(confidence, self.bins)
        self.count[k] += 1
        self.correct[k] += float(correct)
        self.confidence[k] += confidence

    @property
    def total(self) -> int:
        return int(round(sum(self.count)))

    def vector(self) -> List[float]:
        """The counts as one flat list (3 * bins), for summing over processes."""
        return self.count + self.correct + self.confidence

    def load(self, vector: Iterable[float]) -> None:
        values = list(vector)
        if len(values) != 3 * self.bins:
            raise ValueError(f"expected {3 * self.bins} calibration counts, got {len(values)}")
        b = self.bins
        self.count, self.correct, self.confidence = values[:b], values[b : 2 * b], values[2 * b :]

    def ece(self) -> Optional[float]:
        """The expected calibration error as a fraction in [0, 1]; None without predictions."""
        total = sum(self.count)
        if not total:
            return None
        return sum(abs(hits - conf) for hits, conf, n in zip(self.correct, self.confidence, self.count) if n) / total


def expected_calibration_error(confidences, correct, bins: int = DEFAULT_BINS) -> Optional[float]:
    """ECE of (confidence, correct) pairs as a fraction (x100 for the papers' tables)."""
    calibration = CalibrationBins(bins)
    for confidence, hit in zip(confidences, correct):
        calibration.add(float(confidence), bool(hit))
    return calibration.ece()
