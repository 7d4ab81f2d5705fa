"""Scaling: round time, each phase of a round and the exchange's traffic versus the number of peers.

Each cell is one real training (:func:`spirt.runner.run_training`): P peers as threads of this process,
each with its own database server (embedded Valkey, started here so that its counters can be read),
gradient functions run inline, a few rounds after one warm-up round. Per cell:

- the per-phase wall times every peer records per round (``t_compute`` ... ``t_update``, the warm-up
  round left out);
- the traffic, measured by the database servers: ``INFO stats`` (bytes in and out, commands) and
  ``INFO commandstats`` (calls per command) over the whole training, and every command with its request
  and reply size from the servers' command logs (``COMMANDLOG`` with a threshold of 0 bytes). A command
  is exchange traffic when it is one of the pushes of another peer into the inbox (``SET in:q:r``, its
  wake-up ``RPUSH`` / ``LTRIM notify:q``, or ``TENSOR.PUSH``); everything else (the own orchestrator and
  functions, heartbeats, the members' liveness and agreement reads, the launcher's observer) is local;
- CPU seconds, which contention inflates much less than wall time: this process (every orchestrator
  and its inline functions) and every database server, between the moment the slowest peer completed
  the warm-up round and the moment it completed the last one.

This host has 2 cores: with P peers on it, the wall times measure how P peers share 2 cores as much as
the protocol. The report therefore gives the contention-free quantities (messages, bytes, CPU per peer)
beside them, fits a cost model whose contention term is explicit, checks it against the measured points
(fitted on the small groups, held out on the large ones) and extrapolates it, without the contention,
to peers on hosts of their own linked at 1 and 10 Gbit/s, up to 1,000 peers.

    spirt bench scaling                     # P = 2, 4, 8, 16, 32; mlp and cnn -> reports/scaling.*
    spirt bench scaling -- --quick --out /tmp/s
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_PEERS = (2, 4, 8, 16, 32)
DEFAULT_MODELS = ("mlp", "cnn")
#: cores of the host the measured points come from (the contention term of the model)
CORES = 2
#: the model is fitted on the groups up to this size; the larger ones are held out to check it
FIT_MAX_PEERS = 8
#: stated network parameters of the extrapolation: link rates (bit/s) and round trip (s)
LINKS_BPS = (1e9, 10e9)
RTT_S = 0.5e-3
#: memory a peer's database host gives its inbox (bytes): where the all-to-all inbox stops fitting
INBOX_MEMORY = 16e9
EXTRAPOLATE_TO = 1000
#: ResNet-18 (torchvision, 10 classes): floats, and the compute of K = 2 gradient functions of batch 16
#: measured on this host (``reports/round_time.md``, ``t_compute``), for the extrapolation
RESNET18_FLOATS = 11_689_512
RESNET18_COMPUTE_S = 0.80
#: degree of the sparse (expander / gossip) topology and fan-in of the tree in the alternatives
GOSSIP_DEGREE = math.ceil(math.log2(EXTRAPOLATE_TO))
TREE_FANIN = 32
#: phases as the peers record them (``t_<phase>``); ``exchange`` is the push into the other inboxes
PHASES = ("compute", "store", "average", "exchange", "barrier", "aggregate", "update", "cleanup")
#: phases of the model: the functions' work, the peer's local O(d) work, the exchange, the wait, the rule
MODEL_PHASES = {"compute": ("compute", "store"), "local": ("average", "update", "cleanup"),
                "exchange": ("exchange",), "barrier": ("barrier",), "aggregate": ("aggregate",)}
EXCHANGE_COMMANDS = {b"SET", b"RPUSH", b"LTRIM"}


@dataclass(frozen=True)
class Setting:
    """What every cell shares."""

    rounds: int = 10  # measured rounds, after the warm-up
    warmup: int = 1
    functions: int = 2
    batch_size: int = 32
    limit_train: int = 4096
    limit_test: int = 256
    seed: int = 0

    @property
    def total_rounds(self) -> int:
        return self.rounds + self.warmup


QUICK = Setting(rounds=2, warmup=1, limit_train=1024, limit_test=128)


def make_config(model: str, peers: int, setting: Setting, urls: Sequence[str]):
    """The configuration of one cell: peers as threads, functions inline (the cheapest way to run many
    peers on one host), evaluation only after the last round, and deadlines far above what contention
    can cost so that no peer is excluded for being slow (a 2-core host running 32 peers)."""
    from ..config import load_config

    return load_config(None, {
        "run.name": f"scaling-{model}-{peers}", "run.seed": setting.seed, "run.rounds": setting.total_rounds,
        "run.eval_every": 10 * setting.total_rounds, "run.eval_samples": setting.limit_test,
        "model.name": model, "data.limit_train": setting.limit_train, "data.limit_test": setting.limit_test,
        "peers.count": peers, "peers.functions": setting.functions, "peers.batch_size": setting.batch_size,
        "peers.mode": "thread", "peers.urls": list(urls), "executor.kind": "inline",
        "barrier.timeout_s": 300.0, "membership.heartbeat_s": 10.0, "membership.quorum_timeout_s": 600.0,
    })


# -- the servers and what they count ------------------------------------------------------------------

def start_servers(n: int) -> list:
    """``n`` database servers with the tensor module, each logging every command with its request and
    reply size and its execution time (thresholds of 0, logs long enough for the whole training)."""
    from ..servers import start_server

    servers = []
    try:
        for _ in range(n):
            srv = start_server("valkey", module=True, unix_socket=True)
            servers.append(srv)
            c = srv.client()
            for kind in ("request", "reply"):
                c.config_set(f"commandlog-{kind}-larger-than", 0)
                c.config_set(f"commandlog-large-{kind}-max-len", 1_000_000)
            # and every command's execution time (in microseconds): the in-database mean's cost per float
            c.config_set("commandlog-execution-slower-than", 0)
            c.config_set("commandlog-slow-execution-max-len", 1_000_000)
            c.close()
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def stop_servers(servers: Iterable) -> None:
    for srv in servers:
        srv.stop()


def reset_counters(client) -> None:
    """Zero the statistics and the command logs: what follows is the training alone."""
    client.config_resetstat()
    for kind in ("large-request", "large-reply", "slow"):
        client.execute_command("COMMANDLOG", "RESET", kind)


def host_busy_s() -> float:
    """CPU seconds the whole host spent busy since it booted (every core; ``/proc/stat``)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal, *_ = map(int, f.readline().split()[1:])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_split(clients: Sequence) -> tuple[float, float]:
    """(CPU seconds of this process and of the servers of ``clients``, of the whole host): their
    difference over a cell is what other processes took of the host meanwhile."""
    return time.process_time() + sum(map(server_cpu, clients)), host_busy_s()


