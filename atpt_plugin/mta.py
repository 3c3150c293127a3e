"""MTA: MeanShift for Test-time Augmentation (Zanella & Ben Ayed, CVPR 2024).

Instead of averaging the K view embeddings, MTA seeks the mode of their kernel density,
with each view weighted by an *inlierness* score y on the probability simplex. It
alternates two blocks of fixed-point updates, initialised at y uniform and the mode at
the original (center-crop) view:

- inlierness: y <- softmax((kappa + lambda_q * W y) / lambda_y), where kappa_i is the
  Gaussian kernel between view i and the current mode and W = P P^T is the affinity of
  the views' zero-shot class probabilities P. Views near the mode and agreeing with the
  other views' predictions get the mass; lambda_y is the entropic smoothing.
- mode: m <- normalize(sum_i y_i kappa_i x_i / sum_i y_i kappa_i), a MeanShift step with
  each view's kernel weight scaled by its inlierness.

Every view has its own bandwidth: h_i^2 is half the mean squared distance from view i to
its k nearest other views, k = int(neighbour_fraction * (K - 1)). Defaults and the loop
schedule follow the authors' released code (github.com/MaxZanella/MTA, mta.py, main.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class MTAConfig:
    """Published MTA settings (authors' main.py / mta.py)."""

    lambda_y: float = 0.2  # entropic weight: temperature of the inlierness softmax
    lambda_q: float = 4.0  # weight of the quadratic prediction-affinity term W y
    neighbour_fraction: float = 0.3  # bandwidth uses the int(0.3 * (K - 1)) nearest other views
    outer_iters: int = 5  # alternations of the inlierness and mode blocks
    inner_iters: int = 5  # cap on fixed-point updates inside each block
    tol: float = 1e-6  # a block stops once an update moves its variable less (L2)

    def __post_init__(self):
        if self.lambda_y <= 0:
            raise ValueError(f"lambda_y must be > 0, got {self.lambda_y}")
        if self.lambda_q < 0:
            raise ValueError(f"lambda_q must be >= 0, got {self.lambda_q}")
        if not 0 < self.neighbour_fraction <= 1:
            raise ValueError(f"neighbour_fraction must be in (0, 1], got {self.neighbour_fraction}")
        if self.outer_iters < 1 or self.inner_iters < 1:
            raise ValueError("outer_iters and inner_iters must be >= 1")
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")


class MTAResult(NamedTuple):
    mode: torch.Tensor  # (d,) L2-normalised mode, in the features' dtype
    inlierness: torch.Tensor  # (K,) final inlierness scores, on the simplex


def affinity(probs: torch.Tensor) -> torch.Tensor:
    """(K,K) W_ij = <p_i, p_j>: how much views i and j agree on the class."""
    return probs @ probs.T


def bandwidth(features: torch.Tensor, neighbour_fraction: float) -> torch.Tensor:
    """(K,) per-view h_i = sqrt(mean of the k smallest squared distances to other views / 2).

    An adaptive bandwidth follows the local spread of the views, so dense clusters of
    augmentations get a narrow kernel. h^2 is floored at the dtype's epsilon so coincident
    views (zero distance) give kernel 1 instead of 0/0.
    """
    num_views = features.shape[0]
    k = max(1, int(neighbour_fraction * (num_views - 1)))
    # the direct (non-matmul) path is exact for coincident rows
    sq_dist = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist").square()
    self_mask = torch.eye(num_views, dtype=torch.bool, device=features.device)
    sq_dist = sq_dist.masked_fill(self_mask, float("inf"))
    nearest = torch.topk(sq_dist, k, dim=1, largest=False).values
    sq_bandwidth = (0.5 * nearest.mean(dim=1)).clamp_min(torch.finfo(features.dtype).eps)
    return sq_bandwidth.sqrt()


def gaussian_kernel(features: torch.Tensor, mode: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    """(K,) kappa_i = exp(-||x_i - m||^2 / (2 h_i^2)): the density each view lends the mode."""
    sq_dist = (features - mode).square().sum(dim=1)
    return torch.exp(-sq_dist / (2 * bandwidth.square()))


def inlierness_update(
    inlierness: torch.Tensor, kernel: torch.Tensor, affinity: torch.Tensor, lambda_y: float, lambda_q: float
) -> torch.Tensor:
    """(K,) y <- softmax((kappa + lambda_q * W y) / lambda_y).

    One fixed-point step on the stationarity condition of
    sum_i y_i kappa_i + (lambda_q / 2) y^T W y - lambda_y sum_i y_i log y_i over the simplex:
    the entropy keeps y strictly positive and smooth, the quadratic term rewards agreement.
    """
    return torch.softmax((kernel + lambda_q * (affinity @ inlierness)) / lambda_y, dim=0)


def mode_update(
    features: torch.Tensor, mode: torch.Tensor, inlierness: torch.Tensor, bandwidth: torch.Tensor
) -> torch.Tensor:
    """(d,) one inlierness-weighted MeanShift step, projected back to the unit sphere."""
    weights = inlierness * gaussian_kernel(features, mode, bandwidth)
    shifted = weights @ features / weights.sum()
    return shifted / torch.linalg.vector_norm(shifted)


def mta_solve(features: torch.Tensor, probs: torch.Tensor, config: MTAConfig = MTAConfig()) -> MTAResult:
    """Run MTA and return both the mode and the final inlierness scores (see `mta_mode`)."""
    if features.ndim != 2 or probs.ndim != 2 or features.shape[0] != probs.shape[0]:
        raise ValueError(
            f"expected features (K,d) and probs (K,C) with the same K, got "
            f"{tuple(features.shape)} and {tuple(probs.shape)}"
        )
    if features.shape[0] < 2:
        raise ValueError("MTA needs at least two views: the bandwidth is set by neighbouring views")
    # half precision (autocast features) is too coarse for exp(-d^2 / 2h^2) and the softmax
    work_dtype = torch.promote_types(features.dtype, torch.float32)
    x = features.to(work_dtype)
    w = affinity(probs.to(work_dtype))
    h = bandwidth(x, config.neighbour_fraction)
    y = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=work_dtype, device=x.device)
    mode = x[0]
    for _ in range(config.outer_iters):
        kernel = gaussian_kernel(x, mode, h)  # fixed while the inlierness block runs
        for _ in range(config.inner_iters):
            new_y = inlierness_update(y, kernel, w, config.lambda_y, config.lambda_q)
            moved = torch.linalg.vector_norm(new_y - y)
            y = new_y
            if moved < config.tol:
                break
        for _ in range(config.inner_iters):
            new_mode = mode_update(x, mode, y, h)
            moved = torch.linalg.vector_norm(new_mode - mode)
            mode = new_mode
            if moved < config.tol:
                break
    return MTAResult(mode.to(features.dtype), y)


def mta_mode(features: torch.Tensor, probs: torch.Tensor, config: MTAConfig = MTAConfig()) -> torch.Tensor:
    """features: (K,d) L2-normalised view embeddings, row 0 = the original (center-crop) view.
    probs: (K,C) zero-shot class probabilities of the views. Returns the mode (d,) of the
    inlierness-weighted MeanShift, L2-normalised, to be scored against the class text features.

    The mode replaces the mean of the views' embeddings: outlying augmentations (far from
    the mode, or disagreeing with the other views' predictions) get little inlierness and
    barely move it.
    """
    return mta_solve(features, probs, config).mode
