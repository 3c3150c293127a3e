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
        bump = torch.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * self.width ** 2))
        bump = (bump - bump.min()) / (bump.max() - bump.min())
        return bump.expand(len(images), -1, -1)


class MostConfident(Aggregator):
    """The tuned logits of the single most confident view."""

    def __call__(self, views):
        return views.logits[views.confident[0]]

    def views_read(self, confident, count):
        return confident[:1]