def server_cpu(client) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def is_exchange(args: Sequence[bytes]) -> bool:
    """A command another peer sends into this database's inbox when it publishes: the vector
    (``SET ...:in:<sender>:<round>``) and its wake-up (``RPUSH`` / ``LTRIM ...:notify:<sender>``), or the
    guarded inbox's ``TENSOR.PUSH``."""
    if not args:
        return False
    cmd = args[0].upper()
    if cmd == b"TENSOR.PUSH":
        return True
    return cmd in EXCHANGE_COMMANDS and len(args) > 1 and (b":in:" in args[1] or b":notify:" in args[1])


def inputs(args: Sequence[bytes]) -> int:
    """How many vectors a logged ``TENSOR.AVG dst src...`` averaged (the log keeps 32 arguments and says
    how many more there were)."""
    n = len(args) - 2
    last = args[-1]
    if last.startswith(b"... (") and b"more arguments" in last:
        n += int(last[5:].split()[0]) - 1
    return n


def push_round(args: Sequence[bytes]) -> int | None:
    """The round of a pushed vector (``SET {p<q>}:in:<sender>:<round>``); None for other commands."""
    if args[0].upper() != b"SET" or b":in:" not in args[1]:
        return None
    return int(args[1].rsplit(b":", 1)[1])


def traffic(clients: Sequence, rounds: int) -> tuple[dict, Counter]:
    """The group's traffic per round over the whole training (``rounds`` of them), from every server:
    totals from ``INFO``, the exchange's share from the command logs; and the pushes counted per round
    (each push is one message: a pipeline of the vector and its wake-up, one round trip)."""
    net_in = net_out = commands = 0
    calls: Counter = Counter()
    ex_in = ex_out = ex_cmds = 0
    pushes: Counter = Counter()
    averages: dict[int, list[int]] = {}  # inputs -> execution times of TENSOR.AVG (us)
    for c in clients:
        stats = c.info("stats")  # read first: the reads below are counted too
        net_in += stats["total_net_input_bytes"]
        net_out += stats["total_net_output_bytes"]
        commands += stats["total_commands_processed"]
        for name, s in c.info("commandstats").items():
            calls[name.removeprefix("cmdstat_")] += s["calls"]
        for _, _, size, args, *_ in c.execute_command("COMMANDLOG", "GET", -1, "large-request"):
            if is_exchange(args):
                ex_in += size
                ex_cmds += 1
                r = push_round(args)
                if r is not None:
                    pushes[r] += 1
        for _, _, size, args, *_ in c.execute_command("COMMANDLOG", "GET", -1, "large-reply"):
            if is_exchange(args):
                ex_out += size
        for _, _, usec, args, *_ in c.execute_command("COMMANDLOG", "GET", -1, "slow"):
            if args and args[0].upper() == b"TENSOR.AVG":
                averages.setdefault(inputs(args), []).append(usec)
    n_push = sum(pushes.values())
    out = {
        "exchange_messages": n_push / rounds,
        "exchange_commands": ex_cmds / rounds,
        "exchange_in_bytes": ex_in / rounds,
        "exchange_out_bytes": ex_out / rounds,
        "net_in_bytes": net_in / rounds,
        "net_out_bytes": net_out / rounds,
        "local_in_bytes": (net_in - ex_in) / rounds,
        "local_out_bytes": (net_out - ex_out) / rounds,
        "commands": commands / rounds,
        "local_commands": (commands - ex_cmds) / rounds,
        "push_bytes": ex_in / n_push if n_push else float("nan"),
        # the in-database mean, as the servers timed it: over the K gradients (average) and over the
        # P vectors (aggregate; the same when P = K)
        **{f"db_avg_{n}_us": float(np.median(t)) for n, t in sorted(averages.items())},
        **{f"calls_{name}": n / rounds for name, n in sorted(calls.items())},
    }
    return out, pushes


class CpuTrace(threading.Thread):
    """Samples, until stopped, the CPU time of this process (every orchestrator and its inline
    functions) and of every server, with the wall time (``time.time()``, as the peers' metrics). The CPU
    of a stretch of the training is read off by interpolation at its ends (:meth:`between`), so the
    sampling need not land on round boundaries. ``on_round`` sees the slowest peer's completed round."""

    def __init__(self, clients: Sequence, on_round: Callable[[int], None] = lambda r: None):
        super().__init__(name="scaling-cpu", daemon=True)
        from ..keys import Keys

        self.clients, self.on_round = clients, on_round
        self.keys = [Keys(i).completed for i in range(len(clients))]
        # one INFO per server and sample: fewer samples per second for larger groups, whose rounds are longer
        self.poll_s = min(0.1, max(0.01, 0.003 * len(clients)))
        self.samples: list[tuple[float, float, float]] = []  # (wall, own cpu, servers' cpu)
        self._halt = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self._sample()
                self._halt.wait(self.poll_s)
            self._sample()
        except Exception as exc:  # noqa: BLE001 - reported with the cell's CPU figures
            self.error = exc

    def _sample(self) -> None:
        t, own = time.time(), time.process_time()
        self.samples.append((t, own, sum(map(server_cpu, self.clients))))
        done = [c.get(k) for c, k in zip(self.clients, self.keys, strict=True)]
        self.on_round(min(-2 if x is None else int(x) for x in done))

    def stop(self) -> None:
        self._halt.set()
        self.join(30)

    def between(self, t0: float, t1: float) -> tuple[float, float]:
        """CPU seconds (this process, the servers) from wall time ``t0`` to ``t1``."""
        if self.error is not None:
            raise RuntimeError(f"the CPU trace failed: {self.error!r}") from self.error
        ts, own, srv = (np.array(x) for x in zip(*self.samples, strict=True))
        return (float(np.interp(t1, ts, own) - np.interp(t0, ts, own)),
                float(np.interp(t1, ts, srv) - np.interp(t0, ts, srv)))


def cpu_per_round(trace: CpuTrace, df: pd.DataFrame, warmup: int, rounds: int) -> dict:
    """CPU per round of the group (this process; the servers) and the group's round period, from the
    moment the slowest peer completed the warm-up to the moment it completed the last round."""
    ends = df.groupby("round")["wall_end"].max()
    t0, t1 = float(ends[warmup - 1]), float(ends[warmup + rounds - 1])
    own, srv = trace.between(t0, t1)
    return {"cpu_process_s": own / rounds, "cpu_servers_s": srv / rounds, "round_period_s": (t1 - t0) / rounds}


