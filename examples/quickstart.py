"""Quick start: wrap an open_clip CLIP with A-TPT and classify a few images.

Runs offline on a RANDOM-INIT ViT-B-32 (no weights are downloaded), so its predictions
are chance-level: it shows the API and the cost, not accuracy. With real weights use
open_clip.create_model("ViT-B-16", pretrained="openai") or pretrained="/path/to/weights.pt".
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402

from atpt_plugin import list_adapters, load_adapter  # noqa: E402

PETS = [
    "Abyssinian",
    "Bengal",
    "Birman",
    "Bombay",
    "British Shorthair",
    "Egyptian Mau",
    "Maine Coon",
    "Persian",
    "Ragdoll",
    "Russian Blue",
    "Siamese",
    "Sphynx",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or local file; default: random init")
    parser.add_argument("--adapters", default="zeroshot,atpt")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--views", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=args.pretrained).eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    images = torch.rand(args.images, 3, 224, 224)
    print(
        f"{args.model} ({'random init' if args.pretrained is None else args.pretrained}), "
        f"{len(PETS)} classes, {args.images} random images; available adapters: {', '.join(list_adapters())}"
    )
    for name in args.adapters.split(","):
        overrides = {} if name == "zeroshot" else {"views": args.views}
        tta = load_adapter(name, **overrides).wrap(model, classnames=PETS, tokenizer=tokenizer)
        start = time.perf_counter()
        with torch.no_grad():
            predictions = tta(images).argmax(-1)
        seconds = (time.perf_counter() - start) / args.images
        print(f"{name:>10}: predictions {[PETS[i] for i in predictions]}, {seconds:.2f} s per image")


if __name__ == "__main__":
    main()
