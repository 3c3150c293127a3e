"""Per-stage cost of each adapter, optimised against the naive computation, in one run.

    python -m bench.run --models ViT-B-32,ViT-B-16 --adapters atpt,rtpt,tpt,zeroshot --naive

Random-init weights (cost does not depend on them), random 224x224 images, the 37 Oxford
Pets classes. Rows per adapter: "naive" (bench/naive.py), "optimised" (one test image at
a time), "batch N" (`image_batch=N`: N images adapted together) and, with --compile,
"compiled" (`compile=True`, its one-off compilation timed apart). Also the text pass with
the sequence cut after the last EOT against the full context, and PGD per image at each
attack batch size. Writes bench/results/<tag>.json and .md; prints the tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402
import torchattacks  # noqa: E402
from atpt_plugin.adapters.attacks import ZeroShotClassifier  # noqa: E402

from atpt_plugin import TestTimeAdapter, load_adapter  # noqa: E402

from .naive import NaiveTestTimeAdapter  # noqa: E402
from .stages import STAGES, PeakSampler, StageRecorder, sync  # noqa: E402

PETS = [
    "Abyssinian",
    "American Bulldog",
    "American Pit Bull Terrier",
    "Basset Hound",
    "Beagle",
    "Bengal",
    "Birman",
    "Bombay",
    "Boxer",
    "British Shorthair",
    "Chihuahua",
    "Egyptian Mau",
    "English Cocker Spaniel",
    "English Setter",
    "German Shorthaired",
    "Great Pyrenees",
    "Havanese",
    "Japanese Chin",
    "Keeshond",
    "Leonberger",
    "Maine Coon",
    "Miniature Pinscher",
    "Newfoundland",
    "Persian",
    "Pomeranian",
    "Pug",
    "Ragdoll",
    "Russian Blue",
    "Saint Bernard",
    "Samoyed",
    "Scottish Terrier",
    "Shiba Inu",
    "Siamese",
    "Sphynx",
    "Staffordshire Bull Terrier",
    "Wheaten Terrier",
    "Yorkshire Terrier",
]


def timed(function, repeat: int = 1) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        function()
    sync()
    return (time.perf_counter() - start) / repeat


def compute_floor(tta: TestTimeAdapter, images: torch.Tensor) -> float:
    """Forward passes the method cannot avoid: K-1 bases and K views through the image encoder,
    at the adapters' precision."""
    views = tta.config.views
    with torch.no_grad(), tta.image_precision():
        return timed(
            lambda: (
                tta.backbone.encode_image(images[:1].expand(views - 1, -1, -1, -1)),
                tta.backbone.encode_image(images[:1].expand(views, -1, -1, -1)),
            )
        )


def run_adapter(cls, model, tokenizer, name, views, images, sampler, **overrides):
    """Per-image time and peak memory of each stage, all `images` passed in one call."""
    adapter = load_adapter(name, **overrides)
    if adapter.config.views > 1:
        adapter = adapter.with_overrides(views=views)
    tta = cls(model, PETS, tokenizer, adapter.config, name)
    first_call = None
    if adapter.config.compile:  # compilation happens once per wrap; time it apart
        first_call = timed(lambda: tta(images[:1]))
    recorder = StageRecorder(tta, sampler)
    with torch.no_grad():
        start = time.perf_counter()
        predictions = tta(images).argmax(-1).tolist()
        total = (time.perf_counter() - start) / len(images)
    per_image = {label: recorder.seconds[label] / len(images) for label in STAGES.values()}
    return {
        "total_s": total,
        "stages_s": per_image,
        "first_call_s": first_call,
        "peak_mb": {k: v / 2**20 for k, v in recorder.peak_bytes.items()},
        "predictions": predictions,
    }


def text_pass(tta: TestTimeAdapter) -> dict:
    """One pass of all class prompts: cut after the longest EOT (ours) against the full context."""
    prompt, backbone = tta.prompt, tta.backbone
    embeddings = torch.cat(
        [prompt.prefix, prompt.initial_context.expand(len(prompt.prefix), -1, -1), prompt.suffix], dim=1
    )
    full_length = backbone.text_context_length
    padding = backbone.token_embedding(
        torch.full(
            (full_length - embeddings.shape[1],), backbone.text_pad_id, dtype=torch.long, device=embeddings.device
        )
    )
    full = torch.cat([embeddings, padding.expand(len(embeddings), -1, -1)], dim=1)
    with torch.no_grad():
        cut_s = timed(lambda: prompt.text_features(prompt.initial_context), repeat=5)
        full_s = timed(lambda: backbone.encode_text_embeddings(full, prompt.pool), repeat=5)
    return {"tokens_cut": embeddings.shape[1], "tokens_full": full_length, "cut_s": cut_s, "full_s": full_s}


def run_attack(cls, model, tokenizer, images, labels, steps, batch):
    """Per-image PGD time: optimised = the evaluation's batched zero-shot classifier (text
    features once); naive = one image at a time, text features re-encoded at every step."""
    target = cls(model, PETS, tokenizer, load_adapter("zeroshot").config, "zeroshot")
    if cls is TestTimeAdapter:
        target = ZeroShotClassifier.from_adapter(target)
    attack = torchattacks.PGD(target, eps=4 / 255, alpha=1 / 255, steps=steps, random_start=True)
    x, y = images[:batch], labels[:batch]
    return timed(lambda: attack(x, y)) / len(x)


