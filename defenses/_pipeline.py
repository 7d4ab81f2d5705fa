"""Composition of pre-aggregators with an aggregator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._arrays import as_matrix
from ._base import Aggregator, PreAggregator, registry
from ._registry import accepted_params

PreSpec = Any  # a PreAggregator, a name, or a (name, params) pair


def build_pre(spec: PreSpec, f: int | None = None) -> PreAggregator:
    """Turn a pre-aggregator spec into an object; ``f`` is passed on unless the spec sets its own."""
    if isinstance(spec, PreAggregator):
        return spec
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
        name, params = spec[0], dict(spec[1] or {})
    else:
        raise ValueError(
            f"pre-aggregator spec must be a name, a (name, params) pair or a pre-aggregator "
            f"object (got {spec!r})"
        )
    cls = registry.cls(name)
    if cls.kind != "preaggregator":
        allowed = [n for n in registry.names() if registry.cls(n).kind == "preaggregator"]
        raise ValueError(f"{cls.name} is not a pre-aggregator; allowed in pre: {', '.join(allowed)}")
    if f is not None and "f" not in params and "f" in accepted_params(cls):
        params["f"] = f
    return registry.get(name, **params)


class Pipeline(Aggregator):
    """Pre-aggregators applied in order, then an aggregator: (n, d) -> ... -> (m, d) -> (d,).

    ``check(n, f)`` checks every stage with the number of vectors it actually receives (e.g. ceil(n/s)
    after bucketing) and the same f. Extra keyword arguments of ``__call__`` (e.g. ``center``) go to the
    final aggregator. A pipeline has no in-database form.
    """

    reference = "composition"

    def __init__(self, pre: Sequence[PreAggregator], aggregator: Aggregator):
        if not isinstance(aggregator, Aggregator):
            raise ValueError(f"the last stage must be an aggregator (got {aggregator!r})")
        for p in pre:
            if not isinstance(p, PreAggregator):
                raise ValueError(f"pre stages must be pre-aggregators (got {p!r})")
        self.pre = tuple(pre)
        self.aggregator = aggregator
        self.f = aggregator.f
        self.name = "+".join([p.name for p in self.pre] + [aggregator.name])
        self.requirement = "; ".join(f"{s.name}: {s.requirement}" for s in (*self.pre, aggregator))

    def check(self, n: int, f: int | None = None) -> None:
        f = self.f if f is None else f
        n_in = n
        for stage in self.pre:
            stage.check(n, f)
            n = stage.output_size(n)
        try:
            self.aggregator.check(n, f)
        except ValueError as err:
            if n == n_in:
                raise
            raise ValueError(
                f"{err} after {'+'.join(p.name for p in self.pre)} turned n={n_in} inputs into {n}"
            ) from None

    def __call__(self, vectors: Any, **kwargs: Any) -> Any:
        x, restore = as_matrix(vectors)
        self.check(x.shape[0])
        return restore(self.aggregate(x, **kwargs))

    def aggregate(self, x: np.ndarray, **kwargs: Any) -> np.ndarray:
        for stage in self.pre:
            x = stage.preaggregate(x)
        return self.aggregator.aggregate(x, **kwargs)

    def params(self) -> dict[str, Any]:
        return {"pre": list(self.pre), "aggregator": self.aggregator}


def compose(pre: Sequence[PreSpec], aggregator: Aggregator | str, **params: Any) -> Pipeline:
    """Chain pre-aggregators (applied first, in order) with an aggregator.

    ``aggregator`` is an aggregator object or a registered name (then built with ``params``). Each ``pre``
    item is a pre-aggregator object, a name, or a ``(name, params)`` pair; named pre-aggregators inherit
    the aggregator's ``f`` unless their params set one.
    """
    if isinstance(aggregator, str):
        aggregator = registry.get(aggregator, **params)
    elif params:
        raise ValueError("params are only accepted with an aggregator name")
    if not isinstance(aggregator, Aggregator):
        allowed = [n for n in registry.names() if registry.cls(n).kind == "aggregator"]
        raise ValueError(f"{aggregator.name} is not an aggregator; allowed: {', '.join(allowed)}")
    if isinstance(pre, (str, PreAggregator)) or (
        isinstance(pre, tuple) and len(pre) == 2 and isinstance(pre[0], str) and isinstance(pre[1], dict)
    ):
        pre = [pre]
    return Pipeline([build_pre(p, aggregator.f) for p in pre], aggregator)
