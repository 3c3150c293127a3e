"""How much an adapter's attention maps depend on the batch and the thread count (fp32, CPU).

    python -m bench.explainer_fragility --adapters atpt,atpt_official --images 8

For each of the first `--images` shipped test images of the demo CLIP, the adapter's own 63
base views are explained as one batch, one base at a time, and as one batch with 2 threads
instead of 1; the script prints the largest differences between those maps (on [0, 1]) and
how many maps moved by more than 1e-3. A trained model, because on random weights the class
token's weight is ReLU'd away more often than not (docs/method.md §8.1).
"""

from __future__ import annotations

import argparse

import torch

from atpt_plugin import load_adapter
from atpt_plugin.demo_model import load_demo_model, load_demo_subset


def explain_with(tta, bases: torch.Tensor, threads: int) -> torch.Tensor:
    torch.set_num_threads(threads)
    try:
        return tta.explain(bases)
    finally:
        torch.set_num_threads(1)


def fragility(tta, images: torch.Tensor, views: int):
    batch_vs_single, threads_1_vs_2, moved, total = 0.0, 0.0, 0, 0
    for image in images:
        bases = tta.augmenter.bases(image, views - 1, tta.generator_for(image), tta.backbone.image_size)
        batch = explain_with(tta, bases, 1)
        single = torch.cat([explain_with(tta, base[None], 1) for base in bases])
        two_threads = explain_with(tta, bases, 2)
        difference = (batch - single).abs().amax(dim=(1, 2))
        batch_vs_single = max(batch_vs_single, difference.max().item())
        threads_1_vs_2 = max(threads_1_vs_2, (batch - two_threads).abs().max().item())
        moved, total = moved + int((difference > 1e-3).sum()), total + len(bases)
    return batch_vs_single, moved, total, threads_1_vs_2


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", default="atpt,atpt_official")
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer, names = load_demo_model()
    images, _ = load_demo_subset(args.images)
    print("| adapter | token_site | batch vs single, max | maps moved > 1e-3 | 1 vs 2 threads, max |")
    print("|---|---|---:|---:|---:|")
    for name in args.adapters.split(","):
        adapter = load_adapter(name)
        tta = adapter.wrap(model, names, tokenizer)
        worst, moved, total, threads = fragility(tta, images, adapter.config.views)
        print(f"| {name} | {adapter.config.token_site} | {worst:.2g} | {moved} / {total} | {threads:.2g} |")


if __name__ == "__main__":
    main()
