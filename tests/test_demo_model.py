"""The embedded demo CLIP: training script, shipped checkpoint, shipped held-out subset.

The subset is disjoint from training by construction: `train.py` trains on the official
*training* files only and draws the subset from the official *test* files (t10k-*); the
subset file records its split and its indices into the test split, checked here (and
against the real test files when the Debian package dataset-fashion-mnist is installed).
"""

import json
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch

import atpt_plugin.demo_model as demo
from atpt_plugin import load_adapter
from atpt_plugin.backbones.openclip import OpenClipBackbone
from atpt_plugin.demo_model.data import CLASSNAMES, DEBIAN_DIR, build_subset, load_split, read_idx, write_idx
from atpt_plugin.demo_model.train import zero_shot_accuracy

# Zero-shot accuracy the shipped model must clear on the first 200 shipped test images
# (20 per class). Chance is 10%; the training run measured about 85% on the whole
# test split (weights/fmnist-vit-tiny.json). 70% is several standard errors below that
# for 200 images, so it fails on a broken checkpoint or preprocessing, not on noise.
MIN_ZERO_SHOT_200 = 0.70


@pytest.fixture(scope="module")
def demo_model():
    return demo.load_demo_model()


def synthetic_fashion_mnist(folder, n_train=48, n_test=30, seed=0):
    """IDX files in the official layout with random pixels, labels cycling over the classes."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_idx_round_trip(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        write_idx(tmp_path / name, array)
        np.testing.assert_array_equal(read_idx(tmp_path / name), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError):
        read_idx(tmp_path / "bad")


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_split("train", tmp_path)


@pytest.mark.slow
def test_training_script_runs_and_writes_a_loadable_checkpoint(tmp_path):
    synthetic_fashion_mnist(tmp_path)
    out, subset = tmp_path / "tiny.pt", tmp_path / "subset.npz"
    cmd = [
        sys.executable,
        "-m",
        "atpt_plugin.demo_model.train",
        "--data-dir",
        str(tmp_path),
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--output",
        str(out),
        "--subset-output",
        str(subset),
        "--subset-per-class",
        "2",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "zero-shot accuracy" in done.stdout and "step 2/2" in done.stdout

    state = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    model = open_clip.create_model(demo.MODEL_NAME, pretrained=str(out))  # loads into fp32
    assert next(model.parameters()).dtype == torch.float32
    assert torch.equal(model.visual.conv1.weight, state["visual.conv1.weight"].float())
    fresh = open_clip.create_model(demo.MODEL_NAME)
    assert not torch.equal(fresh.visual.conv1.weight, model.visual.conv1.weight)  # trained weights

    record = json.loads(out.with_suffix(".json").read_text())
    assert record["steps"] == 2 and record["train_images"] == 48 and record["test_images"] == 30
    images, labels = demo.load_demo_subset(path=subset)
    assert images.shape == (20, 3, demo.image_size(), demo.image_size())
    assert labels.tolist() == list(range(10)) * 2


def test_subset_indices_are_balanced_round_robin_and_seeded():
    labels = np.random.default_rng(0).integers(0, 10, 500)
    a, b = build_subset(labels, 5, seed=3), build_subset(labels, 5, seed=3)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 50
    assert labels[a].tolist() == list(range(10)) * 5
    assert not np.array_equal(a, build_subset(labels, 5, seed=4))
    with pytest.raises(ValueError):
        build_subset(labels, 1000)


def test_config_is_registered_with_open_clip():
    assert demo.MODEL_NAME in open_clip.list_models()
    config = open_clip.get_model_config(demo.MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(demo.MODEL_NAME)
    assert tokenizer.context_length == config["text_cfg"]["context_length"]
    model = open_clip.create_model(demo.MODEL_NAME)
    grid = model.visual.grid_size
    assert grid[0] >= 8 and grid[1] >= 8
    assert OpenClipBackbone(model).kind == "vit"  # class token, standard blocks


def test_shipped_checkpoint_is_small_and_loads_through_open_clip(demo_model):
    path = demo.checkpoint_path()
    assert path.stat().st_size < 10 * 2**20
    model = open_clip.create_model(demo.MODEL_NAME, pretrained=str(path))
    state = torch.load(path, weights_only=True)
    for name, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, state[name].float()), name
    loaded, tokenizer, classnames = demo_model
    assert not loaded.training and classnames == list(CLASSNAMES)
    assert tokenizer.context_length == open_clip.get_model_config(demo.MODEL_NAME)["text_cfg"]["context_length"]


def test_shipped_subset_shape_labels_and_provenance():
    images, labels = demo.load_demo_subset()
    size = demo.image_size()
    assert images.shape == (1000, 3, size, size) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])  # grey
    assert torch.bincount(labels, minlength=10).tolist() == [100] * 10
    assert torch.bincount(demo.load_demo_subset(200)[1], minlength=10).tolist() == [20] * 10
    assert demo.subset_path().stat().st_size < 1_000_000
    with np.load(demo.subset_path()) as data:
        assert str(data["split"]) == "test"
        indices = data["test_indices"]
        raw_images, raw_labels = data["images"], data["labels"]
        assert list(data["classnames"]) == list(CLASSNAMES)
    assert raw_images.shape == (1000, 28, 28) and raw_images.dtype == np.uint8
    assert len(np.unique(indices)) == 1000 and indices.min() >= 0 and indices.max() < 10000
    if not (DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").exists():
        missing = "Debian package dataset-fashion-mnist not installed: cannot compare with the test split"
        if os.environ.get("ATPT_CI") == "1":  # set by .ci/run, which installs it
            pytest.fail(missing)
        pytest.skip(missing + " (apt-get install dataset-fashion-mnist; CI fails instead of skipping)")
    test_images, test_labels = load_split("test")
    np.testing.assert_array_equal(test_images[indices], raw_images)
    np.testing.assert_array_equal(test_labels[indices], raw_labels)


def test_shipped_model_zero_shot_is_well_above_chance(demo_model):
    model, tokenizer, classnames = demo_model
    with np.load(demo.subset_path()) as data:
        images, labels = data["images"][:200], data["labels"][:200]
    accuracy = zero_shot_accuracy(model, tokenizer, images, labels)
    assert accuracy > MIN_ZERO_SHOT_200, accuracy


def test_zeroshot_adapter_matches_direct_zero_shot(demo_model):
    """The adapter's preprocessing (center view, normalisation, prompt) is the training one."""
    model, tokenizer, classnames = demo_model
    images, _ = demo.load_demo_subset(20)
    with torch.no_grad():
        logits = load_adapter("zeroshot").wrap(model, classnames, tokenizer)(images)
        text = model.encode_text(tokenizer([f"{demo.CONTEXT} {c}." for c in classnames]), normalize=True)
        mean = torch.tensor(model.visual.image_mean)[:, None, None]
        std = torch.tensor(model.visual.image_std)[:, None, None]
        direct = model.logit_scale.exp() * model.encode_image((images - mean) / std, normalize=True) @ text.T
    torch.testing.assert_close(logits, direct, atol=1e-3, rtol=1e-4)
