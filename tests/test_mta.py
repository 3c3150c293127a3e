"""MTA updates against plain per-view loops, and properties of the solved mode."""

import math
from dataclasses import replace

import pytest
import torch

from atpt_plugin.mta import (
    MTAConfig,
    affinity,
    bandwidth,
    gaussian_kernel,
    inlierness_update,
    mode_update,
    mta_mode,
    mta_solve,
)

CONVERGED = MTAConfig(outer_iters=300, inner_iters=300, tol=1e-13)


def make_views(num_views=16, dim=32, num_classes=10, outliers=3, seed=0, dtype=torch.float64):
    """A tight cluster of augmented views around the original, plus a few stray views."""
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(dim, generator=g, dtype=dtype)
    x = center + 0.4 * torch.randn(num_views, dim, generator=g, dtype=dtype)
    if outliers:
        x[-outliers:] = 2.0 * torch.randn(outliers, dim, generator=g, dtype=dtype)
    x = x / x.norm(dim=1, keepdim=True)
    text = torch.randn(num_classes, dim, generator=g, dtype=dtype)
    text = text / text.norm(dim=1, keepdim=True)
    probs = torch.softmax(100.0 * x @ text.T, dim=1)
    return x, probs


# ---- plain references: explicit Python loops over views --------------------------------


def ref_bandwidth(x, fraction):
    n = len(x)
    k = max(1, int(fraction * (n - 1)))
    out = []
    for i in range(n):
        sq = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in range(n) if j != i)
        out.append(math.sqrt(0.5 * sum(sq[:k]) / k))
    return torch.tensor(out, dtype=x.dtype)


def ref_kernel(x, m, h):
    return torch.tensor(
        [math.exp(-float(((x[i] - m) ** 2).sum()) / (2 * float(h[i]) ** 2)) for i in range(len(x))], dtype=x.dtype
    )


def ref_inlierness(y, kernel, probs, lambda_y, lambda_q):
    n = len(y)
    scores = []
    for i in range(n):
        agreement = 0.0
        for j in range(n):
            w_ij = float((probs[i] * probs[j]).sum())
            agreement += w_ij * float(y[j])
        scores.append((float(kernel[i]) + lambda_q * agreement) / lambda_y)
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    return torch.tensor([e / sum(exps) for e in exps], dtype=y.dtype)


def ref_mode(x, m, y, h):
    kernel = ref_kernel(x, m, h)
    num = torch.zeros_like(m)
    den = 0.0
    for i in range(len(x)):
        weight = float(y[i]) * float(kernel[i])
        num = num + weight * x[i]
        den += weight
    shifted = num / den
    return shifted / shifted.norm()


def ref_mta(x, probs, cfg):
    h = ref_bandwidth(x, cfg.neighbour_fraction)
    y = torch.full((len(x),), 1.0 / len(x), dtype=x.dtype)
    m = x[0].clone()
    for _ in range(cfg.outer_iters):
        kernel = ref_kernel(x, m, h)
        for _ in range(cfg.inner_iters):
            new = ref_inlierness(y, kernel, probs, cfg.lambda_y, cfg.lambda_q)
            done = float((new - y).norm()) < cfg.tol
            y = new
            if done:
                break
        for _ in range(cfg.inner_iters):
            new = ref_mode(x, m, y, h)
            done = float((new - m).norm()) < cfg.tol
            m = new
            if done:
                break
    return m, y


# ---- each update against its reference -------------------------------------------------


def test_published_defaults():
    cfg = MTAConfig()
    assert (cfg.lambda_y, cfg.lambda_q, cfg.neighbour_fraction) == (0.2, 4.0, 0.3)
    assert (cfg.outer_iters, cfg.inner_iters, cfg.tol) == (5, 5, 1e-6)


@pytest.mark.parametrize("num_views, fraction", [(64, 0.3), (16, 0.3), (3, 0.3), (10, 1.0)])
def test_bandwidth_matches_loop_reference(num_views, fraction):
    x, _ = make_views(num_views=num_views, outliers=min(3, num_views - 2), seed=1)
    torch.testing.assert_close(bandwidth(x, fraction), ref_bandwidth(x, fraction))


def test_gaussian_kernel_matches_loop_reference():
    x, _ = make_views(seed=2)
    h = ref_bandwidth(x, 0.3)
    m = x[3] + 0.1 * x[5]
    m = m / m.norm()
    kernel = gaussian_kernel(x, m, h)
    torch.testing.assert_close(kernel, ref_kernel(x, m, h))
    assert not torch.allclose(kernel, torch.ones_like(kernel))  # a non-trivial case


def test_inlierness_update_matches_loop_reference():
    x, probs = make_views(seed=3)
    g = torch.Generator().manual_seed(3)
    y = torch.rand(len(x), generator=g, dtype=x.dtype)
    y = y / y.sum()
    kernel = ref_kernel(x, x[0], ref_bandwidth(x, 0.3))
    got = inlierness_update(y, kernel, affinity(probs), 0.2, 4.0)
    torch.testing.assert_close(got, ref_inlierness(y, kernel, probs, 0.2, 4.0))


