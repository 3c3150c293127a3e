"""Test sets in the layouts the CoOp / TPT code bases use, with class names and domain words.

`load_dataset(name, root)` accepts either the data root that holds one folder per dataset
(CoOp's `DATA/`, TPT's `data_root`) or the dataset's own folder. Every dataset yields
`(image, label)` with `image` a (3, S, S) float tensor in [0,1]: Resize(S, bicubic) +
CenterCrop(S), the model's own preprocessing without normalisation (the adapters
normalise inside). A dataset that is missing or malformed raises `DatasetLayoutError`
naming the expected layout; `describe_layout(name)` prints it. An image file that is
there but cannot be read or decoded raises `BadImageError` naming the file and the sample,
so the evaluation can stop with a clear message or skip that sample.

Class names come from the dataset's own files (split file, `variants.txt`) with
underscores read as spaces, as CoOp's prompt learner does; the ImageNet family uses
CLIP's curated ImageNet class names (shipped by open_clip) indexed by the WordNet ids
shipped by timm. ImageNet-A and -R use their official 200-class subsets.

The domain word is what the authors' A-TPT code inserts into "a photo of a" for the
fine-grained sets ("a pet photo of a" for Pets); `None` keeps the plain phrase.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.data import Dataset

from atpt_plugin.registry import Registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetLayoutError(FileNotFoundError):
    """The dataset is missing or does not have the expected layout."""


class BadImageError(Exception):
    """An image file that exists but cannot be read or decoded; names the file and the sample.

    `index` and `sample_id` are set by the dataset, `position` (in the evaluated selection)
    by the evaluation loop.
    """

    def __init__(self, path, reason: str, index: Optional[int] = None, sample_id: Optional[str] = None):
        super().__init__(str(path), reason)
        self.path, self.reason, self.index, self.sample_id = str(path), reason, index, sample_id
        self.position: Optional[int] = None

    def __str__(self) -> str:
        where = [f"sample {self.position} of the run" if self.position is not None else "",
                 f"dataset index {self.index}" if self.index is not None else "",
                 f"id {self.sample_id!r}" if self.sample_id is not None else ""]
        where = ", ".join(w for w in where if w)
        return f"could not read image {self.path}" + (f" ({where})" if where else "") + f": {self.reason}"

    def as_dict(self) -> Dict[str, object]:
        return {"position": self.position, "index": self.index, "id": self.sample_id, "path": self.path,
                "reason": self.reason}


def json_digest(value, length: int = 16) -> str:
    """A short stable hash of a JSON-serialisable value (settings, class names, sample lists)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


DATASETS = Registry("dataset", "atpt_plugin.datasets")


@dataclass(frozen=True)
class DatasetInfo:
    """How one dataset is laid out on disk, how it is loaded and what its prompts need.

    A package adds a dataset by publishing a `DatasetInfo` (or a callable returning one)
    under the entry-point group `atpt_plugin.datasets`; `loader(info, root, split,
    image_size)` returns an `EvalDataset` (`root` is None when `needs_root` is False).
    """

    key: str
    title: str
    kind: str                      # the layout family: "split_json", "aircraft", "imagenet", "imagefolder", ...
    loader: Callable[..., "EvalDataset"]
    layout: str                    # the expected tree, for error messages and `atpt list`
    dirs: Tuple[str, ...] = ()     # candidate dataset folders under the data root (CoOp, TPT)
    image_dir: str = ""            # image root inside the dataset folder
    split_file: str = ""
    domain_word: Optional[str] = None
    aliases: Tuple[str, ...] = ()
    imagenet_variant: str = ""     # "", "a", "r", "v2", "sketch"
    augmix_ops: bool = True        # TPT convention: no AugMix ops on the ImageNet family
    needs_root: bool = True
    splits: Optional[Tuple[str, ...]] = None   # None: any split the files name; else the only ones

    def adapter_overrides(self) -> Dict[str, object]:
        """Settings the TPT / A-TPT code applies for this dataset."""
        overrides: Dict[str, object] = {}
        if self.domain_word:
            overrides["domain_word"] = self.domain_word
        if not self.augmix_ops:
            overrides["augmix_ops"] = False
        return overrides


