"""A SPIRT peer: its own database and an orchestrator running the training round as named phases.

    COMPUTE   invoke K gradient functions (they read params, write grad:r:k in this peer's database)
    AVERAGE   average the K gradients inside the database                          -> avg:r
    PUBLISH   push avg:r into every other peer's inbox (their database: in:p:r) and wake them;
              a Byzantine peer pushes what its attack sends each peer instead
    BARRIER   wait, with a deadline, until the live peers' round-r vectors are in our inbox
    AGGREGATE check sizes (and signatures), then mean or a robust defense over [avg:r, in:q:r ...],
              in the database where the backend can run the rule                    -> agg:r
    UPDATE    SGD step on the parameters inside the database, in one transaction with the round's
              bookkeeping and the deletion of its keys
    CLEANUP   admissions, and snapshots for peers joining next round
    EVALUATE  every E rounds: test loss and accuracy of the parameters

The peer is made of parts with narrow interfaces, each in its own module:

- :mod:`spirt.keys`: the key schema;
- :mod:`spirt.membership`: members, heartbeats, liveness, misses, exclusion, removal, readmission;
- :mod:`spirt.exchange`: pushing vectors, the inbox and the barrier;
- :mod:`spirt.transfer`: join requests, admitting joiners, snapshots, catching up;
- :mod:`spirt.guard`: what security does in a round (a no-op unless ``[security] enabled``);
- :mod:`spirt.aggregate`: the aggregation path, chosen once from the backend's capabilities;
- :mod:`spirt.byzantine`: what a Byzantine peer does differently;
- :mod:`spirt.evaluation`: the initial model and test accuracy.

Faults (each peer logs events, JSON with wall time, to ``{p}:events`` in its database): a crashed or
unreachable peer is excluded within 2 heartbeat intervals and removed after ``membership.max_misses``
missed barriers; failed, dead or hung gradient functions are retried by the executor and the round
goes on with the gradients that arrived; the update, ``completed`` = r and the round's metrics row are
one transaction, so with persistence on a peer whose database restarts resumes right after its last
completed round; a peer that fell behind or diverged resynchronises by state transfer.
"""

from __future__ import annotations

import enum
import json
import logging
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import redis

from .aggregate import Rule
from .agreement import Agreement, NoQuorum, Verdict, queue_digest, quorate
from .backends import SGDConfig, get_backend
from .byzantine import Byzantine, is_byzantine
from .config import Config
from .evaluation import Evaluator
from .events import EventLog
from .exchange import ROUND_KEY_TTL_MS, Behind, Exchange
from .functions import FunctionSpec, GradTask, as_int
from .guard import Guard
from .keys import Keys
from .membership import Membership, member_client
from .screening import GradientScreen, finite
from .servers import make_client
from .transfer import StateTransfer
from .wire import parse_join_request

__all__ = ["Peer", "Phase", "RoundMetrics", "OwnDatabaseDown", "Behind", "function_spec", "peer_main",
           "parse_join_request", "ROUND_KEY_TTL_MS"]

log = logging.getLogger("spirt.peer")

#: state transfers in a row before one round after which a peer gives up: each landed it where it must
#: resynchronise again (no progress; a livelock otherwise)
MAX_RESYNCS = 5


class Phase(enum.Enum):
    COMPUTE = "compute"
    AVERAGE = "average"
    PUBLISH = "publish"
    BARRIER = "barrier"
    AGGREGATE = "aggregate"
    UPDATE = "update"
    CLEANUP = "cleanup"
    EVALUATE = "evaluate"
    JOIN = "join"
    RECOVER = "recover"
    WAIT = "wait"  # no quorum: not training

    @property
    def metric(self) -> str:
        """The phase's time in the metrics (``t_<metric>``); publishing is reported as the exchange."""
        return "exchange" if self is Phase.PUBLISH else self.value


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


def fan_out(executor, tasks: list[GradTask], database_answers) -> tuple[list, list | None]:
    """The round's gradient functions: ``(invocations, failed_first)``. When every function failed yet
    ``database_answers()``, they run once more and ``failed_first`` holds the first fan-out: the
    database they read may have stalled (SIGSTOP, a stuck disk) for longer than their retries, and one
    more fan-out tells a stall that has passed from a fault of the functions themselves."""
    invocations = executor.map(tasks)
    if any(inv.result is not None for inv in invocations) or not database_answers():
        return invocations, None
    return executor.map(tasks), invocations