# -- one cell ------------------------------------------------------------------------------------------

def measure(model: str, peers: int, setting: Setting = Setting(), on_round: Callable[[int], None] = lambda r: None,
            timeout_s: float = 3600.0) -> tuple[dict, Counter]:
    """One training of ``peers`` peers on ``model``; its row (see the module's docstring) and the pushes
    counted per round. Every server started here is stopped before it returns."""
    from ..keys import Keys
    from ..runner import run_training

    servers = start_servers(peers)
    clients = []
    try:
        clients = [s.client(socket_timeout=60) for s in servers]
        cfg = make_config(model, peers, setting, [s.url for s in servers])
        for c in clients:
            reset_counters(c)
        trace = CpuTrace(clients, on_round)
        trace.start()
        t0, before = time.perf_counter(), cpu_split(clients)
        try:
            df = run_training(cfg, progress=False, timeout_s=timeout_s)
        finally:
            trace.stop()
        wall = time.perf_counter() - t0
        after = cpu_split(clients)
        others = (after[1] - before[1]) - (after[0] - before[0])
        tr, pushes = traffic(clients, setting.total_rounds)
        cpu = cpu_per_round(trace, df, setting.warmup, setting.rounds)
        width = int(clients[0].strlen(Keys(0).params))  # d, as the peers hold it
    finally:
        for c in clients:
            c.close()
        stop_servers(servers)
    row = {"model": model, "peers": peers, "functions": setting.functions, "batch_size": setting.batch_size,
           "rounds": setting.rounds, "d_floats": width // 4, "d_bytes": width,
           **phase_times(df, setting.warmup), "run_wall_s": wall, "other_cpu_cores": others / wall,
           **cpu, "cpu_process_peer_s": cpu["cpu_process_s"] / peers, "cpu_servers_peer_s": cpu["cpu_servers_s"] / peers,
           **tr}
    row["exchange_messages_peer"] = row["exchange_messages"] / peers
    row["exchange_bytes_peer"] = row["exchange_in_bytes"] / peers
    row["push_overhead_bytes"] = row["push_bytes"] - width
    row["exchange_messages_min_round"] = min(pushes.values(), default=0)
    row["exchange_messages_max_round"] = max(pushes.values(), default=0)
    row["excluded"] = int((df["peers_excluded"].fillna("") != "").sum())
    return row, pushes


def phase_times(df: pd.DataFrame, warmup: int) -> dict:
    """Mean wall time of each phase and of the round (evaluation left out) over the peers and the rounds
    after the warm-up."""
    m = df[df["round"] >= warmup]
    out = {f"t_{p}": float(m[f"t_{p}"].mean()) for p in PHASES if f"t_{p}" in m}
    out["t_round"] = float((m["t_round"] - m.get("t_evaluate", 0).fillna(0)).mean())
    return out


def run(models: Sequence[str] = DEFAULT_MODELS, peers: Sequence[int] = DEFAULT_PEERS, setting: Setting = Setting(),
        progress: bool = True) -> tuple[list[dict], dict]:
    """Every cell, smallest groups first; returns the rows and, per cell, the pushes counted per round."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    cells = [(m, p) for p in sorted(peers) for m in models]
    rows, pushes = [], {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), disable=not progress, transient=False) as prog:
        overall = prog.add_task("scaling: cells", total=len(cells))
        for model, p in cells:
            task = prog.add_task(f"{model}, P = {p}: rounds", total=setting.total_rounds)
            row, counted = measure(model, p, setting, lambda r, t=task: prog.update(t, completed=max(r + 1, 0)))
            prog.update(task, completed=setting.total_rounds)
            prog.advance(overall)
            rows.append(row)
            pushes[model, p] = counted
    return rows, pushes


# -- the cost model --------------------------------------------------------------------------------------

def contention(peers) -> np.ndarray:
    """How many peers share each core of this host: every phase of every peer runs at 1/s of a core's
    speed once the peers outnumber the cores (the barrier keeps them in the same phase)."""
    return np.maximum(1.0, np.asarray(peers, dtype=float) / CORES)


def _features(phase: str, df: pd.DataFrame, models: Sequence[str]) -> dict[str, np.ndarray]:
    """The model's terms of one phase, per measured point, each multiplied by the contention factor.

    - compute (functions and their database I/O): K gradient functions of ``c_<model>`` seconds each;
    - local (average, update, cleanup): ``u`` seconds per byte of the model (memory-bound O(d) work);
    - exchange (the push): ``e0`` plus ``e1`` seconds per byte pushed, (P - 1) pushes of D = d + h bytes;
    - barrier (the wait for the last vector): ``b0`` plus ``b1`` per peer waited for;
    - aggregate (the mean of P vectors in the database): ``g0`` plus ``g1`` seconds per float read.
    """
    s = contention(df["peers"])
    p = df["peers"].to_numpy(float)
    big_d = df["push_bytes"].to_numpy(float)
    if phase == "compute":
        return {f"c_{m}": s * df["functions"].to_numpy(float) * (df["model"] == m).to_numpy(float) for m in models}
    if phase == "local":
        return {"u": s * df["d_bytes"].to_numpy(float)}
    if phase == "exchange":
        return {"e0": s, "e1": s * (p - 1) * big_d}
    if phase == "barrier":
        return {"b0": s, "b1": s * (p - 1)}
    if phase == "aggregate":
        return {"g0": s, "g1": s * p * df["d_floats"].to_numpy(float)}
    raise ValueError(phase)


def measured_phase(df: pd.DataFrame, phase: str) -> np.ndarray:
    return sum(df[f"t_{p}"].to_numpy(float) for p in MODEL_PHASES[phase])


def fit_mask(df: pd.DataFrame, fit_max: int = FIT_MAX_PEERS) -> np.ndarray:
    """The points the model is fitted on: the groups up to ``fit_max`` peers, unless that leaves fewer
    than two group sizes (then every point, and nothing is held out)."""
    mask = (df["peers"] <= fit_max).to_numpy()
    return mask if df.loc[mask, "peers"].nunique() >= 2 else np.ones(len(df), dtype=bool)


def nonnegative_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (a cost is never negative; noise on few points can make
    a free fit say so). A phase has at most a few terms: the best of the unconstrained fits on every
    subset of them whose coefficients are all >= 0 is the constrained optimum."""
    from itertools import combinations

    n = a.shape[1]
    best, best_err = np.zeros(n), float(y @ y)
    for k in range(1, n + 1):
        for cols in combinations(range(n), k):
            coef, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
            if (coef < 0).any():
                continue
            err = float(np.sum((a[:, cols] @ coef - y) ** 2))
            if err < best_err:
                best, best_err = np.zeros(n), err
                best[list(cols)] = coef
    return best


