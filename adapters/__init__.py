"""Evaluation integrations for test-time adapters: attacks, datasets, RobustBench, the `atpt` command.

Installed as `atpt_plugin.adapters` (the folder is `adapters/` in the repository; the
top-level name `adapters` belongs to an unrelated PyPI package and is never installed).

    from atpt_plugin.adapters import load_dataset, make_attack, benchmark, benchmark_table

Submodules: `orchestrator` (a run described once, under the CLI and `benchmark_table`),
`attacks` (one registered class per attack: transfer attacks on torchattacks, adaptive ones
on the whole wrapped adapter; eps units; the zero-shot attacked model), `cache` (the
checksummed adversarial-image cache), `adaptive` (running adaptive attacks and their sanity
checks), `datasets` (registered layouts: CoOp/TPT, ImageNet variants, ImageFolder),
`robustbench` (`benchmark`, leaderboard JSON, `import_robustbench`), `runner` (the
resumable, sharded evaluation loop), `rows` (per-adapter totals), `sources` (samples),
`distributed` (ranks), `worst_case` and `leaderboard`, `resultlog` (the per-sample results
files), `storage` (atomic writes, write errors), `manifest` (run.json), `models`, `listing`,
`report` (tables and chart), `cli` (`atpt`).
Names are imported lazily, so `import atpt_plugin.adapters` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ATTACKS": "attacks",
    "AttackSpec": "attacks",
    "AdversarialCache": "cache",
    "ZeroShotClassifier": "attacks",
    "make_attack": "attacks",
    "parse_eps": "attacks",
    "run_attack": "attacks",
    "CacheMismatchError": "cache",
    "run_adaptive": "adaptive",
    "attack_view": "attacks",
    "SanityChecks": "adaptive",
    "DATASETS": "datasets",
    "EvalDataset": "datasets",
    "load_dataset": "datasets",
    "describe_layout": "datasets",
    "DatasetLayoutError": "datasets",
    "DatasetInfo": "datasets",
    "BadImageError": "datasets",
    "benchmark": "robustbench",
    "benchmark_table": "robustbench",
    "import_robustbench": "robustbench",
    "Evaluation": "runner",
    "DamagedResultsError": "resultlog",
    "StorageError": "storage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
