"""Per-image cost of one adapter on the same architecture from two libraries, in one run.

    python -m bench.families --adapter atpt --images 2 --rounds 2 --threads 2

A random-init full-size ViT-B/32 as open_clip's `ViT-B-32` (GELU), as open_clip's
`ViT-B-32-quickgelu` (OpenAI's activation) and as a Hugging Face `CLIPModel` (`CLIPConfig()`'s
defaults are OpenAI's ViT-B/32, QuickGELU), all wrapped with the same adapter (64 views by
default), the 37 Oxford Pets classes, random 224x224 images. Runs are interleaved (open_clip,
HF, open_clip, HF, ...) so a change in the machine's load hits both; each model's first call
(one image) is a warm-up, timed apart. The HF model is tokenised with open_clip's tokenizer
(same BPE vocabulary and EOS id; the real HF tokenizer needs a download). Writes
bench/results/families_<adapter>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402

from atpt_plugin import load_adapter  # noqa: E402

from .run import PETS  # noqa: E402


def models():
    import transformers

    built = {}
    for name in ("ViT-B-32", "ViT-B-32-quickgelu"):
        torch.manual_seed(0)
        built[f"open_clip {name}"] = open_clip.create_model(name, pretrained=None).eval()
    torch.manual_seed(0)
    built["HF CLIPModel ViT-B/32 (QuickGELU)"] = transformers.CLIPModel(transformers.CLIPConfig()).eval()
    return built


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="atpt")
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--images", type=int, default=2, help="images per timed call")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timed calls per model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    adapter = load_adapter(args.adapter, views=args.views)
    wrapped = {name: adapter.wrap(model, PETS, tokenizer) for name, model in models().items()}
    images = torch.rand(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    warmup, seconds = {}, {name: [] for name in wrapped}
    with torch.no_grad():
        for name, tta in wrapped.items():
            start = time.perf_counter()
            tta(images[:1])
            warmup[name] = time.perf_counter() - start
        for _ in range(args.rounds):
            for name, tta in wrapped.items():
                start = time.perf_counter()
                tta(images)
                seconds[name].append((time.perf_counter() - start) / len(images))
    per_image = {name: min(values) for name, values in seconds.items()}
    first = next(iter(per_image))
    result = {
        "adapter": args.adapter,
        "views": args.views,
        "images": args.images,
        "rounds": args.rounds,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "warmup_s": warmup,
        "per_image_s_all_rounds": seconds,
        "per_image_s_best_round": per_image,
        "ratio_to_first": {name: value / per_image[first] for name, value in per_image.items()},
    }
    lines = [
        f"`{args.adapter}`, {args.views} views, {args.threads} threads, best of {args.rounds} interleaved "
        f"rounds of {args.images} images",
        "",
        "| model | s / image | ratio |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {value:.2f} | {result['ratio_to_first'][name]:.2f} |" for name, value in per_image.items()]
    out = Path(__file__).parent / "results" / f"families_{args.adapter}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
