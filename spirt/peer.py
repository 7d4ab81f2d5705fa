"""A SPIRT peer: its own database and an orchestrator running the training round as a state machine.

    COMPUTE   invoke K gradient functions (they read params, write grad:r:k in this peer's database)
    AVERAGE   average the K gradients inside the database             -> avg:r
    PUBLISH   push avg:r into every other peer's inbox (their database: in:p:r) and wake them;
              a Byzantine peer pushes its attack vector instead
    BARRIER   wait, with a deadline, until the live peers' round-r vectors are in our inbox
    AGGREGATE check sizes, then mean or a robust defense over [avg:r, in:q:r ...], in the database
              where the rule has a database form -> agg:r
    UPDATE    SGD step on the parameters inside the database (momentum state beside them)
    EVALUATE  every E rounds: test loss and accuracy of the parameters
    CLEANUP   delete this round's keys

Pushing (rather than each peer fetching from all others after the barrier) puts the inputs of the
aggregation in place while the slower peers still compute, keeps the barrier a local check, and lets
a Byzantine peer show different vectors to different peers, as the threat model allows.

The databases are the only channel: between peers, and between a peer and its functions. Key names
carry the peer's hash tag, so all keys of a peer live in one Redis Cluster slot.

Faults (each peer logs membership events, JSON with wall time, to ``{p}:events`` in its database):

- a heartbeat thread keeps ``{p}:alive`` (time to live 1.5 intervals, refreshed every half interval);
  the barrier checks the awaited peers every quarter interval, so a crashed peer (or one whose
  database is unreachable) is excluded within 2 intervals, not at the deadline; a peer missing
  ``membership.max_misses`` barriers in a row is removed, and re-admitted when its vector shows up or
  it asks to join again;
- gradient functions that fail, die or hang are retried by the executor; the round goes on with the
  gradients that arrived (``functions_failed`` in the metrics, a ``function_failed`` event);
- the update, ``completed`` = r and the round's metrics row are one transaction: with persistence on
  (AOF, fsync always) a peer whose database restarts resumes right after its last completed round;
- a peer that fell behind (the others finished a round without it) or diverged (most peers aggregated
  a different set of peers in the last round) resynchronises by state transfer, as a newcomer joins:
  parameters, momentum, round and membership from two agreeing peers.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import redis

from .aggregate import aggregate_in_db, aggregate_on_client, in_db_possible
from .backends import SGDConfig, get_backend
from .config import Config
from .functions import FunctionSpec, GradTask, as_int
from .keys import Keys
from .servers import make_client, pipelines_at_once
from .tensors import as_f32_bytes, from_f32_bytes

log = logging.getLogger("spirt.peer")


class Phase(enum.Enum):
    COMPUTE = "compute"
    AVERAGE = "average"
    PUBLISH = "publish"
    BARRIER = "barrier"
    AGGREGATE = "aggregate"
    UPDATE = "update"
    EVALUATE = "evaluate"
    CLEANUP = "cleanup"
    JOIN = "join"
    RECOVER = "recover"


ROUND_KEY_TTL_MS = 10 * 60 * 1000  # safety net: round keys expire even if a peer dies before cleanup


def function_spec(cfg: Config) -> FunctionSpec:
    return FunctionSpec(
        model=cfg.model.name, norm=cfg.model.norm, dataset=cfg.data.dataset, data_dir=cfg.data.data_dir,
        limit_train=cfg.data.limit_train, n_peers=cfg.data.parts or cfg.peers.count, partition=cfg.data.partition,
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
    functions_retried: int = 0  # invocations that needed more than one attempt (failed or not)
    peers_aggregated: int = 0
    peers_excluded: str = ""
    updates_rejected: int = 0  # received vectors that failed verification (security on)
    members: int = 0
    byzantine: bool = False
    wall_begin: float = float("nan")  # wall-clock time (time.time()) the round started and ended
    wall_end: float = float("nan")
    times: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "times"}
        d.update({f"t_{k}": v for k, v in self.times.items()})
        return d


@dataclass
class Member:
    """This peer's view of another peer."""

    index: int
    url: str
    client: redis.Redis
    since: int = 0  # first round in which we wait for it
    misses: int = 0
    removed: bool = False


class OwnDatabaseDown(RuntimeError):
    """This peer's own database is unreachable (crashed or restarting)."""


class Behind(RuntimeError):
    """Most peers finished this round without our vector reaching us: we fell behind and resynchronise."""


