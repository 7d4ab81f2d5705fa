"""Launching a training run: one database per peer, one orchestrator per peer, metrics to reports.

The launcher only starts things and collects the per-round metrics each peer appends to a list in its
own database; peers talk to each other through the databases alone.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import secrets
import threading
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import pandas as pd
import redis

from .backends import needs_module
from .config import Config
from .disagreement import Observer
from .keys import START_KEY, Keys
from .peer import Peer, peer_process
from .processes import stop_processes
from .rows import EVENT_COLUMNS, read_reports, rejected_event
from .servers import make_client, start_servers
from .wire import BadValue


class TrainingError(RuntimeError):
    pass


def _plain_client(url: str, **kwargs) -> redis.Redis:
    return make_client(url=url, **kwargs)


def _launcher_access(cfg: Config):
    """(config, client factory) of the launcher. A secured run gets a read-only launcher user in every
    database: the peers create it from the SHA-256 of a password only this process holds."""
    if not cfg.security.enabled:
        return cfg, _plain_client
    from .security.acl import LAUNCHER_USER, password_hash
    from .security.provision import tls_for

    password = secrets.token_urlsafe(32)
    sec = cfg.security
    # a fresh session per run: the passwords peers derive for each other's databases rotate with it
    sec_update = {"launcher_password_sha256": password_hash(password), "session": secrets.token_hex(16)}
    cfg = cfg.model_copy(update={"security": sec.model_copy(update=sec_update)})
    files, _ = tls_for(sec, None)  # the launcher's client certificate (or the group's one set)
    tls = files.client.client_kwargs() if files is not None else {}

    def client(url: str, **kwargs) -> redis.Redis:
        return make_client(url=url, username=LAUNCHER_USER, password=password,
                           **(tls if url.startswith("rediss://") else {}), **kwargs)

    return cfg, client


class _Admins:
    """A secured run's databases start with their users in place: the default user off and an ``admin``
    user with a fresh random password per database, which only this process and that peer know (the
    peer installs its users with it, then deletes it). Servers the user runs (``peers.urls``) are
    reached as they were started."""

    def __init__(self, cfg: Config):
        self.passwords: dict[int, str] = {}
        self.enabled = cfg.security.enabled and not cfg.peers.urls

    def server_args(self, i: int) -> dict:
        if not self.enabled:
            return {}
        from .security.acl import bootstrap_users

        self.passwords[i] = secrets.token_urlsafe(32)
        return {"users": bootstrap_users(self.passwords[i])}

    def __call__(self, i: int) -> str | None:
        return self.passwords.get(i)


def _up(c: redis.Redis, i: int, secured: bool) -> bool:
    try:
        return bool(c.exists(Keys(i).up))
    except redis.AuthenticationError:
        if not secured:
            raise
        return False  # the peer has not created the launcher's user yet
    except redis.ConnectionError:
        if not secured:
            raise
        # while a peer installs its users it closes every connection not yet logged in (CLIENT KILL
        # USER default), ours among them; the caller's deadline and its check of the peers' exit codes
        # bound the wait
        return False


def collect_reports(urls: list[str], rounds: int, client=_plain_client) -> pd.DataFrame:
    """Every peer's per-round metrics, with every peer's events in ``attrs["events"]`` (in time order)
    and in ``attrs["rejected"]`` the peers whose report does not parse (peer -> why; their rows are left
    out, and a ``report_rejected`` event says so: :mod:`spirt.rows`). A database that does not answer
    gives none."""
    rows, events, rejected = [], [], {}
    for i, url in enumerate(urls):
        try:
            c = client(url, socket_timeout=30)
            try:
                metrics, said = read_reports(c, i, rounds)
                rows += metrics
                events += said
            finally:
                c.close()
        except BadValue as exc:
            rejected[i] = str(exc)
            events.append(rejected_event(i, str(exc), time.time()))
        except redis.RedisError:
            continue
    df = pd.DataFrame(rows)
    df.attrs["events"] = pd.DataFrame(events, columns=EVENT_COLUMNS).sort_values("t", ignore_index=True)
    df.attrs["rejected"] = rejected
    return df


def _progress(cfg: Config, urls: list[str], stop: threading.Event, enabled: bool, client=_plain_client) -> None:
    if not enabled:
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    clients = [client(u, socket_timeout=5) for u in urls]
    total = cfg.run.rounds * len(urls)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[acc]}"), TimeElapsedColumn(), transient=False) as prog:
        task = prog.add_task(f"{cfg.run.name}: rounds x peers", total=total, acc="")
        while not stop.is_set():
            done, acc = 0, ""
            for i, c in enumerate(clients):
                try:
                    done += c.llen(Keys(i).metrics)
                    if i == 0:
                        last = c.lindex(Keys(i).metrics, -1)
                        if last:
                            a = json.loads(last).get("accuracy")
                            acc = f"acc {a:.3f}" if a == a and a is not None else ""
                except Exception:  # noqa: BLE001 - progress display only
                    pass
            if acc:
                prog.update(task, completed=done, acc=acc)
            else:
                prog.update(task, completed=done)
            stop.wait(0.5)
        prog.update(task, completed=total)
    for c in clients:
        c.close()


STATE_CONFIG = "config.json"


def state_config(state_dir: str | Path) -> Config:
    """The configuration a persisted run was started with (to resume it)."""
    path = Path(state_dir) / STATE_CONFIG
    if not path.exists():
        raise TrainingError(f"{state_dir} holds no persisted run (no {STATE_CONFIG})")
    return Config.model_validate_json(path.read_text())


def run_training(cfg: Config, *, progress: bool = True, timeout_s: float | None = None,
                 state_dir: str | Path | None = None, resume: bool = False,
                 joiners: Mapping[int, int] | None = None, peer_failures: str = "raise",
                 observe: bool = True) -> pd.DataFrame:
    """Train; returns the per-round, per-peer metrics (also left in the peers' databases until stop).

    ``state_dir``: the databases keep their files there (persistence on, every write on disk before
    its reply), one folder per peer, with the configuration beside them; ``resume`` restarts such a
    run after a full stop (every database and orchestrator gone, e.g. a power loss): the databases load
    their files and every peer goes on after the last round its database completed.

    ``df.attrs["final_states"]`` is the number of distinct final models among the honest peers: a run
    that ended with more than one did not end right. ``df.attrs["events"]`` holds every peer's events.

    ``joiners`` (peers as threads only): ``{peer: round}``, peers that are not part of the group at the
    start and ask to join it once peer 0 completed that round (they take the state of the others by
    state transfer, as a newcomer does).

    ``peer_failures`` (peers as threads only): "raise" (a peer that fails fails the run) or "report" (the
    run goes on with the others, and ``df.attrs["peer_failures"]`` maps each failed peer to its error: an
    attack's effect to measure, such as honest peers giving up without a quorum).

    ``observe`` False leaves out the observer of the honest peers' disagreement round by round (the
    ``honest_*`` columns): it polls every honest database every 20 ms, about a tenth of a short run's CPU
    time. ``final_states`` still tells whether the run ended in one model."""
    if cfg.peers.placement == "ray":
        if resume or state_dir is not None or joiners or cfg.peers.urls:
            raise TrainingError("peers.placement = 'ray' starts a new run on the cluster: no state directory, "
                                "resume, joiners or peers.urls")
        from .placement import run_on_ray

        t0 = time.perf_counter()
        df = run_on_ray(cfg, timeout_s=timeout_s)
        df.attrs["wall_s"] = time.perf_counter() - t0
        return df
    if resume and state_dir is None:
        raise TrainingError("resume needs the state directory of the run")
    if joiners and (cfg.peers.mode == "process" or resume or cfg.peers.urls):
        raise TrainingError("joiners are peers started as threads of a new run on servers it starts")
    if peer_failures not in ("raise", "report") or (peer_failures == "report" and cfg.peers.mode == "process"):
        raise TrainingError("peer_failures is 'raise', or 'report' with peers as threads")
    cfg, client = _launcher_access(cfg)
    admins = _Admins(cfg)
    with ExitStack() as stack:
        if cfg.peers.urls:
            urls = list(cfg.peers.urls)
        else:
            if state_dir is not None:
                Path(state_dir).mkdir(parents=True, exist_ok=True)
                if not resume:
                    (Path(state_dir) / STATE_CONFIG).write_text(cfg.model_dump_json(indent=1))
            options = []
            for i in range(cfg.peers.count):
                # with persistence, every write is on disk before its reply (appendfsync always): a
                # restarted database has every update the peer saw completed
                workdir = None if state_dir is None else Path(state_dir) / f"peer-{i}"
                if workdir is not None:
                    workdir.mkdir(exist_ok=True)
                # a secured database needs the module for its inbox guard (TENSOR.PUSH) in any case
                module = needs_module(cfg.aggregation.backend) or (cfg.security.enabled and cfg.security.inbox_guard)
                options.append(dict(binary=cfg.peers.server, module=module, unix_socket=cfg.peers.unix_socket,
                                    persistence=cfg.peers.persistence or state_dir is not None, fsync="always",
                                    workdir=workdir, **_tls_args(cfg, i), **admins.server_args(i)))
            servers = start_servers(options)  # side by side
            for srv in servers:
                stack.callback(srv.stop)
            urls = [s.url for s in servers]
        c0 = client(urls[0], socket_timeout=10)
        stack.callback(c0.close)
        try:
            c0.delete(START_KEY)
        except redis.AuthenticationError:
            if not cfg.security.enabled:
                raise  # secured: no peer created our user yet, so this is a fresh database

        stop = threading.Event()
        shower = threading.Thread(target=_progress, args=(cfg, urls, stop, progress, client), daemon=True)
        observer = _observer(cfg, urls, client) if observe else None
        if observer is not None:
            stack.callback(observer.stop)
        t0 = time.perf_counter()
        failures: dict[int, str] = {}
        try:
            if cfg.peers.mode == "process":
                _run_processes(cfg, urls, c0, stack, shower, timeout_s, client, resume, observer, admins)
            else:
                shower.start()
                if observer is not None:
                    observer.__enter__()
                failures = _run_threads(cfg, urls, timeout_s, resume, admins, dict(joiners or {}), c0,
                                        raise_failures=peer_failures == "raise")
        except TrainingError as exc:
            causes = _server_causes(servers if not cfg.peers.urls else [])
            if causes:
                raise TrainingError(f"{exc}; {causes}") from exc
            raise
        stop.set()
        if shower.is_alive():
            shower.join(5)
        if observer is not None:
            observer.stop()
        df = collect_reports(urls, cfg.run.rounds, client)
        if observer is not None:
            df = _with_disagreement(df, cfg, observer)
        df.attrs["peer_failures"] = failures
        df.attrs["wall_s"] = time.perf_counter() - t0
        df.attrs["final_states"] = final_states(cfg, urls, client)
        return df


def _server_causes(servers: list) -> str:
    """What the logs of the databases that exited say went wrong (a full disk, a corrupt file)."""
    dead = [(i, s) for i, s in enumerate(servers) if not s.alive()]
    return "; ".join(f"the database of peer {i} exited: {s.diagnose() or 'see ' + str(s.logfile)}"
                     for i, s in dead)


def _observer(cfg: Config, urls: list[str], client) -> Observer:
    """The honest peers' disagreement, round by round (:mod:`spirt.disagreement`)."""
    from .byzantine import is_byzantine

    return Observer({i: client(u, socket_timeout=2) for i, u in enumerate(urls) if not is_byzantine(cfg, i)})


def _with_disagreement(df: pd.DataFrame, cfg: Config, observer: Observer) -> pd.DataFrame:
    """The rounds table with the honest peers' disagreement of each round (``honest_states``,
    ``honest_distance``, ``honest_average_accuracy``; the last one where they disagreed)."""
    for c in observer.clients.values():
        c.close()
    evaluator = None

    def accuracy(params: bytes) -> float:
        nonlocal evaluator
        if evaluator is None:
            from .evaluation import Evaluator

            evaluator = Evaluator(cfg)
        return evaluator.evaluate(params)[1]

    d = observer.table(accuracy)
    if df.empty or d.empty:
        return df
    attrs = dict(df.attrs)
    out = df.merge(d[["round", "honest_states", "honest_distance", "honest_average_accuracy"]], on="round",
                   how="left")
    out.attrs.update(attrs)
    return out


def final_states(cfg: Config, urls: list[str], client=_plain_client) -> int:
    """How many distinct final models the honest peers hold (their last ``state`` digests)."""
    from .byzantine import is_byzantine

    states = set()
    for i, url in enumerate(urls):
        if is_byzantine(cfg, i):
            continue
        c = client(url, socket_timeout=30)
        try:
            states.add(c.get(Keys(i).state))
        finally:
            c.close()
    return len(states)


def _tls_args(cfg: Config, i: int) -> dict:
    """How peer i's database server is started: its own server certificate where the group has a key
    folder per peer, else the group's one set; TLS required (the default whenever there are certificates)
    refuses a server binary without TLS."""
    sec = cfg.security
    if not sec.enabled:
        return {}
    from .security.provision import tls_for, tls_required

    files, _ = tls_for(sec, i)
    if files is None or files.server is None:
        return {}
    return {"tls": files.server, "require_tls": tls_required(sec, files)}


def _run_processes(cfg, urls, c0, stack, shower, timeout_s, client=_plain_client, resume=False, observer=None,
                   admins=lambda i: None):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=peer_process,
                         args=(os.getpid(), cfg.model_dump_json(), i, urls, START_KEY, False, resume, admins(i)),
                         name=f"peer-{i}") for i in range(len(urls))]
    for p in procs:
        p.start()

    def _stop_all():
        stop_processes(procs)

    stack.callback(_stop_all)
    # start only once every peer is up (torch imported, workers warm), so round times are clean
    clients = [client(u, socket_timeout=10) for u in urls]
    deadline = time.monotonic() + 300
    while not all(_up(c, i, cfg.security.enabled) for i, c in enumerate(clients)):
        dead = [p.name for p in procs if p.exitcode not in (None, 0)]
        if dead or time.monotonic() > deadline:
            raise TrainingError(f"peers failed to start: {dead or 'timeout'}")
        time.sleep(0.05)
    if observer is not None:
        observer.__enter__()
    for c in clients if cfg.security.enabled else [c0]:  # secured peers read it in their own database
        c.set(START_KEY, 1)
    shower.start()
    deadline = time.monotonic() + (timeout_s or 10**9)
    while any(p.is_alive() for p in procs):
        failed = [f"{p.name} (exit {p.exitcode})" for p in procs if p.exitcode not in (None, 0)]
        if failed:
            raise TrainingError(f"peer orchestrator(s) failed: {', '.join(failed)}")
        if time.monotonic() > deadline:
            raise TrainingError(f"training did not finish within {timeout_s} s")
        time.sleep(0.1)
    failed = [f"{p.name} (exit {p.exitcode})" for p in procs if p.exitcode != 0]
    for c in clients:
        c.close()
    if failed:
        raise TrainingError(f"peer orchestrator(s) failed: {', '.join(failed)}")


