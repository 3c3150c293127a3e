"""What A-TPT does to one test image, in one picture, and how stable its attention is.

`explain_figure` draws, for a clean image and its adversarial version: the attention maps
of the token-gradient rollout (A-TPT) and of the original gradient rollout (Chefer) side
by side, the high-attention mask, the augmented views with each view's entropy and TV
weight, and the prediction before and after adaptation.

`attention_stability` measures the paper's claim on a whole set: the IoU of the top-r masks
of a clean image and of its adversarial version, and the rank correlation of the maps,
for each explainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from atpt_plugin.aggregators import total_variation_weights
from atpt_plugin.augmenters.mixing import top_k_mask, upsample_maps
from atpt_plugin.objectives import entropy, select_confident

EXPLAINERS = {"token-gradient rollout (A-TPT)": "token_grad_rollout", "gradient rollout (Chefer)": "grad_rollout"}


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.flatten(1).argsort(1).argsort(1).float()


def attention_stability(
    tta, clean: torch.Tensor, adversarial: torch.Tensor, fraction: float = 0.2
) -> Dict[str, Dict[str, float]]:
    """Per explainer: mean IoU of the top-`fraction` patch masks and mean Spearman correlation
    between each clean map and its adversarial map (1 = unchanged by the attack)."""
    results = {}
    for title, name in EXPLAINERS.items():
        before, after = tta.explain(clean, name), tta.explain(adversarial, name)
        high_before, high_after = top_k_mask(before, fraction), top_k_mask(after, fraction)
        iou = (high_before & high_after).flatten(1).sum(1) / (high_before | high_after).flatten(1).sum(1)
        ranks_before, ranks_after = _ranks(before), _ranks(after)
        centred_before = ranks_before - ranks_before.mean(1, keepdim=True)
        centred_after = ranks_after - ranks_after.mean(1, keepdim=True)
        spearman = (centred_before * centred_after).sum(1) / (
            centred_before.norm(dim=1) * centred_after.norm(dim=1)
        ).clamp_min(1e-12)
        results[title] = {"top_mask_iou": iou.mean().item(), "spearman": spearman.mean().item(), "images": len(clean)}
    return results


def explain_figure(
    tta, clean: torch.Tensor, adversarial: torch.Tensor, label: int, path, views_shown: int = 16
) -> Path:
    """One PNG for one image: clean vs adversarial maps, mask, views with entropy and TV weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = tta.classnames
    pair = torch.stack([clean, adversarial])
    maps = {title: tta.explain(pair, name) for title, name in EXPLAINERS.items()}
    size = tta.backbone.image_size
    generator = tta.generator_for(adversarial)
    views = tta.make_views(adversarial, generator)
    with torch.no_grad():
        features = tta.encode_views(views)  # as the adapter encodes them (its precision)
        zero_shot = tta.backbone.logit_scale * features @ tta.zero_shot_text.t() + tta.backbone.logit_bias
        before = zero_shot[0].argmax().item()
        after = tta(adversarial.unsqueeze(0))[0].argmax().item()
    confident = select_confident(zero_shot, tta.config.n_confident)
    weights = torch.zeros(len(views))
    weights[confident] = total_variation_weights(
        tta.explain(views[confident]), tta.config.tv_temperature, tta.config.tv_map_size
    ).cpu()
    view_entropy = entropy(zero_shot).cpu()
    mask = top_k_mask(upsample_maps(maps["token-gradient rollout (A-TPT)"][1:], size), tta.config.r)[0]

    shown = min(views_shown, len(views))
    columns = 8
    view_rows = -(-shown // columns)
    figure = plt.figure(figsize=(2.0 * columns, 2.3 * (2 + view_rows)))
    grid = figure.add_gridspec(2 + view_rows, columns)

    def show(cell, image, title, cmap=None):
        axis = figure.add_subplot(cell)
        axis.imshow(
            image.detach().cpu().permute(1, 2, 0).numpy() if image.dim() == 3 else image.cpu().numpy(),
            cmap=cmap,
            vmin=0,
            vmax=1,
        )
        axis.set_title(title, fontsize=8)
        axis.axis("off")

    show(grid[0, 0:2], clean, f"clean: true {names[label]}")
    show(grid[0, 2:4], adversarial, f"adversarial\nzero-shot: {names[before]}")
    for column, (title, pair_maps) in zip((4, 6), maps.items()):
        show(grid[0, column], pair_maps[0], f"{title}\nclean", "inferno")
        show(grid[0, column + 1], pair_maps[1], f"{title}\nadversarial", "inferno")
    show(grid[1, 0:2], mask.float(), f"high-attention mask (top {tta.config.r:.0%})", "gray")
    verdict = "correct" if after == label else "wrong"
    axis = figure.add_subplot(grid[1, 2:8])
    axis.axis("off")
    axis.text(
        0,
        0.5,
        f"before adaptation (zero-shot on the adversarial image): {names[before]}\n"
        f"after {tta.name}: {names[after]} ({verdict}; true: {names[label]})\n"
        f"{len(views)} views; the {len(confident)} confident ones (lowest entropy H) first, with their TV weights",
        fontsize=11,
        va="center",
    )
    others = [i for i in range(len(views)) if i not in set(confident.tolist())]
    order = confident.tolist() + others  # the confident views first
    for slot, index in enumerate(order[:shown]):
        cell = grid[2 + slot // columns, slot % columns]
        title = f"view {index}: H={view_entropy[index]:.2f}\nTV w={weights[index]:.2f}"
        show(cell, views[index], title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _attacked(tta, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int, seed: int) -> torch.Tensor:
    """The paper's transfer attack (PGD on zero-shot CLIP) on `images`."""
    from .attacks import ZeroShotClassifier, make_attack, run_attack

    spec = make_attack("pgd", eps=eps, steps=steps, backbone_kind=tta.backbone.kind, image_size=tta.backbone.image_size)
    return run_attack(spec, ZeroShotClassifier.from_adapter(tta), images, labels, seed)


def _demo_inputs(args):
    from atpt_plugin import load_adapter
    from atpt_plugin.demo_model import load_demo_model, load_demo_subset

    model, tokenizer, names = load_demo_model()
    images, labels = load_demo_subset()
    return load_adapter(args.adapter).wrap(model, names, tokenizer), images, labels


def run_explain(args) -> int:
    """`atpt explain INDEX`: the picture for one shipped demo test image."""
    from .attacks import parse_eps

    tta, images, labels = _demo_inputs(args)
    if not 0 <= args.index < len(images):
        raise ValueError(f"index must be in 0..{len(images) - 1} (the shipped demo subset), got {args.index}")
    image, label = images[args.index], labels[args.index]
    adversarial = _attacked(tta, image[None], label[None], parse_eps(args.eps), args.steps, args.seed)[0]
    path = explain_figure(tta, image, adversarial, int(label), args.out)
    print(f"wrote {path}")
    return 0


def run_stability(args) -> int:
    """`atpt stability`: clean-versus-adversarial agreement of each explainer's maps."""
    import json

    from .attacks import parse_eps

    tta, images, labels = _demo_inputs(args)
    images, labels = images[: args.n_examples], labels[: args.n_examples]
    adversarial = _attacked(tta, images, labels, parse_eps(args.eps), args.steps, args.seed)
    results = attention_stability(tta, images, adversarial)
    print("| explainer | top-20% mask IoU (clean vs adversarial) | Spearman rank correlation |")
    print("|---|---|---|")
    for title, row in results.items():
        print(f"| {title} | {row['top_mask_iou']:.3f} | {row['spearman']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0
