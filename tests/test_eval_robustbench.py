"""RobustBench: the real package's clean_accuracy on a wrapped adapter, benchmark(), leaderboard JSON."""

import dataclasses
import json
import sys

import pytest
import torch
from atpt_plugin.adapters.robustbench import benchmark, benchmark_table, import_robustbench
from conftest import CLASSNAMES
from PIL import Image

from atpt_plugin import load_adapter

SMALL = dict(views=4, rho=0.25)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(5, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3, 0])


def test_real_robustbench_clean_accuracy_on_a_wrapped_adapter(tiny_vit, tokenizer, data):
    robustbench = import_robustbench()
    # the stand-ins for pkg_resources / autoattack do not outlive the import
    assert "stand-in" not in (getattr(sys.modules.get("pkg_resources"), "__doc__", "") or "")
    assert getattr(sys.modules.get("autoattack"), "__name__", "autoattack") == "autoattack"
    from robustbench.utils import clean_accuracy

    assert robustbench.utils.clean_accuracy is clean_accuracy
    x, y = data
    tta = load_adapter("atpt", **SMALL).wrap(tiny_vit, classnames=CLASSNAMES, tokenizer=tokenizer)
    accuracy = clean_accuracy(tta, x, y, batch_size=2)  # runs under torch.no_grad()
    with torch.no_grad():
        expected = (tta(x).argmax(1) == y).float().mean().item()
    assert accuracy == pytest.approx(expected)


def test_benchmark_returns_accuracies_and_writes_model_info(tiny_vit, tokenizer, data, tmp_path, capsys):
    import_robustbench()
    from robustbench.utils import ModelInfo

    tta = load_adapter("atpt", **SMALL).wrap(tiny_vit, classnames=CLASSNAMES, tokenizer=tokenizer)
    clean, adv = benchmark(
        tta,
        n_examples=4,
        dataset=data,
        threat_model="Linf",
        to_disk=True,
        model_name="tiny-atpt",
        eps=4 / 255,
        batch_size=4,
        steps=2,
        tokenizer=tokenizer,
        model_info_dir=tmp_path / "model_info",
        cache_dir=tmp_path / "cache",
    )
    x, y = data
    with torch.no_grad():
        assert clean == pytest.approx((tta(x[:4]).argmax(1) == y[:4]).float().mean().item())
    assert "Clean accuracy" in capsys.readouterr().out
    (batch,) = (tmp_path / "cache").rglob("batch-*.pt")  # the adversarial images the adapter was scored on
    adversarial = torch.load(batch, weights_only=True)["adversarial"]
    assert 0 < (adversarial - x[:4]).abs().max() <= 4 / 255 + 1e-6
    with torch.no_grad():
        predictions = tta(adversarial).argmax(1)
    assert adv == pytest.approx((predictions == y[:4]).float().mean().item())
    entry = json.loads((tmp_path / "model_info/tensors/Linf/tiny-atpt.json").read_text())
    fields = {f.name for f in dataclasses.fields(ModelInfo)}
    extra = {"pgd_acc", "worst_case_acc", "test_time_defence", "clean_ece", "adv_ece"}
    assert fields <= set(entry) and set(entry) - fields == extra
    assert entry["clean_acc"] == str(round(100 * clean, 2)) and entry["pgd_acc"] == str(round(100 * adv, 2))
    assert entry["eps"] == pytest.approx(4 / 255) and entry["number_forward_passes"] >= 4
    assert "transfer attack" in entry["footnote"] and "test-time defence" in entry["footnote"].lower()
    with pytest.raises(NotImplementedError, match="benchmark_table"):
        benchmark([tta, tta], dataset=data)
    with pytest.raises(ValueError, match="model_name"):
        benchmark(tta, dataset=data, to_disk=True)
    with pytest.raises(NotImplementedError, match="corruptions"):
        benchmark(tta, dataset=data, threat_model="corruptions")
    with pytest.raises(NotImplementedError, match="preprocessing does not apply"):
        benchmark(tta, dataset=data, preprocessing="Res256Crop224")
    import inspect

    ours = list(inspect.signature(benchmark).parameters)
    theirs = list(inspect.signature(import_robustbench().eval.benchmark).parameters)
    assert ours[: len(theirs)] == theirs  # RobustBench's parameters, in its order


def test_benchmark_table_on_a_named_dataset_attacks_once(tiny_vit, tokenizer, tmp_path):
    base = tmp_path / "data" / "oxford_pets"
    (base / "images").mkdir(parents=True)
    items = []
    for i in range(4):
        name = ["abyssinian", "beagle"][i % 2]
        Image.new("RGB", (36, 30), (60 * i, 20, 90)).save(base / "images" / f"{name}_{i}.jpg")
        items.append([f"{name}_{i}.jpg", i % 2, name])
    (base / "split_zhou_OxfordPets.json").write_text(json.dumps({"test": items}))
    names = ["atpt", "zeroshot"] if "zeroshot" in _installed() else ["atpt"]
    rows = benchmark_table(
        names,
        n_examples=3,
        dataset="pets",
        data_dir=tmp_path / "data",
        batch_size=2,
        model=tiny_vit,
        tokenizer=tokenizer,
        cache_dir=tmp_path / "cache",
        attack="fgsm",
        overrides=SMALL,
    )
    assert [row["adapter"] for row in rows] == names and all(row["n"] == 3 for row in rows)
    cached = list((tmp_path / "cache").glob("*/batch-*.pt"))
    assert len(cached) == 2  # 3 images in batches of 2: one attack for all adapters
    wrong = load_adapter("atpt", **SMALL).wrap(tiny_vit, classnames=CLASSNAMES, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="class names that differ"):
        benchmark(wrong, dataset="pets", data_dir=tmp_path / "data", n_examples=2, attack="none")


def _installed():
    from atpt_plugin import list_adapters

    return list_adapters()
