"""APGD with EOT through a test-time defence: AutoAttack's version for randomized defences.

AutoAttack's "rand" version (Croce and Hein, ICML 2020) runs APGD on the cross-entropy
and on the DLR loss with Expectation over Transformation. Here torchattacks' single APGD
run (`APGD` for "ce" and "dlr", `APGDT` for "dlr-targeted") works on the attacker's copy
of the adapter (`attack_view`: fresh views at every call, the gradient path through the
tuning step by `gradient`: bpda, exact or fixed_prompt), exactly as EOT-PGD does. After
each run (each restart, each target class) the candidate goes to the deployed adapter:
the iterate that fooled the attacker's copy, else the one of highest loss; the image stops
at the first candidate the deployed adapter misclassifies (APGD keeps its best iterate
per point; the check against the deployed defence makes that hold for what is reported).
"""

from __future__ import annotations

from typing import Dict

import torch

from atpt_plugin.config import INPUT_GRADIENTS
from atpt_plugin.episodic import evaluation_mode

from .base import ATTACKS, Attack, check_choice, check_counts
from .pipeline import Counted, attack_view

LOSSES = ("ce", "dlr", "dlr-targeted")


@ATTACKS.register("apgd-eot")
class ApgdEot(Attack):
    """APGD-CE / APGD-DLR with EOT (torchattacks) on each adapter's whole pipeline, AutoAttack's randomized version"""

    kind = "adaptive"
    defaults = {
        "steps": 20,
        "eot_iter": 4,
        "loss": "ce",
        "gradient": "bpda",
        "n_restarts": 1,
        "n_target_classes": 3,
        "rho": 0.75,
    }
    aliases = ("apgd-rand", "apgd-eot-ce")
    budget_checks = {"fewer_steps": "steps", "fewer_eot": "eot_iter"}

    def norm_of(self, params) -> str:
        return "Linf"

    def validate(self, params):
        check_counts(params, "eot_iter", "n_restarts", "n_target_classes")
        check_choice(params, "loss", LOSSES)
        check_choice(params, "gradient", INPUT_GRADIENTS)
        rho = float(params["rho"])
        if not 0 < rho < 1:
            raise ValueError(f"rho (APGD's step-size decay threshold) must be in (0, 1), got {params['rho']!r}")
        return {**params, "rho": rho}

    def cost(self, spec) -> Dict[str, object]:
        p = spec.param_dict
        runs = p["n_restarts"] * (p["n_target_classes"] if p["loss"] == "dlr-targeted" else 1)
        per_run = (p["steps"] + 1) * p["eot_iter"]
        return {
            "forward": runs * (per_run + 2),
            "backward": runs * per_run,
            "unit": "adaptation (at most)",
            "shared": False,
        }

    def run(self, spec, adapter, images, labels, seed, stats):
        import torchattacks

        p = spec.param_dict
        counted = Counted(attack_view(adapter, gradient=p["gradient"]), stats)
        common = dict(
            norm="Linf",
            eps=spec.eps,
            steps=p["steps"],
            n_restarts=1,
            seed=seed % (2**31),
            eot_iter=p["eot_iter"],
            rho=p["rho"],
        )
        targeted = p["loss"] == "dlr-targeted"
        if targeted:
            attack = torchattacks.APGDT(counted, n_classes=p["n_target_classes"] + 1, **common)
        else:
            attack = torchattacks.APGD(counted, loss=p["loss"], **common)
        attack.set_device(images.device)
        result = images.clone()
        robust = torch.ones(len(images), dtype=torch.bool, device=images.device)
        targets = range(2, p["n_target_classes"] + 2) if targeted else [None]
        torch.manual_seed(seed % (2**31))
        # torchattacks puts a model it finds in training mode back into training mode afterwards
        with evaluation_mode(counted):
            for _ in range(p["n_restarts"]):
                for target in targets:
                    if not robust.any():
                        return result
                    attack.target_class = target
                    index = robust.nonzero().flatten()
                    best, correct_view, _, best_adversarial = attack.attack_single_run(images[index], labels[index])
                    candidate = torch.where((correct_view == 0).view(-1, 1, 1, 1), best_adversarial, best).detach()
                    with torch.no_grad():
                        fooled = adapter(candidate).argmax(-1) != labels[index]
                    stats.forward += len(index)
                    result[index] = candidate  # the latest candidate of a robust image: its highest-loss iterate
                    robust[index[fooled]] = False
        return result
