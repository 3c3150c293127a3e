"""Tiny fake trees of every supported dataset layout, read back with names, labels and errors."""

import json

import pytest
import torch
from atpt_plugin.adapters.datasets import (
    DATASETS,
    DatasetLayoutError,
    dataset_info,
    describe_layout,
    imagenet_classnames,
    imagenet_wnids,
    load_dataset,
    select,
)
from PIL import Image

from atpt_plugin.registry import UnknownNameError

SPLIT_KEYS = [key for key in DATASETS.names() if dataset_info(key).kind == "split_json"]


def write_image(path, size=(20, 14), value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value % 256, 40, 200)).save(path)


def make_split_tree(root, key, folder=None):
    """<root>/<folder>/<split file> listing two test images per class under the image dir."""
    info = dataset_info(key)
    base = root / (folder or info.dirs[0])
    image_root = base / info.image_dir if info.image_dir else base
    names = ["class_one", "class two", "third_class"]
    test, train = [], []
    for label, name in enumerate(names):
        for i in range(2):
            relative = f"{name.replace(' ', '_')}/img_{i}.jpg"
            write_image(image_root / relative, value=label * 10 + i)
            test.append([relative, label, name])
        train.append([f"{name.replace(' ', '_')}/img_0.jpg", label, name])
    base.mkdir(parents=True, exist_ok=True)
    (base / info.split_file).write_text(json.dumps({"train": train, "val": [], "test": test}))
    return base


