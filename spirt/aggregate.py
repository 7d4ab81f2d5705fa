"""Aggregating the peers' published averages: inside the database where the backend can run the rule.

The defense objects (``defenses`` package) hold the maths and say, as data, whether they have a
database form (``in_db_plan()``: a reduction, possibly over rows selected from pairwise distances).
Backends say which reductions they run inside the database (``Backend.in_database``). Where the two
meet, the rule runs in the database:

    mean -> TENSOR.AVG (or the Lua function);  median -> TENSOR.MEDIAN;  trimmed_mean -> TENSOR.TRIMMEAN
    krum / multi_krum -> TENSOR.DIST (n x n squared distances) -> select() on the client -> TENSOR.AVG

Any other rule (or a composed one), or any rule on a backend without that reduction, runs on the client
over the fetched (n, d) matrix and the result is stored back. :func:`choose_path` makes this choice
once per peer, from capabilities, never from names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import redis

from .agreement import NoQuorum
from .backends import Backend, ModuleBackend
from .tensors import as_f32_bytes, from_f32_bytes


def _plan(defense):
    return getattr(defense, "in_db_plan", lambda: None)()


def runs_in_database(backend: Backend, defense) -> bool:
    """Whether ``backend`` can run ``defense`` inside the database."""
    plan = _plan(defense)
    if plan is None or plan.op not in backend.in_database:
        return False
    return not plan.select or "dist" in backend.in_database


def in_db_possible(defense) -> bool:
    """Whether ``defense`` runs inside a database with the tensor module."""
    return runs_in_database(ModuleBackend(), defense)


def aggregate_in_db(client: redis.Redis, defense, keys: list[str], out_key: str,
                    backend: Backend | None = None) -> list[int]:
    """Run ``defense`` over the tensors at ``keys`` inside the database (the tensor module's commands
    unless another ``backend`` is given); returns the indices of the rows used."""
    backend = backend or ModuleBackend()
    plan = _plan(defense)
    if plan is None:
        raise ValueError(f"{type(defense).__name__} has no in-database form")
    n = len(keys)
    if hasattr(defense, "check"):
        defense.check(n)
    chosen = list(range(n))
    if plan.select:
        chosen = [int(i) for i in np.atleast_1d(defense.select(backend.distances(client, keys)).indices)]
    backend.reduce(client, plan.op, out_key, [keys[i] for i in chosen], dict(plan.args))
    return chosen


def aggregate_on_client(client: redis.Redis, defense, keys: list[str], out_key: str,
                        vectors: np.ndarray | None = None, ttl_ms: int | None = None) -> np.ndarray:
    """Fetch (unless given), aggregate with numpy, store the result at ``out_key``."""
    if vectors is None:
        raw = client.mget(keys)
        vectors = np.stack([from_f32_bytes(b, key=k) for k, b in zip(keys, raw, strict=True)])
    out = np.asarray(defense(vectors), dtype=np.float32)
    client.set(out_key, as_f32_bytes(out), px=ttl_ms)
    return out


@dataclass(frozen=True)
class AggregationPath:
    """How one peer aggregates, chosen once: ``in_database`` or on the client, with its rule."""

    defense: object
    backend: Backend
    in_database: bool

    def __call__(self, client: redis.Redis, keys: list[str], out_key: str, ttl_ms: int | None = None) -> None:
        if self.in_database:
            aggregate_in_db(client, self.defense, keys, out_key, self.backend)
        else:
            aggregate_on_client(client, self.defense, keys, out_key, ttl_ms=ttl_ms)

    def describe(self) -> str:
        where = f"in the database ({self.backend.name} backend)" if self.in_database else "on the client"
        return f"{getattr(self.defense, 'name', type(self.defense).__name__)} {where}"


def choose_path(backend: Backend, defense) -> AggregationPath:
    """The aggregation path of a peer with ``backend`` aggregating with ``defense``."""
    return AggregationPath(defense, backend, runs_in_database(backend, defense))


class Rule:
    """A peer's aggregation rule as configured (``aggregation.defense``, ``.params``, ``.pre``), with its
    ``f`` lowered by the members proven Byzantine (banned for equivocating): they send nothing we count
    any more, and the others hold at most the rest of the f. Without that, a group of 5 tolerating 2
    that banned both would be left with 3 vectors, too few for a trimmed mean tolerating 2. One path is
    chosen per number of proven members (:func:`choose_path`)."""

    def __init__(self, cfg, backend: Backend):
        self.cfg, self.backend = cfg, backend
        self._paths: dict[int, AggregationPath] = {}

    def path(self, proven: int = 0) -> AggregationPath:
        if proven not in self._paths:
            import defenses

            a = self.cfg.aggregation
            params = dict(a.params)
            if "f" in params:
                params["f"] = max(0, int(params["f"]) - proven)
            self._paths[proven] = choose_path(self.backend, defenses.get(a.defense, pre=a.pre or None, **params))
        return self._paths[proven]

    def __call__(self, client: redis.Redis, keys: list[str], out_key: str, proven: int = 0,
                 ttl_ms: int | None = None) -> None:
        """Aggregate ``keys`` into ``out_key`` with ``proven`` members known Byzantine (banned, or whose
        vector this round failed its signature check: only the sender writes its slot). Too few vectors
        for the rule (f Byzantine among the rest could outweigh them) is :class:`NoQuorum`: the round's
        update is not applied, and the peer waits, as without a majority."""
        path = self.path(proven)
        try:
            path.defense.check(len(keys))
        except ValueError as exc:
            raise NoQuorum(f"{len(keys)} vectors, too few for the rule: {exc}; the round's update is not "
                           "applied") from None
        path(client, keys, out_key, ttl_ms=ttl_ms)