def test_mode_update_matches_loop_reference():
    x, _ = make_views(seed=4)
    g = torch.Generator().manual_seed(4)
    y = torch.softmax(torch.randn(len(x), generator=g, dtype=x.dtype), dim=0)
    h = ref_bandwidth(x, 0.3)
    got = mode_update(x, x[0], y, h)
    torch.testing.assert_close(got, ref_mode(x, x[0], y, h))
    assert not torch.allclose(got, x[0])


@pytest.mark.parametrize(
    "cfg",
    [
        MTAConfig(),
        MTAConfig(outer_iters=2, inner_iters=1),
        MTAConfig(lambda_y=1.0, lambda_q=0.5, neighbour_fraction=0.5),
    ],
)
def test_solver_matches_loop_reference(cfg):
    x, probs = make_views(seed=5)
    mode, y = mta_solve(x, probs, cfg)
    ref_m, ref_y = ref_mta(x, probs, cfg)
    torch.testing.assert_close(mode, ref_m)
    torch.testing.assert_close(y, ref_y)


# ---- properties of the solution ---------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 6, 7])
def test_converged_mode_is_a_fixed_point(seed):
    x, probs = make_views(seed=seed)
    mode, y = mta_solve(x, probs, CONVERGED)
    h = bandwidth(x, CONVERGED.neighbour_fraction)
    assert torch.linalg.vector_norm(mode_update(x, mode, y, h) - mode) < 1e-5
    torch.testing.assert_close(mode.norm(), torch.tensor(1.0, dtype=mode.dtype))


@pytest.mark.parametrize("cfg", [MTAConfig(), MTAConfig(outer_iters=1, inner_iters=1)])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_mode_is_invariant_to_permuting_augmented_views(dtype, atol, cfg):
    x, probs = make_views(num_views=24, seed=8, dtype=dtype)
    shuffled = 1 + torch.randperm(23, generator=torch.Generator().manual_seed(8))
    perm = torch.cat([torch.zeros(1, dtype=torch.long), shuffled])
    assert not torch.equal(perm, torch.arange(24))
    torch.testing.assert_close(mta_mode(x[perm], probs[perm], cfg), mta_mode(x, probs, cfg), atol=atol, rtol=0)


def test_mode_depends_on_which_view_is_the_original():
    # the mode starts at row 0, so moving an outlier there must change the result
    x, probs = make_views(num_views=24, seed=8)
    swap = torch.arange(24)
    swap[0], swap[-1] = 23, 0
    assert not torch.allclose(mta_mode(x[swap], probs[swap]), mta_mode(x, probs), atol=1e-4)


def test_identical_views_give_that_view():
    x, probs = make_views(seed=9)
    same = x[2].expand(12, -1).clone()
    # the views' predictions may still disagree; the mode cannot leave the single point
    mode = mta_mode(same, probs[:12])
    torch.testing.assert_close(mode, x[2], atol=1e-12, rtol=0)
    mode32 = mta_mode(same.float(), probs[:12].float())
    torch.testing.assert_close(mode32, x[2].float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("cfg", [MTAConfig(), MTAConfig(outer_iters=40, inner_iters=40), MTAConfig(lambda_y=0.01)])
@pytest.mark.parametrize("seed", [0, 10])
def test_inlierness_is_on_the_simplex(cfg, seed):
    x, probs = make_views(num_views=32, seed=seed, dtype=torch.float32)
    _, y = mta_solve(x, probs, cfg)
    assert y.shape == (32,)
    assert torch.all(y >= 0)
    torch.testing.assert_close(y.sum(), torch.tensor(1.0), atol=1e-6, rtol=0)


def test_stray_views_are_downweighted():
    x, probs = make_views(num_views=32, outliers=6, seed=11)
    mode, y = mta_solve(x, probs)
    assert y[-6:].max() < y[:-6].mean()
    inlier_center = x[:-6].mean(0)
    inlier_center = inlier_center / inlier_center.norm()
    # the mode stays with the cluster: closer to its centre than to any stray view
    assert mode @ inlier_center > (x[-6:] @ mode).max()


def test_half_precision_input_returns_unit_mode_in_same_dtype():
    x, probs = make_views(seed=12, dtype=torch.float16)
    mode = mta_mode(x, probs)
    assert mode.dtype == torch.float16 and mode.shape == (x.shape[1],)
    assert abs(float(mode.float().norm()) - 1.0) < 1e-3
    torch.testing.assert_close(mode.float(), mta_mode(x.float(), probs.float()), atol=2e-3, rtol=0)


def test_rejects_bad_shapes_and_settings():
    x, probs = make_views(seed=13)
    with pytest.raises(ValueError):
        mta_mode(x[:1], probs[:1])
    with pytest.raises(ValueError):
        mta_mode(x, probs[:-1])
    with pytest.raises(ValueError):
        replace(MTAConfig(), lambda_y=0.0)
