import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

from atpt_plugin.augmenters import augmix_ops as A

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rand_images(n=4, size=32, seed=0, dtype=torch.float32):
    """Random images whose values are exact 8-bit levels k / 255."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).to(dtype) / 255


def params(*values):
    return torch.tensor(values, dtype=torch.float64)


def to_uint8(images):
    return (images * 255).round().to(torch.uint8)


def mix(images, seed, **kwargs):
    return A.augmix_pure_mix(images, torch.Generator().manual_seed(seed), **kwargs)


# --- augmix_pure_mix ---------------------------------------------------------------------


def test_same_seed_same_output_and_global_rng_is_not_used():
    images = rand_images()
    torch.manual_seed(1)
    first = mix(images, seed=7)
    torch.manual_seed(2)
    second = mix(images, seed=7)
    assert torch.equal(first, second)


def test_different_seed_different_output():
    images = rand_images()
    assert not torch.equal(mix(images, seed=7), mix(images, seed=8))


def test_each_image_gets_its_own_chains():
    images = rand_images(n=1).expand(2, -1, -1, -1)
    out = mix(images, seed=3)
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_range_device_dtype(device, dtype):
    images = rand_images(n=5, size=24, dtype=dtype).to(device)
    out = mix(images, seed=0, width=4, max_depth=2)
    assert out.shape == images.shape
    assert out.device == images.device and out.dtype == dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_is_deterministic_and_follows_the_cpu_result():
    images = rand_images()
    cuda = mix(images.cuda(), seed=5)
    assert torch.equal(cuda, mix(images.cuda(), seed=5))
    # Same parameters as on the CPU; only float rounding (which can flip an 8-bit level) differs.
    assert (cuda.cpu() - mix(images, seed=5)).abs().mean() < 1e-3


def test_dirichlet_weights_sum_to_one(monkeypatch):
    """With every op made the identity, each chain is the image, so the mix is the image iff sum(w) == 1."""
    monkeypatch.setattr(A, "POINT_OPS", {name: (lambda x, levels, signs: x) for name in A.POINT_OPS})
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    monkeypatch.setattr(
        A,
        "AFFINE_MATRICES",
        {name: (lambda levels, signs, size: identity.repeat(len(levels), 1, 1)) for name in A.AFFINE_MATRICES},
    )
    images = rand_images(n=6)
    for width in (1, 3, 5):
        torch.testing.assert_close(mix(images, seed=width, width=width), images, atol=1e-5, rtol=0)


# --- chain sampling and application ------------------------------------------------------


def test_sample_chain_params():
    ops, levels, signs = A.sample_chain_params(3000, 3, torch.Generator().manual_seed(0))
    assert ops.shape == levels.shape == signs.shape == (3, 3000)
    assert (ops[0] >= 0).all()  # every chain applies at least one op
    assert not ((ops[1:] >= 0) & (ops[:-1] < 0)).any()  # once a chain ends it stays ended
    assert set((ops >= 0).sum(0).tolist()) == {1, 2, 3}
    assert set(ops[ops >= 0].tolist()) == set(range(len(A.AUGMIX_OPS)))
    assert levels.min() >= 0.1 and levels.max() < 1
    assert set(signs.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("name", A.AUGMIX_OPS)
def test_apply_chains_dispatches_each_op_by_index(name):
    images = rand_images(n=3)
    levels, signs = params(0.9, 0.9, 0.9), params(1, -1, 1)
    ops = torch.tensor([[A.AUGMIX_OPS.index(name)] * 2 + [-1]])
    out = A.apply_chains(images, ops, levels[None], signs[None])
    if name in A.POINT_OPS:
        expected = A.POINT_OPS[name](images[:2], levels[:2], signs[:2])
    else:
        expected = A.warp(images[:2], A.AFFINE_MATRICES[name](levels[:2], signs[:2], 32))
    torch.testing.assert_close(out[:2], expected)
    assert torch.equal(out[2], images[2])  # an ended chain is left alone


def test_batched_chains_equal_one_image_at_a_time():
    images = rand_images(n=12)
    ops, levels, signs = A.sample_chain_params(12, 3, torch.Generator().manual_seed(4))
    batched = A.apply_chains(images, ops, levels, signs)
    for i in range(12):
        single = A.apply_chains(images[i : i + 1], ops[:, i : i + 1], levels[:, i : i + 1], signs[:, i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single)


def test_apply_chains_does_not_modify_its_input():
    images = rand_images()
    before = images.clone()
    A.apply_chains(images, *A.sample_chain_params(4, 3, torch.Generator().manual_seed(0)))
    assert torch.equal(images, before)


# --- point ops against per-image references ----------------------------------------------


def test_autocontrast_stretches_each_channel_and_leaves_flat_channels():
    images = rand_images(n=3) * 0.5 + 0.2
    images[1, 2] = 0.4  # a flat channel
    out = A.autocontrast(images, params(0.5, 0.5, 0.5), params(1, 1, 1))
    for i in range(3):
        for c in range(3):
            x = images[i, c]
            lo, hi = x.min(), x.max()
            expected = x if hi == lo else (x - lo) / (hi - lo)
            torch.testing.assert_close(out[i, c], expected)


def test_equalize_matches_pil():
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(3, 3, 32, 32, generator=g) ** 2 * 255).round() / 255  # skewed histograms
    out = A.equalize(images, params(0.5, 0.5, 0.5), params(1, 1, 1))
    for i in range(3):
        pil = Image.fromarray(to_uint8(images[i]).permute(1, 2, 0).numpy())
        expected = torch.from_numpy(np.array(ImageOps.equalize(pil))).permute(2, 0, 1)
        assert torch.equal(to_uint8(out[i]), expected)


@pytest.mark.parametrize(("level", "mask"), [(0.1, 0xF0), (0.99, 0xF0), (2.5, 0xE0), (5.0, 0xC0), (7.5, 0x80)])
def test_posterize_keeps_top_bits(level, mask):
    # bits = 4 - int(level * 4 / 10): 4 for every severity-1 level, fewer for larger levels.
    images = rand_images(n=2)
    out = A.posterize(images, params(level, level), params(1, 1))
    for i in range(2):
        assert torch.equal(to_uint8(out[i]), to_uint8(images[i]) & mask)


@pytest.mark.parametrize(("level", "threshold"), [(0.05, 255), (0.5, 244), (1.0, 231), (5.0, 128), (0.01, 256)])
def test_solarize_inverts_at_or_above_threshold(level, threshold):
    images = rand_images(n=2)
    images[0, 0, 0, :2] = torch.tensor([threshold - 1, min(threshold, 255)]) / 255  # values at the edge
    out = A.solarize(images, params(level, level), params(1, 1))
    for i in range(2):
        q = to_uint8(images[i]).int()
        expected = torch.where(q >= threshold, 255 - q, q)
        assert torch.equal(to_uint8(out[i]).int(), expected)


# --- geometric ops -----------------------------------------------------------------------


def geometric(name, images, level, sign):
    n = len(images)
    return A.warp(images, A.AFFINE_MATRICES[name](params(*[level] * n), params(*[sign] * n), images.shape[-1]))


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("axis", ["x", "y"])
def test_translate_integer_pixels_is_a_zero_filled_roll(axis, sign):
    size = 30  # maxval S / 3 = 10, so level 3 means int(3 * 10 / 10) = 3 pixels
    images = rand_images(n=2, size=size)
    out = geometric(f"translate_{axis}", images, 3.0, sign)
    dim = -1 if axis == "x" else -2
    expected = torch.roll(images, -3 * sign, dims=dim)  # output(x) = input(x + 3 * sign)
    vacated = slice(size - 3, size) if sign == 1 else slice(0, 3)
    if axis == "x":
        expected[..., vacated] = 0
    else:
        expected[..., vacated, :] = 0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["rotate", "shear_x", "shear_y", "translate_x", "translate_y"])
def test_zero_amount_is_identity(name):
    images = rand_images(n=2)
    torch.testing.assert_close(geometric(name, images, 0.0, 1), images, atol=1e-5, rtol=0)


def test_severity_one_rotation_is_at_most_three_degrees():
    images = rand_images(n=1)
    # int(level * 30 / 10) is 1 degree for level 0.5 and 0 below 1/3.
    torch.testing.assert_close(geometric("rotate", images, 0.3, 1), images, atol=1e-5, rtol=0)
    torch.testing.assert_close(geometric("rotate", images, 0.5, 1), geometric("rotate", images, 0.4, 1))
    assert not torch.allclose(geometric("rotate", images, 0.5, 1), images, atol=1e-2)


def test_rotate_is_counter_clockwise():
    images = rand_images(n=2)
    # level 30 gives int(30 * 30 / 10) = 90 degrees; the image is square, so nothing is lost.
    out = geometric("rotate", images, 30.0, 1)
    torch.testing.assert_close(out, torch.rot90(images, 1, dims=(-2, -1)), atol=1e-5, rtol=0)


def centred_blob(size=48, margin=12):
    """A smooth image with a black border wide enough that no op moves content off the canvas,
    so PIL's and grid_sample's edge handling cannot differ."""
    rng = np.random.default_rng(0)
    inner = Image.fromarray(rng.integers(0, 256, (size - 2 * margin,) * 2 + (3,), dtype=np.uint8))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(inner.filter(ImageFilter.GaussianBlur(1.5)), (margin, margin))
    return canvas


def pil_reference(name, image, amount):
    if name == "rotate":
        return image.rotate(amount, resample=Image.BILINEAR)
    coefficients = {
        "shear_x": (1, amount, 0, 0, 1, 0),
        "shear_y": (1, 0, 0, amount, 1, 0),
        "translate_x": (1, 0, amount, 0, 1, 0),
        "translate_y": (1, 0, 0, 0, 1, amount),
    }[name]
    return image.transform(image.size, Image.AFFINE, coefficients, resample=Image.BILINEAR)


# (name, level, PIL amount for sign +1): rotate 30 degrees, shear 0.3, translate int(5 * 16 / 10) = 8 px.
@pytest.mark.parametrize(
    ("name", "level", "amount"),
    [
        ("rotate", 10.0001, 30),
        ("shear_x", 10.0, 0.3),
        ("shear_y", 10.0, 0.3),
        ("translate_x", 5.0, 8),
        ("translate_y", 5.0, 8),
    ],
)
@pytest.mark.parametrize("sign", [1, -1])
def test_geometric_ops_follow_pil_conventions(name, level, amount, sign):
    image = centred_blob()
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    out = to_uint8(geometric(name, tensor, level, sign)[0]).permute(1, 2, 0).int()
    expected = torch.from_numpy(np.array(pil_reference(name, image, amount * sign))).int()
    assert (out - expected).abs().max() <= 1  # PIL rounds its bilinear result to 8 bits
