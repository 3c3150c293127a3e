"""What a leaderboard entry needs to compare test-time defences, beyond RobustBench's fields.

RobustBench's ModelInfo describes a static model under AutoAttack. A test-time defence
adds its own cost (views, tuning steps, image-tower passes, seconds, on which device) and
its own fragility: which attacks were run, whether any targeted the defence itself, and
the worst case over them. These fields go into the entry's `test_time_defence` block and
a top-level `worst_case_acc`; `leaderboard_markdown` sorts adapters by the worst case.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

DEFENCE_FIELDS = (
    "views_per_image",
    "tuning_steps",
    "image_forward_passes_per_image",
    "explained_images_per_image",
    "seconds_per_image",
    "device",
    "attacks",
    "accuracy",
    "transfer_only",
)


def explained_images(config: Dict[str, object]) -> Optional[int]:
    """Images the explainer runs forward and backward through the image tower's last blocks,
    per test image, from the adapter's settings (None when a component is a custom object)."""
    augmenter, aggregator = config.get("augmenter"), config.get("aggregator")
    if not isinstance(augmenter, str) or not isinstance(aggregator, str):
        return None
    views = int(config["views"])
    bases = views - 1 if views > 1 and augmenter == "attention_mix" and config.get("augmix_ops", True) else 0
    confident = max(1, int(views * float(config["rho"])))
    maps = (views if config.get("mean_over") == "all" else confident) if aggregator == "tv" else 0
    return bases + maps


def defence_block(
    config: Dict[str, object], row: dict, device: str, attacks: Sequence[dict], accuracy: Dict[str, object]
) -> dict:
    """The `test_time_defence` block of one adapter's entry.

    attacks: [{"attack": label, "kind": "transfer"|"adaptive", "params": {...}}];
    accuracy: {"clean", "transfer": {label: acc}, "adaptive": {label: acc}, "worst_case"} in [0,1].
    """
    kinds = {attack["kind"] for attack in attacks}
    return {
        "views_per_image": config.get("views"),
        "tuning_steps": config.get("steps"),
        "image_forward_passes_per_image": row.get("image_passes_per_image"),
        "explained_images_per_image": explained_images(config),
        "seconds_per_image": row.get("seconds_per_image"),
        "device": device,
        "attacks": list(attacks),
        "accuracy": accuracy,
        "transfer_only": kinds <= {"transfer"},
    }


def percent(value: Optional[float]) -> Optional[str]:
    """RobustBench stores accuracies as percent strings."""
    return None if value is None else str(round(100 * value, 2))


def leaderboard_markdown(rows: Sequence[dict], caption: str = "") -> str:
    """Adapters sorted by worst-case accuracy (then clean), with their cost per image."""
    ordered = sorted(rows, key=lambda r: (-(r.get("worst_case_acc") or 0), -(r.get("clean_acc") or 0)))
    lines: List[str] = ([caption, ""] if caption else []) + [
        "| rank | adapter | worst case (%) | clean (%) | image passes / image | seconds / image |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for rank, row in enumerate(ordered, 1):
        passes, seconds = row.get("image_passes_per_image"), row.get("seconds_per_image")
        lines.append(
            f"| {rank} | {row['adapter']} | {percent(row.get('worst_case_acc')) or '-'} | "
            f"{percent(row.get('clean_acc')) or '-'} | {'-' if passes is None else f'{passes:.0f}'} | "
            f"{'-' if seconds is None else f'{seconds:.3g}'} |"
        )
    return "\n".join(lines) + "\n"
