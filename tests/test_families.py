"""Every CLIP family beyond open_clip's classic towers, through the one backbone protocol:
Hugging Face CLIPModel and SiglipModel, open_clip SigLIP (timm trunk with attention
pooling), EVA-CLIP (timm Eva trunk with RoPE) and ConvNeXt CLIP (timm conv trunk).

For each: the traced forward equals the model's own image embedding, the prompt learner's
text features under the initial prompt equal the model's own, zero-shot logits equal the
model's own logits (SigLIP's bias included), every preset runs and leaves the model
bit-identical, results do not depend on the batch, and the adaptive-attack gradient paths
give input gradients. Tiny random-init configurations built here; no downloads.
"""

import copy
import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402  (the [hf] extra, installed by scripts/setup.sh)
from conftest import CLASSNAMES  # noqa: E402
from timm.models import register_model  # noqa: E402

from atpt_plugin import load_adapter  # noqa: E402
from atpt_plugin.augmenters import center_view  # noqa: E402
from atpt_plugin.backbones import detect  # noqa: E402
from atpt_plugin.prompt import PromptLearner  # noqa: E402

PRESETS = ["zeroshot", "tpt", "rtpt", "mta", "atpt", "atpt_official"]
SMALL = dict(views=8, rho=0.25)


def small(name: str):
    """The preset with fewer views (zero-shot keeps its single view)."""
    return load_adapter(name) if name == "zeroshot" else load_adapter(name, **SMALL)


TRUNK = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
TEXT = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
PROMPTS = [f"a photo of a {name}." for name in CLASSNAMES]
WORDS = ["a", "photo", "of", *CLASSNAMES, "."]


@register_model
def atpt_tiny_siglip(pretrained=False, **kwargs):
    """open_clip's ViT-B-16-SigLIP trunk (timm, attention pooling), test-sized."""
    return timm.create_model("vit_base_patch16_siglip_224", pretrained=False, **{**TRUNK, **kwargs})


@register_model
def atpt_tiny_eva(pretrained=False, **kwargs):
    """open_clip's EVA02-B-16 trunk (timm Eva with rotary position embeddings), test-sized."""
    return timm.create_model("eva02_base_patch16_clip_224", pretrained=False, **{**TRUNK, **kwargs})


def word_tokenizer(bos: bool):
    """A real `transformers` tokenizer made offline: word-level vocabulary, BOS/EOS template."""
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}, "<bos>": 98, "<eos>": 99}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model.post_processor = tokenizers.processors.TemplateProcessing(
        single="<bos> $A <eos>" if bos else "$A <eos>", special_tokens=[("<bos>", 98), ("<eos>", 99)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def hf_configs():
    text = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=98,
        eos_token_id=99,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    return text, vision


def make_hf_clip():
    text, vision = hf_configs()
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def make_hf_siglip():
    text, vision = hf_configs()
    model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():  # SigLIP initialises both at 0; make the bias matter
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-1.5)
    return model


def make_open_clip_siglip():
    text = dict(TEXT, context_length=16, no_causal_mask=True, proj_bias=True, pool_type="last")
    vision = dict(
        timm_model_name="atpt_tiny_siglip",
        timm_model_pretrained=False,
        timm_pool="map",
        timm_proj="none",
        image_size=32,
    )
    return open_clip.CustomTextCLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, init_logit_bias=-10)


def make_open_clip_eva():
    vision = dict(
        timm_model_name="atpt_tiny_eva", timm_model_pretrained=False, timm_pool="token", timm_proj=None, image_size=32
    )
    return open_clip.CustomTextCLIP(embed_dim=16, vision_cfg=vision, text_cfg=TEXT)


def make_open_clip_convnext():
    vision = dict(
        timm_model_name="test_convnext", timm_model_pretrained=False, timm_pool="", timm_proj="linear", image_size=64
    )
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=TEXT)


# family -> (model builder, tokenizer builder, image size, backbone kind)
FAMILIES = {
    "hf_clip": (make_hf_clip, lambda: word_tokenizer(bos=True), 32, "vit"),
    "hf_siglip": (make_hf_siglip, lambda: word_tokenizer(bos=False), 32, "vit"),
    "open_clip_siglip": (
        make_open_clip_siglip,
        lambda: open_clip.get_tokenizer("ViT-B-32", context_length=16),
        32,
        "vit",
    ),
    "open_clip_eva": (make_open_clip_eva, lambda: open_clip.get_tokenizer("ViT-B-32"), 32, "vit"),
    "open_clip_convnext": (make_open_clip_convnext, lambda: open_clip.get_tokenizer("ViT-B-32"), 64, "resnet"),
}


