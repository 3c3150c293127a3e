"""C-TPT and O-TPT: their text-side terms against plain references and rivals.md's hand-worked
values, the objective protocol that passes the text side, and the presets built on it."""

import math

import pytest
import torch
from conftest import CLASSNAMES, make_tiny_vit
from test_registries import PLUGINS, install_distribution

from atpt_plugin import AdapterConfig, load_adapter
from atpt_plugin.objectives import (
    OBJECTIVES,
    marginal_entropy,
    objective_call,
    orthogonality_penalty,
    text_dispersion,
    text_inputs,
)
from atpt_plugin.tuning import adamw

SMALL = dict(views=8, rho=0.25)


def unit_rows(rows):
    return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in rows]


def reference_atfd(rows, normalise=True):
    """(1/C) sum_c ||t_c - mean_c t_c||, written out with Python lists."""
    rows = unit_rows(rows) if normalise else rows
    count, width = len(rows), len(rows[0])
    centroid = [sum(row[d] for row in rows) / count for d in range(width)]
    return sum(math.sqrt(sum((row[d] - centroid[d]) ** 2 for d in range(width))) for row in rows) / count


def reference_orthogonality(rows, normalise=True):
    """(1/C) sum_i (sqrt(sum_j cos(t_i, t_j)^2) - 1), written out with Python lists."""
    rows = unit_rows(rows) if normalise else rows
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    return sum(abs(math.sqrt(sum(dot(a, b) ** 2 for b in rows)) - 1) for a in rows) / len(rows)


def as_tensor(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_dispersion_matches_the_hand_worked_value_and_normalises_first():
    assert text_dispersion(as_tensor([[1, 0], [0, 1], [-1, 0]])).item() == pytest.approx(0.924951, abs=1e-6)
    assert text_dispersion(as_tensor([[2, 0], [0, 3], [-0.5, 0]])).item() == pytest.approx(0.924951, abs=1e-6)
    assert reference_atfd([[2, 0], [0, 3], [-0.5, 0]], normalise=False) == pytest.approx(1.759514, abs=1e-6)
    assert text_dispersion(as_tensor([[2, 0], [0, 3], [1, 1]])).item() == pytest.approx(0.540964, abs=1e-6)


def test_orthogonality_matches_the_hand_worked_value_not_its_variants():
    rows = [[2, 0], [0, 3], [1, 1]]
    value = orthogonality_penalty(as_tensor(rows)).item()
    assert value == pytest.approx(0.287901, abs=1e-6) and 18 * value == pytest.approx(5.182220, abs=1e-5)
    normalised = as_tensor(unit_rows(rows))
    gram = normalised @ normalised.t()
    assert torch.linalg.matrix_norm(gram - torch.eye(3)).item() == pytest.approx(1.414214, abs=1e-6)
    assert reference_orthogonality(rows, normalise=False) == pytest.approx(5.027358, abs=1e-6)
    assert value != pytest.approx(1.414214, abs=1e-3) and value != pytest.approx(5.027358, abs=1e-3)


@pytest.mark.parametrize("shape", [(5, 8), (12, 4)])  # C < D, and C > D (exact orthogonality impossible)
def test_terms_equal_plain_references_on_random_features(shape):
    features = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    rows = features.tolist()
    assert text_dispersion(features).item() == pytest.approx(reference_atfd(rows), rel=1e-6)
    assert orthogonality_penalty(features).item() == pytest.approx(reference_orthogonality(rows), rel=1e-6)


def test_orthogonality_is_zero_and_finite_for_orthogonal_classes():
    features = torch.eye(4, 6, requires_grad=True)
    value = orthogonality_penalty(features)
    (grad,) = torch.autograd.grad(value, [features])
    assert value.item() == 0 and torch.isfinite(grad).all()


def test_householder_route_gives_the_closed_form():
    """The authors' computation: reflect each Gram row onto e_i, subtract e_i, take the norm."""
    features = torch.nn.functional.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1)
    gram = features @ features.t()
    norms = []
    for i, row in enumerate(gram):
        e = torch.zeros_like(row)
        e[i] = 1
        v = row - row.norm() * e
        v = v / v.norm()
        reflected = row - 2 * v * (v @ row)
        norms.append((reflected - e).norm())
    assert orthogonality_penalty(features).item() == pytest.approx(torch.stack(norms).mean().item(), abs=1e-6)


def test_objectives_add_their_weighted_term_to_tpts_loss():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    text = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    rows = text.tolist()
    ctpt = OBJECTIVES.get("ctpt")(weight=50.0)
    otpt = OBJECTIVES.get("otpt")(weight=18.0)
    entropy = marginal_entropy(logits).item()
    assert ctpt(logits, text).item() == pytest.approx(entropy - 50 * reference_atfd(rows), rel=1e-5)
    assert otpt(logits, text).item() == pytest.approx(entropy + 18 * reference_orthogonality(rows), rel=1e-5)


