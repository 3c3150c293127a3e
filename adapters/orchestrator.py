"""One evaluation run, described once, under both `atpt eval` and `benchmark_table`.

`plan_run` turns what a user names (adapters by name, `Adapter` objects or wrapped modules;
a dataset by name, an `EvalDataset` or tensors; an attack by name and parameters) into a
`RunPlan`: the wrapped adapters with their recorded settings, the selected samples, the
resolved attack and the attacked zero-shot model, and the run's identity. The identity is
the one cache-key schema of the adversarial cache, so the CLI and the Python API share
cached attacks. `RunPlan.evaluation(...)` is the resumable evaluation loop of `runner.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

from atpt_plugin.api import Adapter, load_adapter

from .attacks import AttackSpec, ZeroShotClassifier, make_attack
from .cache import AdversarialCache, model_fingerprint, tensor_digest
from .datasets import DatasetInfo, EvalDataset, json_digest, load_dataset, select
from .runner import Evaluation
from .sources import DatasetSource, TensorSource


@dataclass
class RunPlan:
    """What a run evaluates; `identity` says what the samples, model and attack are."""

    adapters: Dict[str, nn.Module]  # wrapped, by row name
    configs: Dict[str, Optional[dict]]  # AdapterConfig.record() per row (None: a foreign module)
    descriptions: Dict[str, str]
    source: Union[DatasetSource, TensorSource]
    dataset: Optional[EvalDataset]
    spec: AttackSpec
    attacked: Optional[ZeroShotClassifier]
    identity: Dict[str, object]
    image_size: int
    backbone_kind: str
    seed: int

    def cache_key(self, batch: int) -> Dict[str, object]:
        """The adversarial cache's key: the identity, the attack and the batching."""
        return {**self.identity, "attack_name": self.spec.name, "attack": self.spec.to_dict(), "batch": batch}

    def evaluation(self, *, batch: int, cache_dir, **loop) -> Evaluation:
        """The evaluation loop; adaptive attacks are per adapter and per image, so not cached
        (the per-sample results file resumes them)."""
        cache = AdversarialCache(None if self.spec.is_adaptive else cache_dir, self.cache_key(batch))
        return Evaluation(
            self.adapters,
            self.source,
            self.spec,
            self.attacked,
            cache,
            seed=self.seed,
            attack_batch_size=batch,
            backbone_kind=self.backbone_kind,
            image_size=self.image_size,
            **loop,
        )


def applicable_overrides(config, info: Optional[DatasetInfo]) -> Dict[str, object]:
    """The dataset's domain word and AugMix convention, where the adapter's prompt can take them."""
    if info is None:
        return {}
    overrides = info.adapter_overrides()
    phrase = config.ctx_init
    if "domain_word" in overrides and (phrase is None or "photo" not in phrase.split() or config.domain_word):
        overrides.pop("domain_word")
    return overrides


def _named_adapters(adapters) -> Dict[str, object]:
    """{row name: a name, an Adapter or a wrapped module} from a dict, a list or one item."""
    if isinstance(adapters, (nn.Module, str, Adapter)):
        adapters = [adapters]
    if isinstance(adapters, Mapping):
        items = list(adapters.items())
    else:
        items = [(item if isinstance(item, str) else getattr(item, "name", None), item) for item in adapters]
    named: Dict[str, object] = {}
    for name, item in items:
        name = name or f"adapter{len(named)}"
        if name in named:
            raise ValueError(f"two adapters are named {name!r}; pass a dict {{name: adapter}}")
        named[name] = item
    if not named:
        raise ValueError("no adapters given")
    return named