def _split(key, title, dirs, image_dir, split_file, domain_word, aliases=()):
    image = f"{image_dir}/..." if image_dir else "<image paths of the split file>"
    layout = (f"<root>/{dirs[0]}/{{{split_file}, {image}}} (CoOp; TPT's <root>/{dirs[1]}/ also works); the "
              'split file is JSON {"train"|"val"|"test": [[relative_image_path, label, class_name], ...]}')
    return DatasetInfo(key, title, "split_json", _load_split_json, layout, tuple(dirs), image_dir, split_file,
                       domain_word, tuple(aliases))


def _imagenet(key, title, dirs, variant, aliases=()):
    folders = "0/ ... 999/ (class indices)" if variant == "v2" else "<wnid>/ (e.g. n01440764/)"
    layout = f"{' or '.join(f'<root>/{d}/' for d in dirs)} with one folder per class: {folders}, images inside"
    return DatasetInfo(key, title, "imagenet", _load_imagenet, layout, tuple(dirs), aliases=tuple(aliases),
                       imagenet_variant=variant, augmix_ops=False, splits=("test",))


def _builtin_datasets() -> List[DatasetInfo]:
    return [
        _split("pets", "OxfordPets", ["oxford_pets", "OxfordPets"], "images", "split_zhou_OxfordPets.json",
               "pet", ["oxford_pets", "oxfordpets"]),
        _split("caltech101", "Caltech101", ["caltech-101", "Caltech101"], "101_ObjectCategories",
               "split_zhou_Caltech101.json", "object", ["caltech-101"]),
        _split("cars", "StanfordCars", ["stanford_cars", "StanfordCars"], "", "split_zhou_StanfordCars.json",
               "car", ["stanford_cars", "stanfordcars"]),
        _split("dtd", "DTD", ["dtd", "DTD"], "images", "split_zhou_DescribableTextures.json", "texture",
               ["describabletextures"]),
        _split("ucf101", "UCF101", ["ucf101", "UCF101"], "UCF-101-midframes", "split_zhou_UCF101.json",
               "action"),
        _split("eurosat", "EuroSAT", ["eurosat", "EuroSAT"], "2750", "split_zhou_EuroSAT.json",
               "satellite-map"),
        _split("flower102", "Flower102", ["oxford_flowers", "Flower102"], "jpg", "split_zhou_OxfordFlowers.json",
               "flower", ["flowers", "flowers102", "oxford_flowers"]),
        _split("food101", "Food101", ["food-101", "Food101"], "images", "split_zhou_Food101.json", None,
               ["food-101", "food"]),
        _split("sun397", "SUN397", ["sun397", "SUN397"], "SUN397", "split_zhou_SUN397.json", None, ["sun"]),
        DatasetInfo("aircraft", "FGVC-Aircraft", "aircraft", _load_aircraft,
                    "<root>/fgvc_aircraft/{images/<id>.jpg, variants.txt, images_variant_test.txt} (CoOp / TPT; "
                    "FGVC-Aircraft's own 'data' folder); images_variant_<split>.txt lines are "
                    "'<image id> <variant name>'", ("fgvc_aircraft", "fgvc-aircraft-2013b/data"), "images",
                    domain_word="aircraft", aliases=("fgvc_aircraft", "fgvc-aircraft", "fgvcaircraft")),
        _imagenet("imagenet", "ImageNet", ["imagenet/images/val", "ImageNet/val", "imagenet/val"], "",
                  ["i", "imagenet-1k", "imagenet1k"]),
        _imagenet("imagenet_a", "ImageNet-A", ["imagenet-adversarial/imagenet-a", "imagenet-a"], "a",
                  ["a", "imagenet-a"]),
        _imagenet("imagenet_r", "ImageNet-R", ["imagenet-rendition/imagenet-r", "imagenet-r"], "r",
                  ["r", "imagenet-r"]),
        _imagenet("imagenet_v2", "ImageNet-V2", ["imagenetv2/imagenetv2-matched-frequency-format-val",
                                                  "imagenetv2-matched-frequency-format-val"], "v2",
                  ["v", "v2", "imagenetv2", "imagenet-v2"]),
        _imagenet("imagenet_sketch", "ImageNet-Sketch", ["imagenet-sketch/images", "ImageNet-Sketch/images",
                                                          "ImageNet-Sketch/sketch", "ImageNet-Sketch"], "sketch",
                  ["k", "sketch", "imagenet-sketch"]),
        DatasetInfo("imagefolder", "ImageFolder", "imagefolder", _load_image_folder,
                    "<root>/<class name>/<image> (one folder per class, sorted folder names = labels)", (".",),
                    aliases=("folder",), splits=("test",)),
        DatasetInfo("fmnist_demo", "Fashion-MNIST demo subset", "demo", _load_demo,
                    "shipped with the package (1,000 held-out Fashion-MNIST test images); no --data-root needed",
                    aliases=("demo", "fmnist"), needs_root=False),
    ]