def build(family: str, seed: int = 0):
    make, make_tokenizer, size, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = make().eval()
    if not is_hf(model):  # timm's init leaves attention near uniform and embeddings near zero
        with torch.no_grad():
            for param in model.visual.parameters():
                param.add_(0.1 * torch.randn_like(param))
    return model, make_tokenizer(), size


def images(count: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def is_hf(model) -> bool:
    return isinstance(model, transformers.PreTrainedModel)


def reference_ids(model, tokenizer, texts):
    """The ids the model's own users feed it: SigLIP padded to its fixed length."""
    if not is_hf(model):
        return tokenizer(texts)
    if isinstance(model, transformers.SiglipModel):
        return tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt").input_ids
    return tokenizer(texts, padding=True, return_tensors="pt").input_ids


def reference_image(model, x):
    """The model's own (unnormalised) image embedding of normalised images."""
    if is_hf(model):
        return model.get_image_features(pixel_values=x).pooler_output
    return model.encode_image(x)


def reference_text(model, ids):
    if is_hf(model):
        return F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    return model.encode_text(ids, normalize=True)


def reference_logits(model, x, ids):
    if is_hf(model):
        return model(input_ids=ids, pixel_values=x).logits_per_image
    return model.get_logits(x, ids)[0]


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [getattr(m, "fused_attn", None) for m in model.modules()],
        [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
        getattr(getattr(model, "config", None), "_attn_implementation", None),
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]
    assert all(p.grad is None for p in model.parameters())


# the traced forward and the text side against the model's own ------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_detected_backbone_and_traced_forward_equal_the_model(family):
    model, _, size = build(family)
    backbone = detect(model, has_text=True)
    assert backbone.kind == FAMILIES[family][3] and backbone.image_size == size
    x = images(3, size)
    with torch.no_grad():
        expected = reference_image(model, backbone.normalize(x))
    torch.testing.assert_close(backbone.encode_image(x), F.normalize(expected, dim=-1), rtol=0, atol=1e-5)
    if backbone.kind == "resnet":
        pooled, feature_map = backbone.trace_resnet(x)
        assert feature_map.requires_grad and feature_map.dim() == 4
        torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)
        return
    for first in (0, backbone.num_blocks - 1):
        trace = backbone.trace(x, first_block=first)
        torch.testing.assert_close(trace.pooled, expected, rtol=0, atol=1e-5)
        assert len(trace.blocks) == backbone.num_blocks - first and trace.grid_size == (4, 4)
        length = trace.num_prefix_tokens + 16
        assert trace.blocks[-1].attn.shape[-2:] == (length, length)
    if trace.query_weights is not None:  # attention pooling: the probe's attention, rows summing to one
        assert trace.query_weights.shape == (3, length)
        torch.testing.assert_close(trace.query_weights.sum(-1), torch.ones(3))


def test_hf_attention_equals_the_eager_implementation():
    """Probabilities against transformers' own eager attention (on a copy: the user's model keeps SDPA),
    and the SigLIP probe's attention against nn.MultiheadAttention's averaged weights."""
    for family in ("hf_clip", "hf_siglip"):
        model, _, size = build(family)
        backbone = detect(model, has_text=True)
        eager = copy.deepcopy(model)
        eager.vision_model.config._attn_implementation = "eager"
        x = backbone.normalize(images(2, size))
        with torch.no_grad():
            out = eager.vision_model(pixel_values=x, output_attentions=True, output_hidden_states=True)
        trace = backbone.trace(images(2, size))
        for record, expected in zip(trace.blocks, out.attentions):
            torch.testing.assert_close(record.attn, expected, rtol=0, atol=1e-6)
        if family == "hf_siglip":
            head, tokens = model.vision_model.head, out.last_hidden_state
            probe = head.probe.expand(len(tokens), -1, -1)
            _, weights = head.attention(probe, tokens, tokens, need_weights=True, average_attn_weights=True)
            torch.testing.assert_close(trace.query_weights, weights[:, 0], rtol=0, atol=1e-6)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
