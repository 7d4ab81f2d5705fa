"""A SPIRT peer: its own database and an orchestrator running the training round as a state machine.

    COMPUTE   invoke K gradient functions (they read params, write grad:r:k in this peer's database)
    AVERAGE   average the K gradients inside the database             -> avg:r
    PUBLISH   (a Byzantine peer replaces avg:r here) mark round r ready
    BARRIER   wait, with a deadline, until the live peers have published round r
    EXCHANGE  copy each ready peer's avg:r into this database         -> in:q:r
    AGGREGATE mean or a robust defense, in the database where it has a database form -> agg:r
    UPDATE    SGD step on the parameters inside the database (momentum state beside them)
    EVALUATE  every E rounds: test loss and accuracy of the parameters
    CLEANUP   delete this round's private keys and the previous round's published average

The databases are the only channel: between peers, and between a peer and its functions. Key names
carry the peer's hash tag, so all keys of a peer live in one Redis Cluster slot.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field

import numpy as np
import redis

from .aggregate import aggregate_in_db, aggregate_on_client, in_db_possible
from .backends import SGDConfig, get_backend
from .config import Config
from .functions import FunctionSpec, GradTask
from .servers import make_client
from .tensors import as_f32_bytes, from_f32_bytes


class Phase(enum.Enum):
    COMPUTE = "compute"
    AVERAGE = "average"
    PUBLISH = "publish"
    BARRIER = "barrier"
    EXCHANGE = "exchange"
    AGGREGATE = "aggregate"
    UPDATE = "update"
    EVALUATE = "evaluate"
    CLEANUP = "cleanup"


ROUND_KEY_TTL_MS = 10 * 60 * 1000  # safety net: round keys expire even if a peer dies before cleanup


@dataclass(frozen=True)
class Keys:
    """Key names of one peer (in its own database)."""

    peer: int

    @property
    def tag(self) -> str:
        return f"{{p{self.peer}}}"

    @property
    def params(self) -> str:
        return f"{self.tag}:params"

    @property
    def momentum(self) -> str:
        return f"{self.tag}:momentum"

    @property
    def ready(self) -> str:
        return f"{self.tag}:ready"

    @property
    def metrics(self) -> str:
        return f"{self.tag}:metrics"

    @property
    def done(self) -> str:
        return f"{self.tag}:done"

    @property
    def notify(self) -> str:
        """List in this peer's database where the others announce their published rounds."""
        return f"{self.tag}:notify"

    def grad(self, r: int, k: int) -> str:
        return f"{self.tag}:grad:{r}:{k}"

    def avg(self, r: int) -> str:
        return f"{self.tag}:avg:{r}"

    def incoming(self, q: int, r: int) -> str:
        return f"{self.tag}:in:{q}:{r}"

    def agg(self, r: int) -> str:
        return f"{self.tag}:agg:{r}"


def function_spec(cfg: Config) -> FunctionSpec:
    return FunctionSpec(
        model=cfg.model.name, norm=cfg.model.norm, dataset=cfg.data.dataset, data_dir=cfg.data.data_dir,
        limit_train=cfg.data.limit_train, n_peers=cfg.peers.count, partition=cfg.data.partition,
        alpha=cfg.data.alpha, batch_size=cfg.peers.batch_size, functions=cfg.peers.functions, seed=cfg.run.seed,
    )


@dataclass
class RoundMetrics:
    round: int
    peer: int
    loss: float = float("nan")
    accuracy: float = float("nan")
    test_loss: float = float("nan")
    functions_ok: int = 0
    functions_failed: int = 0
    peers_aggregated: int = 0
    peers_excluded: str = ""
    byzantine: bool = False
    times: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "times"}
        d.update({f"t_{k}": v for k, v in self.times.items()})
        return d


