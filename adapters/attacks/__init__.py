"""Threat models on torchattacks: transfer attacks on the zero-shot model, adaptive ones on
each adapter; every attack a registered class (base.py).

The paper's protocol (docs/method.md §6) is a transfer attack: untargeted
L-inf PGD with a random start and cross-entropy on the true label, against zero-shot CLIP
with the initial prompt, on the center crop in [0,1] (eps 4/255, step eps/4, 100 steps for
ViTs; eps 1/255, 1 step for RN50). It does not depend on the adapter, so its images are
computed once, batched on the device, and cached per (model, dataset, attack, seed)
(`cache.py`): six adapters compared on one set cost one attack. Adaptive attacks
(`eot.py`, `apgd.py`, `pipeline.py`) attack each wrapped adapter itself inside the
evaluation loop, each image with its own seed (EOT-PGD several images per call).
"""

from .apgd import ApgdEot
from .base import (
    ATTACKS,
    DEFAULT_L2_EPS,
    PAPER_EPS,
    PAPER_STEPS,
    Attack,
    AttackSpec,
    chunk_seed,
    make_attack,
    resolve_attack_name,
    run_attack,
)
from .eot import EotPgd, eot_pgd
from .eps import check_eps, format_eps, parse_eps
from .pipeline import AttackStats, Square, attack_loss, attack_view
from .transfer import CW, FGSM, PGD, PGDL2, AutoAttack, NoAttack
from .zeroshot import ZeroShotClassifier

__all__ = [
    "ApgdEot",
    "ATTACKS",
    "DEFAULT_L2_EPS",
    "PAPER_EPS",
    "PAPER_STEPS",
    "Attack",
    "AttackSpec",
    "AttackStats",
    "AutoAttack",
    "CW",
    "EotPgd",
    "FGSM",
    "NoAttack",
    "PGD",
    "PGDL2",
    "Square",
    "ZeroShotClassifier",
    "attack_loss",
    "attack_view",
    "check_eps",
    "chunk_seed",
    "eot_pgd",
    "format_eps",
    "make_attack",
    "parse_eps",
    "resolve_attack_name",
    "run_attack",
]
