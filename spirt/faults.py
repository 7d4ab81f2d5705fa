"""Fault injection with real processes and real signals, and what the faults cost.

A :class:`Cluster` starts one database server per peer and one orchestrator *process* per peer (as
``peers.mode = "process"`` does; from a forkserver with torch preloaded, see :func:`peer_context`),
each with its warm pool of gradient-function worker processes (spawned), and offers the faults of a
peer-to-peer training:

===================  ==========================================================================
``kill_peer``        SIGKILL a peer's orchestrator in the middle of a round (it never comes back)
``kill_db``          SIGKILL a peer's database server (not restarted: the peer is lost)
``kill_function``    SIGKILL one of a peer's gradient-function workers while it computes
``hang_function``    SIGSTOP one of a peer's gradient-function workers while it computes (a hung
                     function: the executor's timeout kills and replaces the pool)
``straggler``        SIGSTOP a peer's orchestrator for a few seconds, then SIGCONT
``join``             start a new peer while the others train; it is admitted and gets the state
``restart_db``       SIGKILL a peer's database server and start it again on the same files and unix
                     socket (persistence on: AOF, fsync always); the peer resumes
===================  ==========================================================================

:func:`run_scenario` runs one of them and measures, from the peers' per-round metrics and membership
events (each peer appends JSON events to ``{p}:events`` in its own database, with wall time ``t``):

- detection latency: fault -> the first event of another peer about the victim (excluded, removed,
  admitted), or the victim's own ``function_failed`` event for function faults;
- recovery time: for a peer lost for good or a function fault, fault -> end of the first round that
  every survivor started after the detection and that had a normal barrier time (at most the 95th
  percentile of the barrier times before the fault, + 50 ms); for a peer that comes back, fault ->
  its ``joined`` event (state transfer) or else its ``recovered`` event;
- rounds lost: over the peers that should have kept training, rounds expected minus rounds whose update
  they completed;
- final accuracy of the survivors on the full test set (evaluated here, from their parameters), next to
  a fault-free run with the same surviving peers (same seed and data parts: the run starts
  ``peers.count = survivors`` with ``data.parts`` = all peers, so each survivor keeps its part).

``python -m spirt.faults`` (or ``spirt bench faults --``) runs scenarios and writes
``reports/faults.{md,csv}``; see :func:`main`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import redis

from .backends import needs_module
from .config import Config, load_config
from .keys import START_KEY, Keys
from .peer import peer_main
from .runner import _started, descendants, kill_if_same, stop_processes
from .servers import Server, make_client, start_server

log = logging.getLogger("spirt.faults")

#: The training every scenario runs: 4 peers x 2 functions, CNN on Fashion-MNIST, 150 rounds of
#: 4 x 2 x 64 samples (77k samples, 2.6 epochs of the 30k-sample slice) at a small learning rate.
#: Chosen so that the final accuracy is stable: runs that differ in a few rounds' aggregates (a peer
#: missing from round 50 on, missing 8 rounds, joining at round 50) ended within 0.15 points of each
#: other in a centralised-SGD simulation over the same minibatches (lr 0.05 / 150 rounds / batch 32:
#: up to 1.1 points), so the 1-point comparison with the fault-free run is meaningful. The peers
#: evaluate only 200 test images; the harness evaluates the survivors' final parameters on the full
#: test set.
BASE: dict = {
    "run.rounds": 150, "run.eval_every": 10_000, "run.seed": 0,
    "model.name": "cnn", "data.dataset": "fashion-mnist", "data.limit_train": 30_000, "data.limit_test": 200,
    "peers.count": 4, "peers.functions": 2, "peers.batch_size": 64,
    "optim.lr": 0.02, "optim.momentum": 0.9, "optim.weight_decay": 0.0,
    "executor.kind": "process", "executor.workers": 1, "executor.retries": 2, "executor.timeout_s": 3.0,
    "membership.heartbeat_s": 1.0, "membership.max_misses": 3, "membership.db_recovery_s": 30.0,
    "membership.join_timeout_s": 60.0, "barrier.timeout_s": 10.0,
}

FAULTS = ("none", "kill_peer", "kill_db", "kill_function", "hang_function", "straggler", "join", "restart_db")


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: str
    victim: int = 3
    at: float = 0.3  # the fault hits in round int(at * rounds)
    duration_s: float = 0.0  # straggler: how long it is stopped; restart_db: how long the database is down
    description: str = ""

    def __post_init__(self):
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; allowed: {', '.join(FAULTS)}")

    @property
    def permanent(self) -> bool:
        """The victim is lost for good (the survivors are the others)."""
        return self.fault in ("kill_peer", "kill_db")

    @property
    def returning(self) -> bool:
        """The victim leaves the training for a while and comes back (or joins)."""
        return self.fault in ("straggler", "restart_db", "join")

    def survivors(self, n: int) -> list[int]:
        return [i for i in range(n) if not (self.permanent and i == self.victim)]


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("kill_peer", "kill_peer", victim=3, description="SIGKILL peer 3's orchestrator mid-round"),
    Scenario("kill_db", "kill_db", victim=3, description="SIGKILL peer 3's database server (no restart)"),
    Scenario("kill_function", "kill_function", victim=1,
             description="SIGKILL a gradient-function worker of peer 1 while it computes"),
    Scenario("hang_function", "hang_function", victim=1,
             description="SIGSTOP a gradient-function worker of peer 1 while it computes (hung function)"),
    Scenario("straggler", "straggler", victim=2, duration_s=5.0,
             description="SIGSTOP peer 2's orchestrator for 5 s, then SIGCONT"),
    Scenario("join", "join", victim=3, description="peer 3 joins 3 training peers"),
    Scenario("restart_db", "restart_db", victim=2, duration_s=2.0,
             description="SIGKILL peer 2's database (AOF, fsync always), restart it 2 s later on the same files"),
)}


def scenario_config(scenario: Scenario, overrides: dict | None = None) -> tuple[Config, int]:
    """(config the initial peers run, number of peer slots) of a scenario."""
    over = {**BASE, **(overrides or {})}
    n = int(over.get("data.parts") or over["peers.count"])
    over["data.parts"] = n
    if scenario.fault == "join":
        over["peers.count"] = n - 1
    elif scenario.fault == "restart_db":
        over["peers.persistence"] = True
    if scenario.fault != "join" and scenario.victim >= n or scenario.fault == "join" and scenario.victim != n - 1:
        raise ValueError(f"scenario {scenario.name}: victim {scenario.victim} does not fit {n} peers")
    if scenario.permanent and scenario.victim != n - 1:
        raise ValueError("a permanently lost peer must be the last one, so that the fault-free run with the "
                         "survivors (peers 0..n-2) uses the same data parts")
    return load_config(None, over), n


# -- processes ---------------------------------------------------------------------------------------

def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class ClusterError(RuntimeError):
    pass


def peer_context():
    """Multiprocessing context of the peer processes: ``forkserver`` with torch and spirt preloaded.

    Each peer still starts as a fresh single-threaded process (forked from a clean server process, not
    from the harness), as with ``spawn``, but the import of torch is paid once per harness process
    instead of once per peer: starting 4 peers takes about half the time on a busy 2-core machine.
    (Their gradient-function workers are spawned, as in any run.)"""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "numpy", "redis", "spirt.peer", "spirt.functions", "spirt.data",
                                "spirt.models", "spirt.executors", "attacks", "defenses"])
    return ctx


class Cluster:
    """One database server and one orchestrator process per peer, with fault injection.

    Use as a context manager: every process and server it started is stopped on exit, also on failure
    (stopped processes are continued first; function workers are killed with their peer).
    """

    def __init__(self, cfg: Config, slots: int | None = None, initial: list[int] | None = None,
                 newcomers: list[int] = ()):
        """``initial`` peers train from the start; ``newcomers`` are started with them (ready, not
        training) and ask to join on :meth:`join`."""
        self.cfg = cfg
        self.slots = slots or cfg.peers.count
        self.initial = list(range(cfg.peers.count)) if initial is None else list(initial)
        self.newcomers = list(newcomers)
        self.servers: list[Server] = []
        self.procs: dict[int, mp.Process] = {}
        self.stopped: set[int] = set()
        self.t_start = float("nan")
        self._ctx = peer_context()
        self._clients: dict[int, redis.Redis] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self, timeout_s: float = 300.0) -> None:
        c = self.cfg
        for _ in range(self.slots):
            self.servers.append(start_server(c.peers.server, module=needs_module(c.aggregation.backend),
                                             unix_socket=True, persistence=c.peers.persistence, fsync="always"))
        urls = [u if i in self.initial else None for i, u in enumerate(self.urls)]
        cfg_json = c.model_dump_json()
        for i in self.initial:
            self._spawn(i, (cfg_json, i, urls, START_KEY, False))
        for i in self.newcomers:
            self._spawn(i, (cfg_json, i, self.urls, START_KEY, True))
        deadline = time.monotonic() + timeout_s
        while not all(self.client(i).exists(Keys(i).up) for i in self.initial + self.newcomers):
            self._check_started(deadline)
        self.client(0).set(START_KEY, 1)
        self.t_start = time.time()

    def _spawn(self, i: int, args: tuple) -> None:
        p = self._ctx.Process(target=peer_main, args=args, name=f"peer-{i}", daemon=False)
        p.start()
        self.procs[i] = p

    def _check_started(self, deadline: float) -> None:
        dead = [f"{p.name} (exit {p.exitcode})" for p in self.procs.values() if p.exitcode not in (None, 0)]
        if dead:
            raise ClusterError(f"peers failed to start: {', '.join(dead)}")
        if time.monotonic() > deadline:
            raise ClusterError("peers did not start in time")
        time.sleep(0.05)

    def close(self) -> None:
        for i in list(self.stopped):
            self.resume(i)
        stop_processes(list(self.procs.values()), grace_s=5.0)
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        for s in self.servers:
            s.stop()

    def client(self, i: int) -> redis.Redis:
        if i not in self._clients:
            self._clients[i] = make_client(url=self.servers[i].url, socket_timeout=30, connect_timeout=2)
        return self._clients[i]

    # -- observation -------------------------------------------------------------------------------
    def completed(self, i: int) -> int | None:
        """Last round whose update peer i applied (None: unknown, its database is unreachable)."""
        try:
            v = self.client(i).get(Keys(i).completed)
        except redis.RedisError:
            return None
        return int(v) if v is not None else None

    def wait_round(self, i: int, r: int, timeout_s: float = 120.0) -> None:
        """Wait until peer i has completed round r - 1 (it is in round r)."""
        deadline = time.monotonic() + timeout_s
        while (self.completed(i) or -1) < r - 1:
            p = self.procs.get(i)
            if p is not None and p.exitcode is not None:
                raise ClusterError(f"peer {i} exited (code {p.exitcode}) before round {r}")
            if time.monotonic() > deadline:
                raise ClusterError(f"peer {i} did not reach round {r} within {timeout_s:g} s "
                                   f"(at {self.completed(i)})")
            time.sleep(0.01)

    def round_time(self, i: int) -> float:
        """Mean round time of peer i so far (wall)."""
        done = (self.completed(i) or 0) + 1
        return (time.time() - self.t_start) / max(1, done)

    def wait_finished(self, peers: list[int], timeout_s: float) -> None:
        """Wait until the given peers' orchestrators have exited; they must all succeed."""
        deadline = time.monotonic() + timeout_s
        while any(self.procs[i].is_alive() for i in peers):
            failed = [i for i in peers if self.procs[i].exitcode not in (None, 0)]
            if failed:
                raise ClusterError(f"peer(s) {failed} failed (exit codes "
                                   f"{[self.procs[i].exitcode for i in failed]})")
            if time.monotonic() > deadline:
                where = {i: self.completed(i) for i in peers}
                raise ClusterError(f"training did not finish within {timeout_s:g} s; completed rounds: {where}")
            time.sleep(0.1)
        failed = [i for i in peers if self.procs[i].exitcode != 0]
        if failed:
            raise ClusterError(f"peer(s) {failed} failed (exit codes {[self.procs[i].exitcode for i in failed]})")

    def worker_pids(self, i: int) -> list[int]:
        """Gradient-function worker processes of peer i (children of its orchestrator)."""
        p = self.procs[i]
        return [c for c in descendants(p.pid) if "spawn_main" in _cmdline(c)]

    def _busy_worker(self, i: int, timeout_s: float = 10.0) -> int:
        """A worker of peer i that is computing (running, not waiting for work)."""
        deadline = time.monotonic() + timeout_s
        pids: list[int] = []
        while time.monotonic() < deadline:
            pids = self.worker_pids(i)
            for pid in pids:
                if _state(pid) == "R":
                    return pid
            time.sleep(0.002)
        if not pids:
            raise ClusterError(f"peer {i} has no function worker")
        return pids[0]

    def metrics(self, peers: list[int] | None = None) -> pd.DataFrame:
        rows = []
        for i in peers if peers is not None else range(self.slots):
            try:
                rows += [json.loads(x) for x in self.client(i).lrange(Keys(i).metrics, 0, -1)]
            except redis.RedisError:
                continue
        return pd.DataFrame(rows)

    def events(self) -> pd.DataFrame:
        rows = []
        for i in range(self.slots):
            try:
                rows += [json.loads(x) for x in self.client(i).lrange(Keys(i).events, 0, -1)]
            except redis.RedisError:
                continue
        cols = ["t", "round", "peer", "event", "about", "detail"]
        return pd.DataFrame(rows, columns=cols).sort_values("t", ignore_index=True) if rows else pd.DataFrame(columns=cols)

    def params(self, i: int) -> bytes | None:
        try:
            return self.client(i).get(Keys(i).params)
        except redis.RedisError:
            return None

    # -- faults (each returns the wall time it happened) ---------------------------------------------
    def kill_orchestrator(self, i: int) -> float:
        p = self.procs[i]
        workers = [(w, _started(w)) for w in self.worker_pids(i)]
        os.kill(p.pid, signal.SIGKILL)
        t = time.time()
        p.join(10)
        for w, started in workers:  # its orphaned workers exit on their own; make sure
            kill_if_same(w, started)
        return t

    def kill_db(self, i: int) -> float:
        self.servers[i].kill(signal.SIGKILL)
        t = time.time()
        self._drop_client(i)
        return t

    def restart_db(self, i: int) -> float:
        """Start peer i's database again on the same files and socket (call from the main thread: the
        server dies with the thread that starts it)."""
        self.servers[i].restart()
        self._drop_client(i)
        return time.time()

    def _drop_client(self, i: int) -> None:
        c = self._clients.pop(i, None)
        if c is not None:
            c.close()

    def kill_function(self, i: int) -> float:
        pid = self._busy_worker(i)
        os.kill(pid, signal.SIGKILL)
        return time.time()

    def hang_function(self, i: int) -> float:
        """SIGSTOP a computing worker of peer i; its executor must notice the timeout and kill it."""
        pid = self._busy_worker(i)
        os.kill(pid, signal.SIGSTOP)
        return time.time()

    def stop(self, i: int) -> float:
        os.kill(self.procs[i].pid, signal.SIGSTOP)
        self.stopped.add(i)
        return time.time()

    def resume(self, i: int) -> float:
        p = self.procs.get(i)
        if p is not None and p.is_alive():
            os.kill(p.pid, signal.SIGCONT)
        self.stopped.discard(i)
        return time.time()

    def prepare_join(self, i: int, timeout_s: float = 300.0) -> None:
        """Start peer i as a newcomer and wait until it is ready (torch imported, workers warm); it asks
        to join on :meth:`join`."""
        if i in self.procs:
            raise ClusterError(f"peer {i} is already running")
        self._spawn(i, (self.cfg.model_dump_json(), i, self.urls, START_KEY, True))
        deadline = time.monotonic() + timeout_s
        while not self.client(i).exists(Keys(i).up):
            self._check_started(deadline)

    def join(self, i: int) -> float:
        """Let the newcomer i ask the running peers to admit it (started by :meth:`prepare_join`, or
        now)."""
        if i not in self.procs:
            self.prepare_join(i)
        self.client(i).set(START_KEY, 1)
        return time.time()


