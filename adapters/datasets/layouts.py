"""The built-in test sets: CoOp split files, FGVC-Aircraft, the ImageNet family, image folders
and the shipped demo subset; each a registered `DatasetInfo` with its loader."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .base import DATASETS, IMAGE_EXTENSIONS, DatasetInfo, DatasetLayoutError, EvalDataset


def _split(key, title, dirs, image_dir, split_file, domain_word, aliases=()):
    image = f"{image_dir}/..." if image_dir else "<image paths of the split file>"
    layout = (
        f"<root>/{dirs[0]}/{{{split_file}, {image}}} (CoOp; TPT's <root>/{dirs[1]}/ also works); the "
        'split file is JSON {"train"|"val"|"test": [[relative_image_path, label, class_name], ...]}'
    )
    return DatasetInfo(
        key,
        title,
        "split_json",
        _load_split_json,
        layout,
        tuple(dirs),
        image_dir,
        split_file,
        domain_word,
        tuple(aliases),
    )


def _imagenet(key, title, dirs, variant, aliases=()):
    folders = "0/ ... 999/ (class indices)" if variant == "v2" else "<wnid>/ (e.g. n01440764/)"
    layout = f"{' or '.join(f'<root>/{d}/' for d in dirs)} with one folder per class: {folders}, images inside"
    return DatasetInfo(
        key,
        title,
        "imagenet",
        _load_imagenet,
        layout,
        tuple(dirs),
        aliases=tuple(aliases),
        imagenet_variant=variant,
        augmix_ops=False,
        splits=("test",),
    )


def _builtin_datasets() -> List[DatasetInfo]:
    return [
        _split(
            "pets",
            "OxfordPets",
            ["oxford_pets", "OxfordPets"],
            "images",
            "split_zhou_OxfordPets.json",
            "pet",
            ["oxford_pets", "oxfordpets"],
        ),
        _split(
            "caltech101",
            "Caltech101",
            ["caltech-101", "Caltech101"],
            "101_ObjectCategories",
            "split_zhou_Caltech101.json",
            "object",
            ["caltech-101"],
        ),
        _split(
            "cars",
            "StanfordCars",
            ["stanford_cars", "StanfordCars"],
            "",
            "split_zhou_StanfordCars.json",
            "car",
            ["stanford_cars", "stanfordcars"],
        ),
        _split(
            "dtd",
            "DTD",
            ["dtd", "DTD"],
            "images",
            "split_zhou_DescribableTextures.json",
            "texture",
            ["describabletextures"],
        ),
        _split("ucf101", "UCF101", ["ucf101", "UCF101"], "UCF-101-midframes", "split_zhou_UCF101.json", "action"),
        _split("eurosat", "EuroSAT", ["eurosat", "EuroSAT"], "2750", "split_zhou_EuroSAT.json", "satellite-map"),
        _split(
            "flower102",
            "Flower102",
            ["oxford_flowers", "Flower102"],
            "jpg",
            "split_zhou_OxfordFlowers.json",
            "flower",
            ["flowers", "flowers102", "oxford_flowers"],
        ),
        _split(
            "food101",
            "Food101",
            ["food-101", "Food101"],
            "images",
            "split_zhou_Food101.json",
            None,
            ["food-101", "food"],
        ),
        _split("sun397", "SUN397", ["sun397", "SUN397"], "SUN397", "split_zhou_SUN397.json", None, ["sun"]),
        DatasetInfo(
            "aircraft",
            "FGVC-Aircraft",
            "aircraft",
            _load_aircraft,
            "<root>/fgvc_aircraft/{images/<id>.jpg, variants.txt, images_variant_test.txt} (CoOp / TPT; "
            "FGVC-Aircraft's own 'data' folder); images_variant_<split>.txt lines are "
            "'<image id> <variant name>'",
            ("fgvc_aircraft", "fgvc-aircraft-2013b/data"),
            "images",
            domain_word="aircraft",
            aliases=("fgvc_aircraft", "fgvc-aircraft", "fgvcaircraft"),
        ),
        _imagenet(
            "imagenet",
            "ImageNet",
            ["imagenet/images/val", "ImageNet/val", "imagenet/val"],
            "",
            ["i", "imagenet-1k", "imagenet1k"],
        ),
        _imagenet(
            "imagenet_a", "ImageNet-A", ["imagenet-adversarial/imagenet-a", "imagenet-a"], "a", ["a", "imagenet-a"]
        ),
        _imagenet(
            "imagenet_r", "ImageNet-R", ["imagenet-rendition/imagenet-r", "imagenet-r"], "r", ["r", "imagenet-r"]
        ),
        _imagenet(
            "imagenet_v2",
            "ImageNet-V2",
            ["imagenetv2/imagenetv2-matched-frequency-format-val", "imagenetv2-matched-frequency-format-val"],
            "v2",
            ["v", "v2", "imagenetv2", "imagenet-v2"],
        ),
        _imagenet(
            "imagenet_sketch",
            "ImageNet-Sketch",
            ["imagenet-sketch/images", "ImageNet-Sketch/images", "ImageNet-Sketch/sketch", "ImageNet-Sketch"],
            "sketch",
            ["k", "sketch", "imagenet-sketch"],
        ),
        DatasetInfo(
            "imagefolder",
            "ImageFolder",
            "imagefolder",
            _load_image_folder,
            "<root>/<class name>/<image> (one folder per class, sorted folder names = labels)",
            (".",),
            aliases=("folder",),
            splits=("test",),
        ),
        DatasetInfo(
            "fmnist_demo",
            "Fashion-MNIST demo subset",
            "demo",
            _load_demo,
            "shipped with the package (1,000 held-out Fashion-MNIST test images); no --data-root needed",
            aliases=("demo", "fmnist"),
            needs_root=False,
        ),
    ]


class DemoDataset(EvalDataset):
    """The held-out Fashion-MNIST subset shipped with the embedded demo model (in memory)."""

    def __init__(self, info: DatasetInfo, image_size: Optional[int] = None):
        from atpt_plugin.demo_model import CLASSNAMES, load_demo_subset, subset_path

        if image_size not in (None, _demo_image_size()):
            raise ValueError(
                f"the demo subset is made for the demo model's {_demo_image_size()}px input, "
                f"not {image_size}px: use --model fmnist-vit-tiny (or --model demo)"
            )
        self.images, labels = load_demo_subset()
        samples = [(f"fmnist_test_1000/{index}", int(label)) for index, label in enumerate(labels)]
        super().__init__(
            info, subset_path().parent, "test", samples, list(CLASSNAMES), subset_path().parent, image_size
        )

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.images[index], self.samples[index][1]


def _load_demo(info: DatasetInfo, root, split: str, image_size) -> DemoDataset:
    return DemoDataset(info, image_size)


def _demo_image_size() -> int:
    from atpt_plugin.demo_model import image_size

    return image_size()


def _dataset_dir(info: DatasetInfo, root: Path, marker: str) -> Path:
    """The dataset folder: `root` itself when it holds `marker`, else one of the candidates."""
    if (root / marker).exists():
        return root
    for candidate in info.dirs:
        if (root / candidate / marker).exists():
            return root / candidate
    lowered = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    for candidate in info.dirs:
        found = lowered.get(candidate.lower())
        if found is not None and (found / marker).exists():
            return found
    raise DatasetLayoutError(
        f"{info.title} not found under {str(root)!r}: no {marker} in it or in "
        f"{', '.join(repr(d) for d in info.dirs)}; expected layout: {info.layout}"
    )


def _load_split_json(info: DatasetInfo, root: Path, split: str, image_size) -> EvalDataset:
    folder = _dataset_dir(info, root, info.split_file)
    path = folder / info.split_file
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetLayoutError(f"{path} is not readable JSON ({error}); expected layout: {info.layout}") from None
    if not isinstance(content, dict) or split not in content:
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise DatasetLayoutError(f"{path} has no {split!r} split (found {keys}); expected layout: {info.layout}")
    names: Dict[int, str] = {}
    samples: List[Tuple[str, int]] = []
    for part, items in content.items():
        if not isinstance(items, list):
            raise DatasetLayoutError(f"{path}: split {part!r} is not a list; expected layout: {info.layout}")
        for item in items:
            if (
                not isinstance(item, (list, tuple))
                or len(item) != 3
                or not isinstance(item[0], str)
                or isinstance(item[1], bool)
                or not isinstance(item[1], int)
                or not isinstance(item[2], str)
            ):
                raise DatasetLayoutError(
                    f"{path}: split {part!r} has the entry {item!r}, expected "
                    f"[relative_image_path, label, class_name]; layout: {info.layout}"
                )
            relative, label, classname = item
            classname = classname.replace("_", " ").strip()
            if names.setdefault(label, classname) != classname:
                raise DatasetLayoutError(f"{path}: label {label} is named both {names[label]!r} and {classname!r}")
            if part == split:
                samples.append((relative, label))
    classnames = _contiguous_names(names, path)
    image_root = folder / info.image_dir if info.image_dir else folder
    _check_files(info, image_root, samples)
    return EvalDataset(info, folder, split, samples, classnames, image_root, image_size)


def _contiguous_names(names: Dict[int, str], source) -> List[str]:
    if not names:
        raise DatasetLayoutError(f"{source}: no labelled images")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if min(names) < 0 or missing:
        raise DatasetLayoutError(
            f"{source}: labels must be 0..C-1 with a class name each; labels without a name: {missing[:10]}"
        )
    return [names[i] for i in range(len(names))]


def _check_files(info: DatasetInfo, image_root: Path, samples) -> None:
    if not image_root.is_dir():
        raise DatasetLayoutError(f"image folder {str(image_root)!r} does not exist; expected layout: {info.layout}")
    missing = [rel for rel, _ in samples if not (image_root / rel).is_file()]
    if missing:
        raise DatasetLayoutError(
            f"{len(missing)} of {len(samples)} images listed for {info.title} are missing under "
            f"{str(image_root)!r}, e.g. {missing[:3]}; expected layout: {info.layout}"
        )


def _load_aircraft(info: DatasetInfo, root: Path, split: str, image_size) -> EvalDataset:
    folder = _dataset_dir(info, root, "variants.txt")
    variants = [line.strip() for line in (folder / "variants.txt").read_text().splitlines() if line.strip()]
    index = {name: i for i, name in enumerate(variants)}
    listing = folder / f"images_variant_{split}.txt"
    if not listing.is_file():
        raise DatasetLayoutError(f"{listing} does not exist (split {split!r}); expected layout: {info.layout}")
    samples = []
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        image_id, _, variant = line.strip().partition(" ")
        if variant not in index:
            raise DatasetLayoutError(
                f"{listing}:{number}: variant {variant!r} is not in variants.txt; expected layout: {info.layout}"
            )
        samples.append((f"{image_id}.jpg", index[variant]))
    image_root = folder / info.image_dir
    _check_files(info, image_root, samples)
    return EvalDataset(info, folder, split, samples, variants, image_root, image_size)


def imagenet_wnids() -> List[str]:
    """The 1000 ImageNet-1k WordNet ids in label order (shipped by timm)."""
    return _synsets("imagenet_synsets.txt")


def _synsets(filename: str) -> List[str]:
    return (resources.files("timm.data._info") / filename).read_text().split()


def imagenet_classnames() -> List[str]:
    """CLIP's curated ImageNet class names, label order (shipped by open_clip)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def _class_folders(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _find_class_dir(info: DatasetInfo, root: Path) -> Path:
    """`root` itself when it holds class folders of this variant, else a candidate below it."""

    def looks_right(directory: Path) -> bool:
        if not directory.is_dir():
            return False
        folders = _class_folders(directory)
        if info.imagenet_variant == "v2":
            return bool(folders) and all(f.isdigit() for f in folders)
        return bool(folders) and all(f.startswith("n") and f[1:].isdigit() for f in folders)

    for candidate in info.dirs:
        if looks_right(root / candidate):
            return root / candidate
    if looks_right(root):
        return root
    raise DatasetLayoutError(f"{info.title} not found under {str(root)!r}; expected layout: {info.layout}")


