"""The embedded demo's code paths: the eval command, the explain figure, the stability check."""

import json

import pytest
import torch
from atpt_plugin.adapters import cli
from atpt_plugin.adapters.explain import attention_stability, explain_figure
from matplotlib.figure import Figure

from atpt_plugin import load_adapter
from atpt_plugin.demo_model import load_demo_model, load_demo_subset


@pytest.fixture(scope="module")
def demo():
    model, tokenizer, names = load_demo_model()
    images, labels = load_demo_subset(20)
    return load_adapter("atpt", views=16).wrap(model, names, tokenizer), images, labels


def test_explain_figure_has_every_panel(demo, tmp_path, monkeypatch):
    tta, images, labels = demo
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, path, **kw: saved.append(figure))
    explain_figure(tta, images[0], images[1], int(labels[0]), tmp_path / "x.png", views_shown=8)
    titles = [axis.get_title() for axis in saved[0].axes]
    text = " ".join(t.get_text() for axis in saved[0].axes for t in axis.texts)
    assert any(t.startswith("clean") for t in titles) and any(t.startswith("adversarial") for t in titles)
    for explainer in ("token-gradient rollout", "gradient rollout (Chefer)"):
        assert sum(t.startswith(explainer) for t in titles) == 2, "clean and adversarial map each"
    assert any("high-attention mask" in t for t in titles)
    assert sum("TV w=" in t and "H=" in t for t in titles) == 8
    assert "before adaptation" in text and f"after {tta.name}" in text


def test_stability_is_one_for_identical_images(demo):
    tta, images, _ = demo
    same = attention_stability(tta, images[:4], images[:4].clone())
    for row in same.values():
        assert row["top_mask_iou"] == pytest.approx(1.0) and row["spearman"] == pytest.approx(1.0)
    moved = attention_stability(tta, images[:4], images[4:8])
    assert all(row["spearman"] < 0.99 for row in moved.values())


def test_eval_on_the_embedded_default(tmp_path):
    out = tmp_path / "run"
    code = cli.main(
        [
            "eval",
            "--adapters",
            "zeroshot,atpt",
            "--set",
            "views=8",
            "--attack",
            "pgd",
            "--eps",
            "4",
            "--attack-steps",
            "2",
            "--n-examples",
            "4",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-progress",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["adapter"] for r in rows} == {"zeroshot", "atpt"}
    assert (out / "results.png").stat().st_size > 1000 and "zeroshot" in (out / "results.md").read_text()


def test_explain_command_writes_a_png(tmp_path):
    assert cli.main(["explain", "5", "--steps", "1", "--out", str(tmp_path / "e.png")]) == 0
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        cli.main(["explain", "not-a-number"])
    assert cli.main(["explain", "5000", "--out", str(tmp_path / "f.png")]) == 2


def test_demo_subset_refuses_another_model_size():
    from atpt_plugin.adapters.datasets import load_dataset

    with pytest.raises(ValueError, match="--model demo"):
        load_dataset("demo", None, image_size=224)
    assert torch.equal(load_dataset("demo", None, image_size=32)[3][0], load_demo_subset(4)[0][3])
