"""Every component kind is open: registered by name (built-in decorator or another
distribution's entry point) or passed as an object, with clear errors for unknown names."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import CLASSNAMES, make_tiny_vit

from atpt_plugin import AdapterConfig, load_adapter
from atpt_plugin.aggregators import AGGREGATORS
from atpt_plugin.augmenters import AUGMENTERS
from atpt_plugin.backbones import BACKBONES
from atpt_plugin.explainers import EXPLAINERS
from atpt_plugin.objectives import OBJECTIVES
from atpt_plugin.registry import Registry, UnknownNameError

PLUGINS = Path(__file__).parent / "plugins"
REGISTRIES = [EXPLAINERS, AUGMENTERS, AGGREGATORS, OBJECTIVES, BACKBONES]
SMALL = dict(views=8, rho=0.25)


def install_distribution(root: Path, name: str, groups: dict) -> None:
    """A dist-info folder with entry_points.txt on sys.path: what `pip install` leaves behind."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items()) + "\n"
            for group, points in groups.items()
        )
    )


@pytest.fixture
def extra_components(tmp_path, monkeypatch):
    install_distribution(
        tmp_path,
        "extra-components",
        {
            "atpt_plugin.explainers": {"center_bump": "extra_components:CenterBump"},
            "atpt_plugin.aggregators": {"most_confident": "extra_components:MostConfident"},
            "atpt_plugin.attacks": {"random_sign": "extra_components:RandomSign"},
            "atpt_plugin.datasets": {"stripes": "extra_components:stripes"},
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGINS))
    yield sys.modules.get("extra_components") or __import__("extra_components")


def run(tokenizer, **overrides):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    return load_adapter("atpt", **SMALL, **overrides).wrap(make_tiny_vit(), CLASSNAMES, tokenizer)(images)


def test_components_from_another_distribution_by_name(extra_components, tokenizer):
    listed = EXPLAINERS.describe()["center_bump"]
    assert listed.source == "extra-components" and listed.description.startswith("A fixed Gaussian bump")
    assert "most_confident" in AGGREGATORS.names()
    by_name = run(tokenizer, explainer="center_bump", aggregator="most_confident")
    by_object = run(tokenizer, explainer=extra_components.CenterBump(), aggregator=extra_components.MostConfident())
    assert torch.equal(by_name, by_object)
    assert not torch.equal(by_name, run(tokenizer)), "the plugged-in components must change the result"


def test_an_object_gives_the_same_logits_as_its_builtin_name(tokenizer):
    from atpt_plugin.aggregators import ReliabilityAggregator
    from atpt_plugin.explainers.rollout import RolloutExplainer

    explainer = RolloutExplainer("attention_gradient", "all", row_normalize=False)
    by_object = run(tokenizer, explainer=explainer, aggregator=ReliabilityAggregator(k=20, temperature=0.01))
    assert torch.equal(by_object, run(tokenizer, explainer="grad_rollout", aggregator="reliability"))


def test_a_plain_function_is_an_objective(tokenizer):
    from atpt_plugin.objectives import marginal_entropy

    assert torch.equal(run(tokenizer, objective=marginal_entropy), run(tokenizer, objective="marginal_entropy"))


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.kind)
def test_unknown_names_list_the_installed_ones(registry):
    known = registry.names()[0]
    with pytest.raises(UnknownNameError) as error:
        registry.get(known[:-1] + "#")
    message = str(error.value)
    assert f"no {registry.kind} named" in message and known in message and registry.group in message
    assert f"did you mean {known!r}" in message


def test_a_config_with_objects_prints_and_records_them(extra_components):
    config = AdapterConfig(explainer=extra_components.CenterBump(width=0.5), aggregator="tv")
    assert "explainer=center_bump(width=0.5, grid=4)" in repr(config)
    record = config.record()
    assert record["explainer"] == {"name": "center_bump", "options": {"width": 0.5, "grid": 4}}
    assert record["aggregator"] == "tv" and record["layer_weights"] == [1.0, 1.0]

    class Unregistered(extra_components.MostConfident):
        pass

    assert AdapterConfig(aggregator=Unregistered()).record()["aggregator"]["name"] is None


def test_register_decorator_names_and_refuses_duplicates():
    registry = Registry("widget", "example.widgets")

    @registry.register("spinner")
    class Spinner:
        """Spins."""

    assert registry.get("spinner") is Spinner and registry.describe()["spinner"].description == "Spins."
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("spinner")(Spinner)


def test_every_builtin_component_has_a_description():
    for registry in REGISTRIES:
        for name, entry in registry.describe().items():
            assert len(entry.description) > 10, f"{registry.kind} {name} needs a one-line description"


def test_the_custom_component_example_plugs_in_by_object_and_by_name():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "custom_component", PLUGINS.parent.parent / "examples" / "custom_component.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    from atpt_plugin.demo_model import load_demo_model, load_demo_subset

    model, tokenizer, classnames = load_demo_model()
    images, _ = load_demo_subset(2)

    def logits(**components):
        return load_adapter("atpt", views=8, **components).wrap(model, classnames, tokenizer)(images)

    by_name = logits(explainer="last_attention", aggregator="sharpest")
    assert torch.equal(by_name, logits(explainer=example.LastBlockAttention(), aggregator=example.SharpestViews()))
    assert not torch.equal(by_name, logits())


def test_atpt_eval_runs_a_plugged_in_attack_dataset_and_components(extra_components, tmp_path, capsys, one_thread):
    import json

    from atpt_plugin.adapters import cli

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (tmp_path / "tiny-plugin.json").write_text(json.dumps(config))
    assert cli.main(["list"]) == 0
    listing = capsys.readouterr().out
    for name in ("center_bump", "most_confident", "random_sign", "stripes"):
        assert f"  {name} " in listing and "[extra-components]" in listing
    args = [
        "eval",
        "--model",
        str(tmp_path / "tiny-plugin.json"),
        "--pretrained",
        "none",
        "--dataset",
        "stripes",
        "--adapters",
        "zeroshot,atpt[explainer=center_bump,aggregator=most_confident]",
        "--set",
        "views=4",
        "--attack",
        "random_sign",
        "--eps",
        "8",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
    ]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [row["adapter"] for row in summary["rows"]] == [
        "zeroshot",
        "atpt[explainer=center_bump,aggregator=most_confident]",
    ]
    assert all(row["n"] == 6 for row in summary["rows"]) and summary["attack"]["name"] == "random_sign"
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (
        manifest["settings"]["adapters"]["atpt[explainer=center_bump,aggregator=most_confident]"]["explainer"]
        == "center_bump"
    )


def test_an_unregistered_component_object_is_refused_for_a_resumable_run(extra_components):
    from atpt_plugin.adapters.manifest import manifest_config

    class Mine(extra_components.MostConfident):
        pass

    with pytest.raises(ValueError, match="unregistered class: a resumable run records components by name"):
        manifest_config("mine", AdapterConfig(aggregator=Mine()))
    assert manifest_config("ok", AdapterConfig(aggregator=extra_components.MostConfident()))["aggregator"] == {
        "name": "most_confident",
        "options": {},
    }
