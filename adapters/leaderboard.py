"""What a leaderboard entry needs to compare test-time defences, beyond RobustBench's fields.

RobustBench's ModelInfo describes a static model under AutoAttack. A test-time defence
adds its own cost (views, tuning steps, image-tower passes, seconds, on which device) and
its own fragility: which attacks were run, whether any targeted the defence itself, and
the worst case over them. These fields go into the entry's `test_time_defence` block and
a top-level `worst_case_acc`; `leaderboard_markdown` sorts adapters by the worst case.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .attacks import AttackSpec
from .storage import atomic_write, make_dir, warn

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
        "| rank | adapter | worst case (%) | clean (%) | clean ECE (%) | adv ECE (%) | image passes / image "
        "| seconds / image |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rank, row in enumerate(ordered, 1):
        passes, seconds = row.get("image_passes_per_image"), row.get("seconds_per_image")
        lines.append(
            f"| {rank} | {row['adapter']} | {percent(row.get('worst_case_acc')) or '-'} | "
            f"{percent(row.get('clean_acc')) or '-'} | {percent(row.get('clean_ece')) or '-'} | "
            f"{percent(row.get('adv_ece')) or '-'} | {'-' if passes is None else f'{passes:.0f}'} | "
            f"{'-' if seconds is None else f'{seconds:.3g}'} |"
        )
    return "\n".join(lines) + "\n"


# ---- RobustBench-format entries --------------------------------------------------------
FOOTNOTE = (
    "Test-time defence ({adapter}: each test image is adapted on its own) evaluated under a "
    "transfer attack: {attack}, computed against zero-shot CLIP with the initial prompt, not "
    "against the adaptive pipeline (an adaptive attack, e.g. EOT/BPDA through the adaptation, "
    "can be stronger; Croce et al., ICML 2022). {n} test images of {dataset}."
)
ADAPTIVE_FOOTNOTE = (
    "Test-time defence ({adapter}: each test image is adapted on its own) evaluated under an "
    "adaptive attack on the whole adaptive pipeline: {attack}; {cost}. {n} test images of "
    "{dataset}. Sanity checks: {checks}"
)


# ---- the real package ----------------------------------------------------------------


MODEL_INFO_FIELDS = (
    "link",
    "name",
    "authors",
    "additional_data",
    "number_forward_passes",
    "dataset",
    "venue",
    "architecture",
    "eps",
    "clean_acc",
    "reported",
    "corruptions_acc",
    "corruptions_acc_3d",
    "corruptions_mce",
    "corruptions_mce_3d",
    "autoattack_acc",
    "footnote",
)


def accuracy_field(attack: AttackSpec) -> str:
    """RobustBench's `autoattack_acc` for AutoAttack, else `<attack>_acc` (eot-pgd: eot_pgd_acc)."""
    return f"{attack.name.replace('-', '_')}_acc"


def _fmt(value) -> str:
    return "?" if value is None else f"{value:.4g}"


def model_info(
    *,
    dataset: str,
    attack: AttackSpec,
    clean_acc: float,
    adv_acc: Optional[float],
    adapter: str,
    n_examples: int,
    architecture: str = "",
    name: str = "",
    venue: str = "",
    number_forward_passes: Optional[float] = None,
    row: Optional[dict] = None,
    defence: Optional[dict] = None,
) -> dict:
    """One leaderboard entry: RobustBench's ModelInfo fields (accuracies as percent strings),
    plus `worst_case_acc` and the `test_time_defence` block (`leaderboard.py`) when given.

    `row` (a results row) adds an adaptive attack's measured cost and sanity checks to the footnote,
    and its calibration errors as `clean_ece` / `adv_ece` (percent strings; absent when not measured).
    """
    info = {field: None for field in MODEL_INFO_FIELDS}
    if attack.is_adaptive:
        row = row or {}
        cost = (
            f"{_fmt(row.get('attack_forward_per_image'))} forward and "
            f"{_fmt(row.get('attack_backward_per_image'))} backward passes of the pipeline per image"
        )
        checks = row.get("sanity_checks") or []
        failed = [c["check"] for c in checks if not c["passed"]]
        said = (
            "not run"
            if not checks
            else f"{len(checks) - len(failed)}/{len(checks)} passed"
            + (f"; FAILED: {', '.join(failed)}" if failed else "")
        )
        footnote = ADAPTIVE_FOOTNOTE.format(
            adapter=adapter, attack=attack.describe(), cost=cost, n=n_examples, dataset=dataset, checks=said
        )
    else:
        footnote = FOOTNOTE.format(adapter=adapter, attack=attack.describe(), n=n_examples, dataset=dataset)
    info.update(
        name=name or adapter,
        venue=venue or None,
        additional_data=False,
        dataset=dataset,
        architecture=architecture or None,
        eps=attack.eps,
        clean_acc=str(round(100 * clean_acc, 2)),
        number_forward_passes=None if number_forward_passes is None else int(round(number_forward_passes)),
        footnote=footnote,
    )
    if attack.is_attack and adv_acc is not None:
        info[accuracy_field(attack)] = str(round(100 * adv_acc, 2))
    if row is not None:  # calibration (ECE, %), where the run measured it
        ece = {"clean_ece": percent(row.get("clean_ece")), "adv_ece": percent(row.get("adv_ece"))}
        info.update({key: value for key, value in ece.items() if value is not None})
    if defence is not None:
        info.update(worst_case_acc=percent(defence["accuracy"].get("worst_case")), test_time_defence=defence)
    return info


