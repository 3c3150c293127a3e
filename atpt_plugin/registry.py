"""Adapters are found through Python entry points, so other packages can add their own.

A distribution publishes an adapter under the group below, pointing at an `Adapter`
instance or at a callable returning one:

    [project.entry-points."atpt_plugin.adapters"]
    my_method = "my_package.presets:my_method"
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Dict

from .adapter import Adapter

ENTRY_POINT_GROUP = "atpt_plugin.adapters"


def _installed() -> Dict[str, object]:
    """Entry points by name, read afresh so newly installed distributions are seen."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load(entry_point) -> Adapter:
    target = entry_point.load()
    adapter = target if isinstance(target, Adapter) else target()
    if not isinstance(adapter, Adapter):
        raise TypeError(f"entry point {entry_point.name!r} ({entry_point.value}) gave "
                        f"{type(adapter).__name__}, expected an atpt_plugin.Adapter")
    return adapter


def load_adapter(name: str, **overrides) -> Adapter:
    """The adapter published as `name`, with keyword overrides of any of its settings."""
    found = _installed()
    if name not in found:
        raise KeyError(f"no adapter named {name!r}; installed adapters: {', '.join(sorted(found)) or 'none'} "
                       f"(entry point group {ENTRY_POINT_GROUP!r})")
    return _load(found[name]).with_overrides(**overrides)


def list_adapters() -> Dict[str, str]:
    """{name: one-line description} of every installed adapter, sorted by name."""
    return {name: _load(ep).description for name, ep in sorted(_installed().items())}