def fit(df: pd.DataFrame, fit_max: int = FIT_MAX_PEERS) -> dict[str, float]:
    """Non-negative least-squares constants of every phase's terms (:func:`_features`) on the fitted points, and the
    push overhead ``h`` (bytes a push carries beyond the vector) from the measured exchange bytes."""
    mask = fit_mask(df, fit_max)
    models = sorted(df["model"].unique())
    consts: dict[str, float] = {}
    for phase in MODEL_PHASES:
        feats = _features(phase, df, models)
        a = np.column_stack(list(feats.values()))[mask]
        coef = nonnegative_lstsq(a, measured_phase(df, phase)[mask])
        consts.update(zip(feats, map(float, coef), strict=True))
    # exchange bytes per peer = (P - 1)(d + h): h by least squares over the same points
    x = (df["peers"] - 1).to_numpy(float)[mask]
    y = (df["exchange_bytes_peer"] - (df["peers"] - 1) * df["d_bytes"]).to_numpy(float)[mask]
    consts["h"] = float(x @ y / (x @ x))
    points = db_mean_points(df) if any(c.startswith("db_avg_") for c in df) else pd.DataFrame()
    if len(points) and points["inputs"].nunique() >= 2:
        consts.update(fit_db_mean(points))
    return consts


def db_mean_points(df: pd.DataFrame) -> pd.DataFrame:
    """The in-database mean as the servers timed it, one point per cell and input count: over the K
    gradients (the average phase) and over the P vectors (the aggregate phase)."""
    rows = []
    for _, r in df.iterrows():
        for n in sorted({int(r["functions"]), int(r["peers"])}):
            t = r.get(f"db_avg_{n}_us", float("nan"))
            if t == t:
                rows.append({"model": r["model"], "peers": int(r["peers"]), "inputs": n, "floats": int(r["d_floats"]),
                             "measured_us": float(t)})
    return pd.DataFrame(rows)


def fit_db_mean(points: pd.DataFrame) -> dict[str, float]:
    """``TENSOR.AVG`` over n vectors of f floats takes ``(w_db + g_db n) f`` seconds: each input float
    read, each output float written (non-negative least squares over every point: the servers' own timing
    of the command, which the peers sharing the cores inflate much less than the phases' wall times)."""
    f = points["floats"].to_numpy(float)
    a = np.column_stack([f, points["inputs"] * f])
    w_db, g_db = nonnegative_lstsq(a, points["measured_us"].to_numpy(float) * 1e-6)
    return {"w_db": float(w_db), "g_db": float(g_db)}


def predict(df: pd.DataFrame, consts: dict[str, float]) -> pd.DataFrame:
    """The model's value of every phase, the round, the exchange bytes and messages at the measured
    points (this host, contention included)."""
    models = sorted({k[2:] for k in consts if k.startswith("c_")})
    out = pd.DataFrame({"model": df["model"], "peers": df["peers"]})
    for phase in MODEL_PHASES:
        feats = _features(phase, df, models)
        out[phase] = sum(consts.get(k, float("nan")) * v for k, v in feats.items())
    out["round"] = out[list(MODEL_PHASES)].sum(axis=1)
    p = df["peers"].to_numpy(float)
    out["exchange_bytes_peer"] = (p - 1) * (df["d_bytes"] + consts["h"])
    out["exchange_messages"] = p * (p - 1)
    return out


def checks(df: pd.DataFrame, consts: dict[str, float], fit_max: int = FIT_MAX_PEERS) -> pd.DataFrame:
    """Model versus measured at every point, with the relative error (model / measured - 1) and whether
    the point was fitted or held out."""
    pred = predict(df, consts)
    mask = fit_mask(df, fit_max)
    rows = []
    for i in range(len(df)):
        row = {"model": df["model"].iat[i], "peers": int(df["peers"].iat[i]), "set": "fit" if mask[i] else "held out"}
        for what in [*MODEL_PHASES, "round"]:
            measured = float(df["t_round"].iat[i]) if what == "round" else float(measured_phase(df.iloc[[i]], what)[0])
            row[f"{what}_measured_s"] = measured
            row[f"{what}_model_s"] = float(pred[what].iat[i])
            row[f"{what}_err"] = float(pred[what].iat[i]) / measured - 1 if measured > 0 else float("nan")
        for what, col in (("bytes", "exchange_bytes_peer"), ("messages", "exchange_messages")):
            row[f"{what}_err"] = float(pred[col].iat[i]) / float(df[col].iat[i]) - 1
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Workload:
    """What the extrapolation needs of a model: its floats and the compute of a peer's K functions."""

    name: str
    floats: int
    compute_s: float


def workloads(df: pd.DataFrame, consts: dict[str, float]) -> list[Workload]:
    """The measured models (compute from the fit, without contention) and ResNet-18."""
    out = []
    for m, g in df.groupby("model", sort=False):
        out.append(Workload(m, int(g["d_floats"].iat[0]), consts[f"c_{m}"] * float(g["functions"].iat[0])))
    out.append(Workload("resnet18", RESNET18_FLOATS, RESNET18_COMPUTE_S))
    return out


def dedicated(w: Workload, peers, bps: float, consts: dict[str, float], topology: str = "all-to-all") -> dict:
    """Round time and traffic of one peer with a host of its own (no contention: s = 1), its pushes over a
    link of ``bps`` bit/s with round trip :data:`RTT_S`. A byte leaves no faster than the link and than
    the measured loopback cost per byte pushed (``e1``, the CPU on both ends). Topologies:

    - ``all-to-all`` (SPIRT): P - 1 pushes out and P - 1 vectors in per peer (concurrently: one round trip,
      then the link's time for (P - 1) D bytes, ingress and egress in parallel); the mean of P vectors;
    - ``gossip``: each peer exchanges with :data:`GOSSIP_DEGREE` neighbours of an expander graph and
      averages k + 1 vectors (an approximate average: the models agree only after O(log P) rounds);
    - ``tree``: reduce up and broadcast down a tree of fan-in :data:`TREE_FANIN`, 2 levels' worth of round
      trips and f vectors per level (the exact mean, but an inner node sees and can forge its subtree's sum).
    """
    p = np.asarray(peers, dtype=float)
    d = w.floats * 4
    big_d = d + consts["h"]
    per_byte = max(8.0 / bps, consts["e1"])
    base = w.compute_s + consts["u"] * d + consts["e0"] + consts["b0"]
    if topology == "all-to-all":
        fan, levels = p - 1, 1.0
        aggregated = p
        messages = p * (p - 1)
    elif topology == "gossip":
        fan, levels = np.minimum(p - 1, GOSSIP_DEGREE), 1.0
        aggregated = fan + 1
        messages = p * fan
    elif topology == "tree":
        fan = np.minimum(p - 1, TREE_FANIN)
        levels = np.ceil(np.log(p) / np.log(TREE_FANIN))
        aggregated = fan + 1
        messages = 2 * (p - 1)
        levels = 2 * levels  # up, then down
    else:
        raise ValueError(topology)
    wire = levels * (RTT_S + fan * big_d * per_byte)
    # the mean of the vectors: the servers' own per-float cost where measured (the phase's fit cannot
    # tell it from contention on this host), else the phase's fit
    if "g_db" in consts:
        agg = levels * (consts["w_db"] + consts["g_db"] * aggregated) * w.floats
    else:
        agg = levels * (consts["g0"] + consts["g1"] * aggregated * w.floats)
    # the barrier: b0 and the last vector's arrival (the wire term); its b1 (P - 1) growth on this host is
    # the peers waiting for each other's share of the cores, which a host per peer does not have
    return {"round_s": base + wire + agg, "exchange_s": wire, "compute_s": w.compute_s,
            "aggregate_s": agg, "messages_group": messages, "messages_peer": fan,
            "bytes_peer": fan * big_d, "bytes_group": messages * big_d, "inbox_bytes": fan * big_d}


