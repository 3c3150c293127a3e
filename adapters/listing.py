"""`atpt list`: every registry with each entry's one line and the distribution it comes from."""

from __future__ import annotations

import shutil
import textwrap
from typing import Dict, List, Tuple


def registries() -> Dict[str, object]:
    """Every registry `atpt list` shows, by the plural its section is called."""
    from atpt_plugin.aggregators import AGGREGATORS
    from atpt_plugin.api import ADAPTERS
    from atpt_plugin.augmenters import AUGMENTERS
    from atpt_plugin.backbones import BACKBONES
    from atpt_plugin.explainers import EXPLAINERS
    from atpt_plugin.input_defences import INPUT_DEFENCES
    from atpt_plugin.objectives import OBJECTIVES

    from .attacks import ATTACKS
    from .datasets import DATASETS

    return {
        "adapters": ADAPTERS,
        "input_defences": INPUT_DEFENCES,
        "explainers": EXPLAINERS,
        "augmenters": AUGMENTERS,
        "aggregators": AGGREGATORS,
        "objectives": OBJECTIVES,
        "backbones": BACKBONES,
        "attacks": ATTACKS,
        "datasets": DATASETS,
    }


def _details(kind: str, name: str) -> Tuple[str, List[str]]:
    """(one line, further lines) for a registered name; adapters, attacks and datasets say more."""
    if kind == "adapters":
        from atpt_plugin.api import load_adapter

        return load_adapter(name).description, []
    if kind == "attacks":
        from atpt_plugin.registry import first_line

        from .attacks.base import attack_named

        attack = attack_named(name)
        shown = {"alpha": "eps/4", "steps": "the paper's (100 ViT, 1 ResNet)"}
        params = ", ".join(f"{k}={shown[k] if v is None else v}" for k, v in attack.defaults.items())
        return (
            f"{attack.kind}, {attack.norm or 'no budget'}: {first_line(type(attack))}",
            [f"parameters: {params}"] if params else [],
        )
    if kind == "datasets":
        from .datasets import dataset_info

        info = dataset_info(name)
        word = f", domain word {info.domain_word!r}" if info.domain_word else ""
        return f"{info.title}{word}", [f"layout: {info.layout}"]
    return "", []


INDENT = 23  # two spaces, the name in 20 columns, a space


def wrapped(name: str, text: str, width: int) -> List[str]:
    """One entry's text wrapped to `width` columns, continuation lines under the text."""
    return textwrap.wrap(
        text,
        width=max(width, INDENT + 20),
        initial_indent=f"  {name:<20} ",
        subsequent_indent=" " * INDENT,
        break_on_hyphens=False,
    ) or [f"  {name}"]


def run_list(args) -> int:
    width = shutil.get_terminal_size().columns
    for kind, registry in registries().items():
        if args.what not in (None, kind):
            continue
        print(f"{kind} (entry-point group {registry.group}):")
        for name, entry in registry.describe().items():
            line, more = _details(kind, name)
            print("\n".join(wrapped(name, f"{line or entry.description}  [{entry.source}]", width)))
            for extra in more:
                print("\n".join(wrapped("", extra, width)))
    return 0