class Peer:
    """One peer's orchestrator. ``urls[i]`` is peer i's database; this peer is ``index``."""

    def __init__(self, cfg: Config, index: int, urls: list[str], *, executor=None):
        self.cfg, self.index, self.urls = cfg, index, urls
        self.keys = Keys(index)
        self.db = make_client(url=urls[index], socket_timeout=120)
        self.others = {q: make_client(url=u, socket_timeout=30, connect_timeout=2)
                       for q, u in enumerate(urls) if q != index}
        self.backend = get_backend(cfg.aggregation.backend)
        self.backend.prepare(self.db)
        self.sgd = SGDConfig(cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay)
        self.spec = function_spec(cfg)
        self.byzantine = index >= cfg.peers.count - cfg.attack.byzantine
        self.attack = None
        if self.byzantine:
            import attacks

            self.attack = attacks.get(cfg.attack.name, **self._attack_params())
            self.attack_info = attacks.info(cfg.attack.name)
        import defenses

        self.defense = defenses.get(cfg.aggregation.defense, pre=cfg.aggregation.pre or None,
                                    **cfg.aggregation.params)
        self.defense_in_db = self.backend.name == "module" and in_db_possible(self.defense)
        self._executor = executor
        self._eval_state = None
        self.phase = Phase.COMPUTE

    def _attack_params(self) -> dict:
        params = dict(self.cfg.attack.params)
        import attacks

        accepted = attacks.info(self.cfg.attack.name).params
        if "seed" in accepted and "seed" not in params:
            params["seed"] = self.cfg.run.seed * 1000 + self.index  # each Byzantine peer its own noise
        return params

    # -- set-up ----------------------------------------------------------------------------------
    def init_params(self) -> int:
        """Store the seeded initial model (the same on every peer); returns its size."""
        from .data import load_dataset
        from .models import build_model
        from .tensors import FlatParams

        ds = load_dataset(self.cfg.data.dataset, self.cfg.data.data_dir, limit_train=1,
                          limit_test=self.cfg.data.limit_test)
        model = build_model(self.cfg.model.name, ds.channels, ds.num_classes, ds.image_size, self.cfg.run.seed,
                            norm=self.cfg.model.norm)
        flat = FlatParams(model)
        self._eval_state = (model, flat, ds)
        pipe = self.db.pipeline(transaction=False)
        pipe.set(self.keys.params, flat.params_bytes())
        pipe.delete(self.keys.momentum, self.keys.ready, self.keys.metrics, self.keys.done)
        pipe.execute()
        return flat.numel

    @property
    def executor(self):
        if self._executor is None:
            from .executors import make_executor

            e = self.cfg.executor
            self._executor = make_executor(e.kind, self.spec, workers=e.workers, retries=e.retries,
                                           timeout_s=e.timeout_s)
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
        for c in [self.db, *self.others.values()]:
            c.close()

    # -- the round -------------------------------------------------------------------------------
    def run(self, rounds: int | None = None, progress=None) -> list[RoundMetrics]:
        out = []
        for r in range(rounds or self.cfg.run.rounds):
            m = self.round(r)
            out.append(m)
            if progress:
                progress(m)
        self.db.set(self.keys.done, 1)
        return out

    def round(self, r: int) -> RoundMetrics:
        K, k = self.keys, self.cfg.peers.functions
        m = RoundMetrics(r, self.index, byzantine=self.byzantine)
        t = m.times
        t_start = time.perf_counter()

        # COMPUTE
        self.phase = Phase.COMPUTE
        data_attack = None
        if self.byzantine and self.attack_info.kind == "data":
            data_attack = (self.cfg.attack.name, dict(self.cfg.attack.params))
        tasks = [GradTask(self.spec, self.urls[self.index], self.index, r, i, K.params, K.grad(r, i),
                          ROUND_KEY_TTL_MS, data_attack) for i in range(k)]
        t0 = time.perf_counter()
        invocations = self.executor.map(tasks)
        wall = time.perf_counter() - t0
        ok = [inv for inv in invocations if inv.result is not None]
        m.functions_ok, m.functions_failed = len(ok), len(invocations) - len(ok)
        if not ok:
            raise RuntimeError(f"peer {self.index} round {r}: every gradient function failed: "
                               f"{invocations[0].error}")
        m.loss = float(np.mean([inv.result.loss for inv in ok]))
        io = float(np.mean([inv.result.t_read + inv.result.t_store for inv in ok]))
        grad = float(np.mean([inv.result.t_grad for inv in ok]))
        share = io / (io + grad) if io + grad > 0 else 0.0
        t["store"] = wall * share  # the functions' database I/O, as a share of the fan-out's wall time
        t["compute"] = wall - t["store"]

        # AVERAGE (over the gradients that arrived)
        self.phase = Phase.AVERAGE
        t0 = time.perf_counter()
        grad_keys = [inv.task.grad_key for inv in ok]
        self.backend.average(self.db, K.avg(r), grad_keys)
        self.db.pexpire(K.avg(r), ROUND_KEY_TTL_MS)
        t["average"] = time.perf_counter() - t0

        # PUBLISH
        self.phase = Phase.PUBLISH
        t0 = time.perf_counter()
        if self.attack is not None and self.attack_info.kind == "model":
            self._publish_attack(r)
        self.db.set(K.ready, r)
        self._announce(r)
        t_pub = time.perf_counter() - t0

        # BARRIER with a deadline: who is missing is excluded from this round
        self.phase = Phase.BARRIER
        t0 = time.perf_counter()
        ready, missing = self._barrier(r, list(self.others))
        t["barrier"] = time.perf_counter() - t0
        m.peers_excluded = " ".join(map(str, missing))

        # EXCHANGE
        self.phase = Phase.EXCHANGE
        t0 = time.perf_counter()
        in_keys = [K.avg(r)]
        vectors = {}
        for q in ready:
            data = self.others[q].get(Keys(q).avg(r))
            try:
                vectors[q] = from_f32_bytes(data, key=Keys(q).avg(r))
            except ValueError as exc:
                m.peers_excluded += f" {q}(bad:{exc})"
                continue
            in_keys.append(K.incoming(q, r))
        if self.defense_in_db or self.backend.name != "client":
            pipe = self.db.pipeline(transaction=False)
            for q, v in vectors.items():
                pipe.set(K.incoming(q, r), as_f32_bytes(v), px=ROUND_KEY_TTL_MS)
            pipe.execute()
        t["exchange"] = time.perf_counter() - t0 + t_pub

        # AGGREGATE
        self.phase = Phase.AGGREGATE
        t0 = time.perf_counter()
        m.peers_aggregated = len(in_keys)
        if self.defense_in_db:
            aggregate_in_db(self.db, self.defense, in_keys, K.agg(r))
        elif self.backend.name != "client" and self.cfg.aggregation.defense in ("mean", "average"):
            self.backend.average(self.db, K.agg(r), in_keys)
        else:
            own = from_f32_bytes(self.db.get(K.avg(r)), key=K.avg(r))
            stack = np.stack([own, *vectors.values()])
            aggregate_on_client(self.db, self.defense, in_keys, K.agg(r), vectors=stack, ttl_ms=ROUND_KEY_TTL_MS)
        t["aggregate"] = time.perf_counter() - t0

        # UPDATE
        self.phase = Phase.UPDATE
        t0 = time.perf_counter()
        self.backend.update(self.db, K.params, K.momentum, [K.agg(r)], self.sgd)
        t["update"] = time.perf_counter() - t0

        # CLEANUP: private keys now; our previous average once everybody has passed this barrier
        self.phase = Phase.CLEANUP
        t0 = time.perf_counter()
        self.db.delete(*grad_keys, *[K.grad(r, i) for i in range(k)], K.agg(r),
                       *[K.incoming(q, r) for q in self.others], K.avg(r - 1) if r > 0 else K.avg(r) + ":none")
        t["cleanup"] = time.perf_counter() - t0

        # EVALUATE
        last = r == self.cfg.run.rounds - 1
        if (r + 1) % self.cfg.run.eval_every == 0 or last:
            self.phase = Phase.EVALUATE
            t0 = time.perf_counter()
            m.test_loss, m.accuracy = self.evaluate(full=last)
            t["evaluate"] = time.perf_counter() - t0
        t["round"] = time.perf_counter() - t_start
        self.db.rpush(K.metrics, json.dumps(m.row()))
        return m

    def _announce(self, r: int) -> None:
        """Tell every other peer, in its own database, that our round r is published (wakes its barrier)."""
        for q, c in self.others.items():
            try:
                c.rpush(Keys(q).notify, r)
            except redis.RedisError:
                pass  # an unreachable peer cannot wait for us anyway

    def _barrier(self, r: int, peers: list[int]) -> tuple[list[int], list[int]]:
        """Wait until the given peers published round r, or the deadline passed.

        The ready marks in the peers' databases are the truth; announcements pushed into our own
        database only wake us up (a blocking pop costs no CPU, unlike polling on a 2-core machine).
        """
        deadline = time.monotonic() + self.cfg.barrier.timeout_s
        waiting = set(peers)
        ready: list[int] = []
        # old announcements only cause spurious wake-ups; the ready marks below are checked after this
        self.db.delete(self.keys.notify)
        while waiting:
            for q in sorted(waiting):
                try:
                    v = self.others[q].get(Keys(q).ready)
                except redis.RedisError:
                    v = None  # unreachable: treated as not ready until the deadline
                if v is not None and int(v) >= r:
                    ready.append(q)
                    waiting.discard(q)
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                break
            # sleep until the next announcement (or a short while: a missed one costs little)
            self.db.blpop([self.keys.notify], timeout=min(left, 0.05))
        return sorted(ready), sorted(waiting)

    def _publish_attack(self, r: int) -> None:
        """A Byzantine peer overwrites its published average with the attack's vector."""
        own = from_f32_bytes(self.db.get(self.keys.avg(r)), key=self.keys.avg(r))
        honest = None
        if self.attack_info.omniscient:
            n_honest = self.cfg.peers.count - self.cfg.attack.byzantine
            honest_peers = [q for q in self.others if q < n_honest]
            ready, _ = self._barrier(r, honest_peers)
            honest = np.stack([from_f32_bytes(self.others[q].get(Keys(q).avg(r))) for q in ready]) if ready else None
            if honest is None:
                honest = own[None, :]
        vec = np.asarray(self.attack(honest=honest, own=own), dtype=np.float32)
        self.db.set(self.keys.avg(r), as_f32_bytes(vec), px=ROUND_KEY_TTL_MS)

    def evaluate(self, full: bool = False) -> tuple[float, float]:
        from .functions import evaluate

        if self._eval_state is None:
            self.init_eval_state()
        model, flat, ds = self._eval_state
        return evaluate(model, flat, ds, self.db.get(self.keys.params),
                        samples=0 if full else self.cfg.run.eval_samples)

    def init_eval_state(self) -> None:
        from .data import load_dataset
        from .models import build_model
        from .tensors import FlatParams

        ds = load_dataset(self.cfg.data.dataset, self.cfg.data.data_dir, limit_train=1,
                          limit_test=self.cfg.data.limit_test)
        model = build_model(self.cfg.model.name, ds.channels, ds.num_classes, ds.image_size, self.cfg.run.seed,
                            norm=self.cfg.model.norm)
        self._eval_state = (model, FlatParams(model), ds)


def peer_main(cfg_json: str, index: int, urls: list[str], start_key: str | None = None) -> None:
    """Entry point of a peer orchestrator process: set up, wait for the start signal, train."""
    import torch

    from .config import Config

    torch.set_num_threads(1)
    cfg = Config.model_validate_json(cfg_json)
    peer = Peer(cfg, index, urls)
    try:
        peer.init_params()
        if cfg.executor.kind == "process":
            peer.executor.warm()
        peer.db.set(f"{peer.keys.tag}:up", 1)
        if start_key:  # the launcher sets it in peer 0's database once every peer is up
            c0 = make_client(url=urls[0], socket_timeout=5)
            while not c0.exists(start_key):
                time.sleep(0.01)
            c0.close()
        peer.run()
    finally:
        peer.close()
