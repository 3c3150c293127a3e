"""Your own explainer and aggregator inside A-TPT, written outside the package.

Plugged in by object, then by name (registered here with the decorator; a package would
publish them under the entry-point groups atpt_plugin.explainers / .aggregators instead).
Runs on the embedded demo CLIP and its shipped Fashion-MNIST images.
"""

import torch
import torch.nn.functional as F

from atpt_plugin import load_adapter
from atpt_plugin.aggregators import AGGREGATORS, Aggregator
from atpt_plugin.demo_model import load_demo_model, load_demo_subset
from atpt_plugin.explainers import EXPLAINERS, Explainer, clip_and_rescale


@EXPLAINERS.register("last_attention")
class LastBlockAttention(Explainer):
    """Class-token attention of the last block, averaged over heads (no gradients)."""

    def __call__(self, backbone, images, score):
        with torch.no_grad():
            trace = backbone.trace(images, first_block=backbone.num_blocks - 1)
        row = trace.blocks[-1].attn.mean(dim=1)[:, 0, trace.num_prefix_tokens :]
        return clip_and_rescale(row.reshape(-1, *trace.grid_size))


@AGGREGATORS.register("sharpest")
class SharpestViews(Aggregator):
    """Confident views weighted by how peaked their prediction is (max probability)."""

    def __init__(self, temperature: float = 0.1):
        self.temperature = temperature

    def __call__(self, views):
        logits = views.logits[views.confident].float()
        peak = F.softmax(logits, dim=-1).max(dim=-1).values
        weights = F.softmax(peak / self.temperature, dim=0)
        return torch.logsumexp(F.log_softmax(logits, dim=-1) + weights.log()[:, None], dim=0)


def main():
    model, tokenizer, classnames = load_demo_model()
    images, labels = load_demo_subset(8)
    runs = {
        "atpt": load_adapter("atpt", views=16),
        "by object": load_adapter("atpt", views=16, explainer=LastBlockAttention(), aggregator=SharpestViews()),
        "by name": load_adapter("atpt", views=16, explainer="last_attention", aggregator="sharpest"),
    }
    for title, adapter in runs.items():
        logits = adapter.wrap(model, classnames, tokenizer)(images)
        print(
            f"{title:>9}: accuracy {(logits.argmax(1) == labels).float().mean():.2f}, "
            f"config {adapter.config.explainer!r} / {adapter.config.aggregator!r}"
        )


if __name__ == "__main__":
    main()
