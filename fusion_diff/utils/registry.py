"""One registry pattern for every kind of plug-in (embedders, methods, captioners, samplers, training tasks,
search backends, benchmarks): a name maps to a target, imported on first use.

A target is ``"module:attribute[.attribute]"`` (imported when the name is first used, so one plug-in's
missing dependency never blocks the others and becomes a message naming it) or the object itself.
A registry is a mapping ``name -> Entry(target, description)``, so ``sorted(REG)``, ``name in REG``
and ``for name, (target, description) in REG.items()`` read the same everywhere; ``load(name)``
gives the object. Renamed plug-ins keep their old name as a deprecated alias that still works.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator, MutableMapping
from typing import Any, NamedTuple

from fusion_diff.errors import ConfigError


class Entry(NamedTuple):
    target: Any  # "module:attribute" (imported on use) or the object itself
    description: str = ""


class Registry(MutableMapping[str, Entry]):
    """Plug-ins of one ``kind`` by name (``Registry("sampler", {"ddim": (DDIMScheduler, "deterministic")})``)."""

    def __init__(self, kind: str, entries: dict[str, Any] | None = None, aliases: dict[str, str] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self.aliases = dict(aliases or {})  # deprecated spelling -> name
        for name, value in (entries or {}).items():
            self[name] = value

    def register(self, name: str, target: Any, description: str = "") -> None:
        """Add (or replace) plug-in ``name``; ``target`` as in the module docstring."""
        self._entries[name] = Entry(target, description)

    def resolve(self, name: str) -> str:
        """The registered name of ``name`` (a deprecated alias warns once and maps to its new name)."""
        if name in self._entries:
            return name
        if name in self.aliases:
            new = self.aliases[name]
            warnings.warn(f"The {self.kind} {name!r} is now called {new!r}; the old name will go.", FutureWarning, 2)
            return new
        raise ConfigError(f"Unknown {self.kind} {name!r}; choose one of {sorted(self._entries)}.")

    def load(self, name: str) -> Any:
        """The object registered as ``name``, imported now."""
        name = self.resolve(name)
        target = self._entries[name].target
        if not isinstance(target, str):
            return target
        module_name, _, attributes = target.partition(":")
        try:
            found: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise ConfigError(
                f"The {self.kind} {name!r} lives in {module_name}, which cannot be imported ({err}). That part is not "
                f"installed or not built in this checkout; the other {self.kind}s still work."
            ) from err
        for attribute in filter(None, attributes.split(".")):
            found = getattr(found, attribute, None)
            if found is None:
                raise ConfigError(
                    f"The {self.kind} {name!r}: {target} does not exist in this version of {module_name}."
                )
        return found

    # ------------------------------------------------------------------ mapping
    def __getitem__(self, name: str) -> Entry:
        return self._entries[self.resolve(name)] if name in self else self._entries[name]

    def __setitem__(self, name: str, value: Any) -> None:
        """``REG[name] = target`` or ``= (target, description)``."""
        described = isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str)
        target, description = value if described else (value, "")
        self.register(name, target, description)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self.aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"