def heartbeat_process(cfg_json: str, index: int, urls: list[str | None]) -> None:
    """Process entry point of a peer that only keeps its heartbeat (detection tests): it lives until it
    is killed."""
    from .peer import Peer

    cfg = Config.model_validate_json(cfg_json)
    peer = Peer(cfg, index, urls)
    peer.start_heartbeat()
    while True:
        time.sleep(1)


# -- evaluation ---------------------------------------------------------------------------------------

@functools.cache
def _eval_state(dataset: str, data_dir: str | None, model: str, norm: str, seed: int):
    from .data import load_dataset
    from .models import build_model
    from .tensors import FlatParams

    ds = load_dataset(dataset, data_dir, limit_train=1, limit_test=None)
    m = build_model(model, ds.channels, ds.num_classes, ds.image_size, seed, norm=norm)
    return m, FlatParams(m), ds


def accuracy_of(cfg: Config, params: bytes) -> float:
    """Accuracy of ``params`` on the full test set."""
    from .functions import evaluate

    model, flat, ds = _eval_state(cfg.data.dataset, cfg.data.data_dir, cfg.model.name, cfg.model.norm, cfg.run.seed)
    return evaluate(model, flat, ds, params, samples=0)[1]


# -- scenarios ----------------------------------------------------------------------------------------