def extrapolation(ws: Sequence[Workload], consts: dict[str, float], peers=(2, 32, 100, EXTRAPOLATE_TO),
                  topologies=("all-to-all",)) -> pd.DataFrame:
    rows = []
    for w in ws:
        for bps in LINKS_BPS:
            for topo in topologies:
                for p in peers:
                    r = dedicated(w, p, bps, consts, topo)
                    rows.append({"model": w.name, "d_floats": w.floats, "link_gbit": bps / 1e9, "topology": topo,
                                 "peers": p, **{k: float(v) for k, v in r.items()}})
    return pd.DataFrame(rows)


def limits(ws: Sequence[Workload], consts: dict[str, float]) -> pd.DataFrame:
    """Where all-to-all breaks, per model and link: the group size at which a peer's exchange on the wire
    takes as long as its compute (beyond it the round time is mostly the exchange), at which it takes
    ten times as long, and at which one round's inbox ((P - 1) D bytes) exceeds :data:`INBOX_MEMORY`."""
    rows = []
    for w in ws:
        big_d = w.floats * 4 + consts["h"]
        for bps in LINKS_BPS:
            per_push = big_d * max(8.0 / bps, consts["e1"])
            rows.append({"model": w.name, "d_floats": w.floats, "link_gbit": bps / 1e9, "compute_s": w.compute_s,
                         "push_s": per_push,
                         "peers_exchange_eq_compute": 1 + w.compute_s / per_push,
                         "peers_exchange_10x_compute": 1 + 10 * w.compute_s / per_push,
                         "peers_inbox_full": 1 + INBOX_MEMORY / big_d})
    return pd.DataFrame(rows)


# -- reports ---------------------------------------------------------------------------------------------

#: the report's main table (the CSV has every measured column, per-command calls included)
TABLE = ["model", "peers", "t_round", "round_period_s", *[f"t_{p}" for p in PHASES if p != "cleanup"],
         "cpu_process_peer_s", "cpu_servers_peer_s", "exchange_messages", "exchange_messages_peer",
         "exchange_in_bytes", "exchange_bytes_peer", "local_in_bytes", "local_out_bytes", "commands", "excluded"]
CONSTANT_UNITS = {"c_": "s per gradient function", "u": "s per byte of the model", "e0": "s per push phase",
                  "e1": "s per byte pushed", "b0": "s", "b1": "s per peer waited for", "g0": "s",
                  "g1": "s per float aggregated", "h": "bytes per push beyond the vector",
                  "w_db": "s per float written (TENSOR.AVG, in the server)", "g_db": "s per float averaged (in the server)"}


def _unit(name: str) -> str:
    return CONSTANT_UNITS.get(name) or CONSTANT_UNITS["c_"]


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f} MB" if x < 1e9 else f"{x / 1e9:,.1f} GB"


def growth(df: pd.DataFrame, column: str) -> float:
    """The exponent of ``column`` in P (least squares on the log-log points of every model)."""
    ok = df[df[column] > 0]
    if ok["peers"].nunique() < 2:
        return float("nan")
    return float(np.polyfit(np.log(ok["peers"]), np.log(ok[column]), 1)[0])


def db_mean_lines(df: pd.DataFrame, consts: dict[str, float]) -> list[str]:
    """The in-database mean's own timing, fitted and checked, for the report (none if not measured)."""
    if "g_db" not in consts:
        return []
    pts = db_mean_points(df)
    pts["model_us"] = (consts["w_db"] + consts["g_db"] * pts["inputs"]) * pts["floats"] * 1e6
    pts["err"] = pts["model_us"] / pts["measured_us"] - 1
    return [
        "The aggregate phase's wall time cannot tell the mean's growth in P from the contention (both grow "
        "with P), so the mean's own cost is taken where nothing else is: each server timed every command "
        "(`COMMANDLOG` of execution times, threshold 0), and `TENSOR.AVG` over n vectors of f floats is fitted "
        f"as (w_db + g_db n) f (each output float written, each input float read): w_db = "
        f"{consts['w_db'] * 1e9:.3f} ns, g_db = {consts['g_db'] * 1e9:.3f} ns per float"
        f" ({4 / consts['g_db'] / 1e9 if consts['g_db'] else float('inf'):.1f} GB/s read). Median "
        "execution time per cell (n = K for the average phase, n = P for the aggregate):",
        "",
        pts.to_markdown(index=False, floatfmt=".3g"),
        "",
        "The extrapolation aggregates with (w_db + g_db P) f.",
        "",
    ]


def _direction(chk: pd.DataFrame, peers: int, phase: str) -> str:
    """How the model misses ``phase`` at ``peers`` (the mean over the models), in words."""
    e = float(chk.loc[chk["peers"] == peers, f"{phase}_err"].mean())
    return f"{'over' if e > 0 else 'under'}estimates {abs(e):.0%} of"


def pushes_check(df: pd.DataFrame) -> str:
    """Whether every round of every cell had P(P - 1) pushes, in words."""
    want = df["peers"] * (df["peers"] - 1)
    bad = df[(df["exchange_messages_min_round"] != want) | (df["exchange_messages_max_round"] != want)]
    if bad.empty:
        return "every round of every cell had exactly P(P - 1) pushes (`exchange_messages`)"
    cells = ", ".join(f"{m} P = {p}" for m, p in zip(bad["model"], bad["peers"], strict=True))
    return (f"not every round had P(P - 1) pushes ({cells}: see `exchange_messages_min_round` / `_max_round`; "
            "a peer was excluded or its push refused)")


