"""timm models: the traced ViT against timm's own forward, rollouts against references built
from attention captured on timm's unfused path, Grad-CAM on conv nets, and test-time
adaptation of a timm classifier (runs, resets, leaves the model as it was).

Tiny random-init models only (no downloads). Their weights are perturbed beyond timm's
init (which makes attention and logits almost uniform) so the maps have structure.
"""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import ResPostBlock  # noqa: E402

from atpt_plugin import Adapter, presets  # noqa: E402
from atpt_plugin import adapter as adapter_module  # noqa: E402  (a module: pytest would collect Test* names)
from atpt_plugin.backbones.timm_cnn import TimmCnnBackbone  # noqa: E402
from atpt_plugin.backbones.timm_common import timm_backbone, top1_class_score  # noqa: E402
from atpt_plugin.backbones.timm_vit import TimmVitBackbone  # noqa: E402
from atpt_plugin.classifier import ClassifierTestTimeAdapter, norm_parameters, wrap_classifier  # noqa: E402
from atpt_plugin.config import AdapterConfig  # noqa: E402
from atpt_plugin.explainers import build_explainer, clip_and_rescale  # noqa: E402
from atpt_plugin.objectives import OBJECTIVES, select_confident  # noqa: E402

TINY = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
VARIANTS = {  # the four: class token, distillation token, registers, average pooling
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 4}),
    "avg_pool": ("vit_tiny_patch16_224", {"global_pool": "avg"}),
}
MORE_VARIANTS = {  # further options of the family the trace must reproduce
    "avgmax_no_class_token": ("vit_tiny_patch16_224", dict(global_pool="avgmax", class_token=False)),
    "max_with_prefix": ("vit_tiny_patch16_224", dict(global_pool="max", reg_tokens=2, pool_include_prefix=True)),
    "deit3_style": (
        "vit_tiny_patch16_224",
        dict(init_values=0.1, no_embed_class=True, qk_norm=True, pre_norm=True, reg_tokens=1),
    ),
    "post_norm": ("vit_tiny_patch16_224", dict(block_fn=ResPostBlock, init_values=0.5)),
    "dynamic": ("vit_tiny_patch16_224", dict(dynamic_img_size=True)),
    "siglip_map": ("vit_tiny_patch16_224", dict(global_pool="map", class_token=False)),
    "map_with_prefix": ("vit_tiny_patch16_224", dict(global_pool="map", reg_tokens=2, pool_include_prefix=True)),
    "eva02_rope": ("eva02_tiny_patch14_224", {}),
    "eva02_rope_map": ("eva02_tiny_patch14_224", dict(global_pool="map", init_values=0.1)),
    "eva_post_norm": ("eva02_tiny_patch14_224", dict(use_post_norm=True, global_pool="token")),
    "eva_separate_qkv": ("eva02_tiny_patch14_224", dict(qkv_fused=False, class_token=False, num_reg_tokens=1)),
}
EXPLAINERS = ("token_grad_rollout", "grad_rollout", "attention_rollout")


def perturb(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn_like(param))
    return model.eval()


def make_vit(variant: str, seed: int = 0) -> torch.nn.Module:
    name, extra = {**VARIANTS, **MORE_VARIANTS}[variant]
    torch.manual_seed(seed)
    return perturb(timm.create_model(name, **TINY, **extra))


