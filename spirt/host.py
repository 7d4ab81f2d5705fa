"""One peer per host: what ``spirt peer`` and ``spirt collect`` do.

A group spread over machines shares one configuration whose ``peers.urls`` lists every peer's database
(``redis://host:port``, in peer order). On each host, ``spirt peer CONFIG --index i``:

1. starts peer i's database server, listening on the address of ``peers.urls[i]`` (``--no-server``: the
   server at that URL runs already);
2. runs peer i's orchestrator in its own process (its gradient-function workers are its children), the
   same entry point :func:`spirt.peer.peer_main` that ``spirt run`` starts for every peer of a one-host
   run: it marks itself up in its database and waits for the start signal in peer 0's;
3. peer 0 gives that signal once every peer of the list is up, so that nobody needs a launcher;
4. trains; its metrics and events stay in its own database;
5. keeps its database serving until ``spirt collect CONFIG --release`` has read them, or it is stopped.

A peer that is not in the list joins the running group: ``spirt peer CONFIG --index j --url URL`` with
``j`` beyond the list (``peers.count`` or more) and its own database URL. It asks the peers of the list to
admit it and takes the group's state by state transfer, as any newcomer does; ``data.parts`` of the shared
configuration must leave it a data part (the parts beyond the initial peers are the newcomers'). Collect
its metrics too with ``spirt collect CONFIG --joined j=URL``.

``spirt collect`` reads every peer's metrics and events over the network and writes the usual run reports;
a peer whose database does not answer is named, never skipped in silence. What it reads another host's
peer wrote, so it is parsed strictly (:mod:`spirt.rows`): a peer whose report does not parse is left
out, named, and the reason is said (a ``report_rejected`` event and a line of the reports).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import redis

from .backends import needs_module
from .config import Config
from .keys import RELEASE_KEY, START_KEY, Keys
from .rows import EVENT_COLUMNS, read_reports, rejected_event
from .servers import make_client, start_server
from .wire import BadValue

__all__ = ["HostError", "listen_address", "run_peer", "collect"]


class HostError(RuntimeError):
    pass


def check_group(cfg: Config) -> None:
    """What a group of ``spirt peer`` processes needs from its configuration."""
    if len(cfg.peers.urls) != cfg.peers.count:
        raise HostError(f"spirt peer needs peers.urls: the database URL of each of the {cfg.peers.count} peers, "
                        "in peer order (the same list on every host)")
    if cfg.security.enabled:
        # a secured group's users and passwords are installed from a launcher's bootstrap secrets
        # (spirt.runner), which a group of independent hosts does not have
        raise HostError("spirt peer runs open groups only (security.enabled = false); a secured group is "
                        "started by spirt run")


def listen_address(url: str) -> tuple[str, int]:
    """The address and port a peer's database listens on, from its URL (``redis://host:port``)."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname or parts.port is None:
        raise HostError(f"a peer's database URL must be redis://host:port with an explicit port (got {url!r}): "
                        "the others reach it over the network")
    return parts.hostname, parts.port


def _up(url: str, index: int) -> bool:
    return _read(url, Keys(index).up) is not None


def _read(url: str, key: str) -> bytes | None:
    """``key`` in the database at ``url``; None also when it does not answer (not started yet, or on its
    way)."""
    try:
        c = make_client(url=url, socket_timeout=2, connect_timeout=1)
        try:
            return c.get(key)
        finally:
            c.close()
    except redis.RedisError:
        return None


def join_when_training(cfg: Config, own: redis.Redis, stop: threading.Event, timeout_s: float,
                       log: Callable[[str], None]) -> None:
    """A joining peer's part: once a peer of the list has completed a round (the group is training), set
    the signal to ask to join in our own database, where our orchestrator, warm, waits for it."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        marks = [_read(url, Keys(q).completed) for q, url in enumerate(cfg.peers.urls)]
        if any(m is not None for m in marks):
            own.set(START_KEY, 1)
            log("the group is training: asking to join")
            return
        if time.monotonic() > deadline:
            log(f"the group of peers 0 .. {cfg.peers.count - 1} was not training within {timeout_s:g} s: not joining")
            return
        stop.wait(0.2)


def give_start_signal(cfg: Config, own: redis.Redis, stop: threading.Event, timeout_s: float,
                      log: Callable[[str], None]) -> None:
    """Peer 0's part: once every peer of the group is up (torch imported, workers warm), set the start
    signal in our own database, where every peer waits for it."""
    deadline = time.monotonic() + timeout_s
    waiting = set(range(cfg.peers.count))
    while waiting and not stop.is_set():
        waiting = {q for q in waiting if not _up(cfg.peers.urls[q], q)}
        if not waiting:
            break
        if time.monotonic() > deadline:
            log(f"peers {sorted(waiting)} were not up within {timeout_s:g} s: no start signal")
            return
        stop.wait(0.2)
    if not stop.is_set():
        own.set(START_KEY, 1)
        log(f"every peer is up: start signal given ({cfg.peers.count} peers)")


def own_results(db: redis.Redis, index: int) -> dict:
    """Rounds completed and the last evaluated accuracy, from the peer's metrics in its database."""
    rows = [json.loads(x) for x in db.lrange(Keys(index).metrics, 0, -1)]
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    return {"rounds": len(rows), "accuracy": evaluated[-1]["accuracy"] if evaluated else float("nan")}