def markdown(df: pd.DataFrame, consts: dict[str, float], chk: pd.DataFrame, ext: pd.DataFrame, lim: pd.DataFrame,
             alt: pd.DataFrame, setting: Setting, command: str, wall_s: float) -> str:
    held = chk[chk["set"] == "held out"]
    fitted = chk[chk["set"] == "fit"]
    err = lambda g, c: f"{g[c].abs().median():.0%} median, {g[c].abs().max():.0%} max" if len(g) else "none"  # noqa: E731
    per_peer = df.assign(exists_peer=df["calls_exists"] / df["peers"],
                         cpu_peer=df["cpu_process_peer_s"] + df["cpu_servers_peer_s"])
    big_groups = per_peer[per_peer["peers"] >= min(8, df["peers"].max())]
    big = df["peers"].max()
    checks_at_big = float(per_peer.loc[per_peer["peers"] == big, "exists_peer"].mean())
    checks_at_far = checks_at_big * (EXTRAPOLATE_TO / big) ** 2
    cpu_small = float(per_peer.loc[per_peer["peers"] == df["peers"].min(), "cpu_peer"].mean())
    cpu_big = float(per_peer.loc[per_peer["peers"] == big, "cpu_peer"].mean())
    consts_md = "\n".join(f"| `{k}` | {v:.4g} | {_unit(k)} |" for k, v in consts.items())
    show = chk[["model", "peers", "set", "round_measured_s", "round_model_s", "round_err",
                *[f"{p}_err" for p in MODEL_PHASES], "bytes_err", "messages_err"]]
    ext_show = ext[ext["peers"] == EXTRAPOLATE_TO][["model", "d_floats", "link_gbit", "round_s", "compute_s",
                                                     "exchange_s", "aggregate_s", "messages_peer", "messages_group",
                                                     "bytes_peer", "bytes_group", "inbox_bytes"]]
    alt_show = alt[["model", "link_gbit", "topology", "round_s", "exchange_s", "messages_peer", "messages_group",
                    "bytes_peer", "bytes_group", "inbox_bytes"]]
    lines = [
        "# Scaling: round time, phases and exchange traffic versus the number of peers",
        "",
        f"P peers as threads of one process on this host ({CORES} cores), each with its own database server "
        f"(embedded Valkey with the tensor module, unix sockets), {setting.functions} gradient functions per peer "
        f"run inline (batch {setting.batch_size}), Fashion-MNIST (first {setting.limit_train} training images, "
        f"split among the peers), in-database mean, {setting.warmup} warm-up round then {setting.rounds} measured "
        "rounds per cell. Command: "
        f"`{command}`; the whole run took {duration(wall_s)}.",
        "",
        f"**This host has {CORES} cores.** With P peers on it, every phase of every peer shares them: the wall "
        "times (`t_*`, `t_round`, `round_period_s`) measure how P peers share 2 cores at least as much as the "
        "protocol, and grow about as P/2 for that reason alone. What contention does not change is measured "
        "beside them: the messages and bytes of the exchange (exact), and CPU seconds per peer and round "
        "(`cpu_process_peer_s`: the orchestrators and their functions; `cpu_servers_peer_s`: the database "
        "servers), which contention inflates far less than wall time. The cost model below makes the contention "
        "explicit, is checked against the measured points, and is then extrapolated without it: one host per "
        f"peer, linked at 1 and 10 Gbit/s. Other processes on the host took at most "
        f"{df['other_cpu_cores'].max():.2f} of its {CORES} cores during a cell (`other_cpu_cores`, from "
        "`/proc/stat` less this run's own CPU and its servers')"
        + (". **That is a busy host: the wall times of the cells where it was high are inflated by other "
           "work (the traffic is not); compare `other_cpu_cores` before reading them.**"
           if df["other_cpu_cores"].max() > 0.25 else ": a quiet host."),
        "",
        "## How the traffic is measured",
        "",
        "Every server's counters are reset before the training and read after it: `INFO stats` "
        "(`total_net_input_bytes`, `total_net_output_bytes`, `total_commands_processed`) and "
        "`INFO commandstats` (calls per command, `calls_*` in the CSV), and every command with its request and "
        "reply size from the server's command log (`COMMANDLOG` with a 0-byte threshold; it costs the servers "
        "a little CPU, counted in `cpu_servers_peer_s`). A command is "
        "**exchange** traffic when it is another peer's push into the inbox: `SET {q}:in:<sender>:<round>` "
        "(the vector), `RPUSH`/`LTRIM {q}:notify:<sender>` (its wake-up), or `TENSOR.PUSH` (guarded inboxes); "
        "all else is **local** (the own orchestrator and functions, heartbeats, the other members' liveness and "
        "agreement reads, the launcher's observer). One push (vector and wake-up, one pipeline, one round trip) "
        "is one message. Figures are per round: the training's totals over its "
        f"{setting.total_rounds} rounds (the warm-up included: its traffic is that of any round; the local "
        "totals also carry the once-per-run costs: initial parameters, final evaluation, the launcher's polls). "
        "Groups are the sum over the P servers; `_peer` columns divide by P. Wall times and CPU leave the "
        "warm-up round out; evaluation is excluded.",
        "",
        f"Measured: {pushes_check(df)}; a push carries "
        f"{df['push_overhead_bytes'].median():.0f} bytes beyond the vector ("
        + ", ".join(f"{m}: {int(d):,} bytes" for m, d in df.groupby("model", sort=False)["d_bytes"].first().items())
        + "). So a peer sends and receives (P - 1)(d + h) bytes per round "
        f"and the group moves P(P - 1)(d + h): at P = {big} that is "
        + "; ".join(f"{m} {_mb(g['exchange_in_bytes'].iat[-1])} per round "
                    f"({_mb(g['exchange_bytes_peer'].iat[-1])} per peer)"
                    for m, g in df[df['peers'] == big].groupby('model', sort=False))
        + f". The barrier's own reads grow faster than the exchange: it re-checks every awaited inbox slot "
        "(`EXISTS` + `STRLEN`, pipelined) at each wake-up, and a peer wakes about once per arriving vector, so "
        f"`EXISTS` calls per peer and round grow as P^{growth(big_groups, 'exists_peer'):.2f} from 8 to {big} "
        f"peers ({checks_at_big:,.0f} per peer at P = {big}; O(P^2): about {checks_at_far:,.0f} per peer per round "
        f"at P = {EXTRAPOLATE_TO:,} if the trend holds). CPU per peer and round (orchestrator and functions + "
        f"database) grows from {cpu_small * 1e3:.1f} ms at P = {df['peers'].min()} to {cpu_big * 1e3:.1f} ms at "
        f"P = {big} (mean over the models): the P - 1 pushes, the mean over P vectors, those reads.",
        "",
        "## Measured",
        "",
        df[TABLE].to_markdown(index=False, floatfmt=".4g"),
        "",
        "## Cost model",
        "",
        "Per peer and round, every phase is a sum of work terms, times the contention factor s(P) = max(1, P / "
        f"{CORES}) on this host (s = 1 on a host per peer). With K functions, d the model's bytes (f = d/4 "
        "floats) and D = d + h the bytes of one push:",
        "",
        "    compute   (t_compute + t_store)            = s * K * c_model",
        "    local     (t_average + t_update + t_cleanup) = s * u * d",
        "    exchange  (t_exchange: P - 1 pushes)       = s * (e0 + e1 * (P - 1) * D)",
        "    barrier   (t_barrier)                      = s * (b0 + b1 * (P - 1))",
        "    aggregate (t_aggregate: mean of P vectors) = s * (g0 + g1 * P * f)",
        "    round     = the sum;   messages: P - 1 per peer, P(P - 1) group;   bytes: (P - 1) D per peer, P(P - 1) D group",
        "",
        f"Fitted by least squares on the points with P <= {FIT_MAX_PEERS} (each phase on its own), checked on "
        f"the larger groups, which the fit has not seen. Round-time error: fitted points {err(fitted, 'round_err')}; "
        f"held-out points {err(held, 'round_err')}. The exchange's messages and bytes are exact (errors of "
        "0 to 1e-5). The times are not: the linear contention term is a first-order picture of P threads and P "
        "servers on 2 cores; beyond 16 peers the functions and the barrier slow down faster than P / 2 (the "
        f"interpreter lock, 3 P threads with the heartbeats, caches); at P = {big} the model "
        + ", ".join(f"{_direction(chk, big, ph)} {ph}" for ph in MODEL_PHASES)
        + ". The constants (per peer, without contention; fitted with every constant >= 0):",
        "",
        "| constant | value | unit |",
        "|---|---|---|",
        consts_md,
        "",
        *db_mean_lines(df, consts),
        "Model versus measured (`*_err` = model / measured - 1; the bytes and messages are those of the exchange):",
        "",
        show.to_markdown(index=False, floatfmt=".3g"),
        "",
        "## Extrapolation: a host per peer, P = 1,000",
        "",
        f"s = 1; each push leaves at the slower of the link (1 or 10 Gbit/s) and the measured per-byte cost "
        f"`e1`; round trip {RTT_S * 1e3:g} ms, paid once per exchange (the pushes go out at once, the vectors "
        "come in at the same time over the full-duplex link); the barrier is b0 plus the last vector's arrival "
        "(its b1 (P - 1) growth here is the peers waiting for each other's share of this host's cores); the "
        "mean of the P vectors costs (w_db + g_db P) f, the servers' own timing. mlp and cnn compute from the fit (K c_model); "
        f"ResNet-18 ({RESNET18_FLOATS:,} parameters) computes {RESNET18_COMPUTE_S:g} s (K = 2 functions, batch 16, "
        "measured on this host: `reports/round_time.md`); its O(d) terms scale with its size. "
        "`inbox_bytes`: one round's vectors in a peer's database.",
        "",
        ext_show.to_markdown(index=False, floatfmt=".4g"),
        "",
        "Round time versus P (all-to-all; seconds):",
        "",
        ext.pivot_table(index=["model", "link_gbit"], columns="peers", values="round_s", sort=False)
        .rename(columns=lambda p: f"P = {p}").reset_index().to_markdown(index=False, floatfmt=".3g"),
        "",
        "## Where all-to-all breaks",
        "",
        "A peer sends its vector P - 1 times and receives P - 1 vectors each round: its link carries (P - 1) D "
        "bytes each way, growing linearly in P while its compute stays put, and the group's traffic grows as "
        f"P^2. `peers_exchange_eq_compute`: the group size at which that exchange takes as long as the compute "
        f"(the round is then half idle); `peers_exchange_10x_compute`: ten times as long; `peers_inbox_full`: "
        f"one round's inbox exceeds {INBOX_MEMORY / 1e9:g} GB of database memory (a peer that lags holds two).",
        "",
        lim.to_markdown(index=False, floatfmt=".4g"),
        "",
        "For models as small as mlp and cnn the compute of K = 2 minibatches is milliseconds, so the exchange "
        "dominates from a handful of peers on 1 Gbit/s and from tens on 10 Gbit/s; at P = 1,000 a round is "
        "seconds of pure transfer. ResNet-18's 47 MB vector makes it worse: at 1,000 peers a peer moves 47 GB "
        "per round each way (37 s at 10 Gbit/s) and its inbox no longer fits a 16 GB database. The group moves "
        "P(P - 1) messages (about a million per round at P = 1,000).",
        "",
        "### What would replace it",
        "",
        f"- **Sparse / gossip (expander graph of degree k = {GOSSIP_DEGREE} = ceil(log2 P))**: P k messages per "
        "round, k D bytes per peer, inbox k D; a round costs k pushes instead of P - 1. The price: each peer "
        "averages only its neighbours, so the models agree only after O(log P / spectral gap) rounds (consensus "
        "distance instead of bit-identical models), and robust rules see k + 1 vectors, so the Byzantine bound "
        "is per neighbourhood (ClippedGossip-style rules).",
        f"- **Hierarchical aggregation (a tree of fan-in {TREE_FANIN})**: reduce up, broadcast down, "
        "2 ceil(log_f P) levels; 2(P - 1) messages in the group, f D bytes per inner node and level; the exact "
        "mean. The price: latency in levels, and an inner node sees and could forge its subtree's sum (it needs "
        "replicated inner nodes or verifiable sums to keep SPIRT's guarantees).",
        "",
        "The model's numbers at P = 1,000:",
        "",
        alt_show.to_markdown(index=False, floatfmt=".4g"),
        "",
        "Files: `scaling.csv` (every measured column, one row per model and P), `scaling.png` (round time and "
        "phases versus P with the model, measured points and model lines; exchange bytes and messages versus P "
        "with the all-to-all model out to P = 1,000).",
        "",
    ]
    return "\n".join(lines)


