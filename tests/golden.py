"""Every built-in preset's logits on tiny random-init models, recorded to catch refactors
that change a result. `python tests/golden.py` rewrites tests/data/preset_logits.pt; do that
only for a change that is meant to alter a preset's output, and say so in the commit."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import timm  # noqa: E402
import torch  # noqa: E402
from conftest import CLASSNAMES, make_tiny_resnet, make_tiny_vit  # noqa: E402

from atpt_plugin import load_adapter  # noqa: E402
from atpt_plugin.presets import ABLATIONS  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "preset_logits.pt"
PRESETS = [
    "zeroshot",
    "tpt",
    "tpt_ens",
    "rtpt",
    "mta",
    "ens",
    "ens_reliability",
    "zero",
    "atpt",
    "atpt_official",
    *ABLATIONS,
]
SMALL = dict(views=16, rho=0.25)


def tiny_timm_vit():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=2,
        num_classes=5,
    ).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model


def preset_outputs(tokenizer):
    """{(model, preset): logits} on fixed images; every preset on the tiny ViT and ResNet
    CLIPs (grad rollout needs a ViT), the attention presets on a timm classifier."""
    vit_images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    resnet_images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    outputs = {}
    for name in PRESETS:
        adapter = load_adapter(name, **SMALL)
        outputs[("vit", name)] = adapter.wrap(make_tiny_vit(), CLASSNAMES, tokenizer)(vit_images)
        if name != "atpt_grad_rollout":
            outputs[("resnet", name)] = adapter.wrap(make_tiny_resnet(), CLASSNAMES, tokenizer)(resnet_images)
    for name in ("atpt", "atpt_uniform", "atpt_full_augmix"):
        outputs[("timm", name)] = load_adapter(name, **SMALL).wrap(tiny_timm_vit())(vit_images)
    return {key: value.detach() for key, value in outputs.items()}


if __name__ == "__main__":
    import open_clip

    torch.set_num_threads(1)
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save(preset_outputs(open_clip.get_tokenizer("ViT-B-32")), GOLDEN)
    print(f"wrote {GOLDEN}")