@dataclass
class ScenarioResult:
    scenario: Scenario
    peers: int
    rounds: int
    survivors: list[int]
    t_start: float
    t_fault: float
    metrics: pd.DataFrame
    events: pd.DataFrame
    accuracy: dict[int, float]
    digests: dict[int, str]
    wall_s: float
    #: last round the victim had completed just before the fault (None: unknown)
    victim_completed_before: int | None = None

    # -- measures ------------------------------------------------------------------------------------
    @property
    def final_accuracy(self) -> float:
        return float(np.mean(list(self.accuracy.values()))) if self.accuracy else float("nan")

    @property
    def survivors_identical(self) -> bool:
        return len(set(self.digests.values())) == 1

    def _victim_events(self, kinds: tuple[str, ...], by_others: bool = True) -> pd.DataFrame:
        ev = self.events
        if ev.empty:
            return ev
        v = self.scenario.victim
        sel = (ev["about"] == v) & ev["event"].isin(kinds) & (ev["t"] >= self.t_fault - 1e-3)
        sel &= (ev["peer"] != v) if by_others else (ev["peer"] == v)
        return ev[sel]

    @property
    def t_detect(self) -> float:
        f = self.scenario.fault
        if f == "none":
            return float("nan")
        if f in ("kill_function", "hang_function"):
            ev = self._victim_events(("function_failed",), by_others=False)
        elif f == "join":
            ev = self._victim_events(("admitted",))
        else:
            ev = self._victim_events(("excluded", "removed"))
        return float(ev["t"].min()) if len(ev) else float("nan")

    @property
    def detection_s(self) -> float:
        return self.t_detect - self.t_fault

    def barrier_threshold(self) -> float:
        m = self.metrics
        before = m[m["peer"].isin(self.survivors) & (m["wall_end"] < self.t_fault)]
        if len(before) < 5:
            return 0.25
        return float(before["t_barrier"].quantile(0.95)) + 0.05

    @property
    def recovery_s(self) -> float:
        s = self.scenario
        if s.fault == "none":
            return float("nan")
        if s.returning:
            ev = self.events
            mine = ev[(ev["peer"] == s.victim) & (ev["about"] == s.victim) & (ev["t"] >= self.t_fault - 1e-3)]
            for kind in ("joined", "recovered"):
                hit = mine[mine["event"] == kind]
                if len(hit):
                    return float(hit["t"].min()) - self.t_fault
            if s.fault != "straggler":
                return float("nan")
        # the first round every survivor started after the detection, with a normal barrier time
        start = self.t_detect if not math.isnan(self.t_detect) else self.t_fault
        m = self.metrics[self.metrics["peer"].isin(self.survivors)]
        limit = self.barrier_threshold()
        for _, g in m.groupby("round"):
            if len(g) == len(self.survivors) and (g["wall_begin"] >= start).all() and (g["t_barrier"] <= limit).all():
                return float(g["wall_end"].max()) - self.t_fault
        return float("nan")

    def expected_start(self, i: int) -> int:
        """First round peer i was expected to take part in."""
        if self.scenario.fault == "join" and i == self.scenario.victim:
            ev = self.events
            j = ev[(ev["peer"] == i) & (ev["event"] == "joined")]
            return int(j["round"].min()) if len(j) else self.rounds
        return 0

    def rounds_lost_by_peer(self) -> dict[int, int]:
        out = {}
        m = self.metrics
        for i in self.survivors:
            start = self.expected_start(i)
            done = m[(m["peer"] == i) & (m["round"] >= start)]["round"].nunique() if len(m) else 0
            out[i] = (self.rounds - start) - done
        return out

    @property
    def rounds_lost(self) -> int:
        return int(sum(self.rounds_lost_by_peer().values()))

    def victim_story(self) -> str:
        """What the victim itself logged after the fault (recovered / resync / joined, with rounds)."""
        ev = self.events
        if ev.empty or self.scenario.fault == "none":
            return ""
        v = self.scenario.victim
        mine = ev[(ev["peer"] == v) & (ev["about"] == v) & (ev["t"] >= self.t_fault - 1e-3)]
        return " ".join(f"{e}@{int(r)}" for e, r in zip(mine["event"], mine["round"], strict=True))

    def row(self, reference: float | None = None) -> dict:
        s = self.scenario
        ref = float("nan") if reference is None else reference
        m = self.metrics
        last = m[m["round"] == self.rounds - 1] if len(m) else m
        return {
            "scenario": s.name,
            "fault": s.description,
            "peers": self.peers,
            "survivors": " ".join(map(str, self.survivors)),
            "rounds": self.rounds,
            "detection_s": self.detection_s,
            "recovery_s": self.recovery_s,
            "rounds_lost": self.rounds_lost,
            "functions_failed": int(m["functions_failed"].sum()) if len(m) else 0,
            "functions_retried": int(m["functions_retried"].sum()) if len(m) else 0,
            "aggregated_last_round": int(last["peers_aggregated"].min()) if len(last) else 0,
            "final_accuracy": self.final_accuracy,
            "fault_free_accuracy": ref,
            "difference_points": (self.final_accuracy - ref) * 100,
            "survivors_identical": self.survivors_identical,
            "victim_events": self.victim_story(),
            "wall_s": self.wall_s,
        }


