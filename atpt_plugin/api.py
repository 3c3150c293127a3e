"""The public entry: `Adapter` (a named configuration that wraps models) and the adapter
registry, `load_adapter` / `list_adapters`.

Adapters are published as entry points, so other packages add their own without touching
this one; the group's entry point names an `Adapter` or a callable returning one:

    [project.entry-points."atpt_plugin.adapters"]
    my_method = "my_package.presets:my_method"
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from torch import nn

from .adapter import TestTimeAdapter
from .classifier import wrap_classifier
from .config import AdapterConfig
from .registry import Registry
from .specs import parse_named_settings

ADAPTERS = Registry("adapter", "atpt_plugin.adapters")
ENTRY_POINT_GROUP = ADAPTERS.group


class Adapter:
    """A named, validated configuration; `wrap(model, ...)` makes the test-time module."""

    def __init__(self, name: str, config: AdapterConfig = AdapterConfig(), description: str = "", paper: str = ""):
        self.name = name
        self.config = config
        self.description = description
        self.paper = paper

    def with_overrides(self, **overrides) -> "Adapter":
        if not overrides:
            return self
        return Adapter(self.name, self.config.replace(**overrides), self.description, self.paper)

    def wrap(self, model: nn.Module, classnames: Optional[Sequence[str]] = None, tokenizer=None) -> nn.Module:
        """CLIP + class names + tokenizer: prompt tuning. A timm classifier alone: its head's logits."""
        if classnames is None and tokenizer is None:
            return wrap_classifier(model, self.config, self.name)
        return TestTimeAdapter(model, classnames, tokenizer, self.config, self.name)

    def __repr__(self) -> str:
        return f"Adapter({self.name!r}: {self.description})"


def _adapter(name: str) -> Adapter:
    entry = ADAPTERS.entry(name)
    target = entry.load()
    adapter = target if isinstance(target, Adapter) else target()
    if not isinstance(adapter, Adapter):
        raise TypeError(
            f"entry point {name!r} of {entry.source} gave {type(adapter).__name__}, expected an atpt_plugin.Adapter"
        )
    return adapter


def load_adapter(name: str, **overrides) -> Adapter:
    """The adapter published as `name`, with keyword overrides of any of its settings
    (a component setting takes a registered name or an object: `aggregator=MyAggregator()`)."""
    return _adapter(name).with_overrides(**overrides)


def list_adapters() -> Dict[str, str]:
    """{name: one-line description} of every installed adapter, sorted by name."""
    return {name: _adapter(name).description for name in ADAPTERS.names()}


def load_adapter_spec(spec: str) -> Adapter:
    """An adapter or a variant, "atpt[aggregator=reliability]", named by the spec itself
    (so each variant gets its own results); bad settings are errors naming the spec."""
    name, overrides = parse_named_settings(spec)
    adapter = load_adapter(name)
    if not overrides:
        return adapter
    try:
        variant = adapter.with_overrides(**overrides)
    except (TypeError, ValueError) as error:
        raise ValueError(f"adapter variant {spec!r}: {error}") from None
    label = "".join(spec.split())
    return Adapter(label, variant.config, f"{adapter.description} (variant {label})", adapter.paper)
