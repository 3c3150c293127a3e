"""Transfer attacks: made once on zero-shot CLIP with the initial prompt, shared by every
adapter of a run (the paper's protocol is `pgd`). Each wraps torchattacks' implementation."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .base import ATTACKS, Attack, check_choice


@ATTACKS.register("pgd")
class PGD(Attack):
    """untargeted L-inf PGD, random start, CE on the true label (the paper's protocol)"""

    defaults = {"steps": None, "alpha": None, "random_start": True}  # steps None: the paper's
    aliases = ("pgd-linf", "linf-pgd")

    def validate(self, params):
        return {**params, "random_start": bool(params["random_start"])}

    def build(self, model, spec, n_classes, seed):
        import torchattacks

        p = spec.param_dict
        return torchattacks.PGD(model, eps=spec.eps, alpha=p["alpha"], steps=p["steps"], random_start=p["random_start"])


@ATTACKS.register("fgsm")
class FGSM(Attack):
    """one signed-gradient step of size eps"""

    def build(self, model, spec, n_classes, seed):
        import torchattacks

        return torchattacks.FGSM(model, eps=spec.eps)


@ATTACKS.register("pgdl2")
class PGDL2(PGD):
    """untargeted L2 PGD, random start"""

    norm = "L2"
    defaults = {"steps": 100, "alpha": None, "random_start": True}
    aliases = ("l2-pgd",)

    def build(self, model, spec, n_classes, seed):
        import torchattacks

        p = spec.param_dict
        return torchattacks.PGDL2(
            model, eps=spec.eps, alpha=p["alpha"], steps=p["steps"], random_start=p["random_start"]
        )


@ATTACKS.register("cw")
class CW(Attack):
    """Carlini-Wagner L2 (unbounded; c, kappa, steps, lr)"""

    norm = None
    unbounded_threat = "L2"
    defaults = {"c": 1.0, "kappa": 0.0, "steps": 100, "lr": 0.01}
    aliases = ("cw-l2",)

    def validate(self, params):
        return {**params, **{key: float(params[key]) for key in ("c", "kappa", "lr")}}

    def build(self, model, spec, n_classes, seed):
        import torchattacks

        p = spec.param_dict
        return torchattacks.CW(PositiveLogits(model), c=p["c"], kappa=p["kappa"], steps=p["steps"], lr=p["lr"])


class PositiveLogits(nn.Module):
    """The logits shifted per image so that the smallest is 1: same margins, same gradients.

    torchattacks' CW reads the margin z_y - max_{j!=y} z_j from logits multiplied by a one-hot
    mask, so a masked-out entry reads 0; with every logit negative (small models, SigLIP's
    bias) the margin is then 0 and CW returns the clean images unchanged.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)
        return logits - logits.min(dim=1, keepdim=True).values + 1


@ATTACKS.register("autoattack")
class AutoAttack(Attack):
    """AutoAttack (torchattacks): APGD-CE, APGD-T, FAB-T, Square; norm Linf or L2"""

    defaults = {"version": "standard", "norm": "Linf"}
    aliases = ("aa",)

    def norm_of(self, params) -> Optional[str]:
        check_choice(params, "norm", ("Linf", "L2"))
        return params["norm"]

    def validate(self, params):
        check_choice(params, "version", ("standard", "plus", "rand"))
        return params

    def cost(self, spec) -> Dict[str, object]:
        return {"forward": None, "backward": None, "unit": "zero-shot center view", "shared": True}

    def build(self, model, spec, n_classes, seed):
        import torchattacks

        return torchattacks.AutoAttack(
            model, norm=spec.norm, eps=spec.eps, version=spec.param_dict["version"], n_classes=n_classes, seed=seed
        )


@ATTACKS.register("none")
class NoAttack(Attack):
    """no attack: clean accuracy only"""

    kind = "none"
    norm = None
    aliases = ("clean",)

    def cost(self, spec) -> Dict[str, object]:
        return {"forward": 0, "backward": 0, "unit": None, "shared": True}