@pytest.mark.parametrize("key", SPLIT_KEYS)
def test_coop_split_layouts(tmp_path, key):
    make_split_tree(tmp_path, key)
    data = load_dataset(key, tmp_path, image_size=16)
    assert data.classnames == ["class one", "class two", "third class"]  # underscores read as spaces
    assert len(data) == 6 and [data.label(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    image, label = data[3]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 1
    assert 0 <= image.min() and image.max() <= 1
    assert data.domain_word == dataset_info(key).domain_word
    assert load_dataset(key, tmp_path, split="train", image_size=16).samples[0][1] == 0


def test_tpt_folder_names_and_dataset_folder_as_root(tmp_path):
    base = make_split_tree(tmp_path, "pets", folder="OxfordPets")
    assert len(load_dataset("OxfordPets", tmp_path)) == 6  # TPT's folder name, title as name
    assert len(load_dataset("pets", base)) == 6  # the dataset folder itself


def test_domain_words_of_the_authors_code():
    words = {
        key: dataset_info(key).domain_word
        for key in ("pets", "flower102", "caltech101", "dtd", "aircraft", "ucf101", "cars", "eurosat")
    }
    assert words == {
        "pets": "pet",
        "flower102": "flower",
        "caltech101": "object",
        "dtd": "texture",
        "aircraft": "aircraft",
        "ucf101": "action",
        "cars": "car",
        "eurosat": "satellite-map",
    }
    assert dataset_info("food101").domain_word is None and dataset_info("imagenet").domain_word is None
    assert dataset_info("pets").adapter_overrides() == {"domain_word": "pet"}
    assert dataset_info("imagenet_a").adapter_overrides() == {"augmix_ops": False}  # TPT: no AugMix ops


def test_fgvc_aircraft_layout(tmp_path):
    base = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    (base / "images").mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(variants) + "\n")
    lines = []
    for i, variant in enumerate(variants * 2):
        write_image(base / "images" / f"{1000 + i}.jpg", value=i)
        lines.append(f"{1000 + i} {variant}")
    (base / "images_variant_test.txt").write_text("\n".join(lines) + "\n")
    data = load_dataset("fgvc-aircraft", tmp_path, image_size=8)
    assert data.classnames == variants and [data.label(i) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert data.domain_word == "aircraft" and data[5][0].shape == (3, 8, 8)


def test_imagenet_layouts_coop_and_tpt(tmp_path):
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 == len(imagenet_classnames()) and wnids == sorted(wnids)
    for folder in ("imagenet/images/val", "ImageNet/val"):
        root = tmp_path / folder.split("/")[0].lower()
        for wnid in (wnids[0], wnids[7], wnids[999]):
            write_image(root / folder / wnid / "a.JPEG")
        data = load_dataset("imagenet", root, image_size=8)
        assert len(data.classnames) == 1000 and [data.label(i) for i in range(3)] == [0, 7, 999]
        assert data.classnames[0] == imagenet_classnames()[0]


@pytest.mark.parametrize("key, variant", [("imagenet_a", "a"), ("imagenet_r", "r")])
def test_imagenet_a_and_r_use_their_200_class_subsets(tmp_path, key, variant):
    from importlib import resources

    subset = (resources.files("timm.data._info") / f"imagenet_{variant}_synsets.txt").read_text().split()
    folder = dataset_info(key).dirs[0]
    for wnid in (subset[3], subset[150]):
        write_image(tmp_path / folder / wnid / "x.jpg")
    data = load_dataset(key, tmp_path)
    assert len(data.classnames) == 200 and [data.label(i) for i in range(2)] == [3, 150]
    full = dict(zip(imagenet_wnids(), imagenet_classnames()))
    assert data.classnames[3] == full[subset[3]]
    write_image(tmp_path / folder / imagenet_wnids()[0] / "x.jpg")  # not one of the 200 (tench)
    if imagenet_wnids()[0] not in subset:
        with pytest.raises(DatasetLayoutError, match="not a class of"):
            load_dataset(key, tmp_path)


def test_imagenet_v2_and_sketch(tmp_path):
    for index in (0, 5, 999):
        write_image(tmp_path / "imagenetv2/imagenetv2-matched-frequency-format-val" / str(index) / "x.jpeg")
    data = load_dataset("imagenet-v2", tmp_path)
    assert sorted(data.label(i) for i in range(3)) == [0, 5, 999] and len(data.classnames) == 1000
    write_image(tmp_path / "imagenet-sketch/images" / imagenet_wnids()[42] / "s.png")
    sketch = load_dataset("sketch", tmp_path)
    assert sketch.label(0) == 42 and sketch.info.key == "imagenet_sketch"


def test_image_folder(tmp_path):
    for name in ("golden_retriever", "tabby cat"):
        write_image(tmp_path / name / "1.png")
        write_image(tmp_path / name / "2.jpg")
    (tmp_path / "tabby cat" / "notes.txt").write_text("not an image")
    data = load_dataset("imagefolder", tmp_path, image_size=None)
    assert data.classnames == ["golden retriever", "tabby cat"] and len(data) == 4
    assert data[0][0].shape == (3, 14, 20)  # image_size=None: original size


def test_errors_name_the_expected_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"split_zhou_OxfordPets\.json.*images"):
        load_dataset("pets", tmp_path)
    with pytest.raises(DatasetLayoutError, match="is not a directory"):
        load_dataset("pets", tmp_path / "nowhere")
    base = tmp_path / "dtd"
    base.mkdir()
    (base / "split_zhou_DescribableTextures.json").write_text("{not json")
    with pytest.raises(DatasetLayoutError, match="not readable JSON.*expected layout"):
        load_dataset("dtd", tmp_path)
    (base / "split_zhou_DescribableTextures.json").write_text(json.dumps({"test": [["a.jpg", 0]]}))
    with pytest.raises(DatasetLayoutError, match=r"\[relative_image_path, label, class_name\]"):
        load_dataset("dtd", tmp_path)
    (base / "split_zhou_DescribableTextures.json").write_text(json.dumps({"train": []}))
    with pytest.raises(DatasetLayoutError, match="no 'test' split"):
        load_dataset("dtd", tmp_path)
    (base / "split_zhou_DescribableTextures.json").write_text(
        json.dumps({"test": [["x/a.jpg", 0, "banded"], ["x/b.jpg", 2, "woven"]]})
    )
    with pytest.raises(DatasetLayoutError, match="labels without a name: \\[1\\]"):
        load_dataset("dtd", tmp_path)
    (base / "split_zhou_DescribableTextures.json").write_text(json.dumps({"test": [["x/a.jpg", 0, "banded"]]}))
    (base / "images").mkdir()
    with pytest.raises(DatasetLayoutError, match="1 of 1 images .* missing"):
        load_dataset("dtd", tmp_path)
    with pytest.raises(DatasetLayoutError, match="ImageNet-A not found.*one folder per class"):
        load_dataset("imagenet_a", tmp_path)
    assert "split_zhou_OxfordFlowers.json" in describe_layout("flowers")


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(
        UnknownNameError,
        match="no dataset named 'petz' \\(did you mean 'pets'\\?\\); installed "
        "datasets: aircraft, caltech101, .*imagefolder.*atpt_plugin.datasets",
    ):
        dataset_info("petz")
    assert dataset_info("Flowers").key == "flower102" and dataset_info("ImageNet-A").key == "imagenet_a"


def test_selection_is_a_seeded_prefix():
    first = select(50, 10, seed=3)
    assert first == select(50, 20, seed=3)[:10] and len(set(first)) == 10
    assert first != select(50, 10, seed=4) and sorted(select(50, None, seed=3)) == list(range(50))
    with pytest.raises(ValueError, match="positive integer"):
        select(50, 0, seed=0)
