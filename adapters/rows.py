"""One adapter's totals over a run, as a typed record: counts, measured cost, sanity checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .adaptive import CHECKS
from .attacks import AttackSpec
from .calibration import DEFAULT_BINS, CalibrationBins

CHECK_FIELDS = tuple(f"check_{name}_correct" for name in CHECKS)
FIELDS = (
    "n",
    "clean_correct",
    "adv_correct",
    "robust_correct",
    "seconds",
    "image_passes",
    "predictions",
    "attacked_images",
    "attack_seconds",
    "attack_forward",
    "attack_backward",
    "attack_image_passes",
    "attack_zero_gradients",
    "attack_timed",
    "attack_timed_earlier",
    "checks_n",
    "checks_adv_correct",
    *CHECK_FIELDS,
)
FLOAT_FIELDS = ("seconds", "attack_seconds")


@dataclass
class Row:
    """One adapter's totals; accuracies in [0,1].

    attack_* sum the measured cost of adaptive attacks (per adapter, per image); checks_*
    count the sanity-check images, check_<name>_correct the images still correct under
    each check's attack. `attack` (the spec) and `report` (judged checks and warnings,
    set by `Evaluation.run`) describe the attack in `as_dict`. `clean_calibration` and
    `adv_calibration` bin the records' top-1 confidences (`calibration.py`, `ece_bins` bins);
    an ECE is given only when every record carried its confidence.
    """

    adapter: str
    n: int = 0
    clean_correct: int = 0
    adv_correct: int = 0
    robust_correct: int = 0  # correct both clean and under the attack: the per-sample worst case
    seconds: float = 0.0
    image_passes: int = 0
    predictions: int = 0
    attacked: bool = True
    attacked_images: int = 0
    attack_seconds: float = 0.0
    attack_forward: int = 0
    attack_backward: int = 0
    attack_image_passes: int = 0
    attack_zero_gradients: int = 0
    attack_timed: int = 0  # records with a measured attack time ...
    attack_timed_earlier: int = 0  # ... of which measured by an earlier process (a resumed run)
    checks_n: int = 0
    checks_adv_correct: int = 0
    check_fewer_steps_correct: int = 0
    check_fewer_eot_correct: int = 0
    check_fewer_queries_correct: int = 0
    check_large_eps_correct: int = 0
    check_transfer_correct: int = 0
    attack: Optional[AttackSpec] = None
    report: Optional[dict] = None
    ece_bins: int = DEFAULT_BINS
    clean_calibration: CalibrationBins = field(init=False, repr=False)
    adv_calibration: CalibrationBins = field(init=False, repr=False)

    def __post_init__(self):
        self.clean_calibration = CalibrationBins(self.ece_bins)
        self.adv_calibration = CalibrationBins(self.ece_bins)

    def add(self, record: dict, earlier: bool = False) -> None:
        """Count one record; `earlier`: its attack time was measured by an earlier process."""
        self.n += 1
        self.clean_correct += int(record["clean"] == record["label"])
        adv_ok = record.get("adv") is not None and record["adv"] == record["label"]
        if record.get("adv") is not None:
            self.adv_correct += int(adv_ok)
            self.robust_correct += int(adv_ok and record["clean"] == record["label"])
        if record.get("clean_confidence") is not None:
            self.clean_calibration.add(float(record["clean_confidence"]), record["clean"] == record["label"])
        if record.get("adv") is not None and record.get("adv_confidence") is not None:
            self.adv_calibration.add(float(record["adv_confidence"]), adv_ok)
        self.seconds += float(record.get("seconds", 0.0))
        self.image_passes += int(record.get("image_passes") or 0)
        self.predictions += 1 + (record.get("adv") is not None)
        attack = record.get("attack")
        seconds = attack.get("seconds") if attack else record.get("attack_seconds")  # adaptive, or transfer share
        if seconds is not None:
            self.attack_timed += 1
            self.attack_timed_earlier += int(earlier)
            if not attack:
                self.attack_seconds += float(seconds)
        if attack:
            self.attacked_images += 1
            self.attack_seconds += float(attack.get("seconds") or 0.0)
            self.attack_forward += int(attack.get("forward") or 0)
            self.attack_backward += int(attack.get("backward") or 0)
            self.attack_image_passes += int(attack.get("image_passes") or 0)
            self.attack_zero_gradients += int(attack.get("zero_gradients") or 0)
        checks = record.get("checks")
        if checks:
            self.checks_n += 1
            self.checks_adv_correct += int(adv_ok)
            for name, prediction in checks.items():
                field = f"check_{name}_correct"
                if hasattr(self, field):
                    setattr(self, field, getattr(self, field) + int(prediction == record["label"]))

    def calibration_vector(self) -> List[float]:
        """The clean then adversarial calibration counts, flat, for summing over processes."""
        return self.clean_calibration.vector() + self.adv_calibration.vector()

    def load_calibration_vector(self, vector: List[float]) -> None:
        half = len(vector) // 2
        self.clean_calibration.load(vector[:half])
        self.adv_calibration.load(vector[half:])

    @property
    def clean_ece(self) -> Optional[float]:
        """ECE of the clean predictions, None unless every record carried its confidence."""
        calibration = self.clean_calibration
        return calibration.ece() if self.n and calibration.total == self.n else None

    @property
    def adv_ece(self) -> Optional[float]:
        calibration = self.adv_calibration
        return calibration.ece() if self.n and self.attacked and calibration.total == self.n else None

    def check_counts(self) -> Dict[str, int]:
        return {name: getattr(self, f"check_{name}_correct") for name in CHECKS}

    @property
    def clean_acc(self) -> Optional[float]:
        return self.clean_correct / self.n if self.n else None

    @property
    def adv_acc(self) -> Optional[float]:
        return self.adv_correct / self.n if self.n and self.attacked else None

    @property
    def worst_case_acc(self) -> Optional[float]:
        """Correct clean and under the attack, per sample (the worst case over {clean, attack})."""
        return self.robust_correct / self.n if self.n and self.attacked else None

    @property
    def seconds_per_image(self) -> Optional[float]:
        return self.seconds / self.predictions if self.predictions else None

    @property
    def passes_per_image(self) -> Optional[float]:
        return self.image_passes / self.predictions if self.predictions and self.image_passes else None

    def attack_cost(self) -> dict:
        """Per attacked image: passes of the attacked model (forward, backward), images through
        the image tower, seconds; measured for adaptive attacks, from the parameters (and the
        measured attack time, when this run made the images) for transfer attacks."""
        spec = self.attack
        if spec is None or not spec.is_attack:
            return {}
        cost = spec.cost()
        out = {
            "attack_forward_per_image": cost["forward"],
            "attack_backward_per_image": cost["backward"],
            "attack_pass_unit": cost["unit"],
            "attack_shared": cost["shared"],
            "attack_image_passes_per_image": None,
            "attack_seconds_per_image": None,
        }
        if spec.is_adaptive:
            count = self.attacked_images
            if count:
                out.update(
                    attack_forward_per_image=self.attack_forward / count,
                    attack_backward_per_image=self.attack_backward / count,
                    attack_image_passes_per_image=(
                        self.attack_image_passes / count if self.attack_image_passes else None
                    ),
                    attack_seconds_per_image=self.attack_seconds / count,
                    attack_zero_gradients=self.attack_zero_gradients,
                )
        else:
            if cost["forward"] is not None:
                out["attack_image_passes_per_image"] = cost["forward"]
            if self.attack_timed:  # each record carries its share of its batch's attack time
                out["attack_seconds_per_image"] = self.attack_seconds / self.attack_timed
        out["attack_seconds_measured"] = self.attack_timed
        out["attack_seconds_measured_earlier"] = self.attack_timed_earlier
        return out

    def as_dict(self) -> dict:
        out = {
            "adapter": self.adapter,
            "n": self.n,
            "clean_acc": self.clean_acc,
            "adv_acc": self.adv_acc,
            "worst_case_acc": self.worst_case_acc,
            "clean_ece": self.clean_ece,
            "adv_ece": self.adv_ece,
            "ece_bins": self.ece_bins,
            "clean_correct": self.clean_correct,
            "adv_correct": self.adv_correct if self.attacked else None,
            "seconds_per_image": self.seconds_per_image,
            "image_passes_per_image": self.passes_per_image,
        }
        if self.attack is not None:
            out.update(attack=self.attack.name, attack_kind=self.attack.kind, **self.attack_cost())
        if self.report is not None:
            out.update(sanity_checks=self.report["checks"], warnings=self.report["warnings"])
        return out
