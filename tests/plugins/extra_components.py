"""A third-party package as a researcher would write it: components outside atpt_plugin,
published through entry points by the fake distribution the tests install."""

import torch

from atpt_plugin.aggregators import Aggregator
from atpt_plugin.explainers import Explainer


class CenterBump(Explainer):
    """A fixed Gaussian bump at the image centre: attention without a model pass."""

    supports = ("vit", "resnet")

    def __init__(self, width: float = 0.3, grid: int = 4):
        self.width = width
        self.grid = grid

    def __call__(self, backbone, images, score):
        axis = torch.linspace(-1, 1, self.grid, device=images.device)
        bump = torch.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * self.width**2))
        bump = (bump - bump.min()) / (bump.max() - bump.min())
        return bump.expand(len(images), -1, -1)


class MostConfident(Aggregator):
    """The tuned logits of the single most confident view."""

    def __call__(self, views):
        return views.logits[views.confident[0]]

    def views_read(self, confident, count):
        return confident[:1]


# ---- an attack and a dataset, for `atpt eval` ------------------------------------------------
from atpt_plugin.adapters.attacks import Attack  # noqa: E402
from atpt_plugin.adapters.datasets import DatasetInfo, EvalDataset  # noqa: E402


class RandomSign(Attack):
    """a random corner of the L-inf ball: every pixel moved by +-eps (a weak baseline)"""

    def cost(self, spec):
        return {"forward": 0, "backward": 0, "unit": None, "shared": True}

    def build(self, model, spec, n_classes, seed):
        def attack(images, labels):
            signs = torch.randint(0, 2, images.shape, device=images.device) * 2 - 1
            return (images + spec.eps * signs).clamp(0, 1)

        return attack


class Stripes(EvalDataset):
    """Six in-memory images of two classes: horizontal or vertical stripes."""

    def __init__(self, info, image_size):
        size = image_size or 32
        stripes = (torch.arange(size) // 4 % 2).float()
        horizontal = stripes[:, None].expand(size, size)
        self.images = torch.stack([horizontal, horizontal.t()] * 3).unsqueeze(1).expand(-1, 3, -1, -1)
        samples = [(f"stripes/{i}", i % 2) for i in range(6)]
        super().__init__(info, None, "test", samples, ["horizontal stripes", "vertical stripes"], None, image_size)

    def __getitem__(self, index):
        return self.images[index], self.samples[index][1]


def stripes():
    return DatasetInfo(
        "stripes",
        "Stripes",
        "memory",
        lambda info, root, split, size: Stripes(info, size),
        "made in memory by the test package; no --data-root",
        needs_root=False,
    )


# ---- an objective that reads the prompt's text side ------------------------------------------
from atpt_plugin.objectives import marginal_entropy  # noqa: E402

SEEN_TEXT = []  # what the tuning loop passed, for the tests to compare


class ClassSpread:
    """TPT's marginal entropy plus the mean scaled cosine between different classes' features."""

    def __call__(self, logits, text_features, logit_scale):
        SEEN_TEXT.append((text_features.detach().clone(), float(logit_scale)))
        cosines = text_features @ text_features.t()
        count = len(cosines)
        off_diagonal = (cosines.sum() - cosines.diagonal().sum()) / (count * (count - 1))
        return marginal_entropy(logits) + logit_scale * off_diagonal
