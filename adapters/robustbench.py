"""RobustBench-style evaluation of test-time adapters, and the real robustbench package.

`benchmark(tta, ...)` follows `robustbench.eval.benchmark` where it applies (model,
n_examples, dataset, threat_model, to_disk, model_name, data_dir, device, batch_size, eps,
log_path) and returns (clean accuracy, adversarial accuracy) in [0,1]; with `to_disk`
it writes `model_info/<dataset>/<threat_model>/<model_name>.json` in RobustBench's
model_info format. Differences, because the defence adapts at test time:

- by default the adversarial images come from a transfer attack on zero-shot CLIP with the
  initial prompt (the paper's protocol, `attacks.py`), L-inf PGD, not AutoAttack against
  the defended model; the JSON says so in its footnote. `attack="eot-pgd"` or
  `attack="square"` attack each adapter itself (adaptive, `adaptive.py`), with sanity
  checks on the first `sanity_checks` images whose failures are listed in the rows'
  `warnings` and the JSON's footnote;
- `dataset` is one of `datasets.DATASETS` under `data_dir` (nothing is downloaded), an
  `EvalDataset`, or an `(x, y)` pair of tensors;
- `eps=None` means the paper's budget (4/255 ViT, 1/255 ResNet) instead of an error;
- `batch_size` is the attack's batch; the adapters adapt each image on its own;
- `log_path`, when given, is a folder of per-sample results: a rerun resumes from it.

`benchmark_table(...)` evaluates several adapters on one attack and returns one row per
adapter. `import_robustbench()` imports the installed robustbench 1.1.1 even where its
own imports fail (see its docstring); `robustbench.utils.clean_accuracy(tta, x, y)`
works on any wrapped adapter.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
import warnings
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .adaptive import SanityChecks
from .leaderboard import leaderboard_markdown, write_row_model_info
from .orchestrator import plan_run
from .resultlog import ResultLog
from .storage import atomic_write, make_dir

INSTALL_HINT = (
    "robustbench 1.1.1 pins timm==1.0.9, which open_clip's timm>=1.0.17 excludes; install it "
    "without its pins: pip install 'atpt-plugin[robustbench]' && pip install --no-deps robustbench==1.1.1"
)


def import_robustbench():
    """Import robustbench (1.1.1) and return the module, working around its packaging.

    robustbench 1.1.1 imports `pkg_resources` (gone from setuptools >= 81) and `autoattack`
    (its dependency installs the module as `pyautoattack`). Where either is missing, this
    puts a stand-in into `sys.modules` for the duration of the import only: a minimal
    `pkg_resources.resource_filename`, and `pyautoattack` under the name `autoattack`.
    Nothing is installed and the stand-ins are removed afterwards.
    """
    if "robustbench.utils" in sys.modules:
        return sys.modules["robustbench"]
    if importlib.util.find_spec("robustbench") is None:
        raise ModuleNotFoundError(f"robustbench is not installed. {INSTALL_HINT}", name="robustbench")
    injected = []
    if importlib.util.find_spec("pkg_resources") is None:
        sys.modules["pkg_resources"] = _pkg_resources_stand_in()
        injected.append("pkg_resources")
    if importlib.util.find_spec("autoattack") is None and importlib.util.find_spec("pyautoattack") is not None:
        import pyautoattack
        import pyautoattack.state

        sys.modules["autoattack"] = pyautoattack
        sys.modules["autoattack.state"] = pyautoattack.state
        injected += ["autoattack", "autoattack.state"]
    try:
        with warnings.catch_warnings():  # its timm imports use deprecated paths
            warnings.simplefilter("ignore", FutureWarning)
            module = importlib.import_module("robustbench")
            importlib.import_module("robustbench.utils")
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"robustbench could not be imported: {error}. {INSTALL_HINT}", name=error.name
        ) from error
    finally:
        for name in injected:
            sys.modules.pop(name, None)
    return module


def _pkg_resources_stand_in() -> types.ModuleType:
    module = types.ModuleType("pkg_resources")
    module.__doc__ = "atpt_plugin stand-in for robustbench's single use of pkg_resources"

    def resource_filename(package_or_module: str, resource: str) -> str:
        target = importlib.import_module(package_or_module)
        base = os.path.dirname(target.__file__)
        return os.path.join(base, resource)

    module.resource_filename = resource_filename
    return module


def architecture_of(adapter) -> str:
    visual = getattr(getattr(adapter, "model", None), "visual", None)
    if visual is None:
        return type(adapter).__name__
    if hasattr(visual, "transformer"):
        size = getattr(visual, "patch_size", None)
        size = size[0] if isinstance(size, (tuple, list)) else size
        return f"CLIP ViT (width {visual.transformer.width}, {len(visual.transformer.resblocks)} blocks, patch {size})"
    return f"CLIP {type(visual).__name__}"


def benchmark_table(
    adapters,
    n_examples: Optional[int] = 1000,
    dataset="pets",
    threat_model: str = "Linf",
    to_disk: bool = False,
    model_name: Optional[str] = None,
    data_dir: str = "./data",
    device=None,
    batch_size: int = 32,
    eps: Optional[float] = None,
    log_path: Optional[str] = None,
    *,
    attack: Optional[str] = None,
    steps: Optional[int] = None,
    alpha: Optional[float] = None,
    seed: int = 0,
    split: str = "test",
    cache_dir: Optional[str] = None,
    model: Optional[nn.Module] = None,
    tokenizer=None,
    architecture: Optional[str] = None,
    model_info_dir: str = "model_info",
    overrides: Optional[Mapping[str, object]] = None,
    progress: bool = False,
    sanity_checks: Union[int, SanityChecks, None] = 8,
    **attack_params,
) -> List[dict]:
    """Evaluate several adapters on one attack; one row dict per adapter.

    adapters: {name: wrapped adapter}, a list of wrapped adapters, or adapter names (then
      `model` and `tokenizer` are needed; each name is `load_adapter(name, **overrides)`
      with the dataset's domain word, wrapped with the dataset's class names).
    attack: an attack name (`attacks.ATTACKS`); default `pgd` for threat_model "Linf" and
      `pgdl2` for "L2". eps/alpha in [0,1] pixel units (4/255); None: the paper's budget.
    Adaptive attacks (`eot-pgd`, `square`) attack each adapter itself; `sanity_checks`
    (an image count, a `SanityChecks`, or 0/None for none) runs their sanity checks.
    Rows: adapter, n, clean_acc, adv_acc (in [0,1]), seconds_per_image,
    image_passes_per_image (measured images through the image tower per prediction),
    attack, attack_kind, attack_forward_per_image, attack_backward_per_image,
    attack_image_passes_per_image, attack_seconds_per_image, and for adaptive attacks
    sanity_checks and warnings.
    """
    if threat_model not in ("Linf", "L2"):
        raise NotImplementedError(
            f"threat_model {threat_model!r}: only 'Linf' and 'L2' attacks are implemented for test-time adapters"
        )
    plan = plan_run(
        adapters,
        dataset=dataset,
        model=model,
        tokenizer=tokenizer,
        data_dir=data_dir,
        split=split,
        n_examples=n_examples,
        seed=seed,
        attack=attack or ("pgd" if threat_model == "Linf" else "pgdl2"),
        eps=eps,
        steps=steps,
        alpha=alpha,
        attack_params=attack_params,
        overrides=overrides,
        device=device,
    )
    spec = plan.spec
    if spec.norm is not None and spec.norm != threat_model:
        raise ValueError(f"attack {spec.name!r} is an {spec.norm} attack, not {threat_model}")
    if isinstance(sanity_checks, int) or sanity_checks is None:
        sanity_checks = SanityChecks(n=sanity_checks or 0)
    log = ResultLog(log_path, 0) if log_path else None
    if log_path:
        make_dir(log_path)
    device = next(iter(plan.adapters.values())).backbone.device if device is None else torch.device(device)
    evaluation = plan.evaluation(
        batch=batch_size, cache_dir=cache_dir, log=log, device=device, progress=progress, sanity=sanity_checks
    )
    rows = [row.as_dict() for row in evaluation.run()]
    if to_disk:
        dataset_key = plan.identity["dataset"]
        for row in rows:
            name = model_name if (model_name and len(rows) == 1) else f"{model_name or 'model'}_{row['adapter']}"
            row["model_info"] = write_row_model_info(
                row,
                dataset=dataset_key,
                attack=spec,
                name=plan.descriptions.get(row["adapter"], ""),
                file_name=name,
                architecture=architecture or architecture_of(plan.adapters[row["adapter"]]),
                root=model_info_dir,
                config=plan.configs[row["adapter"]],
                device=str(device),
            )
        caption = f"{dataset_key}, {rows[0]['n'] if rows else 0} images, attack: {spec.describe()}"
        atomic_write(make_dir(model_info_dir) / "leaderboard.md", leaderboard_markdown(rows, caption).encode())
    return rows


def benchmark(
    model: Union[nn.Module, Sequence[nn.Module]],
    n_examples: Optional[int] = 1000,
    dataset="pets",
    threat_model: str = "Linf",
    to_disk: bool = False,
    model_name: Optional[str] = None,
    data_dir: str = "./data",
    corruptions_data_dir: Optional[str] = None,
    device=None,
    batch_size: int = 32,
    eps: Optional[float] = None,
    log_path: Optional[str] = None,
    preprocessing=None,
    aa_state_path=None,
    **kwargs,
) -> Tuple[float, Optional[float]]:
    """(clean accuracy, adversarial accuracy) of one wrapped adapter; see the module docstring.

    The parameters are RobustBench's, in its order. corruptions_data_dir, preprocessing
    and aa_state_path do not apply (the adapter normalises inside; no AutoAttack state)
    and must stay None. Keyword-only extras: attack, steps, alpha, seed, split, cache_dir,
    tokenizer, architecture, model_info_dir, overrides, progress and attack parameters
    (see `benchmark_table`).
    """
    if isinstance(model, (list, tuple)):
        raise NotImplementedError(
            "benchmark() takes one model, as RobustBench's does; use benchmark_table() for several adapters"
        )
    for name, value in (
        ("corruptions_data_dir", corruptions_data_dir),
        ("preprocessing", preprocessing),
        ("aa_state_path", aa_state_path),
    ):
        if value is not None:
            raise NotImplementedError(
                f"{name} does not apply to test-time adapters (they take [0,1] images "
                "and normalise inside); leave it None"
            )
    if to_disk and model_name is None:
        raise ValueError("If `to_disk` is True, `model_name` should be specified.")
    rows = benchmark_table(
        {getattr(model, "name", "model"): model},
        n_examples=n_examples,
        dataset=dataset,
        threat_model=threat_model,
        to_disk=to_disk,
        model_name=model_name,
        data_dir=data_dir,
        device=device,
        batch_size=batch_size,
        eps=eps,
        log_path=log_path,
        **kwargs,
    )
    row = rows[0]
    print(f"Clean accuracy: {row['clean_acc']:.2%}")
    if row["adv_acc"] is not None:
        print(f"Adversarial accuracy: {row['adv_acc']:.2%}")
    return row["clean_acc"], row["adv_acc"]
