"""Base crops, attention masks and the pixel-wise mix."""

import math

import numpy as np
import pytest
import torch

from atpt_plugin.augmenters import AttentionMixAugmenter, AugMixAugmenter, center_view
from atpt_plugin.augmenters.crops import (
    center_boxes,
    crop_views,
    random_resized_boxes,
    resize_shorter_side,
    resized_crops,
)
from atpt_plugin.augmenters.mixing import mix, quantile_regions, top_k_mask, upsample_maps


def test_full_box_crop_is_identity_and_flip_mirrors():
    image = torch.rand(3, 16, 16)
    boxes = center_boxes(2, 16, 16)
    views = crop_views(image, boxes, torch.tensor([False, True]), 16)
    torch.testing.assert_close(views[0], image)
    torch.testing.assert_close(views[1], image.flip(-1))


def test_crop_of_a_box_matches_slicing():
    image = torch.rand(3, 20, 20)
    box = torch.tensor([[4.0, 6.0, 10.0, 10.0]])  # top, left, h, w; output 10x10: no resampling
    view = crop_views(image, box, torch.tensor([False]), 10)[0]
    torch.testing.assert_close(view, image[:, 4:14, 6:16])


def test_random_resized_boxes_are_inside_and_seeded():
    boxes = random_resized_boxes(500, 30, 40, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.t()
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= 30).all() and (left + w <= 40).all()
    area = h * w / (30 * 40)
    assert area.min() >= 0.05 and area.max() <= 1.0 and area.std() > 0.1
    assert torch.equal(boxes, random_resized_boxes(500, 30, 40, torch.Generator().manual_seed(0)))
    ratio = w / h  # aspect ratios drawn log-uniformly in [3/4, 4/3], up to rounding to whole pixels
    assert ratio.min() < 0.85 and ratio.max() > 1.2 and (ratio > 0.6).all() and (ratio < 1.7).all()


@pytest.mark.parametrize("height, width, box", [(2, 100, [0, 48, 2, 3]), (100, 2, [48, 0, 3, 2])])
def test_random_resized_boxes_fall_back_to_the_central_crop_at_the_clamped_ratio(height, width, box):
    """No candidate fits a 2-pixel-thin image: torchvision's central crop with the ratio clamped to 4/3."""
    boxes = random_resized_boxes(5, height, width, torch.Generator().manual_seed(0))
    assert boxes.tolist() == [box] * 5


def pil_crops(pixels, boxes, flips, size):
    """The authors' base views: PIL crop, resize (bilinear, antialiased by PIL), mirror; in [0,1]."""
    from PIL import Image

    image, views = Image.fromarray(pixels.numpy()), []
    for (top, left, height, width), flip in zip(boxes.long().tolist(), flips.tolist()):
        view = image.crop((left, top, left + width, top + height)).resize((size, size), Image.BILINEAR)
        view = view.transpose(Image.FLIP_LEFT_RIGHT) if flip else view
        views.append(torch.tensor(np.array(view)).permute(2, 0, 1).float() / 255)
    return torch.stack(views)