def _run_threads(cfg, urls, timeout_s, resume=False, admins=lambda i: None, joiners: dict[int, int] | None = None,
                 c0: redis.Redis | None = None, raise_failures: bool = True) -> dict[int, str]:
    """Peers as threads of this process; ``joiners`` wait until peer 0 (read through ``c0``, the
    launcher's client of its database) completed their round, then join. Returns the peers that failed
    with their errors (when not ``raise_failures``)."""
    joiners = joiners or {}
    # the group at the start does not know the joiners; a joiner knows everyone (it asks them to admit it)
    start_urls = [None if i in joiners else u for i, u in enumerate(urls)]
    peers = [Peer(cfg, i, urls if i in joiners else start_urls, admin=admins(i)) for i in range(len(urls))]
    errors: list[BaseException] = []
    failed: dict[int, str] = {}
    done = threading.Event()

    def body(p: Peer):
        try:
            if p.index in joiners:
                p.init_eval_state()
                while not done.is_set() and completed(c0) < joiners[p.index]:
                    time.sleep(0.05)
                p.join()
            p.run()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            failed[p.index] = f"{type(exc).__name__}: {exc}"[:500]
            # a failed peer looks failed to the others, as a crashed process does: its heartbeat stops
            # now, not when the run ends (the others would count it live, and take its snapshots)
            p.membership.close()

    try:
        for p in peers:
            if p.index in joiners:
                continue
            if resume:
                p.resume()
            else:
                p.init_params()
        threads = [threading.Thread(target=body, args=(p,), name=f"peer-{p.index}") for p in peers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s)
        done.set()
        if any(t.is_alive() for t in threads):
            raise TrainingError(f"training did not finish within {timeout_s} s")
        if errors and raise_failures:
            raise TrainingError(f"peer failed: {errors[0]!r}") from errors[0]
        return failed
    finally:
        done.set()
        for p in peers:
            p.close()


