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

Peers that run as threads of one process (``peers.mode = "thread"``, as the benchmarks run them) share
their client-side results (:func:`shared_result`): the honest peers of a round usually hold the same
vectors in the same order, and computing the rule once for all of them gives each the result it would
have computed. A peer whose inputs differ by one byte, or whose rule carries other state, computes its
own.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass

import numpy as np
import redis

from .agreement import NoQuorum
from .backends import Backend, ModuleBackend
from .shared import Shared
from .tensors import as_f32_bytes, from_f32_bytes

#: the client-side aggregates of this process's peers (see :func:`shared_result`); a round's honest
#: peers ask for one result, an equivocating attacker's victims for one each
_AGGREGATED = Shared(keep=16)
#: bytes sampled from each input vector for the key: inputs equal in the sample are compared whole
SAMPLE_STRIDE = 4093


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
                        vectors: np.ndarray | None = None, ttl_ms: int | None = None,
                        shared: bool = False) -> np.ndarray:
    """Fetch (unless given), aggregate with numpy, store the result at ``out_key``. With ``shared``,
    the result of a peer of this process that aggregated the same fetched bytes with a rule in the same
    state is taken instead of computed (:func:`shared_result`)."""
    raw = None
    if vectors is None:
        raw = client.mget(keys)
        vectors = np.stack([from_f32_bytes(b, key=k) for k, b in zip(keys, raw, strict=True)])
    if shared and raw is not None:
        out = shared_result(defense, raw, vectors)
    else:
        out = np.asarray(defense(vectors), dtype=np.float32)
    client.set(out_key, as_f32_bytes(out), px=ttl_ms)
    return out


def shared_result(defense, raw: list[bytes], vectors: np.ndarray) -> np.ndarray:
    """``defense(vectors)`` as float32, computed once by the peers of this process that ask for it with
    the same inputs: the same ``raw`` bytes (``vectors`` parsed from them) and ``defense`` in the same
    state (its pickle).

    The key holds a sample of the bytes (every :data:`SAMPLE_STRIDE`-th of each vector), so finding it
    costs little; a taker then compares its bytes whole with the ones the result was computed from, and
    computes its own on any difference, so no input another peer controls can hand it a result made from
    other vectors. A rule whose state the call changed (bucketing's random stream, a remembering centred
    clipping) is not shared either: each peer's own rule has to advance. The result is read-only."""
    try:
        before = pickle.dumps(defense)
    except Exception:  # noqa: BLE001 - a rule that cannot be pickled is simply not shared
        return np.asarray(defense(vectors), dtype=np.float32)
    key = (hashlib.blake2b(before, digest_size=16).digest(),
           tuple((len(b), bytes(b[::SAMPLE_STRIDE])) for b in raw))

    me = object()  # tells the caller that computed the result from the ones that find it

    def compute() -> tuple[object, list[bytes], np.ndarray | Exception, bool]:
        try:
            out = np.array(defense(vectors), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - ours to raise, below; a taker computes its own
            return me, raw, exc, False
        out.setflags(write=False)
        return me, raw, out, pickle.dumps(defense) == before

    by, inputs, out, stateless = _AGGREGATED.get(key, compute)
    if by is me:
        if isinstance(out, Exception):
            raise out
        return out
    if stateless and inputs == raw:
        return out
    return np.asarray(defense(vectors), dtype=np.float32)


@dataclass(frozen=True)
class AggregationPath:
    """How one peer aggregates, chosen once: ``in_database`` or on the client, with its rule."""

    defense: object
    backend: Backend
    in_database: bool
    #: share client-side results with the peers of this process (peers as threads)
    shared: bool = False

    def __call__(self, client: redis.Redis, keys: list[str], out_key: str, ttl_ms: int | None = None) -> None:
        if self.in_database:
            aggregate_in_db(client, self.defense, keys, out_key, self.backend)
        else:
            aggregate_on_client(client, self.defense, keys, out_key, ttl_ms=ttl_ms, shared=self.shared)

    def describe(self) -> str:
        where = f"in the database ({self.backend.name} backend)" if self.in_database else "on the client"
        return f"{getattr(self.defense, 'name', type(self.defense).__name__)} {where}"


def choose_path(backend: Backend, defense, shared: bool = False) -> AggregationPath:
    """The aggregation path of a peer with ``backend`` aggregating with ``defense`` (``shared``: see
    :class:`AggregationPath`)."""
    return AggregationPath(defense, backend, runs_in_database(backend, defense), shared)


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
            rule = defenses.get(a.defense, pre=a.pre or None, **params)
            self._paths[proven] = choose_path(self.backend, rule, shared=self.cfg.peers.mode == "thread")
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