def test_crops_of_the_original_image_match_pil():
    """A 400x300 photo of uniform noise (the worst case for resampling): every crop within one
    8-bit level of PIL's. PIL resamples in two separable passes and rounds to 8 bits after
    each (<= 0.5 level each); ours stays in floats. Without antialiasing it is far off."""
    pixels = torch.randint(0, 256, (300, 400, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image = pixels.permute(2, 0, 1).float() / 255
    augmenter = AugMixAugmenter("random_resized", crop_source="original")
    boxes, flips = augmenter.crop_boxes(image.shape[-2:], 12, torch.Generator().manual_seed(1))
    assert (boxes[:, 2] > 224).any() and (boxes[:, 3] > 224).any() and flips.any() and not flips.all()
    reference = pil_crops(pixels, boxes, flips, 224)
    ours = resized_crops(image, boxes, flips, 224)
    assert (ours - reference).abs().max() <= 1 / 255 + 1e-6
    aliased = crop_views(image, boxes, flips, 224)
    assert (aliased - reference).abs().max() > 50 / 255


def test_bases_crop_the_original_or_the_resized_image():
    image = torch.rand(3, 300, 400, generator=torch.Generator().manual_seed(2))
    for source in ("original", "resized"):
        augmenter = AugMixAugmenter("random_resized", crop_source=source)
        bases = augmenter.bases(image, 6, torch.Generator().manual_seed(3), 32)
        if source == "original":  # boxes drawn on the 300x400 image itself
            expected = resized_crops(image, *augmenter.crop_boxes((300, 400), 6, torch.Generator().manual_seed(3)), 32)
        else:  # boxes drawn on the image resized to 32x42
            resized = resize_shorter_side(image, 32)
            expected = crop_views(resized, *augmenter.crop_boxes((32, 42), 6, torch.Generator().manual_seed(3)), 32)
        assert torch.equal(bases, expected)


@pytest.mark.parametrize("height, width", [(40, 60), (75, 30)])
def test_center_view_is_resize_then_center_crop(height, width):
    """Pixels against torchvision's Resize (shorter side, bicubic, antialias) + CenterCrop, as
    open_clip preprocesses; a squashed or uncropped view differs on a non-square image."""
    from torchvision import transforms

    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(height))
    reference = transforms.Compose(
        [
            transforms.Resize(20, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(20),
        ]
    )
    torch.testing.assert_close(center_view(image, 20), reference(image).clamp(0, 1))
    square = torch.rand(3, 20, 20)
    assert torch.equal(center_view(square, 20), square), "an image at the model's size is untouched"


@pytest.mark.parametrize("fraction, size", [(0.2, 224), (0.2, 32), (0.33, 7), (0.5, 10)])
def test_top_k_mask_area_is_exactly_ceil(fraction, size):
    maps = torch.rand(5, size, size)
    mask = top_k_mask(maps, fraction)
    assert (mask.flatten(1).sum(1) == math.ceil(fraction * size * size)).all()
    threshold = maps.flatten(1).masked_fill(~mask.flatten(1), float("inf")).min(1).values
    rest = maps.flatten(1).masked_fill(mask.flatten(1), float("-inf")).max(1).values
    assert (threshold >= rest).all(), "every selected position outranks every other"


def test_top_k_mask_breaks_ties_by_lowest_index():
    """torch.topk(sorted=False) picked [12, 14, 13, 15, 11] of zeros(20); the rule here is fixed."""
    assert top_k_mask(torch.zeros(1, 4, 5), 0.25).flatten().nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    maps = torch.tensor(
        [
            [[0.5, 0.9, 0.5], [0.5, 0.1, 0.5]],  # 2 of 6: 0.9, then the first 0.5
            [[0.2, 0.2, 0.2], [0.7, 0.7, 0.7]],
        ]
    )  # 2 of 6: the first two 0.7s
    expected = torch.tensor(
        [[[True, True, False], [False, False, False]], [[False, False, False], [True, True, False]]]
    )
    assert torch.equal(top_k_mask(maps, 0.3), expected)


def test_quantile_regions_default_has_no_middle():
    maps = torch.rand(3, 16, 16)
    high, low = quantile_regions(maps, 0.2, 0.8)
    assert not (high & low).any() and (high | low).all()
    high, low = quantile_regions(maps, 0.2, 0.5)
    middle = ~(high | low)
    assert middle.flatten(1).float().mean(1).sub(0.3).abs().max() < 0.02


def test_mix_formula():
    base, augmented = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    lam = torch.rand(2, 4, 4)
    expected = (1 - lam[:, None]) * base + lam[:, None] * augmented
    torch.testing.assert_close(mix(base, augmented, lam), expected)
    scalar = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(mix(base, augmented, scalar), torch.stack([base[0], augmented[1]]))


def test_attention_mix_weights_follow_the_mask():
    augmenter = AttentionMixAugmenter(r=0.25, m_high=0.2, m_low=0.8)
    maps = torch.rand(3, 4, 4)
    lam = augmenter.mixing_weights(torch.rand(3, 3, 16, 16), maps, torch.Generator())
    high = top_k_mask(upsample_maps(maps, 16), 0.25)
    assert torch.equal(lam == 0.2, high) and torch.equal(lam == 0.8, ~high)


def test_views_are_seeded_and_on_device():
    image = torch.rand(3, 24, 24)
    augmenter = AugMixAugmenter()
    first = augmenter.views(
        augmenter.bases(image, 5, torch.Generator().manual_seed(1), 16), None, torch.Generator().manual_seed(2)
    )
    again = augmenter.views(
        augmenter.bases(image, 5, torch.Generator().manual_seed(1), 16), None, torch.Generator().manual_seed(2)
    )
    assert first.shape == (5, 3, 16, 16) and torch.equal(first, again)
    assert first.min() >= 0 and first.max() <= 1


def test_crop_only_convention_returns_bases():
    augmenter = AugMixAugmenter(augmix_ops=False)
    bases = augmenter.bases(torch.rand(3, 16, 16), 4, torch.Generator(), 16)
    assert augmenter.views(bases, None, torch.Generator()) is bases
    assert not AttentionMixAugmenter(augmix_ops=False).needs_maps
