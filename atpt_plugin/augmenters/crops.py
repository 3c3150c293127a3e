"""Geometry of the views: the model's preprocessing and batched random crops on the device.

Crops of the image resized to the model size (`crop_views`) are one `grid_sample` call
with a per-view affine matrix, so making 63 base views costs one kernel, not 63 PIL round
trips. Crops of the original image (`resized_crops`, the authors' code) are resized one
by one with antialiasing, as PIL does: a crop larger than the model size is downsampled,
and plain bilinear sampling would alias it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


def resize_shorter_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3,H,W) -> shorter side `size`, bicubic with antialiasing, as open_clip's preprocessing."""
    height, width = image.shape[-2:]
    if min(height, width) == size:
        return image
    return TF.resize(image, [size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)


def center_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize + CenterCrop: the model's own view of an image (view 0)."""
    return TF.center_crop(resize_shorter_side(image, size), [size, size])


def random_resized_boxes(
    count: int,
    height: int,
    width: int,
    generator: torch.Generator,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    tries: int = 10,
) -> torch.Tensor:
    """RandomResizedCrop boxes (top, left, h, w), vectorised over views.

    Ten candidates per view as torchvision draws them; the first that fits wins, and a
    view with none falls back to the central crop at the clamped aspect ratio.
    """
    area = height * width
    target = area * torch.empty(count, tries).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(count, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    found = fits.any(dim=1)
    first = fits.float().argmax(dim=1, keepdim=True)
    bh, bw = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    u = torch.rand(count, 2, generator=generator)
    top = torch.floor(u[:, 0] * (height - bh + 1))
    left = torch.floor(u[:, 1] * (width - bw + 1))
    boxes = torch.stack([top, left, bh, bw], dim=1)
    boxes[~found] = _fallback_box(height, width, ratio)
    return boxes


def _fallback_box(height: int, width: int, ratio) -> torch.Tensor:
    """torchvision's fallback: the central crop with the aspect ratio clamped into `ratio`."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        bw, bh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        bh, bw = height, round(height * ratio[1])
    else:
        bw, bh = width, height
    return torch.tensor([(height - bh) // 2, (width - bw) // 2, bh, bw], dtype=torch.float)


def center_boxes(count: int, height: int, width: int) -> torch.Tensor:
    """The central square crop, repeated: the paper's "Center-Crop" bases."""
    side = min(height, width)
    box = torch.tensor([(height - side) // 2, (width - side) // 2, side, side], dtype=torch.float)
    return box.expand(count, 4).clone()


def crop_views(image: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each box of (3,H,W) `image`, resize to size x size (bilinear), mirror where `flips`."""
    height, width = image.shape[-2:]
    top, left, h, w = boxes.t()
    sign = 1.0 - 2.0 * flips.float()
    theta = torch.zeros(len(boxes), 2, 3)
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    theta = theta.to(image.device, image.dtype)
    grid = F.affine_grid(theta, [len(boxes), 3, size, size], align_corners=False)
    source = image.unsqueeze(0).expand(len(boxes), -1, -1, -1)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resized_crops(image: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each box of (3,H,W) `image`, resize it to size x size, mirror where `flips`.

    Bilinear with antialiasing: torchvision's port of PIL's resampling, so it matches the
    authors' `RandomResizedCrop` on PIL images up to PIL's rounding to 8 bits. One call per
    box, because boxes differ in size and so do the filters' supports.
    """
    views = []
    for (top, left, height, width), flip in zip(boxes.long().tolist(), flips.tolist()):
        crop = image[:, top : top + height, left : left + width]
        view = TF.resize(crop, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        views.append(view.flip(-1) if flip else view)
    return torch.stack(views).clamp(0, 1)  # a convex combination, up to rounding