def run_scenario(scenario: Scenario | str, overrides: dict | None = None, *, timeout_s: float = 600.0) -> ScenarioResult:
    """Train with the scenario's fault injected; returns the measurements (see the module docstring)."""
    s = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
    cfg, _ = scenario_config(s, overrides)
    R = cfg.run.rounds
    initial = list(range(cfg.peers.count))
    newcomers = [s.victim] if s.fault == "join" else []
    t_wall = time.perf_counter()
    slots = len(initial) + len(newcomers)
    with Cluster(cfg, slots=slots, initial=initial, newcomers=newcomers) as cl:
        deadline = time.monotonic() + timeout_s
        fault_round = max(1, int(s.at * R))
        trigger = s.victim if s.fault != "join" else 0
        t_fault = float("nan")
        if s.fault != "none":
            cl.wait_round(trigger, fault_round, timeout_s=timeout_s)
            if s.fault in ("kill_peer", "straggler", "kill_db", "restart_db"):
                time.sleep(0.4 * cl.round_time(trigger))  # into the round
        before = cl.completed(s.victim) if s.fault != "join" else None
        if s.fault == "kill_peer":
            t_fault = cl.kill_orchestrator(s.victim)
        elif s.fault == "kill_db":
            t_fault = cl.kill_db(s.victim)
        elif s.fault == "restart_db":
            t_fault = cl.kill_db(s.victim)
            time.sleep(s.duration_s)
            cl.restart_db(s.victim)
        elif s.fault == "kill_function":
            t_fault = cl.kill_function(s.victim)
        elif s.fault == "hang_function":
            t_fault = cl.hang_function(s.victim)
        elif s.fault == "straggler":
            t_fault = cl.stop(s.victim)
            time.sleep(s.duration_s)
            cl.resume(s.victim)
        elif s.fault == "join":
            t_spawn = cl.join(s.victim)
        survivors = s.survivors(slots)
        cl.wait_finished(survivors, timeout_s=max(10.0, deadline - time.monotonic()))
        metrics, events = cl.metrics(survivors), cl.events()
        if s.fault == "join":
            req = events[(events["peer"] == s.victim) & (events["event"] == "join_request")]
            t_fault = float(req["t"].min()) if len(req) else t_spawn
        params = {i: cl.params(i) for i in survivors}
        t_start = cl.t_start
    missing = [i for i, p in params.items() if p is None]
    if missing:
        raise ClusterError(f"no final parameters from survivors {missing}")
    digests = {i: hashlib.sha256(p).hexdigest()[:16] for i, p in params.items()}
    acc_by_digest = {d: accuracy_of(cfg, params[i]) for d, i in {d: i for i, d in digests.items()}.items()}
    accuracy = {i: acc_by_digest[d] for i, d in digests.items()}
    return ScenarioResult(s, slots, R, survivors, t_start, t_fault, metrics, events, accuracy, digests,
                          time.perf_counter() - t_wall, before)


