"""Train the demo CLIP contrastively on Fashion-MNIST and write the shipped files.

    python -m atpt_plugin.demo_model.train            # the shipped weights and subset

Reads the official training split only (60,000 images) for training; captions are the
class names in several templates; loss is open_clip's ClipLoss with the model's own
learnable logit_scale. Images: 28x28 grey, bilinearly upsampled to the model's 32x32
input and repeated to 3 channels, with light RandomResizedCrop + flip augmentation.
At the end it prints the zero-shot accuracy ("a photo of a {classname}.") on the official
test split, measured on the saved (fp16) checkpoint reloaded through open_clip, and
writes the held-out subset of the test split (never read during training).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

from . import CONTEXT, MODEL_NAME, checkpoint_path, image_size, subset_path
from .data import CLASSNAMES, build_subset, load_split, random_resized_crop, save_subset, to_model_input

TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}, a type of garment.",
    "a picture of a {}.",
    "an image of a {}.",
    "a grayscale photo of a {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a product photo of a {}.",
    "a {}.",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m atpt_plugin.demo_model.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--download", action="store_true", help="let torchvision download the data if missing")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine decay")
    p.add_argument("--crop-scale", type=float, default=0.4, help="smallest RandomResizedCrop area")
    p.add_argument("--p-crop", type=float, default=0.5, help="probability an image is cropped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--output", default=str(checkpoint_path()), help="checkpoint path (.pt)")
    p.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16, half the size)")
    p.add_argument(
        "--subset-output", default=str(subset_path()), help="where to write the held-out test subset ('' to skip)"
    )
    p.add_argument("--subset-per-class", type=int, default=100)
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args(argv)


def caption_tokens(tokenizer) -> torch.Tensor:
    """(T*C, L) tokens; row t*C + c is template t filled with class c."""
    return tokenizer([t.format(name) for t in TEMPLATES for name in CLASSNAMES])


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images_uint8: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` with the prompts "a photo of a {classname}."."""
    model.eval()
    text = model.encode_text(tokenizer([f"{CONTEXT} {name}." for name in CLASSNAMES]), normalize=True)
    size = image_size()
    mean = torch.tensor(model.visual.image_mean)[:, None, None]
    std = torch.tensor(model.visual.image_std)[:, None, None]
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = (to_model_input(images_uint8[start : start + batch_size], size) - mean) / std
        pred = (model.encode_image(x, normalize=True) @ text.T).argmax(-1)
        correct += int((pred == torch.as_tensor(labels[start : start + batch_size])).sum())
    return correct / max(1, len(labels))


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, weight_decay: float):
    """open_clip's convention: no weight decay on gains, biases, norms and logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def save_checkpoint(model, path: Path, fp16: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if fp16 and v.is_floating_point() else v).detach().clone() for k, v in model.state_dict().items()
    }
    torch.save(state, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()

    train_images, train_labels = load_split("train", args.data_dir, args.download)
    if args.train_limit:
        train_images, train_labels = train_images[: args.train_limit], train_labels[: args.train_limit]
    n_train = len(train_labels)
    batch_size = min(args.batch_size, n_train)
    steps_per_epoch = max(1, n_train // batch_size)
    total = args.steps if args.steps is not None else max(1, round(args.epochs * steps_per_epoch))
    print(
        f"Fashion-MNIST train split: {n_train} images; {total} steps of batch {batch_size} "
        f"({total / steps_per_epoch:.2f} epochs), seed {args.seed}, {args.threads} threads",
        flush=True,
    )

    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    size = image_size()
    mean = torch.tensor(model.visual.image_mean)[:, None, None]
    std = torch.tensor(model.visual.image_std)[:, None, None]
    captions = caption_tokens(tokenizer)
    pixels = torch.as_tensor(train_images).float().div_(255.0).unsqueeze(1)  # (N,1,28,28)
    labels = torch.as_tensor(train_labels)

    model.train()
    order, cursor, step, running = torch.randperm(n_train, generator=generator), 0, 0, None
    while step < total:
        if cursor + batch_size > n_train:
            order, cursor = torch.randperm(n_train, generator=generator), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        x = random_resized_crop(pixels[idx], size, generator, scale=(args.crop_scale, 1.0), p_crop=args.p_crop)
        x = (x.expand(-1, 3, -1, -1) - mean) / std
        template = torch.randint(len(TEMPLATES), (len(idx),), generator=generator)
        caption_index = template * len(CLASSNAMES) + labels[idx]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, args.lr, args.warmup)
        image_features = model.encode_image(x, normalize=True)
        text_features = model.encode_text(captions, normalize=True)[caption_index]
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % args.log_every == 0 or step == total:
            print(
                f"step {step}/{total}  loss {running:.4f}  logit scale {model.logit_scale.exp().item():.1f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {time.time() - started:.0f}s",
                flush=True,
            )
    train_seconds = time.time() - started

    output = Path(args.output)
    save_checkpoint(model, output, fp16=not args.fp32)
    shipped = open_clip.create_model(MODEL_NAME, pretrained=str(output))  # what users get
    test_images, test_labels = load_split("test", args.data_dir, args.download)
    if args.eval_limit:
        test_images, test_labels = test_images[: args.eval_limit], test_labels[: args.eval_limit]
    accuracy = zero_shot_accuracy(shipped, tokenizer, test_images, test_labels)
    print(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB, {'fp32' if args.fp32 else 'fp16'})")
    print(
        f"zero-shot accuracy ('{CONTEXT} {{}}.') on the Fashion-MNIST test split "
        f"({len(test_labels)} images): {100 * accuracy:.2f}%",
        flush=True,
    )
    result = dict(
        model=MODEL_NAME,
        seed=args.seed,
        steps=total,
        batch_size=batch_size,
        epochs=round(total / steps_per_epoch, 3),
        train_images=n_train,
        train_seconds=round(train_seconds, 1),
        threads=args.threads,
        test_images=len(test_labels),
        zero_shot_test_accuracy=round(accuracy, 4),
        argv=list(sys.argv[1:] if argv is None else argv),
        torch=torch.__version__,
        open_clip=open_clip.__version__,
    )
    if args.subset_output:
        indices = build_subset(test_labels, args.subset_per_class, seed=args.seed)
        save_subset(args.subset_output, test_images, test_labels, indices, seed=args.seed)
        subset_acc = zero_shot_accuracy(shipped, tokenizer, test_images[indices], test_labels[indices])
        print(
            f"wrote {args.subset_output}: {len(indices)} test images ({args.subset_per_class} per class); "
            f"zero-shot accuracy on it {100 * subset_acc:.2f}%"
        )
        result.update(subset=str(Path(args.subset_output).name), subset_accuracy=round(subset_acc, 4))
    output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
