"""Per-stage wall time and peak memory of a TestTimeAdapter, without touching its code.

The adapter's stages are methods (`make_view_sets`, `explain`, `encode_views`, `tune`,
`aggregate`); `StageRecorder` wraps them on one instance and books *exclusive* time, so
the explainer pass inside `make_view_sets` counts as "explain", not "augment".
Memory: on CUDA the allocator's peak per stage; on CPU the process's peak resident set
size during the stage, sampled every 2 ms by a background thread.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict

import torch

STAGES = {
    "make_view_sets": "augment",
    "explain": "explain",
    "encode_views": "encode views",
    "tune": "tune",
    "aggregate": "aggregate",
}


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakSampler:
    """Highest resident set size seen since `reset()` (CPU) or allocator peak (CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak = 0
        self._stop = threading.Event()
        if not self.cuda:
            threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, resident_bytes())

    def reset(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.peak = resident_bytes() if not self.cuda else 0

    def read(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return max(self.peak, resident_bytes())

    def close(self):
        self._stop.set()


class StageRecorder:
    def __init__(self, adapter, sampler: PeakSampler):
        self.seconds = defaultdict(float)
        self.peak_bytes = defaultdict(int)
        self.sampler = sampler
        self._stack = []
        for method, label in STAGES.items():
            setattr(adapter, method, self._timed(getattr(adapter, method), label))

    def _timed(self, function, label):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            sync()
            if self._stack:  # the enclosing stage keeps what it used so far
                self._stack[-1]["peak"] = max(self._stack[-1]["peak"], self.sampler.read())
            self.sampler.reset()
            self._stack.append({"nested": 0.0, "peak": 0})
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                sync()
                elapsed = time.perf_counter() - start
                frame = self._stack.pop()
                peak = max(frame["peak"], self.sampler.read())
                self.seconds[label] += elapsed - frame["nested"]
                self.peak_bytes[label] = max(self.peak_bytes[label], peak)
                if self._stack:
                    self._stack[-1]["nested"] += elapsed
                    self._stack[-1]["peak"] = max(self._stack[-1]["peak"], peak)

        return wrapper


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
