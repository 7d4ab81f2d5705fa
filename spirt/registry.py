"""One registry mechanism for every named, pluggable part: attacks, defenses, faults, models, data sets,
aggregation backends and executors.

A :class:`Registry` maps a name to a class (or a builder function). Each part registers itself with a
decorator in its own module; a package of parts imports every module of itself (:meth:`Registry.load_package`,
``pkgutil``), so that adding a part is one new file. There is no hand-kept table and no if/elif dispatch:
configuration checks, command-line help and ``spirt list`` read the names from here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any


class Registry:
    """A name -> class table filled by a decorator.

    Parameters
    ----------
    what:
        Noun used in error messages ("defense", "attack").
    describe:
        ``describe(name, cls) -> info`` builds the metadata object returned by :meth:`info` (default:
        the first paragraph of the class docstring).
    """

    def __init__(self, what: str, describe: Callable[[str, type], Any] | None = None):
        self.what = what
        self._describe = describe or (lambda name, cls: summary_of(cls))
        self._classes: dict[str, type] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, aliases: Iterable[str] = ()) -> Callable[[type], type]:
        """Class decorator registering ``cls`` under ``name``; ``aliases`` are accepted by :meth:`get`
        and :meth:`info` but not listed by :meth:`names`."""
        aliases = tuple(aliases)
        for key in (name, *aliases):
            if not key or key != key.lower() or not key.replace("_", "").replace("-", "").isalnum():
                raise ValueError(
                    f"invalid {self.what} name {key!r}: use lower-case letters, digits, '-' or '_'"
                )

        def decorator(cls: type) -> type:
            for key in (name, *aliases):
                owner = self._classes.get(self._aliases.get(key, key))
                if owner is not None and owner is not cls:
                    raise ValueError(
                        f"{self.what} name {key!r} is registered twice "
                        f"({owner.__module__} and {cls.__module__})"
                    )
            cls.name = name
            cls.aliases = aliases
            self._classes[name] = cls
            for alias in aliases:
                self._aliases[alias] = name
            return cls

        return decorator

    def load_package(self, package_name: str, package_path: Iterable[str]) -> None:
        """Import every public module of a package so that their decorators run."""
        for mod in pkgutil.iter_modules(package_path):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{package_name}.{mod.name}")

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._aliases.get(name.lower(), name.lower()) in self._classes

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of its aliases (case-insensitive)."""
        key = name.lower() if isinstance(name, str) else name
        key = self._aliases.get(key, key)
        if key not in self._classes:
            raise ValueError(f"unknown {self.what} {name!r}; allowed: {', '.join(self.names())}")
        return key

    def cls(self, name: str) -> type:
        return self._classes[self.canonical(name)]

    def get(self, name: str, **params: Any) -> Any:
        """Instantiate the class registered under ``name`` with keyword hyperparameters."""
        cls = self.cls(name)
        accepted = accepted_params(cls)
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ValueError(
                f"{cls.name}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"accepted: {', '.join(accepted) or '(none)'}"
            )
        return cls(**params)

    def info(self, name: str) -> Any:
        key = self.canonical(name)
        return self._describe(key, self._classes[key])


def accepted_params(cls: type) -> list[str]:
    """Names of the keyword parameters of ``cls.__init__`` (excluding ``self``)."""
    sig = inspect.signature(cls.__init__)
    return [
        p.name
        for p in sig.parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def default_params(cls: type) -> dict[str, Any]:
    """Defaults of the keyword parameters of ``cls.__init__``."""
    sig = inspect.signature(cls.__init__)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def summary_of(cls: type) -> str:
    """First paragraph of the class docstring, on one line."""
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())
