"""The traced forward and the prompt learner reproduce open_clip's own outputs."""

import pytest
import torch
from conftest import CLASSNAMES

from atpt_plugin.backbones.openclip import OpenClipBackbone
from atpt_plugin.prompt import PromptLearner, check_classnames


def test_vit_trace_matches_model(tiny_vit, images):
    backbone = OpenClipBackbone(tiny_vit)
    for first in (0, 1, 2):
        trace = backbone.trace(images, first_block=first)
        expected = tiny_vit.encode_image(backbone.normalize(images))
        torch.testing.assert_close(trace.pooled, expected, rtol=1e-5, atol=1e-6)
        assert len(trace.blocks) == 3 - first
    probs = trace.blocks[-1].attn
    assert probs.shape == (3, 2, 17, 17)  # 2 heads, 1 + 4x4 tokens
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, 17))


def test_resnet_trace_matches_model(tiny_resnet):
    backbone = OpenClipBackbone(tiny_resnet)
    x = torch.rand(2, 3, 64, 64)
    pooled, feature_map = backbone.trace_resnet(x)
    torch.testing.assert_close(pooled, tiny_resnet.encode_image(backbone.normalize(x)), rtol=1e-5, atol=1e-6)
    assert feature_map.shape[-2:] == (2, 2)


def test_not_a_clip_model_is_rejected():
    with pytest.raises(TypeError, match="expected an open_clip CLIP model"):
        OpenClipBackbone(torch.nn.Linear(3, 3))


def test_prompt_features_equal_encode_text(tiny_vit, tokenizer):
    """Cutting the causal sequence after the last EOT changes nothing."""
    backbone = OpenClipBackbone(tiny_vit)
    prompt = PromptLearner(backbone, CLASSNAMES, tokenizer, "a photo of a", 4, torch.Generator())
    with torch.no_grad():
        ours = prompt.text_features(prompt.initial_context)
        reference = tiny_vit.encode_text(tokenizer([f"a photo of a {c}." for c in CLASSNAMES]), normalize=True)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert prompt.prefix.shape[1] + prompt.n_ctx + prompt.suffix.shape[1] < 77


def test_random_context_has_n_ctx_tokens(tiny_vit, tokenizer):
    prompt = PromptLearner(OpenClipBackbone(tiny_vit), CLASSNAMES, tokenizer, None, 6, torch.Generator().manual_seed(0))
    assert prompt.initial_context.shape == (6, 32)
    assert prompt.text_features(prompt.initial_context).shape == (4, 32)


def test_context_gradient_only(tiny_vit, tokenizer):
    prompt = PromptLearner(OpenClipBackbone(tiny_vit), CLASSNAMES, tokenizer, "a photo of a", 4, torch.Generator())
    context = prompt.initial_context.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(prompt.text_features(context).sum(), [context])
    assert grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_vit.parameters())


@pytest.mark.parametrize(
    "names, message",
    [
        ([], "non-empty list"),
        ("cat", "non-empty list"),
        (["cat", "Cat "], "duplicate class names"),
        (["cat", ""], "non-empty strings"),
    ],
)
def test_bad_classnames(names, message):
    with pytest.raises(ValueError, match=message):
        check_classnames(names)


def test_prompt_too_long_for_context(tiny_vit, tokenizer):
    long_name = " ".join(["word"] * 80)
    with pytest.raises(ValueError, match="needs .* tokens"):
        PromptLearner(OpenClipBackbone(tiny_vit), ["cat", long_name], tokenizer, "a photo of a", 4, torch.Generator())


def test_tokenizer_longer_than_model(tiny_vit):
    import open_clip

    with pytest.raises(ValueError, match="exceeds the text model"):
        PromptLearner(
            OpenClipBackbone(tiny_vit),
            CLASSNAMES,
            open_clip.get_tokenizer("ViT-B-32", context_length=100),
            "a photo of a",
            4,
            torch.Generator(),
        )