def _as_info(target) -> DatasetInfo:
    info = target if isinstance(target, DatasetInfo) else target()
    if not isinstance(info, DatasetInfo):
        raise TypeError(f"a dataset entry must be an atpt_plugin.adapters.datasets.DatasetInfo (or a callable "
                        f"returning one), got {type(info).__name__}")
    return info


def dataset_info(name: str) -> DatasetInfo:
    """The registered dataset `name` (a key, a title or an alias, case-insensitive)."""
    wanted = name.strip().lower().replace(" ", "")
    if wanted in DATASETS:
        return _as_info(DATASETS.get(wanted))
    for entry in DATASETS.entries().values():
        info = _as_info(entry.load())
        if wanted in {info.key, info.title.lower(), *info.aliases}:
            return info
    raise DATASETS.unknown(name)


def describe_layout(name: str) -> str:
    info = dataset_info(name)
    return f"{info.title} ({info.key}): {info.layout}"


# --------------------------------------------------------------------------------------
class EvalDataset(Dataset):
    """Labelled test images as (3, S, S) tensors in [0,1]; `classnames[label]` names each label."""

    def __init__(self, info: DatasetInfo, root: Path, split: str, samples: List[Tuple[str, int]],
                 classnames: List[str], image_root: Path, image_size: Optional[int] = 224):
        self.info = info
        self.root = root
        self.split = split
        self.samples = samples            # (path relative to image_root, label)
        self.classnames = classnames
        self.image_root = image_root
        self.image_size = image_size

    name = property(lambda self: self.info.key)
    domain_word = property(lambda self: self.info.domain_word)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"EvalDataset({self.info.title}, split={self.split!r}, {len(self)} images, "
                f"{len(self.classnames)} classes, root={str(self.root)!r})")

    def sample_id(self, index: int) -> str:
        return self.samples[index][0]

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        relative, label = self.samples[index]
        try:
            return load_image(self.image_root / relative, self.image_size, self.info), label
        except BadImageError as error:
            error.index, error.sample_id = index, relative
            raise

    def fingerprint(self) -> str:
        """Hash of the class names and the (path, label) list: what the samples are."""
        return json_digest([self.classnames, self.samples])


class DemoDataset(EvalDataset):
    """The held-out Fashion-MNIST subset shipped with the embedded demo model (in memory)."""

    def __init__(self, info: DatasetInfo, image_size: Optional[int] = None):
        from atpt_plugin.demo_model import CLASSNAMES, load_demo_subset, subset_path

        if image_size not in (None, _demo_image_size()):
            raise ValueError(f"the demo subset is made for the demo model's {_demo_image_size()}px input, "
                             f"not {image_size}px: use --model fmnist-vit-tiny (or --model demo)")
        self.images, labels = load_demo_subset()
        samples = [(f"fmnist_test_1000/{index}", int(label)) for index, label in enumerate(labels)]
        super().__init__(info, subset_path().parent, "test", samples, list(CLASSNAMES), subset_path().parent,
                         image_size)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.images[index], self.samples[index][1]


def _load_demo(info: DatasetInfo, root, split: str, image_size) -> DemoDataset:
    return DemoDataset(info, image_size)


def _demo_image_size() -> int:
    from atpt_plugin.demo_model import image_size
    return image_size()


def load_image(path: Path, image_size: Optional[int], info: Optional[DatasetInfo] = None) -> torch.Tensor:
    """The image as a (3, S, S) tensor; `BadImageError` when the file cannot be read or decoded."""
    from PIL import Image
    from torchvision.transforms import functional as TF
    from torchvision.transforms import InterpolationMode

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except FileNotFoundError:
        layout = f"; expected layout: {info.layout}" if info else ""
        raise DatasetLayoutError(f"image {path} listed by the dataset does not exist{layout}") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise BadImageError(path, f"{type(error).__name__}: {error}") from None
    if image_size is not None:
        image = TF.resize(image, image_size, interpolation=InterpolationMode.BICUBIC)
        image = TF.center_crop(image, [image_size, image_size])
    return TF.to_tensor(image)