def test_the_call_protocol_passes_only_what_an_objective_names():
    logits, text, scale = torch.randn(3, 4), torch.randn(4, 8), torch.tensor(100.0)
    assert text_inputs(marginal_entropy) == () and text_inputs(OBJECTIVES.get("ctpt")()) == ("text_features",)
    assert objective_call(marginal_entropy)(logits, text, scale) == marginal_entropy(logits)
    assert objective_call(lambda logits, logit_scale: logit_scale * 2)(logits, text, scale) == 200
    assert text_inputs(len) == ()  # a builtin without a signature is a logits-only objective


def wrap(name, tokenizer, model=None, **overrides):
    return load_adapter(name, **{**SMALL, **overrides}).wrap(model or make_tiny_vit(), CLASSNAMES, tokenizer)


@pytest.mark.parametrize("name, weight", [("ctpt", "dispersion_weight"), ("otpt", "orthogonality_weight")])
def test_weight_zero_is_tpt_bit_for_bit_and_the_default_is_not(name, weight, tokenizer, images):
    tpt = wrap("tpt", tokenizer)(images)
    assert torch.equal(wrap(name, tokenizer, **{weight: 0.0})(images), tpt)
    assert not torch.equal(wrap(name, tokenizer)(images), tpt)


def test_presets_are_tpt_with_the_authors_weights():
    tpt = load_adapter("tpt").config
    for name, objective in (("ctpt", "ctpt"), ("otpt", "otpt")):
        config = load_adapter(name).config
        assert config.replace(objective="marginal_entropy") == tpt and config.objective == objective
    assert (AdapterConfig().dispersion_weight, AdapterConfig().orthogonality_weight) == (50.0, 18.0)


def test_ctpt_tuning_step_is_adamw_on_the_reference_loss(tokenizer, images):
    """The tuned text features equal one AdamW step on H(mean p) - 50 * ATFD, computed here."""
    adapter = wrap("ctpt", tokenizer)
    image = images[0]
    features = adapter.backbone.encode_image(adapter.make_views(image, adapter.generator_for(image)))
    scale = adapter.backbone.logit_scale
    initial_logits = scale * features @ adapter.zero_shot_text.t()
    confident = torch.argsort(-(initial_logits.softmax(-1) * initial_logits.log_softmax(-1)).sum(-1))[:2]

    def loss(context):
        text = adapter.prompt.text_features(context)
        logits = scale * features[confident] @ text.t()
        mean_p = logits.softmax(-1).mean(0)
        dispersion = (text - text.mean(0)).norm(dim=-1).mean()
        return -(mean_p * mean_p.log()).sum() - 50 * dispersion

    context = adamw(adapter.prompt.initial_context.float(), loss, 1, 5e-3, 0.01)
    expected = adapter.prompt.text_features(context)
    torch.testing.assert_close(adapter.tune(features), expected, rtol=1e-4, atol=1e-5)


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="dispersion_weight must be a finite number >= 0"):
        AdapterConfig(dispersion_weight=-1)
    with pytest.raises(ValueError, match="orthogonality_weight"):
        AdapterConfig(orthogonality_weight=float("inf"))


def test_a_timm_classifier_refuses_an_objective_that_reads_text():
    from golden import tiny_timm_vit

    with pytest.raises(ValueError, match="reads the prompt's text_features"):
        load_adapter("ctpt", **SMALL).wrap(tiny_timm_vit())


@pytest.fixture
def text_objective_plugin(tmp_path, monkeypatch):
    install_distribution(
        tmp_path,
        "text-objective",
        {"atpt_plugin.objectives": {"class_spread": "extra_components:ClassSpread"}},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGINS))
    module = __import__("extra_components")
    module.SEEN_TEXT.clear()
    yield module
    module.SEEN_TEXT.clear()


def test_an_outside_objective_reading_text_plugs_in_by_entry_point(text_objective_plugin, tokenizer, images):
    assert OBJECTIVES.describe()["class_spread"].source == "text-objective"
    by_name = wrap("tpt", tokenizer, objective="class_spread")
    logits = by_name(images[:1])
    text, scale = text_objective_plugin.SEEN_TEXT[0]
    # what it saw: the L2-normalised class features of the initial prompt (first step) and the model's scale
    torch.testing.assert_close(text, by_name.zero_shot_text, rtol=0, atol=1e-6)
    assert scale == pytest.approx(float(by_name.backbone.logit_scale))
    assert torch.allclose(text.norm(dim=-1), torch.ones(len(CLASSNAMES)))
    by_object = wrap("tpt", tokenizer, objective=text_objective_plugin.ClassSpread())(images[:1])
    assert torch.equal(logits, by_object)
    assert not torch.equal(logits, wrap("tpt", tokenizer)(images[:1]))


@pytest.mark.parametrize("name", ["ctpt", "otpt"])
def test_presets_run_on_a_resnet(name, tokenizer):
    from conftest import make_tiny_resnet

    logits = wrap(name, tokenizer, model=make_tiny_resnet())(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, len(CLASSNAMES)) and torch.isfinite(logits).all()