def plan_run(
    adapters,
    *,
    dataset,
    model: Optional[nn.Module] = None,
    tokenizer=None,
    data_dir=None,
    split: str = "test",
    n_examples: Optional[int] = None,
    seed: int = 0,
    attack: str = "pgd",
    eps: Optional[float] = None,
    steps: Optional[int] = None,
    alpha: Optional[float] = None,
    attack_params: Optional[Mapping[str, object]] = None,
    overrides: Optional[Mapping[str, object]] = None,
    dataset_settings: bool = True,
    device=None,
) -> RunPlan:
    """A run from what the user names; every adapter given by name or as an `Adapter` gets the
    dataset's settings (domain word, ImageNet convention), `overrides` and `seed`."""
    named = _named_adapters(adapters)
    if isinstance(dataset, str):
        image_size = _model_image_size(model, named)
        dataset = load_dataset(dataset, data_dir, split=split, image_size=image_size)
    if isinstance(dataset, EvalDataset):
        indices = select(len(dataset), n_examples, seed)
        source, classnames, info = DatasetSource(dataset, indices), dataset.classnames, dataset.info
        samples = {
            "dataset": info.key,
            "split": dataset.split,
            "dataset_fingerprint": dataset.fingerprint(),
            "selection": json_digest([dataset.sample_id(i) for i in indices]),
        }
    elif isinstance(dataset, tuple) and len(dataset) == 2 and all(isinstance(t, torch.Tensor) for t in dataset):
        x, y = dataset if n_examples is None else (dataset[0][:n_examples], dataset[1][:n_examples])
        source, classnames, info, dataset = TensorSource(x, y), None, None, None
        samples = {"dataset": "tensors", "split": split, "dataset_fingerprint": tensor_digest(x, y), "selection": None}
    else:
        raise TypeError(
            f"dataset must be a dataset name, an EvalDataset or an (x, y) pair of tensors, got {type(dataset).__name__}"
        )

    wrapped, configs, descriptions = {}, {}, {}
    for name, item in named.items():
        if isinstance(item, (str, Adapter)):
            if model is None or tokenizer is None:
                raise ValueError(f"adapter {name!r} is not wrapped: pass model= and tokenizer= to wrap it")
            if classnames is None:
                raise ValueError("adapters given by name need a named dataset (for the class names)")
            adapter = load_adapter(item) if isinstance(item, str) else item
            extra = applicable_overrides(adapter.config, info) if dataset_settings else {}
            try:
                adapter = adapter.with_overrides(**{**extra, "seed": seed, **(overrides or {})})
            except TypeError as error:
                raise ValueError(f"--set: {error}") from None
            item = adapter.wrap(model, classnames=classnames, tokenizer=tokenizer)
            descriptions[name] = adapter.description
        _check_classes(item, classnames, name)
        wrapped[name] = item
        config = getattr(item, "config", None)
        configs[name] = config.record() if hasattr(config, "record") else None
    first = next(iter(wrapped.values()))
    backbone = getattr(first, "backbone", None)
    kind = getattr(backbone, "kind", "vit")
    image_size = getattr(backbone, "image_size", 224)
    spec = make_attack(
        attack,
        eps=eps,
        steps=steps,
        alpha=alpha,
        backbone_kind=kind if kind in ("vit", "resnet") else "vit",
        image_size=image_size,
        **(attack_params or {}),
    )
    device = torch.device(device) if device is not None else getattr(backbone, "device", torch.device("cpu"))
    for adapter in wrapped.values():
        adapter.to(device)
    attacked = None
    if spec.is_attack and hasattr(first, "classnames"):
        domain = info.domain_word if (info is not None and dataset_settings) else None
        if model is not None and tokenizer is not None:
            attacked = ZeroShotClassifier.build(model, first.classnames, tokenizer, domain_word=domain)
        else:
            attacked = ZeroShotClassifier.from_adapter(first)
        attacked.to(device)
    identity = {
        "model_fingerprint": model_fingerprint(getattr(first, "model", first)),
        **samples,
        "seed": seed,
        "attacked_prompt": getattr(attacked, "prompt_phrase", None),
        "classes": None if attacked is None else json_digest(list(attacked.classnames)),
        "image_size": image_size,
    }
    return RunPlan(wrapped, configs, descriptions, source, dataset, spec, attacked, identity, image_size, kind, seed)


def _model_image_size(model: Optional[nn.Module], named: Mapping[str, object]) -> Optional[int]:
    """The view size the dataset is resized and cropped to: the model's (or a wrapped adapter's)."""
    for item in named.values():
        backbone = getattr(item, "backbone", None)
        if backbone is not None:
            return backbone.image_size
    if model is None:
        return None
    from atpt_plugin.backbones import detect

    return detect(model, has_text=True).image_size


def _check_classes(adapter, classnames, name) -> None:
    if classnames is None:
        return
    have = [c.strip() for c in getattr(adapter, "classnames", classnames)]
    if have != [c.strip() for c in classnames]:
        raise ValueError(
            f"adapter {name!r} was wrapped with {len(have)} class names that differ from the "
            f"dataset's {len(classnames)} (e.g. {have[:3]} vs {classnames[:3]}); wrap it with "
            "classnames=dataset.classnames"
        )
