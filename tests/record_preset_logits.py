"""Records every preset's logits on tiny models, so a change that must not move them can show it.

Run from the repository root, before the change, with the package installed:
    HF_HUB_OFFLINE=1 python tests/record_preset_logits.py
It writes tests/data/preset_logits.json; tests/test_recorded_logits.py recomputes the same
logits with the same code (`preset_logits`) and compares. This is a before/after record of
this code on this machine (one thread, CPU), not a claim that the numbers are right.
`atpt_official` is left out: it is the preset meant to change.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import CLASSNAMES, make_tiny_resnet, make_tiny_vit  # noqa: E402

from atpt_plugin import load_adapter  # noqa: E402

RECORD = Path(__file__).resolve().parent / "data" / "preset_logits.json"
PRESETS = ("zeroshot", "tpt", "tpt_ens", "rtpt", "mta", "atpt",
           "atpt_grad_rollout", "atpt_full_augmix", "atpt_uniform", "atpt_all_layers")
# (model, images): images not at the model's size, so the resize path of the crops is used too
MODELS = {
    "vit": (make_tiny_vit, (2, 3, 40, 48)),
    "resnet": (make_tiny_resnet, (2, 3, 80, 64)),
}


def preset_logits(preset: str, model_kind: str, tokenizer) -> torch.Tensor:
    """(2, classes) logits of `preset` (its own settings, 64 views) on fixed images."""
    make, shape = MODELS[model_kind]
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(7))
    tta = load_adapter(preset).wrap(make(), classnames=CLASSNAMES, tokenizer=tokenizer)
    return tta(images).detach()


def cases():
    return [(p, m) for m in MODELS for p in PRESETS if not (m == "resnet" and p == "atpt_grad_rollout")]


def main():
    import open_clip
    torch.set_num_threads(1)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    record = {f"{p}/{m}": preset_logits(p, m, tokenizer).tolist() for p, m in cases()}
    RECORD.parent.mkdir(exist_ok=True)
    lines = ",\n".join(f" {json.dumps(case)}: {json.dumps(logits)}" for case, logits in record.items())
    RECORD.write_text("{\n" + lines + "\n}\n")
    print(f"wrote {len(record)} cases to {RECORD}")


if __name__ == "__main__":
    main()
