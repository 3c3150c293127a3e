"""The GPU check in one command: same predictions across devices and batch sizes, then speed.

    python -m bench.gpu_check            # one GPU, a few minutes
    python -m bench.gpu_check --quick    # tiny settings, seconds on a CPU (tests/test_gpu_check.py)

Correctness runs on the embedded demo CLIP and its shipped test images, because a trained
model's predictions are not near ties (a random-init model's argmax would flip on rounding):
CUDA against CPU logits, and `image_batch` 8 and 32 against one image at a time. Speed runs
on a random-init model (cost does not depend on the weights), random images and the 37 Oxford
Pets classes: images per second and peak memory of `atpt` and `rtpt` in fp32 and bf16 at each
`image_batch`, of the naive computation (bench/naive.py), and of PGD on zero-shot CLIP at
attack batch 1 and 64, timed as bench/run.py times it. Writes
bench/results/gpu_check_<device>[_quick].json and .md.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402

from atpt_plugin import TestTimeAdapter, load_adapter  # noqa: E402
from atpt_plugin.demo_model import load_demo_model, load_demo_subset  # noqa: E402

from .naive import NaiveTestTimeAdapter  # noqa: E402
from .run import PETS, run_attack, timed, write_results  # noqa: E402
from .stages import PeakSampler  # noqa: E402

ADAPTERS = ("atpt", "rtpt")
PRECISIONS = ("fp32", "bf16")
IMAGE_BATCHES = (1, 8, 32)
ATTACK_BATCHES = (1, 64)


@dataclass(frozen=True)
class Settings:
    model: str  # the timed model, random init
    views: int
    images: int  # random images per timed configuration
    naive_images: int  # the naive computation is slow, so it gets fewer
    check_images: int  # shipped demo test images for the correctness checks
    attack_steps: int


FULL = Settings("ViT-B-16", views=64, images=64, naive_images=8, check_images=64, attack_steps=100)
QUICK = Settings("fmnist-vit-tiny", views=8, images=4, naive_images=2, check_images=8, attack_steps=2)


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    agree = reference.argmax(-1) == other.argmax(-1)
    return {
        "same_predictions": bool(agree.all()),
        "agreement": agree.float().mean().item(),
        "max_abs_logit_diff": (reference - other).abs().max().item(),
    }


@functools.cache  # the one-at-a-time logits serve both checks
def demo_logits(name: str, settings: Settings, device: torch.device, image_batch: int) -> torch.Tensor:
    model, tokenizer, classnames = load_demo_model(device=device)
    images, _ = load_demo_subset(settings.check_images)
    tta = load_adapter(name, views=settings.views, image_batch=image_batch).wrap(model, classnames, tokenizer)
    with torch.no_grad():
        return tta(images.to(device)).float().cpu()


def check_devices(settings: Settings, device: torch.device) -> dict:
    """CUDA against CPU logits, one image at a time on both."""
    if device.type != "cuda":
        return {"run": False, "reason": f"no CUDA device: this run is on the {device.type}"}
    adapters = {
        name: compare(demo_logits(name, settings, torch.device("cpu"), 1), demo_logits(name, settings, device, 1))
        for name in ADAPTERS
    }
    return {
        "run": True,
        "adapters": adapters,
        "same_predictions": all(a["same_predictions"] for a in adapters.values()),
    }


def check_image_batches(settings: Settings, device: torch.device) -> dict:
    """Each `image_batch` against one image at a time, on `device`."""
    adapters = {
        name: {
            str(batch): compare(demo_logits(name, settings, device, 1), demo_logits(name, settings, device, batch))
            for batch in IMAGE_BATCHES[1:]
        }
        for name in ADAPTERS
    }
    return {
        "run": True,
        "adapters": adapters,
        "same_predictions": all(c["same_predictions"] for a in adapters.values() for c in a.values()),
    }


def rate(sampler: PeakSampler, run, count: int) -> dict:
    """Images per second and peak memory of `run()`, which returns its seconds for `count` images."""
    sampler.reset()
    seconds = run()
    return {"images_per_s": count / seconds, "peak_mb": sampler.read() / 2**20}


def adapter_row(cls, name, model, tokenizer, images, sampler, **overrides) -> dict:
    """One table row: an adapter configuration's images per second and peak memory on `images`."""
    config = load_adapter(name, **overrides).config
    tta = cls(model, PETS, tokenizer, config, name)
    with torch.no_grad():
        tta(images[:1])  # warm-up: kernels and the allocator's first blocks
        measured = rate(sampler, lambda: timed(lambda: tta(images)), len(images))
    is_naive = cls is NaiveTestTimeAdapter  # always one image at a time
    return {
        "adapter": name,
        "computation": "naive" if is_naive else "optimised",
        "precision": config.precision,
        "image_batch": 1 if is_naive else config.image_batch,
        **measured,
    }