def bench_model(args, model_name, sampler):
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = open_clip.create_model(model_name, pretrained=None).to(device).eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, 3, 224, 224, generator=generator).to(device)
    rows = {}
    floor_tta = TestTimeAdapter(
        model, PETS, tokenizer, load_adapter("atpt", views=args.views, precision=args.precision).config
    )
    floor = compute_floor(floor_tta, images)
    for name in args.adapters:
        run = functools.partial(
            run_adapter,
            model=model,
            tokenizer=tokenizer,
            name=name,
            views=args.views,
            images=images,
            sampler=sampler,
            precision=args.precision,
        )
        configs = {"naive": functools.partial(run, NaiveTestTimeAdapter)} if args.naive else {}
        for image_batch in args.image_batches:
            label = "optimised" if image_batch == 1 else f"batch {image_batch}"
            configs[label] = functools.partial(run, TestTimeAdapter, image_batch=image_batch)
        if args.compile:
            configs["compiled"] = functools.partial(run, TestTimeAdapter, image_batch=1, compile=True)
        rows[name] = {label: measure() for label, measure in configs.items()}
        reference = rows[name][next(iter(rows[name]))]["predictions"]
        rows[name]["same_predictions"] = all(r["predictions"] == reference for r in rows[name].values())
    attack = {}
    labels = torch.randint(len(PETS), (max(args.attack_batches),), generator=generator).to(device)
    attack_images = torch.rand(max(args.attack_batches), 3, 224, 224, generator=generator).to(device)
    for batch in args.attack_batches:
        attack[batch] = {
            "optimised": run_attack(TestTimeAdapter, model, tokenizer, attack_images, labels, args.attack_steps, batch)
        }
        if args.naive and batch == min(args.attack_batches):
            attack[batch]["naive"] = run_attack(
                NaiveTestTimeAdapter, model, tokenizer, attack_images, labels, args.attack_steps, batch
            )
    return {"floor_s": floor, "text_pass": text_pass(floor_tta), "adapters": rows, "attack_per_image_s": attack}


def markdown(results) -> str:
    lines = []
    for model_name, result in results["models"].items():
        floor = result["floor_s"]
        lines += [
            f"### {model_name}: {results['views']} views, {len(PETS)} classes, "
            f"{results['device']} {results['precision']}, {results['threads']} threads",
            "",
            f"Compute floor (K-1 bases + K views, forward only): {floor:.2f} s per image",
            "",
            "| adapter | config | " + " | ".join(STAGES.values()) + " | total s | total/floor | vs naive | peak MB |",
            "|---|---|" + "---|" * (len(STAGES) + 4),
        ]
        for name, row in result["adapters"].items():
            configs = {label: r for label, r in row.items() if label != "same_predictions"}
            for config, r in configs.items():
                stages = " | ".join(f"{r['stages_s'][s]:.2f}" for s in STAGES.values())
                speedup = f"{configs['naive']['total_s'] / r['total_s']:.1f}x" if "naive" in configs else ""
                lines.append(
                    f"| {name} | {config} | {stages} | {r['total_s']:.2f} | "
                    f"{r['total_s'] / floor:.2f} | {speedup} | {max(r['peak_mb'].values(), default=0):.0f} |"
                )
            lines.append(f"| {name} | same predictions in every config: {row['same_predictions']} |")
            if configs.get("compiled", {}).get("first_call_s"):
                lines.append(
                    f"| {name} | compiled: first call (compilation, one image) "
                    f"{configs['compiled']['first_call_s']:.1f} s |"
                )
        text = result["text_pass"]
        lines += [
            "",
            f"Text pass, {len(PETS)} class prompts: cut after the last EOT ({text['tokens_cut']} "
            f"tokens) {text['cut_s'] * 1e3:.1f} ms against the full context ({text['tokens_full']} "
            f"tokens) {text['full_s'] * 1e3:.1f} ms, {text['full_s'] / text['cut_s']:.1f}x",
        ]
        lines += ["", f"PGD-{results['attack_steps']} per image (eps 4/255):", ""]
        for batch, times in result["attack_per_image_s"].items():
            said = f"batch {batch}: {times['optimised']:.2f} s"
            if "naive" in times:
                said += (
                    f" (naive, text re-encoded every step: {times['naive']:.2f} s, "
                    f"{times['naive'] / times['optimised']:.1f}x)"
                )
            lines.append(f"- {said}")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ViT-B-32")
    parser.add_argument("--adapters", default="atpt,rtpt,tpt,zeroshot")
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--naive", action="store_true", help="also run the naive computation")
    parser.add_argument("--image-batches", default="1", help="image_batch values to run, e.g. 1,8")
    parser.add_argument("--compile", action="store_true", help="also run with compile=True")
    parser.add_argument("--attack-steps", type=int, default=100)
    parser.add_argument("--attack-batches", default="1,8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="autocast of the adapters' image-tower passes (the attack stays fp32)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--tag", default="", help="appended to the result files' names")
    args = parser.parse_args()
    args.adapters = [name for name in args.adapters.split(",") if name]
    args.image_batches = [int(b) for b in args.image_batches.split(",")]
    args.attack_batches = [int(b) for b in args.attack_batches.split(",")]
    torch.set_num_threads(args.threads)
    sampler = PeakSampler(torch.device(args.device))
    results = {
        "machine": platform.processor() or platform.machine(),
        "device": args.device,
        "precision": args.precision,
        "threads": args.threads,
        "views": args.views,
        "attack_steps": args.attack_steps,
        "models": {},
    }
    for model_name in args.models.split(","):
        results["models"][model_name] = bench_model(args, model_name, sampler)
    sampler.close()
    table = markdown(results)
    print(table)
    write_results(args.out, f"{args.device}_{args.precision}_{'-'.join(results['models'])}{args.tag}", results, table)


def write_results(directory, tag: str, results: dict, table: str) -> None:
    """<directory>/<tag>.json and .md, side by side."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(results, indent=1))
    (out / f"{tag}.md").write_text(table)


if __name__ == "__main__":
    main()
