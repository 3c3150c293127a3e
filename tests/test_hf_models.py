"""`atpt eval --model hf:<hub id or folder>`: Hugging Face models offline from a local folder,
random init from their config, clear errors when they cannot be had, and a run end to end."""

import json

import pytest
import torch
import transformers  # noqa: E402  (the [hf] extra, installed by scripts/setup.sh)
from atpt_plugin.adapters import cli
from atpt_plugin.adapters.models import create_model
from test_families import make_hf_clip, word_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny CLIPModel and its tokenizer, written with save_pretrained as users do."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-clip"
    torch.manual_seed(0)
    model = make_hf_clip().eval()
    model.save_pretrained(folder)
    word_tokenizer(bos=True).save_pretrained(folder)
    return folder, model


def test_a_local_folder_loads_with_its_weights_and_tokenizer(saved):
    folder, original = saved
    model, tokenizer, name, recorded = create_model(f"hf:{folder}", "openai")
    assert isinstance(model, transformers.CLIPModel) and not model.training
    assert name == f"hf:{folder}" and recorded == str(folder.resolve())
    reference = original.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())
    assert tokenizer(["a photo of a cat."])["input_ids"] == word_tokenizer(bos=True)(["a photo of a cat."])["input_ids"]


def test_random_init_from_the_config_is_seeded(saved):
    folder, original = saved
    first, _, _, recorded = create_model(f"hf:{folder}", "none", seed=3)
    again, _, _, _ = create_model(f"hf:{folder}", "none", seed=3)
    assert recorded == "none"
    assert torch.equal(first.logit_scale, again.logit_scale)
    weight = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], original.state_dict()[weight])


def test_what_cannot_be_had_is_a_clear_error(tmp_path):
    with pytest.raises(cli.PretrainedUnavailable, match="(?s)offline mode.*save_pretrained"):
        create_model("hf:atpt-test/no-such-model", "openai")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        create_model(f"hf:{tmp_path / 'missing'}", "openai")
    with pytest.raises(ValueError, match="brings its own weights"):
        create_model("hf:atpt-test/no-such-model", "/some/file.pt")


@pytest.mark.usefixtures("one_thread")
def test_eval_runs_a_hugging_face_model_end_to_end(saved, tmp_path, capsys):
    folder, _ = saved
    out = tmp_path / "run"
    status = cli.main(
        [
            "eval",
            "--model",
            f"hf:{folder}",
            "--adapters",
            "zeroshot,atpt",
            "--set",
            "views=4",
            "--set",
            "rho=0.25",
            "--attack",
            "pgd",
            "--eps",
            "4",
            "--attack-steps",
            "1",
            "--n-examples",
            "2",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-progress",
        ]
    )
    assert status == 0, capsys.readouterr().err
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["settings"]["model"] == f"hf:{folder}"
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {line["adapter"] for line in lines} == {"zeroshot", "atpt"} and len(lines) == 4
    rows = {row["adapter"]: row for row in json.loads((out / "summary.json").read_text())["rows"]}
    for row in rows.values():  # counted as for open_clip models (their patch embedding is the stem)
        assert row["image_passes_per_image"] >= 1
    assert rows["atpt"]["image_passes_per_image"] >= 4  # at least its views