def completed(c0: redis.Redis) -> int:
    """The last round peer 0 completed, from its state (``round|digest``, which the launcher of a secured
    run may read); -1 before its first, or when it does not answer."""
    try:
        return int(c0.get(Keys(0).state).partition(b"|")[0])
    except (AttributeError, TypeError, ValueError, redis.RedisError):
        return -1


# -- reports -----------------------------------------------------------------------------------------

PHASES = ["compute", "store", "average", "barrier", "exchange", "aggregate", "update", "cleanup"]


def summarize(df: pd.DataFrame) -> dict:
    """Headline figures of one run."""
    last = df[df["round"] == df["round"].max()]
    honest = last[~last["byzantine"]] if "byzantine" in last else last
    tcols = [f"t_{p}" for p in PHASES if f"t_{p}" in df]
    mean_t = df[tcols].mean()
    round_t = df["t_round"].mean() - df.get("t_evaluate", pd.Series([0.0])).fillna(0).mean()
    non_compute = float(mean_t.drop("t_compute").sum())
    return {
        "final_accuracy": float(honest["accuracy"].mean()),
        "rounds": int(df["round"].max() + 1),
        "peers": int(df["peer"].nunique()),
        "mean_round_s": float(round_t),
        "compute_s": float(mean_t["t_compute"]),
        "non_compute_s": non_compute,
        "non_compute_share": non_compute / (non_compute + float(mean_t["t_compute"])),
        "wall_s": float(df.attrs.get("wall_s", float("nan"))),
        "final_states": int(df.attrs.get("final_states", 1)),
        # a run whose reports miss peers says so in its headline
        **({"peers_not_answering": sorted(df.attrs["missing"])} if df.attrs.get("missing") else {}),
        **({"reports_rejected": "; ".join(f"peer {i}: {why}" for i, why in sorted(df.attrs["rejected"].items()))}
           if df.attrs.get("rejected") else {}),
    }


