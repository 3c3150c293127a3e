"""Input quantisation: the authors' uint8 round trip of adversarial images (docs/method.md §9.6)."""

import numpy as np
import torch
from conftest import CLASSNAMES
from torchvision.transforms import functional as TF

from atpt_plugin import load_adapter
from atpt_plugin.inputs import quantize_images


def test_uint8_floor_truncates():
    levels = torch.tensor([0.0, 0.5, 0.999, 1.0, 1.5, 3.9999, 254.9, 255.0]) / 255
    expected = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 3.0, 254.0, 255.0]) / 255
    assert torch.equal(quantize_images(levels, "uint8_floor"), expected)
    assert quantize_images(levels, None) is levels


def test_uint8_floor_is_the_authors_pil_round_trip():
    """ToPILImage (what the authors' code calls on the adversarial image), then ToTensor."""
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    round_trip = torch.tensor(np.array(TF.to_pil_image(image))).permute(2, 0, 1).float() / 255
    assert torch.equal(quantize_images(image[None], "uint8_floor")[0], round_trip)


def test_images_on_the_grid_keep_their_level():
    """Clean 8-bit images pass unchanged: k / 255 in fp32 however it was made maps to level k
    (written as k / 255: k * (1 / 255) can differ from it in the last bit)."""
    k = torch.arange(256)
    canonical = k.float() / 255
    for on_grid in (
        canonical,
        k.float() * (1 / 255),
        torch.from_numpy(k.numpy() / 255.0).float(),
        TF.to_tensor(k.to(torch.uint8).numpy().reshape(16, 16, 1))[0].flatten(),
    ):
        assert torch.equal(quantize_images(on_grid, "uint8_floor"), canonical)


def test_gradient_passes_straight_through():
    image = torch.rand(1, 3, 4, 4, requires_grad=True)
    weights = torch.randn(1, 3, 4, 4)
    (grad,) = torch.autograd.grad((quantize_images(image, "uint8_floor") * weights).sum(), image)
    assert torch.equal(grad, weights)


def test_adapter_makes_every_view_from_the_quantised_image(tiny_vit, tokenizer):
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(4))
    quantised = quantize_images(image, "uint8_floor")
    adapter = load_adapter("atpt", views=4, input_quantization="uint8_floor").wrap(tiny_vit, CLASSNAMES, tokenizer)
    plain = load_adapter("atpt", views=4).wrap(tiny_vit, CLASSNAMES, tokenizer)
    generator = adapter.generator_for(image)
    views = adapter.make_views(image, generator)
    assert torch.equal(views, plain.make_views(quantised, adapter.generator_for(image)))
    assert torch.equal(views[0], quantised), "view 0 (the center crop at the model size) is the quantised image"