def test_text_features_and_zero_shot_logits_equal_the_model(family):
    model, tokenizer, size = build(family)
    backbone = detect(model, has_text=True)
    prompt = PromptLearner(backbone, CLASSNAMES, tokenizer, "a photo of a", 4, torch.Generator())
    assert prompt.n_ctx == 4
    ids = reference_ids(model, tokenizer, PROMPTS)
    with torch.no_grad():
        ours = prompt.text_features(prompt.initial_context)
        torch.testing.assert_close(ours, reference_text(model, ids), rtol=0, atol=1e-5)
        x = images(2, size)
        logits = load_adapter("zeroshot").wrap(model, CLASSNAMES, tokenizer)(x)
        expected = reference_logits(model, backbone.normalize(center_view(x, size)), ids)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_a_tensor_returning_tokenizer_works_with_hf_models_too():
    """An open_clip-style tokenizer (a callable returning an id tensor) gives the same prompt."""
    for family in ("hf_clip", "hf_siglip"):
        model, tokenizer, _ = build(family)
        backbone = detect(model, has_text=True)
        plain = functools.partial(_padded_ids, tokenizer)
        ours = [
            PromptLearner(backbone, CLASSNAMES, tok, "a photo of a", 4, torch.Generator()) for tok in (tokenizer, plain)
        ]
        with torch.no_grad():
            torch.testing.assert_close(
                ours[0].text_features(ours[0].initial_context),
                ours[1].text_features(ours[1].initial_context),
                rtol=0,
                atol=0,
            )


def test_siglip_text_keeps_its_padded_length_and_clip_is_cut():
    for family, causal in (("hf_clip", True), ("hf_siglip", False), ("open_clip_siglip", False)):
        model, tokenizer, _ = build(family)
        backbone = detect(model, has_text=True)
        prompt = PromptLearner(backbone, CLASSNAMES, tokenizer, "a photo of a", 4, torch.Generator())
        length = prompt.prefix.shape[1] + prompt.n_ctx + prompt.suffix.shape[1]
        assert backbone.text_causal is causal
        assert (length < 16) if causal else (length == backbone.text_context_length and (prompt.pool == 15).all())


# the presets on every family --------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", FAMILIES)
def test_every_preset_runs_leaves_the_model_unchanged_and_ignores_the_batch(family):
    model, tokenizer, size = build(family)
    model.train()
    before = snapshot(model)
    x = images(2, size)
    for name in PRESETS:
        tta = small(name).wrap(model, CLASSNAMES, tokenizer)
        logits = tta(x)
        assert logits.shape == (2, len(CLASSNAMES)) and torch.isfinite(logits).all(), name
        assert torch.equal(tta(x[1:]), logits[1:]), name
        assert torch.equal(tta(x.flip(0)).flip(0), logits), name
        assert_unchanged(model, before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("path", ["bpda", "exact"])
@pytest.mark.parametrize("family", FAMILIES)
def test_adaptive_attack_gradient_paths(family, path):
    model, tokenizer, size = build(family)
    before = snapshot(model)
    tta = load_adapter("atpt", **SMALL, input_gradient=path).wrap(model, CLASSNAMES, tokenizer)
    x = images(1, size).requires_grad_(True)
    logits = tta(x)
    (grad,) = torch.autograd.grad(logits.logsumexp(-1).sum(), [x])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(logits.detach(), tta(x.detach()), rtol=1e-5, atol=1e-5)
    assert_unchanged(model, before)


# what is refused, and how ------------------------------------------------------------


def test_siglip2_is_refused_clearly():
    text, vision = hf_configs()
    model = transformers.Siglip2Model(transformers.Siglip2Config(text_config=text, vision_config=vision))
    with pytest.raises(NotImplementedError, match="NaFlex patch sequences"):
        load_adapter("zeroshot").wrap(model, CLASSNAMES, word_tokenizer(bos=False))


def test_an_unexplainable_tower_still_runs_the_adapters_without_an_explainer():
    """An open_clip timm trunk no explainer reads (relative-position ViT): A-TPT says what is
    missing; zero-shot, MTA and R-TPT (no maps) still run."""
    vision = dict(
        timm_model_name="test_vit_relpos", timm_model_pretrained=False, timm_pool="", timm_proj="linear", image_size=160
    )
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=TEXT).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with pytest.raises(NotImplementedError, match="outside timm's VisionTransformer.*still run on this model"):
        load_adapter("atpt").wrap(model, CLASSNAMES, tokenizer)
    x = images(1, 160)
    for name in ("zeroshot", "mta", "rtpt"):
        logits = small(name).wrap(model, CLASSNAMES, tokenizer)(x)
        assert logits.shape == (1, len(CLASSNAMES)) and torch.isfinite(logits).all()


def _padded_ids(tokenizer, texts):
    """A plain callable returning ids padded to a fixed length, as a model's own tokenizer pads them."""
    return tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt").input_ids