def _load_imagenet(info: DatasetInfo, root: Path, split: str, image_size) -> EvalDataset:
    directory = _find_class_dir(info, root)
    wnids = imagenet_wnids()
    names = imagenet_classnames()
    places = [directory, directory.parent, directory.parent.parent, root / "imagenet"]
    custom = next((p / "classnames.txt" for p in places if (p / "classnames.txt").is_file()), None)
    if custom is not None:  # CoOp's imagenet/classnames.txt: "<wnid> <class name>" per line
        table = dict(line.strip().split(" ", 1) for line in custom.read_text().splitlines() if " " in line.strip())
        names = [table.get(w, n) for w, n in zip(wnids, names)]
    if info.imagenet_variant in ("a", "r"):
        subset = _synsets(f"imagenet_{info.imagenet_variant}_synsets.txt")
        index = {w: i for i, w in enumerate(subset)}
        classnames = [names[wnids.index(w)] for w in subset]
    else:
        index = {w: i for i, w in enumerate(wnids)}
        classnames = names
    samples = []
    for folder in _class_folders(directory):
        if info.imagenet_variant == "v2":
            label = int(folder)
            if not 0 <= label < 1000:
                raise DatasetLayoutError(f"{directory / folder}: ImageNet-V2 folders are class indices 0..999")
        elif folder in index:
            label = index[folder]
        else:
            raise DatasetLayoutError(
                f"{directory / folder}: {folder!r} is not a class of {info.title}; expected layout: {info.layout}"
            )
        samples.extend((f"{folder}/{name}", label) for name in _images_in(directory / folder))
    if not samples:
        raise DatasetLayoutError(f"no images in {str(directory)!r}; expected layout: {info.layout}")
    return EvalDataset(info, directory, "test", samples, classnames, directory, image_size)


def _load_image_folder(info: DatasetInfo, root: Path, split: str, image_size) -> EvalDataset:
    folders = _class_folders(root)
    samples = [
        (f"{folder}/{name}", label) for label, folder in enumerate(folders) for name in _images_in(root / folder)
    ]
    if not samples:
        raise DatasetLayoutError(f"no images found in class folders of {str(root)!r}; expected layout: {info.layout}")
    classnames = [folder.replace("_", " ").strip() for folder in folders]
    return EvalDataset(info, root, "test", samples, classnames, root, image_size)


for _info in _builtin_datasets():
    DATASETS.register(_info.key, _info.title)(_info)