def plot(df: pd.DataFrame, consts: dict[str, float], ext: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    models = list(dict.fromkeys(df["model"]))
    ncols = 2
    nrows = math.ceil((len(models) + 2) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 4.8 * nrows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(models) + 2:]:
        ax.axis("off")
    grid = np.unique(np.geomspace(df["peers"].min(), df["peers"].max(), 40).round())
    colours = dict(zip([*MODEL_PHASES, "round"], plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, m in zip(axes, models, strict=False):
        g = df[df["model"] == m].sort_values("peers")
        line = pd.DataFrame({"model": m, "peers": grid, "functions": g["functions"].iat[0],
                             "d_bytes": g["d_bytes"].iat[0], "d_floats": g["d_floats"].iat[0],
                             "push_bytes": g["push_bytes"].iat[0]})
        pred = predict(line.assign(exchange_bytes_peer=np.nan), consts)
        for what in ["round", *MODEL_PHASES]:
            y = g["t_round"] if what == "round" else measured_phase(g, what)
            ax.plot(g["peers"], y, "o", color=colours[what], ms=5 if what == "round" else 4)
            ax.plot(grid, pred[what], "-", color=colours[what], lw=1.8 if what == "round" else 1, label=what)
        ax.axvline(FIT_MAX_PEERS + 0.5, color="grey", ls=":", lw=0.8)
        ax.set(xscale="log", yscale="log", title=f"{m}: time per round and phase (this host, {CORES} cores)",
               xlabel="peers P", ylabel="seconds (points: measured; lines: model)")
        # ticks at the measured group sizes (the dotted line: fitted on its left, held out on its right)
        ax.xaxis.set_major_locator(FixedLocator(sorted(df["peers"].unique())))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax_b, ax_m = axes[len(models)], axes[len(models) + 1]
    far = np.unique(np.geomspace(2, EXTRAPOLATE_TO, 60).round())
    for i, m in enumerate(models):
        g = df[df["model"] == m].sort_values("peers")
        big_d = g["d_bytes"].iat[0] + consts["h"]
        # the models' vectors are about the same size: hollow markers keep the second one visible
        style = {"fillstyle": "full" if i == 0 else "none", "ms": 8 if i == 0 else 11}
        ax_b.plot(g["peers"], g["exchange_in_bytes"], "o", label=f"{m} group (measured)", **style)
        ax_b.plot(g["peers"], g["exchange_bytes_peer"], "s", label=f"{m} per peer (measured)", **style)
        ax_b.plot(far, far * (far - 1) * big_d, "-", lw=0.8, color="grey")
        ax_b.plot(far, (far - 1) * big_d, "--", lw=0.8, color="grey")
        ax_m.plot(g["peers"], g["exchange_messages"], "o", label=f"{m} group (measured)", **style)
        ax_m.plot(g["peers"], g["exchange_messages_peer"], "s", label=f"{m} per peer (measured)", **style)
    ax_m.plot(far, far * (far - 1), "-", lw=0.8, color="grey", label="model: P(P-1), group")
    ax_m.plot(far, far - 1, "--", lw=0.8, color="grey", label="model: P-1, per peer")
    ax_b.set(title="exchange bytes per round (lines: model to P = 1,000)", ylabel="bytes")
    ax_m.set(title="exchange messages per round", ylabel="messages (pushes)")
    for ax in (ax_b, ax_m):
        ax.set(xscale="log", yscale="log", xlabel="peers P")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("SPIRT all-to-all: scaling with the number of peers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(rows: list[dict], out_dir, command: str, setting: Setting = Setting(), wall_s: float = float("nan"),
                  fit_max: int = FIT_MAX_PEERS) -> dict[str, float]:
    """``scaling.csv`` (every measured column), ``scaling.md`` and ``scaling.png`` in ``out_dir``; returns
    the fitted constants."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    first = [c for c in TABLE if c in df] + ["functions", "batch_size", "rounds", "d_floats", "d_bytes"]
    df = df[first + sorted(c for c in df if c not in first)].sort_values(["model", "peers"], key=_model_order)
    df = df.reset_index(drop=True)
    consts = fit(df, fit_max)
    chk = checks(df, consts, fit_max)
    ws = workloads(df, consts)
    ext = extrapolation(ws, consts)
    lim = limits(ws, consts)
    alt = extrapolation(ws, consts, peers=(EXTRAPOLATE_TO,), topologies=("all-to-all", "gossip", "tree"))
    df.to_csv(out / "scaling.csv", index=False)
    (out / "scaling.md").write_text(markdown(df, consts, chk, ext, lim, alt, setting, command, wall_s))
    plot(df, consts, ext, out / "scaling.png")
    return consts


def _model_order(col: pd.Series) -> pd.Series:
    """Models in the order the registry lists them (smallest first); peers as numbers."""
    if col.name != "model":
        return col
    order = {m: i for i, m in enumerate(DEFAULT_MODELS)}
    return col.map(lambda m: order.get(m, len(order)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spirt bench scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="report directory (default: $SPIRT_REPORTS_DIR, else reports; with --quick: "
                                 "results, so that a smoke run never replaces the full run's reports)")
    p.add_argument("--models", nargs="+", help=f"models (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--peers", nargs="+", type=int, help=f"group sizes (default: {' '.join(map(str, DEFAULT_PEERS))})")
    p.add_argument("--rounds", type=int, help=f"measured rounds after the warm-up (default: {Setting().rounds})")
    p.add_argument("--quick", action="store_true", help="a tiny run: P = 2 and 3, mlp, 2 rounds (tests)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    args = p.parse_args(argv)
    setting = QUICK if args.quick else Setting()
    if args.rounds is not None:
        if args.rounds < 1:
            p.error("--rounds must be at least 1")
        setting = Setting(**{**asdict(setting), "rounds": args.rounds})
    models = args.models or (["mlp"] if args.quick else list(DEFAULT_MODELS))
    peers = args.peers or ([2, 3] if args.quick else list(DEFAULT_PEERS))
    if min(peers) < 2:
        p.error("--peers: at least 2 peers per group")
    from ..models import names

    unknown = [m for m in models if m not in names()]
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(names())})")
    try:  # one torch thread: the peers are the parallelism, as in the test suite
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    from .update import out_dir

    out = out_dir(args.out, args.quick)
    t0 = time.perf_counter()
    rows, _ = run(models, peers, setting, progress=not args.quiet)
    wall = time.perf_counter() - t0
    command = ("spirt bench scaling -- " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    command = command.removesuffix(" --")
    write_reports(rows, out, command, setting, wall)
    print(f"reports written to {out}/scaling.{{csv,md,png}} ({duration(wall)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
