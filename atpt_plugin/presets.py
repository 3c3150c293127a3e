"""The methods as named configurations of one machinery (published as entry points).

Every preset attacks and explains with the initial prompt and resets per image, so none
reproduces the stale-prompt bug of the public A-TPT / R-TPT code (docs/method.md §9.5).
`atpt_official` otherwise follows the authors' code, numerics included, except two more
behaviours that make results arbitrary: self-similarity is dropped by index, not by the fp32
test `sim >= 1.0` (docs/method.md §9.8), and at least one confident view is kept (docs/method.md §9.9).
Its literal token site makes its maps depend on the batch size and thread count (README).
"""

from __future__ import annotations

from .api import Adapter
from .config import AdapterConfig

ATPT_PAPER = "Attention-Guided Test-Time Prompt Tuning for VLMs (ICML 2026)"
TPT_VIEWS = dict(augmenter="augmix", base_crop="random_resized")

zeroshot = Adapter(
    "zeroshot",
    AdapterConfig(views=1, steps=0, aggregator="single"),
    "zero-shot CLIP: hand-written prompt, center crop, no tuning",
    "Radford et al., Learning Transferable Visual Models From Natural Language Supervision (ICML 2021)",
)
tpt = Adapter(
    "tpt",
    AdapterConfig(objective="marginal_entropy", aggregator="single", **TPT_VIEWS),
    "TPT: AugMix views, marginal entropy on confident views, predict on the center crop",
    "Shu et al., Test-Time Prompt Tuning for Zero-Shot Generalization in VLMs (NeurIPS 2022)",
)
tpt_ens = Adapter(
    "tpt_ens",
    tpt.config.replace(aggregator="mean", mean_over="all"),
    "TPT-Ens: TPT's tuned prompt, uniform average over all views",
    tpt.paper,
)
rtpt = Adapter(
    "rtpt",
    AdapterConfig(aggregator="reliability", **TPT_VIEWS),
    "R-TPT: AugMix views, mean per-view entropy, reliability-weighted ensemble of all views",
    "Sheng et al., R-TPT: Improving Adversarial Robustness of VLMs through Test-Time Prompt Tuning (CVPR 2025)",
)
# The calibrated TPT family: TPT plus one term on the tuned prompt's text features (docs/method.md).
ctpt = Adapter(
    "ctpt",
    tpt.config.replace(objective="ctpt"),
    "C-TPT: TPT's loss minus 50 x the text features' dispersion (ATFD; dispersion_weight, 20 for natural shift)",
    "Yoon et al., C-TPT: Calibrated Test-Time Prompt Tuning for VLMs via Text Feature Dispersion (ICLR 2024)",
)
otpt = Adapter(
    "otpt",
    tpt.config.replace(objective="otpt"),
    "O-TPT: TPT's loss plus 18 x the text features' orthogonality penalty (orthogonality_weight, 2 for natural shift)",
    "Sharifdeen et al., O-TPT: Orthogonality Constraints for Calibrating Test-time Prompt Tuning in VLMs (CVPR 2025)",
)
mta = Adapter(
    "mta",
    AdapterConfig(steps=0, augmix_ops=False, aggregator="mta", **TPT_VIEWS),
    "MTA: training-free MeanShift mode of crop views with inlierness scores",
    "Zanella & Ben Ayed, On the test-time zero-shot generalization of VLMs (CVPR 2024)",
)
# An input defence in front of zero-shot CLIP; `atpt[input_defence=ttc]` puts it in front of A-TPT.
ttc = Adapter(
    "ttc",
    zeroshot.config.replace(input_defence="ttc"),
    "TTC: counterattack the input image (4/255, 2 steps, tau 0.2, beta 2), then zero-shot CLIP",
    "Xing, Zhao & Sebe, CLIP is Strong Enough to Fight Back: Test-time Counterattacks towards Zero-shot "
    "Adversarial Robustness of CLIP (CVPR 2025)",
)
# Augmentation-only baselines: the same views, no tuning; what tuning adds is measured against these.
ens = Adapter(
    "ens",
    AdapterConfig(steps=0, aggregator="mean", mean_over="all", **TPT_VIEWS),
    "augmentation only: TPT's 64 AugMix views, no tuning, uniform average of all views",
    "baseline (no tuning) for TPT / R-TPT / A-TPT",
)
ens_reliability = Adapter(
    "ens_reliability",
    AdapterConfig(steps=0, aggregator="reliability", **TPT_VIEWS),
    "augmentation only: TPT's 64 AugMix views, no tuning, R-TPT's reliability weights",
    "baseline (no tuning) for R-TPT",
)
zero = Adapter(
    "zero",
    AdapterConfig(steps=0, aggregator="vote", **TPT_VIEWS),
    "ZERO: TPT's 64 AugMix views, no tuning, the confident 10% vote with their argmax",
    "Farina et al., Frustratingly Easy Test-Time Adaptation of VLMs (NeurIPS 2024)",
)
atpt = Adapter(
    "atpt",
    AdapterConfig(),
    "A-TPT (paper): token-gradient rollout, attention-guided AugMix, mean entropy, TV-weighted ensemble",
    ATPT_PAPER,
)
atpt_official = Adapter(
    "atpt_official",
    AdapterConfig(
        token_site="input",
        layer_weights=(0.5, 1.0),
        explainer_eps=1e-8,
        gradcam_sharpen=True,
        base_crop="random_resized",
        crop_source="original",
        input_quantization="uint8_floor",
        mask_rule="quantile",
        aggregator="reliability",
    ),
    "A-TPT as the authors' code behaves, numerics included: token weights at block inputs (maps "
    "fp32-fragile: batch and thread dependent), 0.5/1.0 layers, 1e-8 terms, antialiased crops of the "
    "original image, uint8 round trip, quantile masks, reliability ensemble; not its stale prompt "
    "(results would depend on sample order), its fp32 `sim >= 1.0` test (keeps self-similarities by "
    "accident) or zero confident views below 10 (NaN loss)",
    ATPT_PAPER + ", public code",
)

# The paper's ablations: each changes exactly one component of `atpt`.
ABLATIONS = {
    "atpt_grad_rollout": (
        dict(explainer="grad_rollout"),
        "original gradient rollout (Chefer) instead of token-gradient",
    ),
    "atpt_full_augmix": (dict(augmenter="augmix"), "full-image AugMix instead of the attention-guided mix"),
    "atpt_uniform": (dict(aggregator="mean"), "uniform average of the confident views instead of TV weights"),
    "atpt_all_layers": (dict(rollout_layers="all"), "token-gradient rollout over all layers, no last-two averaging"),
}
atpt_grad_rollout, atpt_full_augmix, atpt_uniform, atpt_all_layers = (
    Adapter(name, atpt.config.replace(**changes), f"A-TPT ablation: {what}", ATPT_PAPER)
    for name, (changes, what) in ABLATIONS.items()
)