def write_run_reports(df: pd.DataFrame, out_dir: str | Path, label: str = "") -> dict:
    from .reports import plot_rounds, write_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"rounds{('_' + label) if label else ''}"
    cols = ["round", "peer", "loss", "accuracy", "test_loss", "functions_ok", "functions_failed",
            "peers_aggregated", "peers_excluded", "byzantine"] + [c for c in df.columns if c.startswith("t_")]
    cols += [c for c in ("honest_states", "honest_distance", "honest_average_accuracy") if c in df.columns]
    attrs = dict(df.attrs)
    df = df.sort_values(["round", "peer"])[cols]
    df.attrs.update(attrs)
    summary = summarize(df)
    df.to_csv(out / f"{stem}.csv", index=False)
    # what the peers said happened (exclusions, state transfers, rollbacks, resumes...): a round missing
    # from a peer's rows is explained there
    events = attrs.get("events")
    if events is None:
        events = pd.DataFrame(columns=EVENT_COLUMNS)
    events.to_csv(out / f"{stem}_events.csv", index=False)
    counts = events["event"].value_counts()
    said = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())) or "none"
    evals = df.dropna(subset=["accuracy"])
    notes = "\n".join(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in summary.items())
    write_table(evals, out, f"{stem}_eval", f"Evaluated rounds {label}".strip(), notes)
    (out / f"{stem}.md").write_text(
        f"# Training run {label}\n\n{notes}\n- events: {said}\n\nPer-round metrics of every peer: `{stem}.csv`; "
        f"the peers' events: `{stem}_events.csv`; evaluated rounds: `{stem}_eval.md`; curves: `{stem}.png`.\n"
    )
    plot_rounds(df, out / f"{stem}.png", title=f"SPIRT training {label}".strip())
    return summary