def failure_report(invocations: list) -> tuple[float, str] | None:
    """(time of the first failure, description) of a fan-out's failed attempts; None if none failed."""
    failures = sorted((tf, inv.task.index, err) for inv in invocations for tf, err in inv.failures)
    if not failures:
        return None
    tf, i, err = failures[0]
    without = sum(inv.result is None for inv in invocations)
    return tf, (f"{len(failures)} failed attempt(s), first: function {i}: {err}; "
                f"{without} of {len(invocations)} function(s) without a gradient")


def own_probe(url: str, heartbeat_s: float, credentials: dict) -> redis.Redis:
    """A client that asks whether our database is there, with a short timeout: through the peer's main
    client (120 s), a stalled server (SIGSTOP, a stuck disk) would answer "yes" once it resumes, and
    the stall would look like a fault of the gradient functions rather than of the database they read."""
    return make_client(url=url, socket_timeout=max(2.0, 2 * heartbeat_s), connect_timeout=max(1.0, heartbeat_s),
                       **credentials)


def back_from_files(db: redis.Redis, keys: Keys, index: int, completed: int, events: EventLog) -> int:
    """Our database answers again after a restart: the round to resume at, after the last one its
    files say we completed. Fewer than we had completed (it lost acknowledged updates) is an event."""
    done = db.get(keys.completed)
    if done is None or db.get(keys.params) is None:
        raise RuntimeError(f"peer {index}: the restarted database lost the training state "
                           "(start it with persistence on)")
    resume = int(done) + 1
    if resume <= completed:
        events(resume, "rolled_back", index, f"our database came back at round {resume - 1}, we had "
               f"completed round {completed}: {completed - resume + 1} round(s) lost from its files; we go "
               "on from there")
    events(resume, "recovered", index, f"database back, resuming at round {resume}")
    return resume


class OwnDatabaseDown(RuntimeError):
    """This peer's own database is unreachable (crashed or restarting) or stalled (it does not answer)."""


def make_guard(cfg: Config, index: int, url: str, backend, admin: str | None = None, width=lambda: None) -> Guard:
    """The peer's guard: security's when ``[security] enabled``, else the no-op one. Security installs
    the database's users first, through a client with full rights: the ``admin`` user the server was
    started with (its password: ``admin``), else the default user."""
    if not cfg.security.enabled:
        return Guard()
    from .security.acl import ADMIN_USER
    from .security.context import PeerSecurity

    login = {"username": ADMIN_USER, "password": admin} if admin is not None else {}
    return PeerSecurity(cfg.security, index, url, make_client(url=url, socket_timeout=120, **login),
                        checks_in_database=backend.finite_check, functions=cfg.peers.functions, width=width(),
                        peers=cfg.peers.count)


