"""Robust aggregation rules (defenses) against Byzantine peers.

Public API
----------
``get(name, pre=None, **params)``
    Build a registered defense; ``params`` are its hyperparameters (``f`` = number of Byzantine inputs
    tolerated, plus rule-specific ones). With ``pre=[...]`` (pre-aggregator names, ``(name, params)``
    pairs or objects) the result is a :class:`Pipeline` applying the pre-aggregators in order and then the
    aggregator; named pre-aggregators inherit ``f``. Examples: ``defenses.get("krum", f=2, pre=["nnm"])``,
    ``defenses.get("median", f=1, pre=[("bucketing", {"s": 2, "seed": 7})])``.
``compose(pre, aggregator, **params)``
    The same composition from objects (or an aggregator name with its params).
``names(kind=None)``, ``info(name)``
    Registered names (optionally only ``"aggregator"`` or ``"preaggregator"``) and their metadata
    (:class:`DefenseInfo`: kind, summary, reference, (n, f) requirement, in-database form, defaults).

Every rule object has ``check(n, f=None)`` raising ``ValueError`` naming the violated condition, and is
called on an (n, d) numpy array or torch tensor (or a list of vectors): an aggregator returns (d,), a
pre-aggregator (m, d), of the same kind, dtype and device. Aggregators with an in-database form expose
``in_db_plan()`` (an :class:`InDBPlan`), and the Krum family and NNM expose ``select(sq_dists)`` so the
(n, n) squared distances may be computed elsewhere (``pairwise_sq_dists`` computes them on the client).

Adding a defense: one module in this package whose class derives from :class:`Aggregator` or
:class:`PreAggregator` and is decorated with ``@register("name")``; modules are imported automatically.
"""

from __future__ import annotations

from typing import Any

from ._arrays import pairwise_sq_dists
from ._base import Aggregator, DefenseInfo, InDBPlan, PreAggregator, Rule, Selection, register, registry
from ._pipeline import Pipeline, PreSpec, compose

registry.load_package(__name__, __path__)


def get(name: str, pre: list[PreSpec] | None = None, **params: Any) -> Rule:
    """Instantiate the defense ``name`` (or an alias) with ``params``; see the module docstring."""
    rule = registry.get(name, **params)
    if pre is None or len(pre) == 0:
        return rule
    return compose(pre, rule)


def names(kind: str | None = None) -> list[str]:
    """Sorted registered names, optionally restricted to ``kind`` ("aggregator" or "preaggregator")."""
    if kind not in (None, "aggregator", "preaggregator"):
        raise ValueError(f"kind must be None, 'aggregator' or 'preaggregator' (got {kind!r})")
    return [n for n in registry.names() if kind is None or registry.cls(n).kind == kind]


def info(name: str) -> DefenseInfo:
    """Metadata of the defense ``name`` (or an alias)."""
    return registry.info(name)


__all__ = [
    "get",
    "names",
    "info",
    "compose",
    "register",
    "pairwise_sq_dists",
    "Aggregator",
    "PreAggregator",
    "Pipeline",
    "Rule",
    "InDBPlan",
    "Selection",
    "DefenseInfo",
]
