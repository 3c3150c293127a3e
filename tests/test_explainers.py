"""Explainers against plain references built from open_clip's own forward."""

import numpy as np
import pytest
import torch

from atpt_plugin.backbones.openclip import OpenClipBackbone
from atpt_plugin.config import AdapterConfig
from atpt_plugin.explainers import build_explainer, clip_and_rescale, top1_logit_score
from atpt_plugin.explainers.base import rescale
from atpt_plugin.explainers.gradcam import gradcam, sharpen
from atpt_plugin.explainers.rollout import (
    RolloutExplainer,
    last_two_rollout,
    refine,
    rollout,
    token_scores,
    token_weights,
)


def plain_attention(mha, x):
    """Self-attention written out per head; checked against nn.MultiheadAttention below."""
    heads, dim = mha.num_heads, x.shape[-1]
    q, k, v = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
    split = lambda t: t.reshape(*t.shape[:2], heads, dim // heads).transpose(1, 2)  # noqa: E731
    probs = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (dim // heads) ** 0.5, -1)
    out = mha.out_proj((probs @ split(v)).transpose(1, 2).reshape(x.shape))
    return out, probs


def reference_capture(model, images):
    """open_clip's own forward, with each block's attention swapped for `plain_attention`.

    Returns the embeddings and per block (input tokens, ln_1 output, attention probs),
    all in the autograd graph with gradients retained.
    """
    records, handles = [], []
    for block in model.visual.transformer.resblocks:

        def pre_hook(module, args):
            args[0].retain_grad()
            records.append({"tokens": args[0]})

        def ln_hook(module, args, output):
            output.retain_grad()
            records[-1]["normed"] = output

        def attn_hook(module, args, kwargs, output):
            out, probs = plain_attention(module, args[0])
            torch.testing.assert_close(out, output[0], rtol=1e-4, atol=1e-5)
            probs.retain_grad()
            records[-1]["attn"] = probs
            return out, None

        handles += [
            block.register_forward_pre_hook(pre_hook),
            block.ln_1.register_forward_hook(ln_hook),
            block.attn.register_forward_hook(attn_hook, with_kwargs=True),
        ]
    try:
        embeddings = model.encode_image(OpenClipBackbone(model).normalize(images))
    finally:
        for handle in handles:
            handle.remove()
    return embeddings, records


def score_for(model, tokenizer):
    backbone = OpenClipBackbone(model)
    with torch.no_grad():
        text = model.encode_text(
            tokenizer(["a photo of a cat.", "a photo of a dog.", "a photo of a car."]), normalize=True
        )
    return top1_logit_score(text, backbone.logit_scale)


def plain_refine(attn, weights, normalize, eps=0.0):
    """I + relu(mean_h(A_h[:, j] * w_j)), row-normalised (+ eps) if asked, with explicit loops."""
    heads, n, _ = attn.shape
    out = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            out[i, j] += max(0.0, float(sum(float(attn[h, i, j]) * float(weights[j]) for h in range(heads)) / heads))
    return out / (out.sum(1, keepdim=True) + eps) if normalize else out


def plain_weights(scores, eps=0.0):
    raw = [max(0.0, float(v)) for v in scores]
    return torch.tensor(raw, dtype=torch.float64) / (sum(raw) + eps)


def plain_last_two(previous, last, layer_weights, eps=0.0):
    """Ahat^(B) @ rownorm((w0 Ahat^(B-1) + w1 Ahat^(B)) / (w0 + w1 + eps)), as the authors' code."""
    mixed = (layer_weights[0] * previous + layer_weights[1] * last) / (sum(layer_weights) + eps)
    return last @ (mixed / (mixed.sum(1, keepdim=True) + eps))


def plain_post_process(patches, quantile, eps=0.0):
    """numpy: clip at the quantile, min-max with eps added to the span; returns (threshold, map)."""
    flat = np.asarray(patches, dtype=np.float64).ravel()
    threshold = np.quantile(flat, quantile)
    clipped = np.minimum(flat, threshold)
    span = clipped.max() - clipped.min()
    return threshold, (clipped - clipped.min()) / (span + eps) if span > 0 else np.zeros_like(clipped)


def test_token_weights_formula():
    tokens, grads = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    weights = token_weights(token_scores(tokens, grads))
    for b in range(2):
        raw = [max(0.0, float(tokens[b, j] @ grads[b, j])) for j in range(5)]
        torch.testing.assert_close(weights[b], torch.tensor(raw) / sum(raw))


def test_refine_and_rollouts_match_loops():
    torch.manual_seed(0)
    attn = torch.softmax(torch.randn(3, 2, 5, 5), -1)
    weights = torch.rand(3, 5)
    for normalize in (True, False):
        ours = refine(attn * weights[:, None, None, :], normalize)
        torch.testing.assert_close(ours[1], plain_refine(attn[1], weights[1], normalize).float())
    a, b, c = (torch.rand(5, 5) for _ in range(3))
    torch.testing.assert_close(rollout([a, b, c]), c @ b @ a)
    torch.testing.assert_close(last_two_rollout(a, b, (1.0, 1.0), False), b @ ((a + b) / 2))
    mixed = 0.5 * a + 1.0 * b
    torch.testing.assert_close(last_two_rollout(a, b, (0.5, 1.0), True), b @ (mixed / mixed.sum(1, keepdim=True)))


def test_clip_and_rescale_matches_numpy():
    maps = torch.rand(4, 6, 6)
    ours = clip_and_rescale(maps, 0.9)
    for k in range(4):
        flat = maps[k].numpy().ravel()
        clipped = np.minimum(flat, np.quantile(flat, 0.9))
        expected = (clipped - clipped.min()) / (clipped.max() - clipped.min())
        np.testing.assert_allclose(ours[k].numpy().ravel(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(clip_and_rescale(torch.ones(1, 3, 3)), torch.zeros(1, 3, 3))


def test_token_gradient_rollout_end_to_end(tiny_vit, tokenizer, images):
    score = score_for(tiny_vit, tokenizer)
    config = AdapterConfig(explainer="token_grad_rollout", layer_weights=(0.5, 1.0))
    ours = build_explainer(config, OpenClipBackbone(tiny_vit))(OpenClipBackbone(tiny_vit), images, score)
    embeddings, records = reference_capture(tiny_vit, images)
    score(embeddings).backward()
    for b in range(images.shape[0]):
        mats = []
        for record in records[-2:]:
            raw = torch.relu((record["normed"][b] * record["normed"].grad[b]).sum(-1)).detach()
            mats.append(plain_refine(record["attn"][b].detach(), raw / raw.sum(), True).float())
        mixed = 0.5 * mats[0] + 1.0 * mats[1]
        relevance = mats[1] @ (mixed / mixed.sum(1, keepdim=True))
        expected = clip_and_rescale(relevance[0, 1:].reshape(1, 4, 4))[0]
        torch.testing.assert_close(ours[b], expected, rtol=1e-4, atol=1e-4)


def test_literal_token_site(tiny_vit, tokenizer, images):
    """The paper's literal weights on block inputs: right where they are well conditioned
    (block B-1), and degenerate at the last block, where LayerNorm's scale invariance makes
    every patch token's <T, dS/dT> zero up to rounding (docs/method.md §8.1)."""
    score = score_for(tiny_vit, tokenizer)
    trace = OpenClipBackbone(tiny_vit).trace(images, first_block=1)
    grads = torch.autograd.grad(score(trace.pooled), [b.tokens for b in trace.blocks])
    ours = token_weights(token_scores(trace.blocks[0].tokens.detach(), grads[0]))
    embeddings, records = reference_capture(tiny_vit, images)
    score(embeddings).backward()
    reference = records[1]
    raw = torch.relu((reference["tokens"] * reference["tokens"].grad).sum(-1))
    torch.testing.assert_close(ours, raw / raw.sum(-1, keepdim=True), rtol=1e-4, atol=1e-5)

    last = trace.blocks[-1]
    inner = (last.tokens * grads[-1]).sum(-1).abs()
    assert inner[:, 1:].max() < 1e-4 * inner[:, 0].max()
    # after ln_1, where the attention reads them, the same tokens carry real weight
    again = OpenClipBackbone(tiny_vit).trace(images, 2)
    (g,) = torch.autograd.grad(score(again.pooled), [again.blocks[0].normed])
    assert (again.blocks[0].normed * g).sum(-1)[:, 1:].abs().max() > 1e-3


def test_explainers_take_no_parameter_gradients(tiny_vit, tokenizer, images):
    score = score_for(tiny_vit, tokenizer)
    for name in ("token_grad_rollout", "grad_rollout", "attention_rollout"):
        maps = build_explainer(AdapterConfig(explainer=name), OpenClipBackbone(tiny_vit))(
            OpenClipBackbone(tiny_vit), images, score
        )
        assert maps.shape == (3, 4, 4) and maps.min() >= 0 and maps.max() <= 1
    assert all(p.grad is None for p in tiny_vit.parameters())


def test_chefer_gradient_rollout(tiny_vit, tokenizer, images):
    score = score_for(tiny_vit, tokenizer)
    ours = build_explainer(AdapterConfig(explainer="grad_rollout"), OpenClipBackbone(tiny_vit))(
        OpenClipBackbone(tiny_vit), images, score
    )
    embeddings, records = reference_capture(tiny_vit, images)
    score(embeddings).backward()
    for b in range(images.shape[0]):
        relevance = torch.eye(17)
        for record in records:
            cam = torch.relu((record["attn"].grad[b] * record["attn"][b]).mean(0))
            relevance = (torch.eye(17) + cam) @ relevance
        expected = clip_and_rescale(relevance[0, 1:].reshape(1, 4, 4).detach())[0]
        torch.testing.assert_close(ours[b], expected, rtol=1e-4, atol=1e-4)


def test_attention_rollout(tiny_vit, tokenizer, images):
    ours = build_explainer(AdapterConfig(explainer="attention_rollout"), OpenClipBackbone(tiny_vit))(
        OpenClipBackbone(tiny_vit), images, score_for(tiny_vit, tokenizer)
    )
    _, records = reference_capture(tiny_vit, images)
    for b in range(images.shape[0]):
        relevance = torch.eye(17)
        for record in records:
            relevance = (0.5 * record["attn"][b].mean(0) + 0.5 * torch.eye(17)) @ relevance
        expected = clip_and_rescale(relevance[0, 1:].reshape(1, 4, 4).detach())[0]
        torch.testing.assert_close(ours[b], expected, rtol=1e-4, atol=1e-4)


def test_batched_equals_one_at_a_time(tiny_vit, tokenizer):
    """The well-conditioned default (tokens after ln_1) is batch independent in fp32."""
    score = score_for(tiny_vit, tokenizer)
    backbone = OpenClipBackbone(tiny_vit)
    explainer = build_explainer(AdapterConfig(), backbone)
    batch = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    together = explainer(backbone, batch, score)
    alone = torch.cat([explainer(backbone, batch[i : i + 1], score) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_gradcam_against_hooked_model(tiny_resnet, tokenizer):
    x = torch.rand(2, 3, 64, 64)
    score = score_for(tiny_resnet, tokenizer)
    backbone = OpenClipBackbone(tiny_resnet)
    ours = build_explainer(AdapterConfig(), backbone)(backbone, x, score)
    captured = []
    handle = tiny_resnet.visual.layer4.register_forward_hook(lambda m, a, out: captured.append(out))
    embeddings = tiny_resnet.encode_image(backbone.normalize(x))
    handle.remove()
    (grads,) = torch.autograd.grad(score(embeddings), captured)
    fmap = captured[0].detach()
    for b in range(2):
        cam = torch.zeros(fmap.shape[-2:])
        for c in range(fmap.shape[1]):
            cam += grads[b, c].mean() * fmap[b, c]
        expected = clip_and_rescale(torch.relu(cam)[None])[0]
        torch.testing.assert_close(ours[b], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gradcam(fmap, grads), torch.relu((grads.mean((2, 3), keepdim=True) * fmap).sum(1)))


def test_gradcam_sharpening():
    maps = torch.tensor([[[0.0, 0.1], [0.6, 1.0]]])
    expected = torch.tensor([[[0.0, 0.0], [(0.4 / 0.8) ** 2, 1.0]]])
    torch.testing.assert_close(sharpen(maps), expected)


def test_explainer_tower_mismatch_is_an_error(tiny_vit):
    with pytest.raises(ValueError, match="needs a resnet image tower"):
        build_explainer(AdapterConfig(explainer="gradcam"), OpenClipBackbone(tiny_vit))


def test_eps_terms_on_known_values():
    """The authors' 1e-8 terms (explainer_eps), on numbers small enough for them to matter."""
    scores = torch.tensor([[-1.0, 1e-8, 3e-8]])  # CLS ReLU'd away, patches ~1e-8
    torch.testing.assert_close(token_weights(scores), torch.tensor([[0.0, 0.25, 0.75]]))
    torch.testing.assert_close(token_weights(scores, 1e-8), torch.tensor([[0.0, 0.2, 0.6]]))  # / (4e-8 + 1e-8)

    # one head attending uniformly: Ahat_ij = (w_j / 3 + delta_ij) / (1 + sum(w) / 3)
    attention = torch.full((1, 1, 3, 3), 1 / 3)
    previous = refine(attention * torch.tensor([0.25, 0.25, 0.5]), True)
    torch.testing.assert_close(
        previous[0], torch.tensor([[0.8125, 0.0625, 0.125], [0.0625, 0.8125, 0.125], [0.0625, 0.0625, 0.875]])
    )
    exact = refine(attention * token_weights(scores)[:, None, None, :], True)
    torch.testing.assert_close(
        exact[0], torch.tensor([[0.75, 0.0625, 0.1875], [0.0, 0.8125, 0.1875], [0.0, 0.0625, 0.9375]])
    )
    with_eps = refine(attention * token_weights(scores, 1e-8)[:, None, None, :], True, 1e-8)
    torch.testing.assert_close(with_eps[0], torch.tensor([[3.0, 0.2, 0.6], [0.0, 3.2, 0.6], [0.0, 0.2, 3.6]]) / 3.8)

    explainer = RolloutExplainer(layer_weights=(0.5, 1.0), eps=1e-8)
    for last in (exact, with_eps):  # rows sum to one, so the average's rows do too
        expected = (last[0] @ ((0.5 * previous[0] + last[0]) / 1.5))[0]
        torch.testing.assert_close(explainer.relevance_row([previous, last])[0], expected)
    moved = explainer.relevance_row([previous, with_eps]) - explainer.relevance_row([previous, exact])
    assert moved.abs().max() > 0.01, "the eps in the token-weight sum moves the rollout"

    near_flat = torch.tensor([[[0.0, 1e-8], [5e-9, 0.0]]])  # span 1e-8: the eps halves the map
    torch.testing.assert_close(rescale(near_flat, torch.ones(1)), torch.tensor([[[0.0, 1.0], [0.5, 0.0]]]))
    torch.testing.assert_close(rescale(near_flat, torch.ones(1), 1e-8), torch.tensor([[[0.0, 0.5], [0.25, 0.0]]]))
    assert torch.equal(rescale(torch.ones(1, 2, 2), torch.ones(1), 1e-8), torch.zeros(1, 2, 2))


@pytest.mark.parametrize("site, eps", [("normed", 0.0), ("input", 1e-8)])
def test_internals_are_what_the_explainer_computes(site, eps, tiny_vit, tokenizer, images):
    score = score_for(tiny_vit, tokenizer)
    backbone = OpenClipBackbone(tiny_vit)
    config = AdapterConfig(token_site=site, explainer_eps=eps, layer_weights=(0.5, 1.0))
    explainer = build_explainer(config, backbone)
    internals = explainer.trace(backbone, images, score)
    assert torch.equal(internals.maps, explainer(backbone, images, score))
    assert len(internals.blocks) == 2 and all(b.token_scores.shape == (3, 17) for b in internals.blocks)
    # each value against an independent plain reference: test_each_step_matches_a_plain_reference


@pytest.mark.parametrize("site, eps", [("normed", 0.0), ("input", 1e-8)])
def test_each_step_matches_a_plain_reference(site, eps, tiny_vit, tokenizer, images):
    """Each step from the previous step's returned values, so fp32 noise upstream (the literal
    site's last-block patch scores) cannot hide or fake a difference downstream."""
    score = score_for(tiny_vit, tokenizer)
    backbone = OpenClipBackbone(tiny_vit)
    explainer = build_explainer(AdapterConfig(token_site=site, explainer_eps=eps, layer_weights=(0.5, 1.0)), backbone)
    internals = explainer.trace(backbone, images, score)
    embeddings, records = reference_capture(tiny_vit, images)
    score(embeddings).backward()
    key = "normed" if site == "normed" else "tokens"
    for block, record in zip(internals.blocks, records[-2:]):
        torch.testing.assert_close(block.attention, record["attn"].mean(1).detach(), rtol=1e-5, atol=1e-6)
        reference = (record[key] * record[key].grad).sum(-1).detach()
        scale = reference.abs().max()
        torch.testing.assert_close(block.token_scores, reference, rtol=0, atol=1e-4 * float(scale))
        assert (block.token_scores < 0).any(), "scores are returned before the ReLU"
    for b in range(images.shape[0]):
        refined = [
            plain_refine(record["attn"][b].detach(), plain_weights(block.token_scores[b], eps), True, eps)
            for block, record in zip(internals.blocks, records[-2:])
        ]
        for ours, expected in zip(internals.blocks, refined):
            torch.testing.assert_close(ours.refined[b].double(), expected, rtol=1e-5, atol=1e-6)
        previous, last = (block.refined[b].double() for block in internals.blocks)
        torch.testing.assert_close(
            internals.row[b].double(), plain_last_two(previous, last, (0.5, 1.0), eps)[0], rtol=1e-5, atol=1e-7
        )
        threshold, expected_map = plain_post_process(internals.row[b, 1:], 0.99, eps)
        assert abs(float(internals.threshold[b]) - threshold) <= 1e-6 * abs(threshold)
        np.testing.assert_allclose(internals.maps[b].numpy().ravel(), expected_map, rtol=1e-4, atol=1e-5)