def write_row_model_info(
    row: dict,
    *,
    dataset: str,
    attack: AttackSpec,
    architecture: str,
    name: str,
    file_name: str,
    root,
    config: Optional[dict] = None,
    device: str = "",
) -> str:
    """A results row's leaderboard entry, written under `root`; returns its path. With the
    adapter's settings (`config`, as `AdapterConfig.record()` gives them) it carries the
    test-time-defence fields, the worst case being over {clean, this attack}."""
    defence = None
    if config is not None and attack.is_attack:
        accuracy = {"clean": row["clean_acc"], "transfer": {}, "adaptive": {}, "worst_case": row.get("worst_case_acc")}
        accuracy["adaptive" if attack.is_adaptive else "transfer"][attack.name] = row["adv_acc"]
        defence = defence_block(
            config, row, device, [{"attack": attack.name, "kind": attack.kind, "params": attack.to_dict()}], accuracy
        )
    entry = model_info(
        dataset=dataset,
        attack=attack,
        clean_acc=row["clean_acc"],
        adv_acc=row["adv_acc"],
        adapter=row["adapter"],
        n_examples=row["n"],
        architecture=architecture,
        name=name,
        number_forward_passes=row["image_passes_per_image"],
        row=row,
        defence=defence,
    )
    return str(write_model_info(entry, file_name, attack.threat_model, root))


def write_model_info(info: dict, model_name: str, threat_model: str, root="model_info") -> Path:
    """Write (or update, keeping fields not given now) model_info/<dataset>/<threat>/<name>.json.

    A damaged existing file is replaced (with a warning): it holds nothing this run cannot rewrite.
    """
    path = make_dir(Path(root) / str(info["dataset"]) / threat_model) / f"{model_name}.json"
    existing = _read_model_info(path)
    existing.update({k: v for k, v in info.items() if v is not None or k not in existing})
    atomic_write(path, (json.dumps(existing, indent=2) + "\n").encode())
    return path


def _read_model_info(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        existing = json.loads(path.read_text())
        if not isinstance(existing, dict):
            raise ValueError(f"it holds a {type(existing).__name__}, not an entry")
    except (OSError, ValueError) as error:
        warn(f"leaderboard entry {path} is damaged ({error}); writing it anew")
        return {}
    return existing


def entry_name(prefix: str, adapter: str) -> str:
    """A leaderboard entry's file name (adapter variants carry brackets and '=')."""
    return re.sub(r"[^\w.-]+", "_", f"{prefix}_{adapter}")


def write_worst_case_model_info(rows: List[dict], outputs: Dict[str, dict], out: Path) -> List[Path]:
    """One leaderboard entry per adapter for the worst case: every attack's accuracy, the
    worst case, and the cost of the defence (from the first attack's run)."""
    first = next(iter(outputs.values()))
    settings = first["settings"]
    by_adapter = {label: {row["adapter"]: row for row in output["rows"]} for label, output in outputs.items()}
    attacks = [
        {"attack": label, "kind": output["attack"]["kind"], "params": output["attack"]["params"]}
        for label, output in outputs.items()
    ]
    paths = []
    for row in rows:
        adapter = row["adapter"]
        accuracy = {
            "clean": row["clean_acc"],
            "worst_case": row["worst_case_acc"],
            "transfer": {
                a["attack"]: row["adv_acc_by_attack"][a["attack"]] for a in attacks if a["kind"] == "transfer"
            },
            "adaptive": {
                a["attack"]: row["adv_acc_by_attack"][a["attack"]] for a in attacks if a["kind"] == "adaptive"
            },
        }
        first_row = by_adapter[next(iter(outputs))][adapter]
        defence = defence_block(settings["adapters"][adapter], first_row, first["device"], attacks, accuracy)
        params = first["attack"]["params"]
        spec = AttackSpec(params["name"], params["norm"], params["eps"])
        entry = model_info(
            dataset=settings["dataset"],
            attack=spec,
            clean_acc=row["clean_acc"],
            adv_acc=None,
            adapter=adapter,
            n_examples=row["n"],
            architecture=settings["model"],
            name=first["descriptions"][adapter],
            number_forward_passes=first_row["image_passes_per_image"],
            defence=defence,
        )
        entry["footnote"] = (
            f"Test-time defence ({adapter}) evaluated as the worst case over "
            f"{', '.join(a['attack'] for a in attacks)} on {row['n']} images of {settings['dataset']}: "
            "a sample counts only if it is classified correctly clean and under every attack."
            + ("" if not defence["transfer_only"] else " Only transfer attacks were run: not evaluated adaptively.")
        )
        for a in attacks:
            field = re.sub(r"[^\w]+", "_", a["attack"]).strip("_") + "_acc"
            entry[field] = percent(row["adv_acc_by_attack"][a["attack"]])
        paths.append(
            write_model_info(
                entry, entry_name(first["prefix"] + "_worst_case", adapter), spec.threat_model, out / "model_info"
            )
        )
    return paths


# ---- benchmark ------------------------------------------------------------------------------
