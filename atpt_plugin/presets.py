"""The methods as named configurations of one machinery (published as entry points)."""
from __future__ import annotations

from .adapter import Adapter
from .config import AdapterConfig

ATPT_PAPER = "Attention-Guided Test-Time Prompt Tuning for Vision-Language Models (ICML 2026)"

atpt = Adapter(
    "atpt", AdapterConfig(),
    "A-TPT (paper): token-gradient rollout, attention-guided AugMix, mean entropy, TV-weighted ensemble",
    ATPT_PAPER)
