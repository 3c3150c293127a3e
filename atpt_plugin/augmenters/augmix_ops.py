"""AugMix (Hendrycks et al., 2020) at severity 1, as TPT uses it, on batched float tensors.

TPT augments one PIL image at a time on the CPU. Here every chain of a whole batch runs at
once on the images' own device: per depth step, each point op is one call on the rows that
drew it, and all geometric ops share a single ``affine_grid`` + ``grid_sample`` call.

The op parameters follow the reference implementation's PIL conventions (pixel coordinates
from the top-left corner, zero fill outside the image). All random numbers are drawn on the
CPU from the caller's generator, so a generator state gives the same output on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import equalize as _equalize_uint8

AUGMIX_OPS: tuple[str, ...] = (
    "autocontrast",
    "equalize",
    "posterize",
    "rotate",
    "solarize",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)


def _int_parameter(levels: torch.Tensor, maxval: float) -> torch.Tensor:
    """AugMix's ``int(level * maxval / 10)``; levels are positive, so floor == int."""
    return torch.floor(levels * maxval / 10)


def _float_parameter(levels: torch.Tensor, maxval: float) -> torch.Tensor:
    """AugMix's ``level * maxval / 10``."""
    return levels * maxval / 10


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantise [0, 1] floats to the 8-bit values the PIL ops work on."""
    return (images * 255).round().to(torch.uint8)


# Point ops: (images (M,3,S,S), levels (M,), signs (M,)) -> images. Levels and signs are CPU tensors.


def autocontrast(images: torch.Tensor, levels: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Stretch each channel's [min, max] to [0, 1]; a flat channel is left as it is."""
    lo = images.amin(dim=(-2, -1), keepdim=True)
    hi = images.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    return ((images - lo.masked_fill(flat, 0)) / (hi - lo).masked_fill(flat, 1)).clamp(0, 1)


