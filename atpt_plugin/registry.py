"""Named components, open to other packages: one registry per kind.

Built-in components register themselves with a decorator; another installed distribution
adds its own under the kind's entry-point group, without touching this package:

    [project.entry-points."atpt_plugin.explainers"]
    my_explainer = "my_package.explain:MyExplainer"

An entry point names a class or a factory, and its name is what users write
(`load_adapter("atpt", explainer="my_explainer")`). Built-ins are looked up first;
entry points are read afresh on a miss, so a distribution installed later is seen.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, Optional


class UnknownNameError(ValueError, KeyError):
    """A name no registry entry answers to; the message lists what is installed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    """One registered component: what users write, what it builds, and where it comes from."""

    name: str
    kind: str
    description: str
    source: str  # "atpt-plugin" or the distribution that published it
    load: Callable[[], Any]  # the class or factory (entry points import on first use)


def first_line(target: Any) -> str:
    doc = inspect.getdoc(target) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry:
    """Components of one kind by name: built-ins by decorator, others by entry point."""

    def __init__(self, kind: str, group: str, builtin_source: str = "atpt-plugin"):
        self.kind = kind
        self.group = group
        self.builtin_source = builtin_source
        self._builtins: Dict[str, Entry] = {}

    def register(self, name: Optional[str] = None, description: Optional[str] = None):
        """Decorator: `@REGISTRY.register("name")` on a class or factory; returns it unchanged."""

        def decorate(target):
            key = name or target.__name__
            if key in self._builtins:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._builtins[key] = Entry(
                key, self.kind, description or first_line(target), self.builtin_source, lambda: target
            )
            return target

        return decorate

    def _installed(self) -> Dict[str, Entry]:
        found = {}
        for point in entry_points(group=self.group):
            source = point.dist.name if point.dist is not None else "unknown distribution"
            found[point.name] = Entry(point.name, self.kind, "", source, point.load)
        return found

    def entries(self) -> Dict[str, Entry]:
        """Every entry by name, built-ins winning over an entry point of the same name."""
        return {**self._installed(), **self._builtins}

    def entry(self, name: str) -> Entry:
        if name in self._builtins:
            return self._builtins[name]
        found = self.entries()
        if name not in found:
            raise self.unknown(name, found)
        return found[name]

    def get(self, name: str):
        """The class or factory registered as `name`."""
        return self.entry(name).load()

    def __contains__(self, name: str) -> bool:
        return name in self._builtins or name in self.entries()

    def names(self):
        return sorted(self.entries())

    def describe(self) -> Dict[str, Entry]:
        """Entries sorted by name, each with its one-line description (entry points loaded)."""
        described = {}
        for name, entry in sorted(self.entries().items()):
            if not entry.description:
                entry = Entry(name, entry.kind, first_line(entry.load()), entry.source, entry.load)
            described[name] = entry
        return described

    def name_of(self, target: Any) -> Optional[str]:
        """The name a class (or the class of an object) is registered under, if any."""
        cls = target if isinstance(target, type) else type(target)
        for name, entry in self.entries().items():
            try:
                if entry.load() is cls:
                    return name
            except Exception:  # a broken third-party entry point does not hide the others
                continue
        return None

    def unknown(self, name: str, found: Optional[Dict[str, Entry]] = None) -> UnknownNameError:
        names = sorted(found if found is not None else self.entries())
        return unknown_name(
            self.kind,
            name,
            names,
            f"installed {self.kind}s",
            f"Another package adds one under the entry-point group {self.group!r}",
        )


def unknown_name(kind: str, name: str, known, listing: str, advice: str = "") -> UnknownNameError:
    """ "no <kind> named <name> (did you mean ...?); <listing>: <known>. <advice>" """
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UnknownNameError(
        f"no {kind} named {name!r}{hint}; {listing}: {', '.join(known) or 'none'}" + (f". {advice}" if advice else "")
    )


def construct(target, config):
    """A component from what a registry holds: a class is built with `from_config(config)`
    when it has one, else with no arguments; a function is a factory `f(config)`."""
    if isinstance(target, type):
        from_config = getattr(target, "from_config", None)
        return from_config(config) if from_config is not None else target()
    return target(config)


def resolve(registry: Registry, spec, config):
    """`spec` as a component: an object is used as given, a name is looked up and built."""
    return construct(registry.get(spec), config) if isinstance(spec, str) else spec


class Component:
    """Base of every pluggable component: readable as its registered name and options."""

    registry: Registry

    def options(self) -> Dict[str, Any]:
        """Constructor-style settings: the public attributes holding plain values."""
        plain = (bool, int, float, str, type(None), tuple)
        return {key: value for key, value in vars(self).items() if not key.startswith("_") and isinstance(value, plain)}

    def record(self) -> Dict[str, Any]:
        """What a run's manifest stores; `name` is None for an unregistered class."""
        return {"name": self.registry.name_of(self), "options": self.options()}

    def __repr__(self) -> str:
        name = self.registry.name_of(self) or type(self).__qualname__
        return f"{name}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"