def load_dataset(name: str, root, split: str = "test", image_size: Optional[int] = 224) -> EvalDataset:
    """The `split` of dataset `name` under `root` (the data root or the dataset folder itself).

    image_size: the model's input size S (Resize + CenterCrop); None keeps the original size.
    """
    info = dataset_info(name)
    if not info.needs_root:
        return info.loader(info, None, split, image_size)
    if root is None:
        raise DatasetLayoutError(f"{info.title} needs --data-root (data_dir); expected layout: {info.layout}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(f"data root {str(root)!r} is not a directory; expected layout for "
                                 f"{info.title}: {info.layout}")
    if info.splits is not None and split not in info.splits:
        raise ValueError(f"{info.title} has only the {', '.join(map(repr, info.splits))} split here "
                         f"(its evaluation set), got {split!r}")
    return info.loader(info, root, split, image_size)


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
        f"{', '.join(repr(d) for d in info.dirs)}; expected layout: {info.layout}")


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
            if (not isinstance(item, (list, tuple)) or len(item) != 3 or not isinstance(item[0], str)
                    or isinstance(item[1], bool) or not isinstance(item[1], int) or not isinstance(item[2], str)):
                raise DatasetLayoutError(f"{path}: split {part!r} has the entry {item!r}, expected "
                                         f"[relative_image_path, label, class_name]; layout: {info.layout}")
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
        raise DatasetLayoutError(f"{source}: labels must be 0..C-1 with a class name each; "
                                 f"labels without a name: {missing[:10]}")
    return [names[i] for i in range(len(names))]


def _check_files(info: DatasetInfo, image_root: Path, samples) -> None:
    if not image_root.is_dir():
        raise DatasetLayoutError(f"image folder {str(image_root)!r} does not exist; expected layout: {info.layout}")
    missing = [rel for rel, _ in samples if not (image_root / rel).is_file()]
    if missing:
        raise DatasetLayoutError(
            f"{len(missing)} of {len(samples)} images listed for {info.title} are missing under "
            f"{str(image_root)!r}, e.g. {missing[:3]}; expected layout: {info.layout}")


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
            raise DatasetLayoutError(f"{listing}:{number}: variant {variant!r} is not in variants.txt; "
                                     f"expected layout: {info.layout}")
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
    return sorted(p.name for p in directory.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


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
            raise DatasetLayoutError(f"{directory / folder}: {folder!r} is not a class of {info.title}; "
                                     f"expected layout: {info.layout}")
        samples.extend((f"{folder}/{name}", label) for name in _images_in(directory / folder))
    if not samples:
        raise DatasetLayoutError(f"no images in {str(directory)!r}; expected layout: {info.layout}")
    return EvalDataset(info, directory, "test", samples, classnames, directory, image_size)


def _load_image_folder(info: DatasetInfo, root: Path, split: str, image_size) -> EvalDataset:
    folders = _class_folders(root)
    samples = [(f"{folder}/{name}", label) for label, folder in enumerate(folders)
               for name in _images_in(root / folder)]
    if not samples:
        raise DatasetLayoutError(f"no images found in class folders of {str(root)!r}; expected layout: {info.layout}")
    classnames = [folder.replace("_", " ").strip() for folder in folders]
    return EvalDataset(info, root, "test", samples, classnames, root, image_size)


for _info in _builtin_datasets():
    DATASETS.register(_info.key, _info.title)(_info)


def select(dataset_size: int, n_examples: Optional[int], seed: int) -> List[int]:
    """The evaluated indices: the first `n_examples` of a seeded permutation (all when None).

    A permutation, not the first N files: split files list images class by class. The
    order for a given seed is fixed, so a smaller N is a prefix of a larger one.
    """
    if n_examples is not None and (isinstance(n_examples, bool) or not isinstance(n_examples, int)
                                   or n_examples < 1):
        raise ValueError(f"n_examples must be a positive integer or None (all), got {n_examples!r}")
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed)).tolist()
    return order if n_examples is None else order[:n_examples]