def throughput(settings, model, tokenizer, images, sampler) -> list:
    return [
        adapter_row(
            TestTimeAdapter,
            name,
            model,
            tokenizer,
            images,
            sampler,
            views=settings.views,
            precision=precision,
            image_batch=batch,
        )
        for name in ADAPTERS
        for precision in PRECISIONS
        for batch in IMAGE_BATCHES
    ]


def naive(settings, model, tokenizer, images, sampler) -> list:
    """fp32, one image at a time: what the authors' code computes (bench/naive.py)."""
    return [
        adapter_row(
            NaiveTestTimeAdapter, name, model, tokenizer, images[: settings.naive_images], sampler, views=settings.views
        )
        for name in ADAPTERS
    ]


def attack(settings, model, tokenizer, size, device, sampler) -> list:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(max(ATTACK_BATCHES), 3, size, size, generator=generator).to(device)
    labels = torch.randint(len(PETS), (len(images),), generator=generator).to(device)

    def seconds(batch):
        return batch * run_attack(TestTimeAdapter, model, tokenizer, images, labels, settings.attack_steps, batch)

    return [
        {
            "attack_batch": batch,
            "steps": settings.attack_steps,
            **rate(sampler, functools.partial(seconds, batch), batch),
        }
        for batch in ATTACK_BATCHES
    ]


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        (
            f"# GPU check on {results['device']} (torch {results['torch']}"
            f"{', --quick' if results['quick'] else ''}), {results['total_s']:.0f} s"
        ),
        "",
        (f"Correctness on the demo CLIP (trained), first {s['check_images']} shipped test images, {s['views']} views:"),
        "",
    ]
    devices = results["cuda_vs_cpu"]
    if devices["run"]:
        lines.append(
            "- CUDA against CPU, image_batch 1: "
            + "; ".join(
                f"`{name}` same predictions {c['same_predictions']} (agreement {c['agreement']:.0%}, "
                f"max logit difference {c['max_abs_logit_diff']:.1e})"
                for name, c in devices["adapters"].items()
            )
        )
    else:
        lines.append(f"- CUDA against CPU: not run ({devices['reason']})")
    lines.append(
        "- image_batch "
        + ", ".join(map(str, IMAGE_BATCHES))
        + ": "
        + "; ".join(
            f"`{name}` same predictions {all(c['same_predictions'] for c in batches.values())} (max logit "
            "difference against 1: "
            + ", ".join(f"{b}: {c['max_abs_logit_diff']:.1e}" for b, c in batches.items())
            + ")"
            for name, batches in results["image_batch"]["adapters"].items()
        )
    )
    lines += [
        "",
        (
            f"Speed on a random-init {s['model']}, {s['views']} views, {len(PETS)} classes, "
            f"{s['images']} random images (naive: {s['naive_images']}); peak memory: {results['memory']}:"
        ),
        "",
        "| adapter | computation | precision | image_batch | images/s | peak MB |",
        "|---|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['adapter']} | {r['computation']} | {r['precision']} | {r['image_batch']} | "
        f"{r['images_per_s']:.2f} | {r['peak_mb']:.0f} |"
        for r in results["naive"] + results["throughput"]
    ]
    lines += [
        "",
        f"PGD-{s['attack_steps']} (eps 4/255) on zero-shot CLIP:",
        "",
        "| attack batch | images/s | peak MB |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['attack_batch']} | {r['images_per_s']:.2f} | {r['peak_mb']:.0f} |" for r in results["attack"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few images, views and attack steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.quick:
        parser.error(
            f"without --quick this times {FULL.model} at {FULL.views} views, hours on a "
            f"{device.type}: run it on a GPU, or pass --quick"
        )
    settings = QUICK if args.quick else FULL
    start = time.perf_counter()
    results = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "quick": args.quick,
        "settings": asdict(settings),
        "memory": "CUDA allocator peak" if device.type == "cuda" else "process resident set peak",
        "cuda_vs_cpu": check_devices(settings, device),
        "image_batch": check_image_batches(settings, device),
    }
    torch.manual_seed(0)
    model = open_clip.create_model(settings.model, pretrained=None).to(device).eval()
    tokenizer = open_clip.get_tokenizer(settings.model)
    size = open_clip.get_model_config(settings.model)["vision_cfg"]["image_size"]
    images = torch.rand(settings.images, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    sampler = PeakSampler(device)
    try:
        results["throughput"] = throughput(settings, model, tokenizer, images, sampler)
        results["naive"] = naive(settings, model, tokenizer, images, sampler)
        results["attack"] = attack(settings, model, tokenizer, size, device, sampler)
    finally:
        sampler.close()
    results["total_s"] = time.perf_counter() - start
    table = markdown(results)
    print(table)
    write_results(args.out, f"gpu_check_{device.type}{'_quick' if args.quick else ''}", results, table)
    return results


if __name__ == "__main__":
    main()