def group_urls(cfg: Config, index: int, url: str | None = None) -> list[str | None]:
    """The databases as peer ``index`` knows them: the group's list, and for a peer joining from beyond
    it (``index >= peers.count``), its own ``url`` at its index."""
    n = cfg.peers.count
    if index < 0:
        raise HostError(f"--index {index}: peers are numbered from 0")
    if index < n:
        if url is not None and url != cfg.peers.urls[index]:
            raise HostError(f"--url {url}: peer {index}'s database is {cfg.peers.urls[index]} in peers.urls")
        return list(cfg.peers.urls)
    if url is None:
        raise HostError(f"--index {index} is beyond the group's peers 0 .. {n - 1}: a peer joining the group "
                        "needs its own database URL (--url)")
    parts = cfg.data.parts or n
    if index >= parts:
        raise HostError(f"--index {index}: the group's data has {parts} parts, none left for peer {index}; "
                        f"set data.parts to at least {index + 1} in the group's configuration")
    listen_address(url)
    return [*cfg.peers.urls, *[None] * (index - n), url]


def run_peer(cfg: Config, index: int, *, url: str | None = None, server: bool = True,
             state_dir: str | Path | None = None, start_timeout_s: float = 600.0, hold: bool = True,
             hold_timeout_s: float | None = None, log: Callable[[str], None] = print) -> dict:
    """Peer ``index`` of the group ``cfg`` on this host (see the module docstring), or, with ``index`` beyond
    the list and its database ``url``, a peer joining the running group; returns its own results
    (``rounds``, ``accuracy``). Its database server, orchestrator and workers are stopped when it returns,
    also on failure (SIGTERM included: the command line turns it into an exit)."""
    from .peer import peer_main

    check_group(cfg)
    urls = group_urls(cfg, index, url)
    joining = index >= cfg.peers.count
    url = urls[index]
    host, port = listen_address(url)
    with ExitStack() as stack:
        if server:
            workdir = None
            if state_dir is not None:
                workdir = Path(state_dir) / f"peer-{index}"
                workdir.mkdir(parents=True, exist_ok=True)
            srv = start_server(cfg.peers.server, module=needs_module(cfg.aggregation.backend), host=host, port=port,
                               persistence=cfg.peers.persistence or state_dir is not None, fsync="always",
                               workdir=workdir)
            stack.callback(srv.stop)
            log(f"peer {index}: database listening at {url}")
        db = make_client(url=url, socket_timeout=30)
        stack.callback(db.close)
        db.delete(START_KEY, RELEASE_KEY, Keys(index).up)  # nothing of an earlier run starts this one
        stop = threading.Event()
        stack.callback(stop.set)
        if index == 0:
            threading.Thread(target=give_start_signal, args=(cfg, db, stop, start_timeout_s, log),
                             name="start-signal", daemon=True).start()
        if joining:  # once warm and the group trains: ask its peers to admit us, take its state, train
            log(f"peer {index}: joining the group of peers 0 .. {cfg.peers.count - 1} once it trains")
            threading.Thread(target=join_when_training, args=(cfg, db, stop, start_timeout_s, log),
                             name="join-signal", daemon=True).start()
            peer_main(cfg.model_dump_json(), index, urls, START_KEY, join=True, start_timeout_s=start_timeout_s)
        else:
            peer_main(cfg.model_dump_json(), index, urls, START_KEY, start_timeout_s=start_timeout_s)
        results = own_results(db, index)
        log(f"peer {index}: trained {results['rounds']} rounds, accuracy {results['accuracy']:.4f}")
        if hold:
            log(f"peer {index}: serving its metrics until spirt collect --release (or a stop signal)")
            deadline = None if hold_timeout_s is None else time.monotonic() + hold_timeout_s
            while not db.exists(RELEASE_KEY):
                if deadline is not None and time.monotonic() > deadline:
                    log(f"peer {index}: not released within {hold_timeout_s:g} s; stopping")
                    break
                time.sleep(0.2)
        return results


def collect(cfg: Config, *, joined: dict[int, str] | None = None, release: bool = False,
            timeout_s: float = 10.0) -> tuple[pd.DataFrame, list[int]]:
    """Every peer's per-round metrics (with ``attrs["events"]`` and ``attrs["final_states"]`` as a run of
    :func:`spirt.runner.run_training` has them) and the peers whose databases did not answer; ``joined``:
    the peers that joined from beyond the list (index -> database URL). A peer whose report does not
    parse is left out of both (its final state too) and named in ``attrs["rejected"]`` (peer -> why).
    With ``release``, each peer that answered is told it may stop."""
    from .byzantine import is_byzantine

    if len(cfg.peers.urls) != cfg.peers.count:
        raise HostError("spirt collect needs peers.urls: the database URL of every peer")
    rows, events, missing, states, rejected = [], [], [], set(), {}
    for i, url in [*enumerate(cfg.peers.urls), *sorted((joined or {}).items())]:
        try:
            c = make_client(url=url, socket_timeout=timeout_s, connect_timeout=timeout_s)
            try:
                try:
                    metrics, said = read_reports(c, i, cfg.run.rounds)
                except BadValue as exc:  # its own report: nothing of it is used, and it is said
                    rejected[i] = str(exc)
                    events.append(rejected_event(i, str(exc), time.time()))
                else:
                    rows += metrics
                    events += said
                    if not is_byzantine(cfg, i):
                        states.add(c.get(Keys(i).state))
                if release:
                    c.set(RELEASE_KEY, 1)
            finally:
                c.close()
        except redis.RedisError:
            missing.append(i)
    df = pd.DataFrame(rows)
    df.attrs["events"] = pd.DataFrame(events, columns=EVENT_COLUMNS).sort_values("t", ignore_index=True)
    df.attrs["final_states"] = len(states)
    df.attrs["rejected"] = rejected
    df.attrs["missing"] = missing
    return df, missing
