"""Base classes of the defenses: aggregators, pre-aggregators, their (n, f) contract and in-DB plans."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np

from ._arrays import as_matrix
from ._registry import Registry, default_params, int_param, summary_of


@dataclass(frozen=True)
class DefenseInfo:
    """Metadata of a registered defense, as returned by :func:`defenses.info`."""

    name: str
    kind: str  # "aggregator" | "preaggregator"
    summary: str
    reference: str
    requirement: str  # the (n, f) condition, e.g. "n > 2f + 2"
    in_db: bool  # True if the rule has an in-database form (see InDBPlan)
    params: Mapping[str, Any] = field(default_factory=dict)  # hyperparameter defaults
    aliases: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "summary": self.summary,
            "reference": self.reference,
            "requirement": self.requirement,
            "in_db": self.in_db,
            "params": dict(self.params),
            "aliases": list(self.aliases),
        }


def _describe(name: str, cls: type) -> DefenseInfo:
    return DefenseInfo(
        name=name,
        kind=cls.kind,
        summary=summary_of(cls),
        reference=cls.reference,
        requirement=cls.requirement,
        in_db=cls.in_db,
        params=default_params(cls),
        aliases=tuple(getattr(cls, "aliases", ())),
    )


registry = Registry("defense", _describe)


def register(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator: register a defense under ``name`` (``aliases`` are also accepted by ``get``)."""
    return registry.register(name, aliases)


@dataclass(frozen=True)
class InDBPlan:
    """How a rule can run inside the peer's database. Pure data: the system maps ``op`` to its module command.

    Attributes
    ----------
    op:
        The row reduction the database performs: ``"mean"``, ``"median"`` or ``"trimmed_mean"``.
    args:
        Integer arguments of the reduction, e.g. ``{"trim": f}`` for ``"trimmed_mean"`` (drop ``trim``
        values from each end of every coordinate).
    select:
        If True, the reduction applies only to a subset of rows chosen from the pairwise squared distances:
        the database computes the (n, n) squared-distance matrix ``D``, the client calls
        ``rule.select(D).indices`` and the database reduces just those rows (Krum family).
    """

    op: str
    args: Mapping[str, int] = field(default_factory=dict)
    select: bool = False


class Selection(NamedTuple):
    """Result of a distance-based selection: chosen row ``indices`` and the per-row ``scores`` (n,)."""

    indices: np.ndarray
    scores: np.ndarray


def requirement_error(rule: str, text: str, n: int, f: int) -> ValueError:
    return ValueError(f"{rule} requires {text} (got n={n}, f={f})")


class Rule:
    """Common part of aggregators and pre-aggregators.

    Subclasses set the class attributes ``kind``, ``reference``, ``requirement`` (human-readable (n, f)
    condition) and ``in_db``, and implement :meth:`conditions`.
    """

    name: ClassVar[str] = "rule"
    kind: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    requirement: ClassVar[str] = "n >= 1"
    in_db: ClassVar[bool] = False
    aliases: ClassVar[tuple[str, ...]] = ()

    def __init__(self, f: int = 0):
        self.f = int_param(self.name, "f", f, minimum=0)

    # -- (n, f) contract -------------------------------------------------------------------------------
    def conditions(self, n: int, f: int) -> list[tuple[bool, str]]:
        """List of ``(holds, text)`` pairs; the default only asks for at least one input."""
        return [(n >= 1, "n >= 1")]

    def check(self, n: int, f: int | None = None) -> None:
        """Raise ``ValueError`` naming the violated condition if the rule cannot run on n inputs with f
        Byzantine ones (``f`` defaults to the rule's own ``f``)."""
        f = self.f if f is None else f
        n = int_param(self.name, "n", n, minimum=1)
        f = int_param(self.name, "f", f, minimum=0)
        for holds, text in self.conditions(n, f):
            if not holds:
                raise requirement_error(self.name, text, n, f)

    # -- introspection ---------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """Current hyperparameters (those of ``__init__``)."""
        return {k: getattr(self, k) for k in default_params(type(self)) if hasattr(self, k)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class Aggregator(Rule):
    """Maps (n, d) vectors to one (d,) vector of the same kind (numpy/torch), dtype and device."""

    kind: ClassVar[str] = "aggregator"

    def __call__(self, vectors: Any, **kwargs: Any) -> Any:
        """Aggregate (n, d) vectors after ``check(n)``. Keyword arguments (e.g. ``center``, the previous
        aggregate) are used by the rules that take them and ignored by the others, so a caller can pass
        them uniformly."""
        x, restore = as_matrix(vectors)
        self.check(x.shape[0])
        return restore(self.aggregate(x, **kwargs))

    def aggregate(self, x: np.ndarray, **kwargs: Any) -> np.ndarray:
        """Numpy core: (n, d) -> (d,). Assumes :meth:`check` passed; must not modify ``x``."""
        raise NotImplementedError

    def in_db_plan(self) -> InDBPlan | None:
        """In-database form of the rule, or None if it only runs on the client."""
        return None


class PreAggregator(Rule):
    """Maps (n, d) vectors to (m, d) vectors of the same kind; see :meth:`output_size` for m."""

    kind: ClassVar[str] = "preaggregator"

    def __call__(self, vectors: Any) -> Any:
        x, restore = as_matrix(vectors)
        self.check(x.shape[0])
        return restore(self.preaggregate(x))

    def preaggregate(self, x: np.ndarray) -> np.ndarray:
        """Numpy core: (n, d) -> (m, d). Assumes :meth:`check` passed; must not modify ``x``."""
        raise NotImplementedError

    def output_size(self, n: int) -> int:
        """Number m of vectors produced from n inputs."""
        return n


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


__all__ = [
    "Aggregator",
    "PreAggregator",
    "Rule",
    "InDBPlan",
    "Selection",
    "DefenseInfo",
    "register",
    "registry",
    "requirement_error",
    "ceil_div",
    "is_int",
]
