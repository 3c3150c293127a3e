"""Settings, overrides and entry-point discovery (through importlib.metadata for real)."""

import sys
import textwrap

import pytest

import atpt_plugin
from atpt_plugin import AdapterConfig, list_adapters, load_adapter


def test_paper_defaults():
    config = load_adapter("atpt").config
    assert (config.views, config.rho, config.lr, config.steps) == (64, 0.1, 5e-3, 1)
    assert (config.r, config.m_high, config.m_low) == (0.2, 0.2, 0.8)
    assert (config.aggregator, config.augmenter, config.objective) == ("tv", "attention_mix", "mean_entropy")
    assert config.n_confident == 6


def test_overrides_reach_every_setting():
    adapter = load_adapter(
        "atpt",
        views=32,
        rho=0.25,
        lr=1e-2,
        steps=2,
        r=0.3,
        m_high=0.1,
        m_low=0.9,
        explainer="grad_rollout",
        augmenter="augmix",
        aggregator="mean",
        seed=7,
    )
    config = adapter.config
    assert (config.views, config.rho, config.lr, config.steps, config.r) == (32, 0.25, 1e-2, 2, 0.3)
    assert (config.m_high, config.m_low, config.explainer) == (0.1, 0.9, "grad_rollout")
    assert (config.augmenter, config.aggregator, config.seed) == ("augmix", "mean", 7)
    assert load_adapter("atpt").config.views == 64, "overrides must not leak into the preset"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(view=8), "did you mean 'views'"),
        (dict(rho=0.0), "rho must be in"),
        (dict(rho=1.5), "rho must be in"),
        (dict(views=0), "views must be an integer"),
        (dict(lr=-1.0), "lr must be > 0"),
        (dict(m_high=0.9, m_low=0.1), "must not exceed m_low"),
        (dict(explainer="nope"), "no explainer named 'nope'; installed explainers: .*token_grad_rollout"),
        (dict(aggregator="max"), "no aggregator named 'max'.*atpt_plugin.aggregators"),
        (dict(objective="mean_entrop"), "did you mean 'mean_entropy'"),
        (dict(augmenter=object()), "augmenter=.* is neither a registered name"),
        (dict(steps=1.5), "steps must be an integer"),
        (dict(domain_word="pet", ctx_init="a picture of a"), "domain_word"),
        (dict(explainer_eps=-1e-8), "explainer_eps must be a finite number >= 0"),
        (dict(explainer_eps=float("nan")), "explainer_eps must be"),
        (dict(crop_source="pil"), "crop_source='pil' is not one of: resized, original"),
        (dict(input_quantization="uint8"), "input_quantization='uint8' is not one of: None, uint8_floor"),
    ],
)
def test_bad_settings_are_clear_errors(overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        load_adapter("atpt", **overrides)


def test_confident_count_never_zero():
    assert AdapterConfig(views=8).n_confident == 1, "int(8 * 0.1) = 0 must still select a view"
    assert AdapterConfig(views=64, rho=0.5).n_confident == 32


def test_domain_word_goes_before_photo():
    assert AdapterConfig(domain_word="pet").context_phrase == "a pet photo of a"


def test_unknown_adapter_lists_known_names():
    with pytest.raises(KeyError, match="installed adapters: .*atpt"):
        load_adapter("no_such_method")


def test_adapter_from_another_distribution(tmp_path, monkeypatch):
    """A second distribution on sys.path publishes an adapter; discovery goes through importlib.metadata."""
    (tmp_path / "extra_tta.py").write_text(
        textwrap.dedent("""
        from atpt_plugin import Adapter, AdapterConfig
        fast = Adapter("fast_tta", AdapterConfig(views=8, aggregator="mean"), "a third-party preset")
    """)
    )
    info = tmp_path / "extra_tta-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extra-tta\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{atpt_plugin.ENTRY_POINT_GROUP}]\nfast_tta = extra_tta:fast\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "fast_tta" in list_adapters()
    adapter = load_adapter("fast_tta", views=16)
    assert adapter.config.views == 16 and adapter.config.aggregator == "mean"
    monkeypatch.delitem(sys.modules, "extra_tta", raising=False)