def equalize(images: torch.Tensor, levels: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """PIL-style histogram equalisation per channel (torchvision's batched uint8 kernel)."""
    return _equalize_uint8(_to_uint8(images)).to(images.dtype) / 255


def posterize(images: torch.Tensor, levels: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Keep the top ``4 - int_parameter(level, 4)`` bits of each 8-bit value."""
    bits = 4 - _int_parameter(levels, 4)
    masks = (256 - 2 ** (8 - bits)).to(torch.uint8).to(images.device).view(-1, 1, 1, 1)
    return (_to_uint8(images) & masks).to(images.dtype) / 255


def solarize(images: torch.Tensor, levels: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Invert pixels at or above ``256 - int_parameter(level, 256)`` (on the 0..255 scale)."""
    thresholds = ((256 - _int_parameter(levels, 256)) / 255).to(images.device, images.dtype)
    return torch.where(images >= thresholds.view(-1, 1, 1, 1), 1 - images, images)


POINT_OPS = {"autocontrast": autocontrast, "equalize": equalize, "posterize": posterize, "solarize": solarize}


# Geometric ops: (levels (M,), signs (M,), size S) -> (M, 2, 3) CPU float64 matrices for
# ``F.affine_grid``. They map output to input coordinates normalised to [-1, 1] with
# align_corners=False, where pixel coordinate p from the top-left corner is 2 * p / S - 1.


def _matrices(a, b, c, d, e, f) -> torch.Tensor:
    """Stack per-row entries of [[a, b, c], [d, e, f]] into an (M, 2, 3) batch."""
    return torch.stack(torch.broadcast_tensors(a, b, c, d, e, f), dim=-1).view(-1, 2, 3)


def rotate_matrices(levels: torch.Tensor, signs: torch.Tensor, size: int) -> torch.Tensor:
    """Counter-clockwise (PIL) rotation by ``int_parameter(level, 30) * sign`` degrees about the centre."""
    radians = torch.deg2rad(_int_parameter(levels, 30) * signs)
    cos, sin, zero = torch.cos(radians), torch.sin(radians), torch.zeros_like(radians)
    return _matrices(cos, -sin, zero, sin, cos, zero)


def shear_x_matrices(levels: torch.Tensor, signs: torch.Tensor, size: int) -> torch.Tensor:
    """Output (x, y) samples input (x + a * y, y), a = float_parameter(level, 0.3) * sign.

    In normalised coordinates that is x' = x + a * (y + 1), because PIL's origin is the corner.
    """
    a = _float_parameter(levels, 0.3) * signs
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    return _matrices(one, a, a, zero, one, zero)


def shear_y_matrices(levels: torch.Tensor, signs: torch.Tensor, size: int) -> torch.Tensor:
    """Output (x, y) samples input (x, y + a * x), a = float_parameter(level, 0.3) * sign."""
    a = _float_parameter(levels, 0.3) * signs
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    return _matrices(one, zero, zero, a, one, a)


def translate_x_matrices(levels: torch.Tensor, signs: torch.Tensor, size: int) -> torch.Tensor:
    """Output (x, y) samples input (x + p, y), p = int_parameter(level, S / 3) * sign pixels."""
    shift = 2 * _int_parameter(levels, size / 3) * signs / size
    one, zero = torch.ones_like(shift), torch.zeros_like(shift)
    return _matrices(one, zero, shift, zero, one, zero)


def translate_y_matrices(levels: torch.Tensor, signs: torch.Tensor, size: int) -> torch.Tensor:
    """Output (x, y) samples input (x, y + p), p = int_parameter(level, S / 3) * sign pixels."""
    shift = 2 * _int_parameter(levels, size / 3) * signs / size
    one, zero = torch.ones_like(shift), torch.zeros_like(shift)
    return _matrices(one, zero, zero, zero, one, shift)


AFFINE_MATRICES = {
    "rotate": rotate_matrices,
    "shear_x": shear_x_matrices,
    "shear_y": shear_y_matrices,
    "translate_x": translate_x_matrices,
    "translate_y": translate_y_matrices,
}


def warp(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resample each image through its own 2x3 matrix: bilinear, zero fill, like PIL's transform."""
    theta = matrices.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def sample_chain_params(
    rows: int, max_depth: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw every chain's ops, levels and signs up front, on the CPU, from ``generator``.

    Returns (max_depth, rows) tensors: op indices into AUGMIX_OPS (-1 once a chain, whose depth
    is uniform in 1..max_depth, has ended), levels ~ U(0.1, 1) in float64 and signs in {-1, +1}.
    """
    depths = torch.randint(1, max_depth + 1, (rows,), generator=generator)
    ops = torch.randint(len(AUGMIX_OPS), (max_depth, rows), generator=generator)
    ops[torch.arange(max_depth).unsqueeze(1) >= depths] = -1
    levels = 0.1 + 0.9 * torch.rand(max_depth, rows, dtype=torch.float64, generator=generator)
    signs = torch.randint(2, (max_depth, rows), dtype=torch.float64, generator=generator) * 2 - 1
    return ops, levels, signs


def apply_chains(images: torch.Tensor, ops: torch.Tensor, levels: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Apply row r's op sequence ``ops[:, r]`` to ``images[r]``, one batched call per op and step."""
    images = images.clone()
    size = images.shape[-1]
    affine_ids = torch.tensor([AUGMIX_OPS.index(name) for name in AFFINE_MATRICES])
    for step_ops, step_levels, step_signs in zip(ops, levels, signs):
        for name, op in POINT_OPS.items():
            rows = (step_ops == AUGMIX_OPS.index(name)).nonzero().squeeze(1)
            if len(rows):
                at = rows.to(images.device)
                images[at] = op(images[at], step_levels[rows], step_signs[rows])
        matrices = torch.zeros(len(step_ops), 2, 3, dtype=torch.float64)
        for name, matrices_for in AFFINE_MATRICES.items():
            picked = step_ops == AUGMIX_OPS.index(name)
            matrices[picked] = matrices_for(step_levels[picked], step_signs[picked], size)
        rows = torch.isin(step_ops, affine_ids).nonzero().squeeze(1)
        if len(rows):
            at = rows.to(images.device)
            images[at] = warp(images[at], matrices[rows])
    return images


def augmix_pure_mix(
    images: torch.Tensor, generator: torch.Generator, width: int = 3, max_depth: int = 3
) -> torch.Tensor:
    """images: (N,3,S,S) float in [0,1] on any device. Returns (N,3,S,S) in [0,1]:
    for each image, `width` chains; chain weights ~ Dirichlet(1,...,1) (per image); each chain
    applies a random number of ops in {1..max_depth} (uniform), each op drawn uniformly from AUGMIX_OPS,
    at severity 1; result = sum_c w_c * chain_c(image)."""
    n = images.shape[0]
    # Dirichlet(1, ..., 1) is a vector of Exp(1) draws divided by their sum.
    weights = torch.empty(n, width, dtype=torch.float64).exponential_(generator=generator)
    weights = weights / weights.sum(dim=1, keepdim=True)
    ops, levels, signs = sample_chain_params(n * width, max_depth, generator)
    chains = apply_chains(images.repeat_interleave(width, dim=0), ops, levels, signs)
    chains = chains.view(n, width, *images.shape[1:])
    mixed = (weights.to(images.device, images.dtype).view(n, width, 1, 1, 1) * chains).sum(dim=1)
    return mixed.clamp(0, 1)