class Peer:
    """One peer's orchestrator. ``urls[i]`` is peer i's database; this peer is ``index``. ``urls`` may hold
    ``None`` for peers that are not running (yet): a peer joining later uses :meth:`join` with the URLs of
    live peers, which then learn its URL from its join request."""

    def __init__(self, cfg: Config, index: int, urls: list[str | None], *, executor=None, admin: str | None = None):
        self.cfg, self.index = cfg, index
        self.url = urls[index]
        self.keys = Keys(index)
        self.backend = get_backend(cfg.aggregation.backend)
        self.evaluator = Evaluator(cfg)
        self.guard = make_guard(cfg, index, self.url, self.backend, admin, lambda: 4 * self.evaluator.initial()[1])
        self.db = make_client(url=self.url, socket_timeout=120, **self.guard.own_credentials())
        self._own_probe = own_probe(self.url, cfg.membership.heartbeat_s, self.guard.own_credentials())
        self.backend.prepare(self.db)
        self.events = EventLog(self.db, self.keys.events, index)
        self.guard.check_users(self.events, 0)
        self.membership = Membership(
            index, cfg.membership, self.events,
            connect=lambda q, u, timeout_s: member_client(u, self.guard.member_credentials(q, u), timeout_s),
            own=lambda **kw: make_client(url=self.url, **kw, **self.guard.own_credentials()),
            data_timeout_s=cfg.barrier.timeout_s, rounds=cfg.run.rounds)
        for q, u in enumerate(urls):
            if q != index and u is not None:
                self.membership.add(q, u, since=0)
        self.exchange = Exchange(index, self.db, self.membership, self.guard,
                                 barrier_timeout_s=cfg.barrier.timeout_s, heartbeat_s=cfg.membership.heartbeat_s)
        self.transfer = StateTransfer(index, self.url, self.db, self.membership, self.guard, self.events, cfg)
        self.sgd = SGDConfig(cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay)
        self.spec = function_spec(cfg)
        self.byzantine = is_byzantine(cfg, index)
        self.attack = Byzantine(cfg, index) if self.byzantine else None
        if self.attack is not None:  # the state it hands to joiners is the attack's
            self.transfer.served_state = self.attack.served_state
        # a simulated attacker does not mind diverging from the honest peers: it never resyncs for it
        self.agreement = Agreement(index, self.db, self.membership, cfg.byzantine_bound, cfg.run.rounds,
                                   self.transfer.bad_value, self.guard, check_state=not self.byzantine,
                                   events=self.events, max_group=cfg.max_group)
        self.rule = Rule(cfg, self.backend)
        self._executor = executor
        self.phase = Phase.COMPUTE
        self.start_round = 0
        self._resyncs: dict[int, int] = {}  # state transfers before each round
        self._waiting_since: float | None = None  # monotonic time we first waited since our last round
        self.width = 0  # bytes of a parameter vector
        # our parameters' version counter, known from our own updates (None: read it from the database)
        self._version: int | None = None
        self.screen = GradientScreen(index, self.db, cfg.peers.functions, self.events)
        self.completed = -1  # the last round whose update we applied (acknowledged by our database)

    @property
    def members(self):
        return self.membership.members

    @property
    def others(self) -> dict[int, redis.Redis]:
        return self.membership.clients

    @property
    def executor(self):
        if self._executor is None:
            from .executors import executor_for

            self._executor = executor_for(self.cfg.executor, self.spec, self.index, self.cfg.peers.count)
        return self._executor

    # -- set-up ------------------------------------------------------------------------------------
    def init_params(self) -> int:
        """Store the seeded initial model (the same on every peer); returns its size."""
        params, numel = self.evaluator.initial()
        self.width = len(params)
        K = self.keys
        pipe = self.db.pipeline(transaction=True)
        pipe.set(K.params, params)
        # a random start, so a warm worker never mistakes another run's parameters for these
        pipe.set(K.version, secrets.randbits(62))
        self._version = None
        pipe.set(K.completed, -1)
        pipe.delete(K.momentum, K.peer_momentum, K.ready, K.state, K.metrics, K.done, K.events,
                    *self.transfer.matching(K.join_pattern), *self.transfer.matching(K.notify_pattern),
                    # another run's digests on the same database would read as this run's
                    *self.transfer.matching(K.digest_pattern), *self.transfer.matching(K.aggset_pattern))
        pipe.execute()
        self.guard.open_inbox(0, self.width)  # before any peer can push round 0
        self.membership.start_heartbeat()
        return numel

    def resume(self) -> int:
        """Take up a persisted training where our database's files left it (after every database and
        orchestrator stopped, e.g. a power loss); returns the round we go on from."""
        K = self.keys
        done, params = self.db.get(K.completed), self.db.get(K.params)
        if done is None or params is None:
            raise RuntimeError(f"peer {self.index}: nothing to resume: the database has no training state")
        self.completed = int(done)
        self.start_round = self.completed + 1
        self.width, self._version = len(params), None
        self.db.delete(K.done)
        self.guard.open_inbox(self.start_round, self.width)
        self.events(self.start_round, "resumed", self.index, f"after round {self.completed}, from our "
                    "database's files")
        self.membership.start_heartbeat()
        return self.start_round

    def init_eval_state(self) -> None:
        self.evaluator.warm()

    def evaluate(self, full: bool = False) -> tuple[float, float]:
        return self.evaluator.evaluate(self.db.get(self.keys.params), full=full)

    def join(self, bootstrap: dict[int, str] | None = None, total: int | None = None) -> int:
        """Join a running training, or resynchronise (see :meth:`StateTransfer.join`); returns the first
        round we take part in (the number of rounds when there is nothing left to join)."""
        self.phase = Phase.JOIN
        self.membership.sit_out(self.db)
        first, width = self.transfer.join(bootstrap, total)
        self.start_round = first
        if width:
            self.completed = first - 1
            self.width = width
            self._version = None
            self.membership.start_heartbeat(self.db)
        return first

    def close(self) -> None:
        self.membership.close()
        if self._executor is not None:
            self._executor.close()
        self.db.close()
        self._own_probe.close()
        self.guard.close()

    # -- main loop ---------------------------------------------------------------------------------
    def run(self, rounds: int | None = None, progress=None) -> list[RoundMetrics]:
        """Train to the last round, recovering from a restart of our own database and from falling behind."""
        total, out, r = rounds or self.cfg.run.rounds, [], self.start_round
        self.guard.admit(self.members, wait_for=set(self.membership.current()))
        self.guard.limit_value_size(self.width)
        while True:
            try:
                if r >= total:  # our final state for late joiners, then the comparison after the last round
                    self.transfer.snapshot(total)
                    verdict = self.agreement.close(total, self.cfg.barrier.timeout_s + self.cfg.membership.heartbeat_s)
                    if verdict.kind != "resync":
                        break
                    r = self._resync(total, total, verdict.why)
                    continue
                self.guard.open_inbox(r, self.width)
                verdict = self.agreement.check(r)
                if verdict.kind == "resync":
                    r = self._resync(r, total, verdict.why)
                    continue
                if verdict.kind == "wait":
                    r = self._wait(r, total, verdict)
                    continue
                m = self.round(r)
            except NoQuorum as exc:
                r = self._wait(r, total, Verdict("wait", str(exc)))
                continue
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
            self._waiting_since = None  # a round completed: the next wait for a quorum starts afresh
            if progress:
                progress(m)
            r += 1
        self.db.set(self.keys.done, 1)
        return out

    def _wait(self, r: int, total: int, verdict: Verdict) -> int:
        """No quorum before round r: train nothing, keep our heartbeat, serve joins (and admissions), probe
        again every half heartbeat interval. Returns the round to go on from once a quorum is back (or after
        a resync); gives up after ``membership.quorum_timeout_s`` without a completed round (over every wait
        since our last one: a quorum back for rounds that never complete is no progress)."""
        self.phase = Phase.WAIT
        self.events(r, "no_quorum", self.index, f"{verdict.why}; not training until a quorum is back")
        t0 = self._waiting_since = self._waiting_since or time.monotonic()
        while time.monotonic() - t0 < self.cfg.membership.quorum_timeout_s:
            self.guard.serve(self.members)
            r = self.transfer.serve_waiting(r)
            time.sleep(self.cfg.membership.heartbeat_s / 2)
            verdict = self.agreement.check(r)
            if verdict.kind == "resync":
                return self._resync(r, total, verdict.why)
            if verdict.train:
                self.events(r, "quorum", self.index, f"back after {time.monotonic() - t0:.1f} s")
                return r
        self._give_up(r, f"no quorum for {self.cfg.membership.quorum_timeout_s:g} s before round {r}: {verdict.why}")

    def _give_up(self, r: int, why: str) -> None:
        self.events(r, "gave_up", self.index, why)
        raise RuntimeError(f"peer {self.index}: {why}")

    def _resync(self, r: int, total: int, why: str = "") -> int:
        if self.byzantine:  # a simulated attacker left behind (the honest peers shut it out) stops there
            self.events(r, "attacker_stopped", self.index, why or "behind the live peers")
            return total
        self._resyncs[r] = self._resyncs.get(r, 0) + 1
        if self._resyncs[r] > MAX_RESYNCS:
            self._give_up(r, f"{MAX_RESYNCS} state transfers before round {r} made no progress: {why}")
        self.events(r, "resync", self.index, f"{why or 'behind the live peers'}; state transfer")
        return self.join(None, total=total)

    def _own_db_ok(self) -> bool:
        """Our database answers a ping within a couple of heartbeat intervals."""
        try:
            return bool(self._own_probe.ping())
        except redis.RedisError:
            return False

    def _recover_own_db(self, r: int, exc: BaseException) -> int:
        """Wait for our restarted database; resume after its last completed round."""
        self.phase = Phase.RECOVER
        log.warning("peer %s: own database unreachable in round %s (%s); waiting", self.index, r, exc)
        deadline = time.monotonic() + self.cfg.membership.db_recovery_s
        while time.monotonic() < deadline:
            if self._own_db_ok():
                resume = back_from_files(self.db, self.keys, self.index, self.completed, self.events)
                self._version = None  # the restart may have lost our last update
                self.completed = resume - 1
                self.guard.check_users(self.events, resume)  # the users its files brought back
                return resume
            time.sleep(0.1)
        raise RuntimeError(f"peer {self.index}: own database did not come back within "
                           f"{self.cfg.membership.db_recovery_s} s") from exc

    # -- the round ---------------------------------------------------------------------------------
    @contextmanager
    def _phase(self, phase: Phase, times: dict[str, float]):
        """Enter ``phase`` and add its wall time to ``times`` under the phase's metric name."""
        self.phase = phase
        t0 = time.perf_counter()
        try:
            yield
        finally:
            times[phase.metric] = times.get(phase.metric, 0.0) + time.perf_counter() - t0

    def round(self, r: int) -> RoundMetrics:
        m = RoundMetrics(r, self.index, byzantine=self.byzantine, wall_begin=time.time())
        t = m.times
        t_start = time.perf_counter()
        self.exchange.begin_round()
        with self._phase(Phase.COMPUTE, t):
            grads = self.compute(r, m)
        t["compute"] -= t["store"]  # the functions' database I/O is reported apart
        with self._phase(Phase.AVERAGE, t):
            own = self.average(r, grads, m)
        with self._phase(Phase.PUBLISH, t):
            self.publish(r, own)
        with self._phase(Phase.BARRIER, t):
            ready, missing = self.exchange.barrier(r, self.membership.awaited(r), self.width)
        excluded = self.membership.account(r, ready, missing)
        group = 1 + len(self.members) - len(self.membership.banned())
        if not quorate(1 + len(ready), group):  # a minority does not move on alone
            raise NoQuorum(f"round {r}: {1 + len(ready)} of {group} vectors arrived, no majority of the "
                           "group; the round's update is not applied")
        with self._phase(Phase.AGGREGATE, t):
            arrived = self.aggregate(r, ready, excluded, m)
        with self._phase(Phase.UPDATE, t):
            join_scan = self.update(r, arrived, m)
        with self._phase(Phase.CLEANUP, t):
            self.guard.serve(self.members)
            self.transfer.serve_joins(r, join_scan)
        last = r == self.cfg.run.rounds - 1
        # a simulated attacker's model is nobody's result (the reports read the honest peers' only)
        if not self.byzantine and ((r + 1) % self.cfg.run.eval_every == 0 or last):
            with self._phase(Phase.EVALUATE, t):
                m.test_loss, m.accuracy = self.evaluate(full=last)
        t["round"] = time.perf_counter() - t_start
        m.wall_end = time.time()
        self.db.lset(self.keys.metrics, -1, json.dumps(m.row()))
        return m

    def compute(self, r: int, m: RoundMetrics) -> list[str]:
        """COMPUTE: the K gradient functions of round r; the keys of the gradients that arrived. Records
        the functions' outcome in ``m`` and their database I/O as ``t_store``."""
        K, k = self.keys, self.cfg.peers.functions
        t0 = time.perf_counter()
        if self._version is None:  # known from our last update otherwise; one read, not one per function
            self._version = as_int(self.db.get(K.version))
        t_version = time.perf_counter() - t0
        data_attack = self.attack.data_attack if self.attack is not None else None
        tasks = [GradTask(self.spec, self.url, self.index, r, i, K.params, K.grad(r, i), ROUND_KEY_TTL_MS,
                          data_attack, version_key=K.version, version=self._version,
                          **self.guard.function_credentials(i)) for i in range(k)]
        t0 = time.perf_counter()
        invocations, failed_first = fan_out(self.executor, tasks, self._own_db_ok)
        wall = time.perf_counter() - t0
        ok = [inv for inv in invocations if inv.result is not None]
        m.functions_ok, m.functions_failed = len(ok), len(invocations) - len(ok)
        m.functions_retried = len(invocations) if failed_first else sum(inv.attempts > 1 for inv in invocations)
        for fan, then in ((failed_first, "; our database answers: the functions once more"), (invocations, "")):
            if fan and (failed := failure_report(fan)):
                self.events(r, "function_failed", self.index, failed[1] + then, t=failed[0])
        if not ok:
            # fan_out ran them once only if our database did not answer then: its fault, even if it is back
            if failed_first is None or not self._own_db_ok():
                raise OwnDatabaseDown(f"every gradient function failed: {invocations[0].error}")
            raise RuntimeError(f"peer {self.index} round {r}: every gradient function failed, twice: "
                               f"{invocations[0].error}")
        m.loss = float(np.mean([inv.result.loss for inv in ok]))
        io = float(np.mean([inv.result.t_read + inv.result.t_store for inv in ok]))
        grad = float(np.mean([inv.result.t_grad for inv in ok]))
        share = io / (io + grad) if io + grad > 0 else 0.0
        # the functions' database I/O, as a share of the fan-out's wall time, and the version read for them
        m.times["store"] = wall * share + t_version
        return self.screen.sizes(r, [inv.task.grad_key for inv in ok], m)

    def average(self, r: int, grad_keys: list[str], m: RoundMetrics) -> bytes:
        """AVERAGE over the gradients that arrived, read back for publishing in the same round trip;
        the round is announced (``ready``) before any vector leaves, and old wake-ups are dropped. Our
        average is screened like a received vector (before it enters the peer momentum, if any): if it
        is not finite, the gradients with a NaN or an infinity are dropped as failed functions and the
        rest averaged again."""
        K = self.keys
        beta = self.cfg.optim.peer_momentum
        pipe = self.db.pipeline(transaction=False)
        if beta > 0 or not self.backend.queue_average(pipe, K.avg(r), grad_keys):
            self.backend.average(self.db, K.avg(r), grad_keys)
            if beta > 0:  # what we publish becomes our momentum of the averages
                if not finite(self.db.get(K.avg(r))) and (kept := self.screen.finite(r, grad_keys, m)) != grad_keys:
                    return self.average(r, kept, m)
                self.backend.peer_momentum(self.db, K.peer_momentum, K.avg(r), beta)
        pipe.pexpire(K.avg(r), ROUND_KEY_TTL_MS)
        pipe.get(K.avg(r))
        pipe.set(K.ready, r)
        pipe.delete(*self.exchange.wake_keys())
        own = pipe.execute()[-3]
        if beta == 0 and not finite(own) and (kept := self.screen.finite(r, grad_keys, m)) != grad_keys:
            return self.average(r, kept, m)
        self.width = len(own)
        return own

    def publish(self, r: int, own: bytes) -> None:
        """PUBLISH our vector into every other peer's inbox (a Byzantine peer: what its attack says)."""
        if self.attack is not None:
            return self.attack.publish(self, r, own)
        outgoing = {q: own for q in self.members}
        self.exchange.push(r, outgoing, self.guard.sign_outgoing(r, outgoing))

    def aggregate(self, r: int, ready: list[int], excluded: list[str], m: RoundMetrics) -> str:
        """AGGREGATE our average and every vector that arrived (checked first), in peer order so that
        peers with the same inputs compute bit-identical results. Returns the peers that arrived
        (comma-separated, ourselves included), as recorded with the update."""
        K = self.keys
        # a late member's vector counts; a removed member's never does: it comes back only by state
        # transfer (its state has diverged from ours since we removed it)
        present = [q for q in sorted(self.members) if q not in ready and not self.members[q].removed]
        late = sorted(self.exchange.inbox(r, present))
        inputs = {self.index: K.avg(r)}
        candidates = sorted(set(ready) | set(late))
        arrived = ",".join(map(str, sorted([self.index, *candidates])))
        for q in candidates:
            n = self.exchange.sizes[q]  # as found with the vector, in the same round trip
            if n != self.width:
                excluded.append(f"{q}(size {n} bytes, expected {self.width})")
                self.events(r, "rejected", q, f"vector of {n} bytes, expected {self.width}")
            else:
                inputs[q] = K.incoming(q, r)
        for q, reason, detail in self.guard.screen(r, inputs, self.width):
            m.updates_rejected += 1
            excluded.append(f"{q}(rejected: {reason})")
            self.events(r, "update_rejected", q, detail)
        in_keys = [inputs[q] for q in sorted(inputs)]
        m.peers_excluded = " ".join(excluded)
        m.peers_aggregated = len(in_keys)
        m.members = self.membership.size()
        proven = len(self.membership.banned()) + m.updates_rejected  # their own signatures convict them
        self.rule(self.db, in_keys, K.agg(r), proven, ttl_ms=ROUND_KEY_TTL_MS)
        return arrived

    def update(self, r: int, arrived: str, m: RoundMetrics) -> tuple[int, list]:
        """UPDATE, atomically with the bookkeeping: with persistence on, a restart resumes exactly here
        (the round's metrics row goes in too, so a completed update always has its row; it is rewritten
        with the final figures at the end of the round). The round's keys go with it: nothing reads
        them after the update. Returns the first SCAN of join requests, made in the same round trip."""
        K = self.keys
        pipe = self.db.pipeline(transaction=True)
        digest = self.backend.queue_update(pipe, self.db, K.params, K.momentum, K.agg(r), self.sgd)
        pipe.set(K.completed, r)
        pipe.set(K.aggset(r), arrived, px=ROUND_KEY_TTL_MS)
        heard = self.guard.heard(r)
        if heard is not None:  # the senders' signed envelopes of what we accepted: equivocation checks
            pipe.set(K.heard(r), heard, px=ROUND_KEY_TTL_MS)
        queue_digest(pipe, K, r, self.backend, digest)  # what the peers compare before the next round
        pipe.incr(K.version)
        pipe.rpush(K.metrics, json.dumps(m.row()))
        pipe.delete(*[K.grad(r, i) for i in range(self.cfg.peers.functions)], K.agg(r), K.avg(r),
                    *self.exchange.round_keys(r), *self.guard.round_keys(r, self.members))
        pipe.scan(0, match=K.join_pattern, count=1000)
        *_, self._version, _, _, join_scan = pipe.execute()
        self.completed = r
        return join_scan