class Peer:
    """One peer's orchestrator. ``urls[i]`` is peer i's database; this peer is ``index``.

    ``urls`` may hold ``None`` for peers that are not running (yet): a peer joining later uses
    :meth:`join` with the URLs of live peers, which then learn its URL from its join request.
    """

    def __init__(self, cfg: Config, index: int, urls: list[str | None], *, executor=None):
        self.cfg, self.index = cfg, index
        self.urls = list(urls)
        self.url = urls[index]
        self.keys = Keys(index)
        self.db = make_client(url=self.url, socket_timeout=120)
        self.security = None
        if cfg.security.enabled:
            from .security.context import PeerSecurity

            self.security = PeerSecurity(cfg.security, index, self.url, self.db)
            self.db = make_client(url=self.url, socket_timeout=120, **self.security.own_credentials())
        self.members: dict[int, Member] = {}
        for q, u in enumerate(urls):
            if q != index and u is not None:
                self._add_member(q, u, since=0)
        self.backend = get_backend(cfg.aggregation.backend)
        self.backend.prepare(self.db)
        self.sgd = SGDConfig(cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay)
        self.spec = function_spec(cfg)
        self.byzantine = cfg.attack.byzantine > 0 and cfg.peers.count - cfg.attack.byzantine <= index < cfg.peers.count
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
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()
        self._hb_paused = threading.Event()  # set while we sit out (state transfer): others stop waiting
        self.phase = Phase.COMPUTE
        self.start_round = 0
        self.width = 0  # bytes of a parameter vector
        # our parameters' version counter, known from our own updates (None: read it from the database)
        self._version: int | None = None
        # (round, the peers we aggregated in it): what _behind compares with the others
        self._aggset: tuple[int, str] | None = None
        # this round's inbox: byte size of each peer's vector, as the barrier found it
        self._sizes: dict[int, int] = {}

    # -- membership --------------------------------------------------------------------------------
    @property
    def others(self) -> dict[int, redis.Redis]:
        return {q: m.client for q, m in self.members.items()}

    def _add_member(self, q: int, url: str, since: int) -> Member:
        creds = self.security.member_credentials(q, url) if self.security else {}
        client = make_client(url=url, socket_timeout=30, connect_timeout=2, **creds)
        self.members[q] = Member(q, url, client, since=since)
        return self.members[q]

    def _event(self, r: int, event: str, peer: int, detail: str = "", t: float | None = None) -> None:
        rec = {"t": time.time() if t is None else t, "round": r, "peer": self.index, "event": event, "about": peer, "detail": detail}
        log.info("peer %s round %s: %s peer %s %s", self.index, r, event, peer, detail)
        try:
            self.db.rpush(self.keys.events, json.dumps(rec))
        except redis.RedisError:
            pass

    def _alive(self, m: Member) -> tuple[bool, str, int | None]:
        """(alive, why not, last round it published) of another peer, from its own database."""
        try:
            pipe = m.client.pipeline(transaction=False)
            pipe.exists(Keys(m.index).alive)
            pipe.get(Keys(m.index).ready)
            alive, ready = pipe.execute()
            ready = as_int(ready)
            if alive:
                return True, "", ready
            return False, "heartbeat expired", ready
        except redis.RedisError as exc:
            return False, f"database unreachable ({type(exc).__name__})", None

    def _heartbeat_loop(self) -> None:
        hb = self.cfg.membership.heartbeat_s
        creds = self.security.own_credentials() if self.security else {}
        client = make_client(url=self.url, socket_timeout=max(1.0, hb), connect_timeout=max(0.5, hb / 2), **creds)
        ttl_ms = max(1, int(hb * 1500))
        while not self._stop.is_set():
            try:
                if self._hb_paused.is_set():
                    client.delete(self.keys.alive)
                else:
                    client.set(self.keys.alive, self.index, px=ttl_ms)
            except redis.RedisError:
                pass  # our database is down; the orchestrator notices on its own
            self._stop.wait(hb / 2)
        try:
            client.delete(self.keys.alive)
        except redis.RedisError:
            pass
        client.close()

    def start_heartbeat(self) -> None:
        self._hb_paused.clear()
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.index}",
                                               daemon=True)
            self._heartbeat.start()

    def _attack_params(self) -> dict:
        params = dict(self.cfg.attack.params)
        import attacks

        accepted = attacks.info(self.cfg.attack.name).params
        if "seed" in accepted and "seed" not in params:
            params["seed"] = self.cfg.run.seed * 1000 + self.index  # each Byzantine peer its own noise
        return params

    # -- set-up ------------------------------------------------------------------------------------
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
        self.width = flat.nbytes
        pipe = self.db.pipeline(transaction=True)
        pipe.set(self.keys.params, flat.params_bytes())
        # a random start, so a warm worker never mistakes another run's parameters for these
        pipe.set(self.keys.version, secrets.randbits(62))
        self._version, self._aggset = None, None
        pipe.set(self.keys.completed, -1)
        pipe.delete(self.keys.momentum, self.keys.peer_momentum, self.keys.ready, self.keys.metrics, self.keys.done,
                    self.keys.events,
                    *self._matching(self.keys.join_pattern), *self._matching(self.keys.notify_pattern))
        pipe.execute()
        self.start_heartbeat()
        return flat.numel

    @property
    def executor(self):
        if self._executor is None:
            from .executors import executor_for

            self._executor = executor_for(self.cfg.executor, self.spec, self.index, self.cfg.peers.count)
        return self._executor

    def close(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(5)
        if self._executor is not None:
            self._executor.close()
        for c in [self.db, *self.others.values()]:
            c.close()
        if self.security is not None:
            self.security.close()

    # -- main loop ---------------------------------------------------------------------------------
    def run(self, rounds: int | None = None, progress=None) -> list[RoundMetrics]:
        """Train from ``start_round`` to the configured number of rounds, recovering from a restart of
        our own database (resume after the last completed round) and from falling behind (state
        transfer from the live peers, as for a joining peer)."""
        total = rounds or self.cfg.run.rounds
        out = []
        r = self.start_round
        if self.security is not None:
            self.security.admit(self, wait_for={q for q, mb in self.members.items() if not mb.removed})
            self.security.limit_value_size(self.db, self.width)
        while r < total:
            try:
                why = self._behind(r) if r > self.start_round else None
                if why:
                    r = self._resync(r, total, why)
                    continue
                m = self.round(r)
            except Behind as exc:
                log.warning("peer %s: %s", self.index, exc)
                r = self._resync(r, total, str(exc))
                continue
            except (redis.ConnectionError, redis.TimeoutError, OwnDatabaseDown) as exc:
                if self._own_db_ok():
                    raise
                r = self._recover_own_db(r, exc)
                continue
            out.append(m)
            if progress:
                progress(m)
            r += 1
        self.db.set(self.keys.done, 1)
        return out

    def _own_db_ok(self) -> bool:
        try:
            return bool(self.db.ping())
        except redis.RedisError:
            return False

    def _recover_own_db(self, r: int, exc: BaseException) -> int:
        """Wait for our restarted database; resume after its last completed round."""
        self.phase = Phase.RECOVER
        log.warning("peer %s: own database unreachable in round %s (%s); waiting", self.index, r, exc)
        deadline = time.monotonic() + self.cfg.membership.db_recovery_s
        while time.monotonic() < deadline:
            if self._own_db_ok():
                done = self.db.get(self.keys.completed)
                if done is None or self.db.get(self.keys.params) is None:
                    raise RuntimeError(f"peer {self.index}: the restarted database lost the training state "
                                       "(start it with persistence on)")
                resume = int(done) + 1
                self._version, self._aggset = None, None  # the restart may have lost our last update
                self._event(resume, "recovered", self.index, f"database back, resuming at round {resume}")
                return resume
            time.sleep(0.1)
        raise RuntimeError(f"peer {self.index}: own database did not come back within "
                           f"{self.cfg.membership.db_recovery_s} s") from exc

    # -- the round ---------------------------------------------------------------------------------
    def round(self, r: int) -> RoundMetrics:
        K, k = self.keys, self.cfg.peers.functions
        m = RoundMetrics(r, self.index, byzantine=self.byzantine, wall_begin=time.time())
        self._sizes = {}
        t = m.times
        t_start = time.perf_counter()

        # COMPUTE
        self.phase = Phase.COMPUTE
        data_attack = None
        if self.byzantine and self.attack_info.kind == "data":
            data_attack = (self.cfg.attack.name, dict(self.cfg.attack.params))
        creds = self.security.function_credentials() if self.security else {}
        t0 = time.perf_counter()
        if self._version is None:  # known from our last update otherwise; one read, not one per function
            self._version = as_int(self.db.get(K.version))
        version = self._version
        t_version = time.perf_counter() - t0
        tasks = [GradTask(self.spec, self.url, self.index, r, i, K.params, K.grad(r, i), ROUND_KEY_TTL_MS,
                          data_attack, version_key=K.version, version=version, **creds) for i in range(k)]
        t0 = time.perf_counter()
        invocations = self.executor.map(tasks)
        wall = time.perf_counter() - t0
        ok = [inv for inv in invocations if inv.result is not None]
        m.functions_ok, m.functions_failed = len(ok), len(invocations) - len(ok)
        m.functions_retried = sum(inv.attempts > 1 for inv in invocations)
        failures = sorted((tf, inv.task.index, err) for inv in invocations for tf, err in inv.failures)
        if failures:
            tf, i, err = failures[0]
            self._event(r, "function_failed", self.index,
                        f"{len(failures)} failed attempt(s), first: function {i}: {err}; "
                        f"{m.functions_failed} of {len(invocations)} function(s) without a gradient", t=tf)
        if not ok:
            if not self._own_db_ok():
                raise OwnDatabaseDown(f"every gradient function failed: {invocations[0].error}")
            raise RuntimeError(f"peer {self.index} round {r}: every gradient function failed: "
                               f"{invocations[0].error}")
        m.loss = float(np.mean([inv.result.loss for inv in ok]))
        io = float(np.mean([inv.result.t_read + inv.result.t_store for inv in ok]))
        grad = float(np.mean([inv.result.t_grad for inv in ok]))
        share = io / (io + grad) if io + grad > 0 else 0.0
        # the functions' database I/O, as a share of the fan-out's wall time, and the version read for them
        t["store"] = wall * share + t_version
        t["compute"] = wall - t["store"]

        # AVERAGE (over the gradients that arrived), read back for publishing in the same round trip;
        # the round is announced (``ready``) before any vector leaves, and old wake-ups are dropped
        self.phase = Phase.AVERAGE
        t0 = time.perf_counter()
        grad_keys = [inv.task.grad_key for inv in ok]
        beta = self.cfg.optim.peer_momentum
        pipe = self.db.pipeline(transaction=False)
        if beta > 0 or not self.backend.queue_average(pipe, K.avg(r), grad_keys):
            self.backend.average(self.db, K.avg(r), grad_keys)
            if beta > 0:  # what we publish becomes our momentum of the averages
                self.backend.peer_momentum(self.db, K.peer_momentum, K.avg(r), beta)
        pipe.pexpire(K.avg(r), ROUND_KEY_TTL_MS)
        pipe.get(K.avg(r))
        pipe.set(K.ready, r)
        pipe.delete(*self._wake_keys())
        own_raw = pipe.execute()[-3]
        t["average"] = time.perf_counter() - t0

        # PUBLISH (exchange): push our average into every other peer's inbox, in its own database
        self.phase = Phase.PUBLISH
        t0 = time.perf_counter()
        self.width = len(own_raw)
        outgoing = {q: own_raw for q in self.members}
        if self.attack is not None and self.attack_info.kind == "model":
            outgoing = self._attack_vectors(r, own_raw)
        self._push(r, outgoing, self.security.sign_outgoing(r, outgoing) if self.security else None)
        t["exchange"] = time.perf_counter() - t0

        # BARRIER with a deadline over the live membership; the vectors arrive in our own database
        self.phase = Phase.BARRIER
        t0 = time.perf_counter()
        expected = [q for q, mb in self.members.items() if not mb.removed and mb.since <= r]
        ready, missing = self._barrier(r, expected)
        t["barrier"] = time.perf_counter() - t0
        excluded = self._account(r, ready, missing)

        # AGGREGATE over our average and every vector that arrived (checked first), in peer order so
        # that peers with the same inputs compute bit-identical results
        self.phase = Phase.AGGREGATE
        t0 = time.perf_counter()
        present = [q for q in sorted(self.members) if q not in ready]
        late = sorted(self._inbox(r, present))
        for q in late:  # a removed or late peer whose vector is here after all: use it, re-admit it
            if self.members[q].removed:
                self.members[q].removed, self.members[q].misses = False, 0
                self._event(r, "readmitted", q)
        inputs = {self.index: K.avg(r)}
        candidates = sorted(set(ready) | set(late))
        arrived = ",".join(map(str, sorted([self.index, *candidates])))
        for q in candidates:
            n = self._sizes[q]  # as found with the vector, in the same round trip
            if n != len(own_raw):
                excluded.append(f"{q}(size {n} bytes, expected {len(own_raw)})")
                self._event(r, "rejected", q, f"vector of {n} bytes, expected {len(own_raw)}")
            else:
                inputs[q] = K.incoming(q, r)
        if self.security is not None:
            for q, reason, detail in self.security.screen(self, r, inputs):
                m.updates_rejected += 1
                excluded.append(f"{q}(rejected: {reason})")
                self._event(r, "update_rejected", q, detail)
        in_keys = [inputs[q] for q in sorted(inputs)]
        m.peers_excluded = " ".join(excluded)
        m.peers_aggregated = len(in_keys)
        m.members = 1 + sum(not mb.removed for mb in self.members.values())
        if self.defense_in_db:
            aggregate_in_db(self.db, self.defense, in_keys, K.agg(r))
        elif self.backend.name != "client" and self.cfg.aggregation.defense in ("mean", "average"):
            self.backend.average(self.db, K.agg(r), in_keys)
        else:
            aggregate_on_client(self.db, self.defense, in_keys, K.agg(r), ttl_ms=ROUND_KEY_TTL_MS)
        t["aggregate"] = time.perf_counter() - t0

        # UPDATE, atomically with the bookkeeping: with persistence on, a restart resumes exactly here
        # (the round's metrics row goes in too, so a completed update always has its row; it is
        # rewritten with the final figures at the end of the round)
        self.phase = Phase.UPDATE
        t0 = time.perf_counter()
        pipe = self.db.pipeline(transaction=True)
        self.backend.queue_update(pipe, self.db, K.params, K.momentum, K.agg(r), self.sgd)
        pipe.set(K.completed, r)
        pipe.set(K.aggset(r), arrived, px=ROUND_KEY_TTL_MS)
        pipe.incr(K.version)
        pipe.rpush(K.metrics, json.dumps(m.row()))
        # the round's keys go with it: nothing reads them after the update
        pipe.delete(*[K.grad(r, i) for i in range(k)], K.agg(r), K.avg(r),
                    *[K.incoming(q, r) for q in self.members],
                    *(self.security.round_keys(self, r) if self.security else ()))
        pipe.scan(0, match=K.join_pattern, count=1000)  # join requests, for the cleanup below
        *_, self._version, _, _, join_scan = pipe.execute()
        self._aggset = (r, arrived)
        t["update"] = time.perf_counter() - t0

        # CLEANUP; hand our state to peers joining next round
        self.phase = Phase.CLEANUP
        t0 = time.perf_counter()
        if self.security is not None:
            self.security.serve(self)
        self._serve_joins(r, join_scan)
        t["cleanup"] = time.perf_counter() - t0

        # EVALUATE
        last = r == self.cfg.run.rounds - 1
        if (r + 1) % self.cfg.run.eval_every == 0 or last:
            self.phase = Phase.EVALUATE
            t0 = time.perf_counter()
            m.test_loss, m.accuracy = self.evaluate(full=last)
            t["evaluate"] = time.perf_counter() - t0
        t["round"] = time.perf_counter() - t_start
        m.wall_end = time.time()
        self.db.lset(K.metrics, -1, json.dumps(m.row()))
        return m

    def _account(self, r: int, ready: list[int], missing: dict[int, tuple[str, float]]) -> list[str]:
        """Update misses and membership after a barrier; returns the exclusion notes of this round.
        ``missing`` maps a peer to (reason, wall time it was found missing)."""
        for q in ready:
            self.members[q].misses = 0
        notes = []
        for q, (why, t_found) in missing.items():
            mb = self.members[q]
            mb.misses += 1
            notes.append(f"{q}({why})")
            self._event(r, "excluded", q, why, t=t_found)
            if mb.misses >= self.cfg.membership.max_misses and not mb.removed:
                mb.removed = True
                self._event(r, "removed", q, f"{mb.misses} missed barriers")
        return notes

    def _push(self, r: int, outgoing: dict[int, bytes], envelopes: dict[int, bytes] | None = None) -> None:
        """Write our round-r vector into each peer's inbox and wake its barrier, all peers at once (one
        round trip in all). Removed peers get it too: a peer coming back can then rejoin without
        waiting. An unreachable peer cannot wait for us anyway: it misses this round."""
        jobs = {}
        for q, data in outgoing.items():
            inbox = Keys(q).incoming(self.index, r)
            cmds = []
            if envelopes is not None:  # before the vector: the barrier only looks for the vector
                cmds.append(("SET", Keys(q).envelope(self.index, r), envelopes[q], "PX", ROUND_KEY_TTL_MS))
            cmds += [("SET", inbox, data, "PX", ROUND_KEY_TTL_MS), ("RPUSH", Keys(q).notify(self.index), r),
                     ("LTRIM", Keys(q).notify(self.index), -1000, -1)]
            jobs[q] = (self.members[q].client, cmds)
        pipelines_at_once(jobs)

    def _wake_keys(self) -> list[str]:
        """The lists the other peers announce their vectors on (a pop on them wakes our barrier)."""
        return [self.keys.notify(q) for q in sorted(self.members)] or [self.keys.notify(self.index)]

    def _inbox(self, r: int, peers: list[int]) -> dict[int, int]:
        """Which of ``peers``' round-r vectors are in our inbox, with their byte sizes (one round trip,
        none for no peers); the sizes are kept for this round's aggregate phase."""
        if not peers:
            return {}
        pipe = self.db.pipeline(transaction=False)
        for q in peers:
            pipe.exists(self.keys.incoming(q, r))
            pipe.strlen(self.keys.incoming(q, r))
        out = pipe.execute()
        found = {q: int(n) for q, e, n in zip(peers, out[::2], out[1::2], strict=True) if e}
        self._sizes.update(found)
        return found

    def _barrier(self, r: int, peers: list[int]) -> tuple[list[int], dict[int, tuple[str, float]]]:
        """Wait until the given peers' round-r vectors are in our inbox, a peer is found dead, or the
        deadline passed. Returns (ready, {missing peer: (reason, wall time found missing)}).

        Everything is local: the others push into our database. Their announcements (a list in our
        database) only wake us up; a blocking pop costs no CPU, unlike polling on a 2-core machine.
        Liveness of the peers still awaited is checked every quarter heartbeat interval (at once for
        peers that already missed a barrier): a heartbeat lives 1.5 intervals after its last refresh, so
        a crashed peer ends the wait within 1.75 intervals instead of at the deadline.

        A peer that already published a later round but whose round-r vector is not here will not send
        it (it was lost, e.g. while our database restarted): it is missing. If most awaited peers are in
        that state, we are the one behind: :class:`Behind` is raised and the peer resynchronises.
        """
        deadline = time.monotonic() + self.cfg.barrier.timeout_s
        check_every = self.cfg.membership.heartbeat_s / 4
        now = time.monotonic()
        suspect = any(self.members[q].misses for q in peers)
        next_check = now if suspect else now + check_every
        waiting = sorted(peers)
        ready: list[int] = []
        dead: dict[int, tuple[str, float]] = {}
        ahead: list[int] = []
        # announcements only wake us up (old ones were dropped when we announced the round): the keys
        # below are the truth
        wake = self._wake_keys()
        while waiting:
            found = self._inbox(r, waiting)
            ready += [q for q in waiting if q in found]
            waiting = [q for q in waiting if q not in found]
            now = time.monotonic()
            if waiting and now >= next_check:
                next_check = now + check_every
                passed = []
                for q in list(waiting):
                    alive, why, published = self._alive(self.members[q])
                    if not alive:
                        dead[q] = (why, time.time())
                        waiting.remove(q)
                    elif published is not None and published > r:
                        passed.append(q)
                if passed:  # re-check: the vector may have landed just before the mark moved on
                    late = self._inbox(r, passed)
                    for q in passed:
                        waiting.remove(q)
                        if q in late:
                            ready.append(q)
                        else:
                            ahead.append(q)
                            dead[q] = (f"ahead (published a later round), its round {r} vector lost", time.time())
                    if len(ahead) * 2 > len(peers):
                        raise Behind(f"round {r}: peers {sorted(ahead)} of {sorted(peers)} finished it without "
                                     "our inbox receiving their vectors")
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                break
            if self.security is not None:  # admissions, and checks of the vectors already here
                self.security.during_barrier(self, r, ready)
            self.db.blpop(wake, timeout=min(left, 0.05))
        t_deadline = time.time()
        missing = {**dead, **{q: (f"missed the {self.cfg.barrier.timeout_s:g} s deadline", t_deadline)
                              for q in waiting}}
        return sorted(ready), missing

    def _attack_vectors(self, r: int, own_raw: bytes) -> dict[int, bytes]:
        """What a Byzantine peer sends each peer instead of its honest average."""
        own = from_f32_bytes(own_raw, key=self.keys.avg(r))
        honest = None
        if self.attack_info.omniscient:
            # the honest peers' averages of this round are readable: they pushed them to us too
            n_honest = self.cfg.peers.count - self.cfg.attack.byzantine
            ready, _ = self._barrier(r, [q for q in self.members if q < n_honest and not self.members[q].removed])
            raw = self.db.mget([self.keys.incoming(q, r) for q in ready]) if ready else []
            vecs = [from_f32_bytes(b) for b in raw if b is not None and len(b) == len(own_raw)]
            honest = np.stack(vecs) if vecs else own[None, :]
        vec = as_f32_bytes(np.asarray(self.attack(honest=honest, own=own), dtype=np.float32)).tobytes()
        return {q: vec for q in self.members}

    # -- joining and state transfer ----------------------------------------------------------------
    def _serve_joins(self, r: int, scanned: tuple[int, list] | None = None) -> None:
        """Admit peers that asked to join; snapshot our state for those starting at round r + 1.
        ``scanned``: the reply of a first ``SCAN 0 MATCH join_pattern`` already made."""
        keys = self._matching(self.keys.join_pattern, scanned)
        values = self.db.mget(keys) if keys else []
        prefix = self.keys.join_pattern[:-1]
        for key, raw in zip(keys, values, strict=True):
            if raw is None:
                continue
            name = key.decode(errors="replace") if isinstance(key, bytes) else key
            raw_q = name[len(prefix):]
            try:  # written by another peer: a request that does not parse is dropped, with the reason
                q, url, first = parse_join_request(raw_q, raw)
            except ValueError as exc:
                self.db.delete(key)
                self._event(r, "join_rejected", -1, str(exc))
                continue
            if q == self.index or (self.security is not None and not self.security.may_join(q)):
                self.db.delete(key)
                self._event(r, "join_rejected", q, "a join request in our own name" if q == self.index
                            else "not admitted by challenge-response")
                continue
            mb = self.members.get(q)
            if mb is None or mb.url != url or mb.since < first:
                if mb is not None:
                    mb.client.close()
                self._add_member(q, url, since=first)
                self._event(r, "admitted", q, f"joins at round {first}")
            if first == r + 1:
                self._snapshot(first)
            if first <= r + 1:
                self.db.delete(key)

    def _matching(self, pattern: str, scanned: tuple[int, list] | None = None) -> list[bytes]:
        """Keys of our database matching ``pattern`` (a handful: one per peer); ``scanned`` is the
        reply of a first ``SCAN 0`` with that pattern, when already made."""
        cursor, keys = scanned if scanned is not None else self.db.scan(0, match=pattern, count=1000)
        keys = list(keys)
        while int(cursor) != 0:
            cursor, more = self.db.scan(cursor, match=pattern, count=1000)
            keys += more
        return keys

    def _snapshot(self, first: int) -> None:
        K = self.keys
        meta = {"round": first - 1, "from": self.index,
                "members": {str(q): mb.url for q, mb in self.members.items() if not mb.removed},
                "self_url": self.url}
        pipe = self.db.pipeline(transaction=True)
        pipe.execute_command("COPY", K.params, K.snapshot(first, "params"), "REPLACE")
        pipe.execute_command("COPY", K.momentum, K.snapshot(first, "momentum"), "REPLACE")
        pipe.set(K.snapshot(first, "meta"), json.dumps(meta))
        for what in ("params", "momentum", "meta"):
            pipe.pexpire(K.snapshot(first, what), ROUND_KEY_TTL_MS)
        pipe.execute()

    def _behind(self, r: int) -> str | None:
        """Why we must resynchronise before round r, or None.

        - lagging: most current members already published round r + 1 (they finished round r
          without us);
        - diverged: a strict majority of the peers that finished round r - 1 aggregated a different set
          of peers than we did (they excluded us, or we them, e.g. after we stalled past their deadline
          while their vectors still reached us): our parameters differ from theirs.
        """
        marks: list[int] = []
        sets: list[str] = []
        replies = pipelines_at_once({q: (mb.client, [("GET", Keys(q).ready), ("GET", Keys(q).aggset(r - 1))])
                                     for q, mb in self.members.items() if not mb.removed})
        for reply in replies.values():
            if isinstance(reply, redis.RedisError) or any(isinstance(x, redis.RedisError) for x in reply):
                continue
            v, agg = reply
            if as_int(v) is not None:
                marks.append(as_int(v))
            if agg is not None:
                sets.append(agg.decode(errors="replace"))
        if marks and sorted(marks)[len(marks) // 2] >= r + 1:
            return f"lagging: the peers published round {sorted(marks)[len(marks) // 2]}, we are at {r}"
        if self._aggset is not None and self._aggset[0] == r - 1:
            mine = self._aggset[1]
        else:
            mine = self.db.get(self.keys.aggset(r - 1))
            mine = mine.decode() if mine is not None else None
        if mine is not None and sets:
            counts: dict[str, int] = {}
            for x in [mine, *sets]:
                counts[x] = counts.get(x, 0) + 1
            top, n_top = max(counts.items(), key=lambda kv: kv[1])
            if top != mine and n_top * 2 > len(sets) + 1:
                return (f"diverged: round {r - 1} aggregated peers {mine} here, {top} at {n_top} of "
                        f"{len(sets) + 1} peers")
        return None

    def _resync(self, r: int, total: int, why: str = "") -> int:
        self._event(r, "resync", self.index, f"{why or 'behind the live peers'}; state transfer")
        return self.join(None, total=total)

    def join(self, bootstrap: dict[int, str] | None = None, total: int | None = None) -> int:
        """Join a running training (or resynchronise after falling behind).

        Asks the live peers to admit us from a round R a little ahead of theirs, then takes the
        parameters, optimizer state, round and membership they snapshot after round R - 1, from at
        least two peers where there are two, and only if they agree (so one faulty peer cannot hand us
        a corrupt model). Returns R, the first round we take part in (``total``, the number of rounds,
        when the training ends before R: there is nothing left to join).
        """
        total = total or self.cfg.run.rounds
        self.phase = Phase.JOIN
        self._hb_paused.set()
        try:
            self.db.delete(self.keys.alive)
        except redis.RedisError:
            pass
        if bootstrap:
            for q, u in bootstrap.items():
                if q != self.index and q not in self.members:
                    self._add_member(q, u, since=0)
        if self.security is not None:  # the live peers let us in before we can ask them anything
            self.security.admit(self, wait_for=set())
        live = {}
        for q, mb in self.members.items():
            try:
                pipe = mb.client.pipeline(transaction=False)
                pipe.get(Keys(q).ready)
                pipe.exists(Keys(q).alive)
                pipe.exists(Keys(q).done)
                v, alive, done = pipe.execute()
            except redis.RedisError:
                continue
            if alive and not done:
                live[q] = as_int(v) if as_int(v) is not None else -1
        if not live:
            raise RuntimeError(f"peer {self.index}: no live peer to join")
        first = max(live.values()) + 3
        if first >= total:
            self._event(first, "join_too_late", self.index, f"the training ends at round {total - 1}")
            self.start_round = total
            return total
        asked = {}
        for q in live:
            try:
                self.members[q].client.set(Keys(q).join(self.index), f"{self.url}|{first}")
                asked[q] = live[q]
            except redis.RedisError:
                continue
        live = asked
        self._event(first, "join_request", self.index, f"asked peers {sorted(live)} to admit us from round {first}")
        need = min(2, len(live))
        deadline = time.monotonic() + self.cfg.membership.join_timeout_s
        states: dict[int, tuple[bytes, bytes | None, dict]] = {}
        while time.monotonic() < deadline and live:
            for q in live:
                if q in states:
                    continue
                c = self.members[q].client
                try:
                    pipe = c.pipeline(transaction=True)
                    for what in ("params", "momentum", "meta"):
                        pipe.get(Keys(q).snapshot(first, what))
                    p, mom, meta = pipe.execute()
                except redis.RedisError:
                    continue
                if p is not None and meta is not None:
                    states[q] = (p, mom, json.loads(meta))
            if len(states) >= need and self._agreeing(states) is not None:
                break
            if len(states) == len(live):
                break
            if self.security is not None:
                self.security.serve(self)
            time.sleep(0.05)
        chosen = self._agreeing(states) if len(states) >= need else None
        if chosen is None:
            raise RuntimeError(f"peer {self.index}: state transfer for round {first} failed: "
                               f"{len(states)} snapshot(s) from {sorted(live)}, "
                               f"{'no two agree' if len(states) >= need else 'too few'}")
        params, momentum, meta = chosen
        pipe = self.db.pipeline(transaction=True)
        pipe.set(self.keys.params, params)
        if momentum is not None:
            pipe.set(self.keys.momentum, momentum)
        else:
            pipe.delete(self.keys.momentum)
        pipe.set(self.keys.completed, first - 1)
        pipe.set(self.keys.ready, first - 1)
        pipe.set(self.keys.version, secrets.randbits(62))
        pipe.execute()
        self._version, self._aggset = None, None
        # the membership of the peers we join: theirs, plus the peer that served the state
        current = {int(q): u for q, u in meta["members"].items()}
        current.setdefault(int(meta["from"]), self.members[int(meta["from"])].url)
        for q, u in current.items():
            if q != self.index and q not in self.members:
                self._add_member(q, u, since=first)
        for q, mb in self.members.items():
            mb.removed, mb.misses = q not in current, 0
        self.start_round = first
        self.width = len(params)
        self.start_heartbeat()
        self._event(first, "joined", self.index, f"state of round {first - 1} from peers {sorted(states)}")
        return first

    @staticmethod
    def _agreeing(states: dict[int, tuple[bytes, bytes | None, dict]]):
        """The state that at least two sources (or the only source) hand over identically."""
        digests: dict[str, list[int]] = {}
        for q, (p, mom, _) in states.items():
            h = hashlib.sha256(p + b"|" + (mom or b"")).hexdigest()
            digests.setdefault(h, []).append(q)
        best = max(digests.values(), key=len, default=[])
        if len(states) == 1 or len(best) >= 2:
            return states[best[0]]
        return None

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



MAX_JOIN_REQUEST_BYTES = 2048


def parse_join_request(raw_q, raw) -> tuple[int, str, int]:
    """(peer, database URL, first round) of one entry of a join-request hash; ValueError saying what
    is wrong otherwise."""
    if raw is None or len(raw) > MAX_JOIN_REQUEST_BYTES:
        raise ValueError(f"join request of {0 if raw is None else len(raw)} bytes (at most {MAX_JOIN_REQUEST_BYTES})")
    try:
        text_q = raw_q.decode("ascii") if isinstance(raw_q, bytes) else str(raw_q)
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as exc:
        raise ValueError("join request is not text") from exc
    if not text_q.isdigit() or len(text_q) > 9:
        raise ValueError(f"join request field {text_q[:20]!r} is not a peer index")
    if "|" not in text:
        raise ValueError("join request is not url|first-round")
    url, first = text.rsplit("|", 1)
    if not (first.isascii() and first.isdigit()) or len(first) > 18:
        raise ValueError(f"join request's first round {first[:20]!r} is not a round number")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("join request's URL is not a redis://, rediss:// or unix:// URL")
    return int(text_q), url, int(first)


def peer_main(cfg_json: str, index: int, urls: list[str | None], start_key: str | None = None,
              join: bool = False) -> None:
    """Entry point of a peer orchestrator process: set up, wait for the start signal (or join a
    running training), train.

    The start signal is ``start_key`` in peer 0's database. With ``join=True`` it is awaited in this
    peer's own database instead (if given): a launcher can start a newcomer ahead of time (torch
    imported, workers warm) and let it ask to join at a chosen moment."""
    import torch

    from .config import Config

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format=f"peer {index}: %(message)s")
    cfg = Config.model_validate_json(cfg_json)
    peer = Peer(cfg, index, urls)
    try:
        if join:
            peer.init_eval_state()
            peer.executor.warm()
            peer.db.set(peer.keys.up, 1)
            if start_key:
                while not peer.db.exists(start_key):
                    time.sleep(0.01)
            peer.join()
            peer.run()
            return
        peer.init_params()
        peer.executor.warm()
        peer.db.set(peer.keys.up, 1)
        if start_key and peer.security is not None:  # secured: set in every database, ours is the one we read
            while not peer.db.exists(start_key):
                time.sleep(0.01)
        elif start_key:  # the launcher sets it in peer 0's database once every peer is up
            c0 = make_client(url=urls[0], socket_timeout=5)
            while not c0.exists(start_key):
                time.sleep(0.01)
            c0.close()
        peer.run()
    finally:
        peer.close()