_REFERENCES: dict[str, float] = {}


def fault_free_accuracy(survivors: int, overrides: dict | None = None, *, timeout_s: float = 600.0) -> float:
    """Final test accuracy of the fault-free run with ``survivors`` peers (peers 0..survivors-1, each with
    the same data part as in the scenarios). Cached per configuration within the process."""
    over = {**BASE, **(overrides or {})}
    n = int(over.get("data.parts") or over["peers.count"])
    over.update({"data.parts": n, "peers.count": survivors})
    key = json.dumps(over, sort_keys=True, default=str)
    if key not in _REFERENCES:
        res = run_scenario(Scenario("fault_free", "none", victim=0, description="no fault"), over, timeout_s=timeout_s)
        _REFERENCES[key] = res.final_accuracy
    return _REFERENCES[key]


def reference_for(scenario: Scenario, overrides: dict | None = None, **kw) -> float:
    over = {**BASE, **(overrides or {})}
    n = int(over.get("data.parts") or over["peers.count"])
    return fault_free_accuracy(len(scenario.survivors(n)), overrides, **kw)


COLUMNS = ["scenario", "detection_s", "recovery_s", "rounds_lost", "final_accuracy", "fault_free_accuracy",
           "difference_points"]


def write_reports(rows: list[dict], out_dir: str | Path, notes: str = "") -> pd.DataFrame:
    from .reports import write_table

    df = pd.DataFrame(rows)
    lead = [c for c in COLUMNS if c in df]
    df = df[lead + [c for c in df.columns if c not in lead]]
    text = (
        "Real processes and signals: one database server and one orchestrator process per peer, each with a "
        "warm gradient-function worker process. "
        f"Training: {_describe(BASE)}.\n\n"
        "- `detection_s`: fault -> first event of another peer about the victim (excluded / removed / admitted), "
        "or the victim's own `function_failed` event for function faults.\n"
        "- `recovery_s`: a peer lost for good or a function fault: fault -> end of the first round every survivor "
        "started after the detection with a normal barrier time; a peer coming back: fault -> its `joined` "
        "(state transfer) or `recovered` event. Join: from the newcomer's join request.\n"
        "- `rounds_lost`: over the peers that should have kept training (survivors and returning victims), "
        "rounds expected minus rounds whose update they completed.\n"
        "- `final_accuracy`: the survivors' final parameters on the full Fashion-MNIST test set (10,000 images); "
        "`fault_free_accuracy`: the same training without the fault and with the same surviving peers "
        "(same seed, same data parts); `difference_points` = 100 x (final - fault-free).\n"
        "- `survivors_identical`: the survivors end with bit-identical parameters; `victim_events`: what the "
        "victim logged after the fault (event@round); `wall_s`: the whole scenario, including starting 8 "
        "processes and 4 servers and the final evaluation.\n\n"
        "Training is deterministic for given inputs: a fault that only delays work (a retried function) ends "
        "bit-identical to the fault-free run, and two faults that remove the same peer from the same round on "
        "end identical to each other.\n"
        + (f"\n{notes.strip()}\n" if notes else "")
    )
    write_table(df, out_dir, "faults", "Fault tolerance: detection, recovery, rounds lost, accuracy", text)
    return df


