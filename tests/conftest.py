"""Tiny random-init open_clip models: every test runs offline in seconds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

TEXT_CFG = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
CLASSNAMES = ["cat", "dog", "car", "ship"]


def make_tiny_vit(seed: int = 0, layers: int = 3) -> open_clip.CLIP:
    torch.manual_seed(seed)
    vision = dict(image_size=32, patch_size=8, width=32, layers=layers, head_width=16)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=TEXT_CFG).eval()


def make_tiny_resnet(seed: int = 0) -> open_clip.CLIP:
    torch.manual_seed(seed)
    vision = dict(image_size=64, layers=[1, 1, 1, 1], width=16, head_width=16)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=TEXT_CFG).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture
def tiny_vit():
    return make_tiny_vit()


@pytest.fixture
def tiny_resnet():
    return make_tiny_resnet()


@pytest.fixture
def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def one_thread():
    """For tests that run several processes or heavy attacks: on two shared cores, one
    thread each is far faster than two fighting threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
