"""Small real `atpt eval` runs for the leaderboard tests: a random-init tiny CLIP on two
on-disk datasets the tests make (a CoOp-layout OxfordPets and an image folder)."""

import json
from pathlib import Path

import torch
from atpt_plugin.adapters import cli
from PIL import Image

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLASSES = ["abyssinian", "american_bulldog", "beagle"]
N_IMAGES = 6


def make_workspace(root: Path) -> Path:
    """root/data/oxford_pets (CoOp layout), root/data/folder (one folder per class), root/tiny.json."""
    g = torch.Generator().manual_seed(0)
    pets = root / "data" / "oxford_pets"
    (pets / "images").mkdir(parents=True)
    items = []
    for i in range(N_IMAGES + 2):
        label = i % 3
        pixels = (torch.rand(30 + i, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(pets / "images" / f"{CLASSES[label]}_{i}.jpg")
        items.append([f"{CLASSES[label]}_{i}.jpg", label, CLASSES[label]])
    (pets / "split_zhou_OxfordPets.json").write_text(json.dumps({"train": [], "val": [], "test": items}))
    for i in range(N_IMAGES + 1):
        folder = root / "data" / "folder" / ["cat", "dog", "ship"][i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(36, 36, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (root / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    return root


def run_eval(root: Path, out: str, dataset: str = "pets", eps: str = "4", *extra: str) -> Path:
    """One `atpt eval` in this process: zeroshot and ens (4 views), PGD with 2 steps by default."""
    data = root / "data" / ("folder" if dataset == "imagefolder" else "")
    args = [
        "eval",
        "--model",
        str(root / "tiny.json"),
        "--pretrained",
        "none",
        "--dataset",
        dataset,
        "--data-root",
        str(data),
        "--adapters",
        "zeroshot,ens",
        "--set",
        "views=4",
        "--n-examples",
        str(N_IMAGES),
        "--attack-batch-size",
        "3",
        "--out",
        str(root / out),
        "--cache-dir",
        str(root / "cache"),
        "--no-progress",
        *extra,
    ]
    if eps is not None:
        args += ["--eps", eps]
    if "--attack" not in extra:
        args += ["--attack-steps", "2"]
    assert cli.main(args) == 0
    return root / out
