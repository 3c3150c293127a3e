"""Prediction agreement of bf16/fp16 autocast with fp32, on a trained model (the demo CLIP).

    python -m bench.precision --adapters atpt,rtpt --images 200

Random-init weights would make agreement meaningless (near-tied logits), so this runs on
the embedded demo model and its shipped test subset.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from atpt_plugin import load_adapter
from atpt_plugin.demo_model import load_demo_model, load_demo_subset


def predictions(adapter, model, tokenizer, names, images):
    tta = adapter.wrap(model, names, tokenizer)
    start = time.perf_counter()
    with torch.no_grad():
        predicted = tta(images).argmax(-1)
    return predicted, (time.perf_counter() - start) / len(images)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", default="atpt,rtpt")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    args = parser.parse_args()
    model, tokenizer, names = load_demo_model()
    images, labels = load_demo_subset(args.images)
    rows = {}
    for name in args.adapters.split(","):
        full, full_s = predictions(load_adapter(name), model, tokenizer, names, images)
        low, low_s = predictions(load_adapter(name, precision=args.precision), model, tokenizer, names, images)
        rows[name] = {
            "agreement": (full == low).float().mean().item(),
            "accuracy_fp32": (full == labels).float().mean().item(),
            f"accuracy_{args.precision}": (low == labels).float().mean().item(),
            "seconds_fp32": full_s,
            f"seconds_{args.precision}": low_s,
        }
        print(name, json.dumps(rows[name]))


if __name__ == "__main__":
    main()