def wait_for_start(url: str, key: str, timeout_s: float | None = None) -> None:
    """Wait until ``key`` exists in the database at ``url`` (peer 0's: the start signal). That database may
    not answer yet (on another host, started later) or answer with an error for a while: keep trying
    until ``timeout_s`` (None: without end; a launcher that gives up stops us)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    c0, last = None, None
    try:
        while True:
            try:
                c0 = c0 or make_client(url=url, socket_timeout=5, connect_timeout=2)
                if c0.exists(key):
                    return
            except redis.RedisError as exc:
                last = exc
                if c0 is not None:
                    c0.close()
                c0 = None
            if deadline is not None and time.monotonic() > deadline:
                why = f" (last error: {type(last).__name__}: {last})" if last else ""
                raise TimeoutError(f"no start signal {key!r} in the database at {url} within {timeout_s:g} s{why}")
            time.sleep(0.05 if last is None else 0.5)
    finally:
        if c0 is not None:
            c0.close()


def peer_process(harness: int, *args, **kwargs) -> None:
    """Entry point of a peer orchestrator process that a harness started (``spirt run``, a fault
    cluster): :func:`peer_main`, ended when the ``harness`` process is gone
    (:func:`spirt.processes.exit_with`). ``spirt host`` runs :func:`peer_main` as its own process and
    needs no such watch."""
    from .processes import exit_with

    exit_with(harness)
    peer_main(*args, **kwargs)


def peer_main(cfg_json: str, index: int, urls: list[str | None], start_key: str | None = None,
              join: bool = False, resume: bool = False, admin: str | None = None,
              start_timeout_s: float | None = None) -> None:
    """Entry point of a peer orchestrator process: set up, wait for the start signal (or join a
    running training), train.

    The start signal is ``start_key`` in peer 0's database. With ``join=True`` it is awaited in this
    peer's own database instead (if given): a launcher can start a newcomer ahead of time (torch
    imported, workers warm) and let it ask to join at a chosen moment. With ``resume=True`` the peer takes
    up the training its database holds (:meth:`Peer.resume`) instead of starting a new one. ``admin``: the
    password of the ``admin`` user the database was started with (secured runs). ``start_timeout_s``: how
    long to wait for the start signal (None: until it comes)."""
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format=f"peer {index}: %(message)s")
    cfg = Config.model_validate_json(cfg_json)
    peer = Peer(cfg, index, urls, admin=admin)
    try:
        if join:
            peer.init_eval_state()
            peer.executor.warm()
            peer.db.set(peer.keys.up, 1)
            if start_key:  # in our own database
                wait_for_start(urls[index], start_key, start_timeout_s)
            peer.join()
            peer.run()
            return
        if resume:
            peer.resume()
        else:
            peer.init_params()
        peer.executor.warm()
        peer.db.set(peer.keys.up, 1)
        if start_key and peer.guard.active:  # secured: set in every database, ours is the one we read
            while not peer.db.exists(start_key):
                time.sleep(0.01)
        elif start_key:  # the launcher (or peer 0 itself) sets it in peer 0's database once every peer is up
            wait_for_start(urls[0], start_key, start_timeout_s)
        peer.run()
    finally:
        peer.close()