def _describe(over: dict) -> str:
    return (f"{over['peers.count']} peers x {over['peers.functions']} functions, {over['model.name']}, "
            f"batch {over['peers.batch_size']}, lr {over['optim.lr']}, momentum {over['optim.momentum']}, "
            f"{over['run.rounds']} rounds, heartbeat {over['membership.heartbeat_s']} s, "
            f"barrier deadline {over['barrier.timeout_s']} s, removal after {over['membership.max_misses']} misses, "
            f"function timeout {over['executor.timeout_s']} s with {over['executor.retries']} retries")


def run_all(names: list[str] | None = None, overrides: dict | None = None, out_dir: str | Path | None = None,
            progress=print) -> pd.DataFrame:
    rows = []
    for name in names or list(SCENARIOS):
        s = SCENARIOS[name]
        ref = reference_for(s, overrides)
        res = run_scenario(s, overrides)
        row = res.row(ref)
        rows.append(row)
        if progress:
            progress(f"{name}: detection {row['detection_s']:.2f} s, recovery {row['recovery_s']:.2f} s, "
                     f"rounds lost {row['rounds_lost']}, accuracy {row['final_accuracy']:.4f} vs "
                     f"{row['fault_free_accuracy']:.4f} ({row['difference_points']:+.2f} points), {row['wall_s']:.0f} s")
    df = pd.DataFrame(rows)
    if out_dir is not None:
        df = write_reports(rows, out_dir)
    return df


def main(argv: list[str] | None = None) -> int:
    """``python -m spirt.faults [--scenarios a,b] [--rounds N] [--out DIR] [--set key=value ...]``"""
    from .config import parse_override

    argv = list(argv or [])
    if argv[:1] == ["--"]:
        argv = argv[1:]
    ap = argparse.ArgumentParser(prog="spirt bench faults", description="fault-injection scenarios with real "
                                 "processes and signals -> faults.{md,csv}")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, from: {', '.join(SCENARIOS)}")
    ap.add_argument("--rounds", type=int, help=f"training rounds (default {BASE['run.rounds']})")
    ap.add_argument("--out", default="reports", help="report directory (default: reports)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override the scenario training config")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; allowed: {', '.join(SCENARIOS)}")
    over = dict(parse_override(x) for x in args.set)
    if args.rounds:
        over["run.rounds"] = args.rounds
    df = run_all(names, over, args.out)
    print(df[[c for c in COLUMNS if c in df]].to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
