"""A training cluster of real processes for fault injection: one database server and one orchestrator
process per peer, each with its warm pool of gradient-function worker processes.

:class:`Cluster` starts them as ``peers.mode = "process"`` does (from a forkserver with torch preloaded,
see :func:`peer_context`), observes them only through their databases (completed rounds, per-round
metrics, membership events, final parameters) and offers the primitives faults are made of: SIGKILL an
orchestrator or a database server, restart a database on its files, stop and continue an orchestrator,
find a gradient-function worker while it computes, let a newcomer join. The faults themselves are in
:mod:`spirt.faults`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time

import pandas as pd
import redis

from .backends import needs_module
from .byzantine import is_byzantine
from .config import Config
from .disagreement import Observer
from .keys import START_KEY, Keys
from .links import Links
from .peer import peer_process
from .processes import RUNNING, command_line, descendants, handle, signal_if_same, state, stop_processes
from .servers import Server, make_client, start_servers

__all__ = ["Cluster", "ClusterError", "peer_context", "heartbeat_process", "peer_on_host"]


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


def peer_on_host(namespace: str, harness: int, *args) -> None:
    """Process entry point of a peer on an emulated host: :func:`spirt.peer.peer_process` inside the host's
    network namespace (its gradient-function workers, started later, live there too)."""
    from .netns import enter

    enter(namespace)
    peer_process(harness, *args)


def heartbeat_process(cfg_json: str, index: int, urls: list[str | None]) -> None:
    """Process entry point of a peer that only keeps its heartbeat (detection tests): it lives until it
    is killed, or until the process that started it is gone."""
    from .peer import Peer
    from .processes import exit_with

    exit_with(os.getppid())
    cfg = Config.model_validate_json(cfg_json)
    peer = Peer(cfg, index, urls)
    peer.membership.start_heartbeat()
    while True:
        time.sleep(1)


class Cluster:
    """One database server and one orchestrator process per peer, with fault injection.

    Use as a context manager: every process and server it started is stopped on exit, also on failure
    (stopped processes are continued first; function workers are killed with their peer).
    """

    def __init__(self, cfg: Config, slots: int | None = None, initial: list[int] | None = None,
                 newcomers: list[int] = (), *, links: bool = False, hosts: bool = False,
                 cut_mode: str = "drop"):
        """``initial`` peers train from the start; ``newcomers`` are started with them (ready, not
        training) and ask to join on :meth:`join`. With ``links``, each peer reaches every other
        peer's database through its own proxy (:class:`spirt.links.Links`, as :attr:`links`), which
        partition faults cut and heal. With ``hosts`` instead, each peer (its database server and its
        orchestrator) lives on an emulated host of its own, a network namespace (:class:`spirt.netns.Hosts`,
        as :attr:`hosts`; needs root), and :attr:`links` cuts and heals the network between them with
        blackhole routes (``cut_mode="route"``) or iptables DROP rules (``"drop"``, the default: silent, as
        the proxies' cuts are)."""
        if links and hosts:
            raise ClusterError("links (proxies) or hosts (network namespaces), not both")
        self.cfg = cfg
        self.slots = slots or cfg.peers.count
        self.initial = list(range(cfg.peers.count)) if initial is None else list(initial)
        self.newcomers = list(newcomers)
        self.servers: list[Server] = []
        self.procs: dict[int, mp.Process] = {}
        self.stopped: set[int] = set()
        self.stopped_dbs: set[int] = set()
        self.t_start = float("nan")
        self._ctx = peer_context()
        self._clients: dict[int, redis.Redis] = {}
        self._want_links = links
        self._want_hosts, self._cut_mode = hosts, cut_mode
        self.hosts = None  # spirt.netns.Hosts, with hosts=True
        #: the partition primitives: spirt.links.Links (proxies) or spirt.netns.PeerCuts (routes, rules)
        self.links = None
        #: the honest peers' disagreement, per round (started with the training)
        self.observer: Observer | None = None

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

    def urls_for(self, i: int) -> list[str | None]:
        """The databases as peer i reaches them: directly, or through its links."""
        if not self._want_links:
            return self.urls
        return self.links.urls_for(i, dict(enumerate(self.urls)))

    def start(self, timeout_s: float = 300.0) -> None:
        c = self.cfg
        if self._want_hosts:
            from .netns import Hosts, PeerCuts

            self.hosts = Hosts(self.slots)
            self.links = PeerCuts(self.hosts, self._cut_mode)
        self.servers.extend(start_servers([
            dict(binary=c.peers.server, module=needs_module(c.aggregation.backend), persistence=c.peers.persistence,
                 fsync="always", **({"host": self.hosts.address(i), "netns": self.hosts.namespace(i)} if self.hosts
                                    else {"unix_socket": True}))
            for i in range(self.slots)]))
        if self._want_links:
            self.links = Links({i: s.unix_socket for i, s in enumerate(self.servers)})
        cfg_json = c.model_dump_json()
        for i in self.initial:
            urls = [u if q in self.initial else None for q, u in enumerate(self.urls_for(i))]
            self._spawn(i, (cfg_json, i, urls, START_KEY, False))
        for i in self.newcomers:
            self._spawn(i, (cfg_json, i, self.urls_for(i), START_KEY, True))
        deadline = time.monotonic() + timeout_s
        while not all(self.client(i).exists(Keys(i).up) for i in self.initial + self.newcomers):
            self._check_started(deadline)
        honest = [i for i in range(self.slots) if not is_byzantine(c, i)]
        self.observer = Observer({i: make_client(url=self.servers[i].url, socket_timeout=1, connect_timeout=1)
                                  for i in honest}).__enter__()
        self.client(0).set(START_KEY, 1)
        self.t_start = time.time()

    def _spawn(self, i: int, args: tuple) -> None:
        # the peer ends with this process even if it cannot stop the peer (SIGKILL): see exit_with
        args = (os.getpid(), *args)
        target, args = (peer_on_host, (self.hosts.namespace(i), *args)) if self.hosts else (peer_process, args)
        p = self._ctx.Process(target=target, args=args, name=f"peer-{i}", daemon=False)
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
        if self.observer is not None:
            self.observer.stop()
            for c in self.observer.clients.values():
                c.close()
        for i in list(self.stopped):
            self.resume(i)
        for i in list(self.stopped_dbs):
            self.resume_db(i)
        stop_processes(list(self.procs.values()), grace_s=5.0)
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        for s in self.servers:
            s.stop()
        if self.hosts is not None:
            self.hosts.close()  # with its cuts; after the processes inside are gone
        elif self.links is not None:
            self.links.close()

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
        """Gradient-function worker processes of peer i (spawned below its orchestrator)."""
        p = self.procs[i]
        return [c for c in descendants(p.pid) if "spawn_main" in command_line(c)]

    def busy_worker(self, i: int, timeout_s: float = 10.0) -> int:
        """A worker of peer i that is computing (running, not waiting for work); after ``timeout_s``
        without one, any of its workers."""
        deadline = time.monotonic() + timeout_s
        pids: list[int] = []
        while time.monotonic() < deadline:
            # listing the workers scans every process of the host; their states are cheap to poll, and
            # a computation can be short, so poll those often and list again now and then (a pool
            # restart replaces the workers)
            pids = self.worker_pids(i)
            relist = min(deadline, time.monotonic() + 0.25)
            while time.monotonic() < relist:
                for pid in pids:
                    if state(pid) == RUNNING:
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

    # -- fault primitives (each returns the wall time it happened) ---------------------------------
    def kill_orchestrator(self, i: int) -> float:
        p = self.procs[i]
        workers = [h for h in map(handle, self.worker_pids(i)) if h is not None]
        os.kill(p.pid, signal.SIGKILL)
        t = time.time()
        p.join(10)
        for w in workers:  # its orphaned workers exit on their own; make sure
            signal_if_same(w, signal.SIGKILL)
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

    def stop(self, i: int) -> float:
        """SIGSTOP peer i's orchestrator (its workers go on with what they were given)."""
        os.kill(self.procs[i].pid, signal.SIGSTOP)
        self.stopped.add(i)
        return time.time()

    def resume(self, i: int) -> float:
        p = self.procs.get(i)
        if p is not None and p.is_alive():
            os.kill(p.pid, signal.SIGCONT)
        self.stopped.discard(i)
        return time.time()

    def stop_db(self, i: int) -> float:
        """SIGSTOP peer i's database server: it hangs with its connections open (no error, only
        silence, for its own orchestrator and for the peers pushing to it)."""
        self.servers[i].process.send_signal(signal.SIGSTOP)
        self.stopped_dbs.add(i)
        return time.time()

    def resume_db(self, i: int) -> float:
        self.servers[i].process.send_signal(signal.SIGCONT)
        self.stopped_dbs.discard(i)
        return time.time()

    def prepare_join(self, i: int, timeout_s: float = 300.0) -> None:
        """Start peer i as a newcomer and wait until it is ready (torch imported, workers warm); it asks
        to join on :meth:`join`."""
        if i in self.procs:
            raise ClusterError(f"peer {i} is already running")
        self._spawn(i, (self.cfg.model_dump_json(), i, self.urls_for(i), START_KEY, True))
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