def make_cnn(name: str = "test_resnet", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return perturb(timm.create_model(name, pretrained=False, num_classes=5), 0.05)


def images(count: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def query_rows(variant: str, relevance: torch.Tensor, prefix: int, pool_attention=None) -> torch.Tensor:
    """The relevance row(s) the pooled output reads, written out per model (attention pooling:
    the pool query's attention over the patch tokens, mean over heads, times their rows)."""
    if pool_attention is not None:
        return torch.einsum("nl,nlk->nk", pool_attention.mean(dim=1)[:, 0], relevance[:, prefix:])
    if variant == "deit_distilled":
        return 0.5 * (relevance[:, 0] + relevance[:, 1])
    if variant == "avg_pool":
        return relevance[:, prefix:].mean(dim=1)
    return relevance[:, 0]


def unfused_capture(model, x):
    """Logits, attention probabilities and attention inputs from timm's own unfused path.

    A deep copy gets `fused_attn = False`; forward hooks on `attn_drop` keep the
    probabilities and pre-hooks on `attn` the tokens it reads, both with gradients of
    the score S = sum of top-1 logits.
    """
    reference = copy.deepcopy(model)
    probs, reads, pool = [], [], {}

    def keep(store):
        def hook(tensor):
            tensor.retain_grad()
            store.append(tensor)

        return hook

    for block in reference.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, i, out: keep(probs)(out))
        block.attn.register_forward_pre_hook(lambda m, args: keep(reads)(args[0]))
    if reference.attn_pool is not None:  # its latent query and keys, from timm's own layers
        reference.attn_pool.q.register_forward_hook(lambda m, i, out: pool.update(q=out))
        reference.attn_pool.kv.register_forward_hook(lambda m, i, out: pool.update(kv=out))
    logits = reference(x)
    logits.max(dim=-1).values.sum().backward()
    pool_attention = None
    if pool:
        heads = reference.attn_pool.num_heads
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
        keys = split(pool["kv"].chunk(2, dim=-1)[0])
        pool_attention = ((split(pool["q"]) * reference.attn_pool.scale) @ keys.transpose(-2, -1)).softmax(-1)
    return logits.detach(), probs, reads, pool_attention


def reference_maps(variant, model, x, explainer):
    """Rollouts of docs/method.md §2 from the captured attention, no code shared with the package."""
    _, probs, reads, pool_attention = unfused_capture(model, x)
    length = probs[0].shape[-1]
    eye = torch.eye(length)
    matrices = []
    for attention, tokens in zip(probs, reads):
        if explainer == "attention_rollout":
            refined = eye + attention.mean(dim=1)
        elif explainer == "grad_rollout":
            refined = eye + torch.relu((attention.grad * attention).mean(dim=1))
        else:
            weights = torch.relu((tokens * tokens.grad).sum(dim=-1))
            weights = weights / weights.sum(dim=-1, keepdim=True)
            refined = eye + torch.relu((attention * weights[:, None, None, :]).mean(dim=1))
        if explainer != "grad_rollout":
            refined = refined / refined.sum(dim=-1, keepdim=True)
        matrices.append(refined.detach())
    if explainer == "token_grad_rollout":
        average = (matrices[-2] + matrices[-1]) / 2
        relevance = matrices[-1] @ (average / average.sum(dim=-1, keepdim=True))
    else:
        relevance = matrices[0]
        for matrix in matrices[1:]:
            relevance = matrix @ relevance
    prefix = model.num_prefix_tokens
    side = int(round((length - prefix) ** 0.5))
    rows = query_rows(variant, relevance, prefix, None if pool_attention is None else pool_attention.detach())
    return clip_and_rescale(rows[:, prefix:].reshape(-1, side, side))


def explain(model, x, name, backbone=None):
    backbone = backbone or timm_backbone(model)
    return build_explainer(AdapterConfig(explainer=name), backbone)(backbone, x, top1_class_score(backbone))


# the traced forward -------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS) + list(MORE_VARIANTS))
def test_trace_reproduces_timm(variant):
    model = make_vit(variant)
    backbone = timm_backbone(model)
    x = images(3)
    normed = backbone.normalize(x)
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(normed), pre_logits=True)
    logits, probs, _, _ = unfused_capture(model, normed)
    for first in (0, 2):
        trace = backbone.trace(x, first_block=first)
        torch.testing.assert_close(backbone.embedding(trace.pooled), pre_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(backbone.classify(trace.pooled), logits, rtol=1e-5, atol=1e-5)
        assert len(trace.blocks) == 3 - first
        assert trace.num_prefix_tokens == model.num_prefix_tokens and trace.grid_size == (4, 4)
        for record, expected in zip(trace.blocks, probs[first:]):
            # atol 1e-5: blocks before `first` run timm's fused SDPA, which saturated post-norm attention amplifies
            torch.testing.assert_close(record.attn, expected.detach(), rtol=1e-5, atol=1e-5)
    if model.global_pool == "token" and variant != "deit_distilled":
        assert trace.query_weights is None
    else:
        torch.testing.assert_close(trace.query_weights.sum(-1), torch.ones_like(trace.query_weights.sum(-1)))
    encoded = backbone.encode_image(x)
    torch.testing.assert_close(encoded, torch.nn.functional.normalize(pre_logits, dim=-1), rtol=1e-5, atol=1e-6)


def test_dynamic_image_size():
    model = make_vit("dynamic")
    backbone = TimmVitBackbone(model, image_size=48)
    assert backbone.image_size == 48
    x = images(2, 48)
    trace = backbone.trace(x)
    assert trace.grid_size == (6, 6)
    with torch.no_grad():
        expected = model(backbone.normalize(x))
    torch.testing.assert_close(backbone.classify(trace.pooled), expected, rtol=1e-5, atol=1e-5)
    assert explain(model, x, "token_grad_rollout", backbone).shape == (2, 6, 6)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        TimmVitBackbone(make_vit("vit"), image_size=48)
    with pytest.raises(ValueError, match="takes 32x32 images"):
        TimmVitBackbone(make_vit("vit")).trace(x)


def open_clip_with_timm_tower(timm_name: str, image_size: int):
    import open_clip

    torch.manual_seed(0)
    text = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    vision = dict(
        timm_model_name=timm_name, timm_model_pretrained=False, timm_pool="", timm_proj="linear", image_size=image_size
    )
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def test_projection_reproduces_open_clip_timm_tower():
    """An open_clip tower built on timm (TimmModel) is traced through its trunk and projection."""
    import open_clip

    clip = open_clip_with_timm_tower("vit_tiny_patch16_224", 224)
    backbone = TimmVitBackbone(
        clip.visual.trunk,
        projection=clip.visual.head,
        mean=open_clip.OPENAI_DATASET_MEAN,
        std=open_clip.OPENAI_DATASET_STD,
    )
    x = images(2, 224)
    trace = backbone.trace(x, first_block=backbone.num_blocks - 2)
    with torch.no_grad():
        expected = clip.encode_image(backbone.normalize(x))
    torch.testing.assert_close(trace.pooled, expected, rtol=1e-5, atol=1e-5)


# explainers -----------------------------------------------------------------------


@pytest.mark.parametrize("explainer", EXPLAINERS)
@pytest.mark.parametrize("variant", list(VARIANTS) + ["siglip_map"])
def test_rollout_matches_unfused_reference(variant, explainer):
    model = make_vit(variant)
    backbone = TimmVitBackbone(model)
    x = images(3)
    ours = explain(model, x, explainer, backbone)
    torch.testing.assert_close(
        ours, reference_maps(variant, model, backbone.normalize(x), explainer), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("explainer", EXPLAINERS)
@pytest.mark.parametrize("variant", list(VARIANTS) + ["avgmax_no_class_token"])
def test_batched_explainer_equals_one_at_a_time(variant, explainer):
    model = make_vit(variant)
    x = images(4)
    batched = explain(model, x, explainer)
    single = torch.cat([explain(model, image[None], explainer) for image in x])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_mambaout"])
def test_gradcam_fallback_for_conv_nets(name):
    model = make_cnn(name)
    backbone = timm_backbone(model, image_size=64)
    assert isinstance(backbone, TimmCnnBackbone)
    x = images(3, 64)
    maps = explain(model, x, "auto", backbone)  # auto picks Grad-CAM for a conv net
    feature_map = model.forward_features(backbone.normalize(x)).detach().requires_grad_(True)
    (grads,) = torch.autograd.grad(model.forward_head(feature_map).max(-1).values.sum(), [feature_map])
    channels = 3 if getattr(model, "output_fmt", "NCHW") == "NHWC" else 1  # MambaOut's maps are channels-last
    spatial = tuple(d for d in (1, 2, 3) if d != channels)
    cam = torch.relu((grads.mean(dim=spatial, keepdim=True) * feature_map.detach()).sum(dim=channels))
    torch.testing.assert_close(maps, clip_and_rescale(cam), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs a vit"):
        build_explainer(AdapterConfig(explainer="token_grad_rollout"), backbone)
    with pytest.raises(NotImplementedError, match="not a ViT"):
        backbone.trace(x)


def test_unsupported_timm_models_fail_clearly():
    torch.manual_seed(0)
    with pytest.raises(NotImplementedError, match="no pooled features"):
        timm_backbone(timm.create_model("vit_tiny_patch16_224", **{**TINY, "global_pool": ""}))
    with pytest.raises(NotImplementedError, match="outside timm's VisionTransformer"):
        timm_backbone(timm.create_model("test_vit_relpos", pretrained=False))
    with pytest.raises(TypeError, match="no backbone accepts Linear as an image classifier"):
        timm_backbone(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="classnames"):
        wrap_classifier(torch.nn.Linear(3, 3))


# the model is left as it was ------------------------------------------------------


def snapshot(model):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: b.clone() for n, b in model.named_buffers()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
        {n: m.fused_attn for n, m in model.named_modules() if hasattr(m, "fused_attn")},
    )


def assert_unchanged(model, before):
    params, buffers, flags, modes, fused = snapshot(model)
    assert all(torch.equal(params[n], before[0][n]) for n in params)
    assert all(torch.equal(buffers[n], before[1][n]) for n in buffers)
    assert (flags, modes, fused) == before[2:]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_explaining_and_adapting_leave_the_model_unchanged(variant):
    model = make_vit(variant)
    model.train()  # the caller's modes and flags, unusual on purpose
    model.blocks[1].attn.fused_attn = False
    model.blocks[0].norm1.weight.requires_grad_(False)
    before = snapshot(model)
    backbone = TimmVitBackbone(model)
    x = images(2)
    for name in EXPLAINERS:
        explain(model.eval(), x, name, backbone)
        model.train()
    assert_unchanged(model, before)
    for tuning in ("norm", "prompt"):
        ClassifierTestTimeAdapter(model, AdapterConfig(views=8, steps=2, classifier_tuning=tuning))(x)
        assert_unchanged(model, before)


def test_adapting_a_conv_net_leaves_it_unchanged():
    model = make_cnn("test_resnet").train()
    before = snapshot(model)
    adapter = ClassifierTestTimeAdapter(model, AdapterConfig(views=8), image_size=64)
    logits = adapter(images(2, 64))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert_unchanged(model, before)  # BatchNorm running statistics included
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        ClassifierTestTimeAdapter(model, AdapterConfig(views=8, classifier_tuning="prompt"), image_size=64)


# test-time adaptation of a classifier ---------------------------------------------


@pytest.mark.parametrize("tuning", ["norm", "prompt"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_classifier_adapts_resets_and_ignores_batch_order(variant, tuning):
    model = make_vit(variant)
    adapter = ClassifierTestTimeAdapter(model, AdapterConfig(views=16, classifier_tuning=tuning))
    x = images(3, 40)  # any size: views are resized and cropped
    first = adapter(x)
    assert first.shape == (3, 5) and torch.isfinite(first).all()
    assert torch.equal(adapter(x), first)  # reset per sample: nothing carried over
    assert torch.equal(adapter(x.flip(0)).flip(0), first)
    assert torch.equal(adapter(x[1:2]), first[1:2])
    untuned = ClassifierTestTimeAdapter(model, AdapterConfig(views=16, steps=0, classifier_tuning=tuning))(x)
    assert not torch.allclose(first, untuned, atol=1e-6)  # the tuning step changed the prediction


def test_tuning_step_equals_plain_adamw_on_layernorms():
    """One step on functional copies equals AdamW on a deep copy's LayerNorm parameters."""
    model = make_vit("vit")
    config = AdapterConfig(views=16)
    adapter = ClassifierTestTimeAdapter(model, config)
    views = adapter.make_views(images(1, 40)[0], adapter.generator_for(images(1, 40)[0]))
    x = adapter.backbone.normalize(views)
    with torch.no_grad():
        confident = select_confident(model(x), config.n_confident)
    params, prompts = adapter.tune(x, confident)
    assert prompts is None
    reference = copy.deepcopy(model)
    names = sorted(n for n, m in reference.named_modules() if isinstance(m, torch.nn.LayerNorm))
    assert sorted(params) == sorted(f"{n}.{p}" for n in names for p in ("weight", "bias"))
    tuned = [reference.get_parameter(name) for name in sorted(params)]
    optimizer = torch.optim.AdamW(tuned, lr=config.lr, weight_decay=config.weight_decay)
    OBJECTIVES.get(config.objective)()(reference(x[confident])).backward()
    optimizer.step()
    for name, value in zip(sorted(params), tuned):
        torch.testing.assert_close(params[name], value.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("aggregator", ["tv", "single", "mean"])
def test_reading_only_the_aggregated_views_is_exact(aggregator, monkeypatch):
    """After tuning only the views the aggregator reads are re-encoded; all of them give the same."""
    model = make_vit("avg_pool")
    adapter = ClassifierTestTimeAdapter(model, AdapterConfig(views=16, aggregator=aggregator))
    x = images(2, 32)
    fast = adapter(x)
    monkeypatch.setattr(adapter.aggregator, "views_read", lambda confident, count: None)
    torch.testing.assert_close(fast, adapter(x), rtol=1e-6, atol=1e-6)


def test_every_preset_runs_or_explains_why_not():
    model = make_vit("vit")
    x = images(1, 32)
    found = [a for a in vars(presets).values() if isinstance(a, Adapter)]
    assert {"atpt", "tpt", "rtpt"} <= {a.name for a in found}
    for adapter in found:
        config = adapter.config.replace(views=min(adapter.config.views, 8))
        if config.aggregator == "mta":
            with pytest.raises(ValueError, match="needs a text encoder"):
                wrap_classifier(model, config, adapter.name)
            continue
        if config.objective in ("ctpt", "otpt"):  # they regularise the prompt's text features
            with pytest.raises(ValueError, match="has no text side"):
                wrap_classifier(model, config, adapter.name)
            continue
        logits = wrap_classifier(model, config, adapter.name)(x)
        assert logits.shape == (1, 5) and torch.isfinite(logits).all(), adapter.name


def test_classifier_under_no_grad_and_with_input_gradients():
    model = make_vit("registers")
    adapter = ClassifierTestTimeAdapter(model, AdapterConfig(views=8))
    x = images(2)
    with torch.no_grad():
        quiet = adapter(x)
    with torch.inference_mode():
        torch.testing.assert_close(adapter(x), quiet, rtol=0, atol=0)
    tracked = x.clone().requires_grad_(True)
    logits = adapter(tracked)
    torch.testing.assert_close(logits.detach(), quiet, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(logits.logsumexp(-1).sum(), [tracked])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert adapter(torch.empty(0, 3, 32, 32)).shape == (0, 5)


def test_seeding_is_the_clip_adapters():
    model = make_vit("vit")
    adapter = ClassifierTestTimeAdapter(model, AdapterConfig(views=8, seed=3))
    image = images(1)[0]
    ours = adapter.generator_for(image).initial_seed()
    assert ours == adapter_module.TestTimeAdapter.generator_for(adapter, image).initial_seed()
    assert ours != ClassifierTestTimeAdapter(model, AdapterConfig(views=8, seed=4)).generator_for(image).initial_seed()


def test_norm_parameters_cover_every_layernorm():
    model = make_vit("avg_pool")
    found = norm_parameters(model)
    expected = {
        f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm) for p in ("weight", "bias")
    }
    assert set(found) == expected and "fc_norm.weight" in found
    with pytest.raises(ValueError, match="no classifier head"):
        ClassifierTestTimeAdapter(timm.create_model("vit_tiny_patch16_224", **{**TINY, "num_classes": 0}))


def test_open_clip_with_a_timm_tower_is_adapted():
    """wrap() on an open_clip CLIP whose image tower is a timm ViT explains it through the trunk."""
    import open_clip

    clip = open_clip_with_timm_tower("test_vit", 64)
    tta = presets.atpt.with_overrides(views=8).wrap(
        clip, classnames=["cat", "dog"], tokenizer=open_clip.get_tokenizer("ViT-B-32")
    )
    assert tta.backbone.kind == "vit" and tta.backbone.num_blocks == len(clip.visual.trunk.blocks)
    maps = tta.explain(images(3, 64))
    assert maps.shape == (3, 4, 4) and maps.max() == 1
    assert torch.isfinite(tta(images(2, 64))).all()


@pytest.mark.parametrize("path", ["bpda", "exact"])
def test_classifier_tuning_is_differentiable_for_adaptive_attacks(path):
    """input_gradient is honoured for timm classifiers (the CLIP loop's AdamW): the input
    gradient through the tuning step differs from the fixed-parameter one, and is finite."""
    model = make_vit("vit")
    x = images(1, 32).requires_grad_(True)
    gradients = {}
    for gradient in ("fixed_prompt", path):
        adapter = ClassifierTestTimeAdapter(model, AdapterConfig(views=8, rho=0.25, input_gradient=gradient))
        (grad,) = torch.autograd.grad(adapter(x)[:, 0].sum(), [x])
        gradients[gradient] = grad
    assert torch.isfinite(gradients[path]).all() and gradients[path].abs().sum() > 0
    assert not torch.allclose(gradients[path], gradients["fixed_prompt"])
