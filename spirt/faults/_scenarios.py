"""Running a fault scenario on a real cluster, and what the fault cost (see :mod:`spirt.faults`)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..cluster import Cluster, ClusterError
from ..config import Config, load_config
from ._base import FATE_ORDER, Fate, Fault, NoFault, Scenario, registry

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


def names() -> list[str]:
    """The registered faults in report order: grouped by what becomes of the victim (lost, stays,
    returns, joins), then by name."""
    return sorted(registry.names(), key=lambda n: (FATE_ORDER.index(registry.cls(n).fate), n))


#: the name of a link-cutting fault's scenario on emulated hosts: ``cut_link@netns``
NETNS = "@netns"


class _Scenarios(Mapping[str, Scenario]):
    """name -> the default scenario of every registered fault, in :func:`names` order, then, for every
    fault that cuts links, the same scenario with the peers on emulated hosts (``name@netns``, see
    :attr:`Scenario.network`). Read from the registry on every use: a fault registered later is in it."""

    def __getitem__(self, name: str) -> Scenario:
        base = name.removesuffix(NETNS)
        if base not in names() or (base != name and not registry.cls(base).links):
            raise KeyError(name)
        s = registry.cls(base).scenario()
        return s if base == name else Scenario(name, base, s.victim, s.at, s.duration_s, network="netns")

    def __iter__(self) -> Iterator[str]:
        yield from names()
        yield from (n + NETNS for n in names() if registry.cls(n).links)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"SCENARIOS({', '.join(self)})"


SCENARIOS: Mapping[str, Scenario] = _Scenarios()


def _peer_slots(overrides: dict | None) -> tuple[dict, int]:
    over = {**BASE, **(overrides or {})}
    return over, int(over.get("data.parts") or over["peers.count"])


def scenario_config(scenario: Scenario, overrides: dict | None = None) -> tuple[Config, int]:
    """(config the initial peers run, number of peer slots) of a scenario."""
    cls = scenario.fault_class
    over, n = _peer_slots(overrides)
    over["data.parts"] = n
    if cls.fate is Fate.JOINS:
        over["peers.count"] = n - 1
    over.update(cls.config)
    fits = scenario.victim == n - 1 if cls.fate is Fate.JOINS else scenario.victim < n
    if not fits:
        raise ValueError(f"scenario {scenario.name}: victim {scenario.victim} does not fit {n} peers")
    if cls.fate is Fate.LOST and scenario.victim != n - 1:
        raise ValueError("a permanently lost peer must be the last one, so that the fault-free run with the "
                         "survivors (peers 0..n-2) uses the same data parts")
    return load_config(None, over), n


# -- evaluation ---------------------------------------------------------------------------------------

@functools.cache
def _eval_state(dataset: str, data_dir: str | None, model: str, norm: str, seed: int):
    from ..data import load_dataset
    from ..models import build_model
    from ..tensors import FlatParams

    ds = load_dataset(dataset, data_dir, limit_train=1, limit_test=None)
    m = build_model(model, ds.channels, ds.num_classes, ds.image_size, seed, norm=norm)
    return m, FlatParams(m), ds


def accuracy_of(cfg: Config, params: bytes) -> float:
    """Accuracy of ``params`` on the full test set."""
    from ..functions import evaluate

    model, flat, ds = _eval_state(cfg.data.dataset, cfg.data.data_dir, cfg.model.name, cfg.model.norm, cfg.run.seed)
    return evaluate(model, flat, ds, params, samples=0)[1]


# -- measures -----------------------------------------------------------------------------------------

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
    #: per round: the honest peers' distinct models, largest pairwise distance, their average's accuracy
    disagreement: pd.DataFrame | None = None

    @property
    def fault(self) -> Fault:
        return self.scenario.fault_class()

    @property
    def final_accuracy(self) -> float:
        return float(np.mean(list(self.accuracy.values()))) if self.accuracy else float("nan")

    @property
    def survivors_identical(self) -> bool:
        return len(set(self.digests.values())) == 1

    # -- event times the faults' measures are made of ----------------------------------------------
    def first_event(self, kinds: tuple[str, ...], by_victim: bool = False) -> float:
        """Wall time of the first event of one of ``kinds`` about the victim at or after the fault,
        logged by another peer (or by the victim itself); NaN if there is none."""
        ev = self.events
        if ev.empty:
            return math.nan
        v = self.scenario.victim
        sel = (ev["about"] == v) & ev["event"].isin(kinds) & (ev["t"] >= self.t_fault - 1e-3)
        sel &= (ev["peer"] == v) if by_victim else (ev["peer"] != v)
        hit = ev[sel]
        return float(hit["t"].min()) if len(hit) else math.nan

    def victim_back_at(self, kinds: tuple[str, ...]) -> float:
        """Wall time of the victim's own first event of the first of ``kinds`` it logged after the
        fault (``("joined", "recovered")``: a state transfer, if any, else its database back); NaN if
        none."""
        ev = self.events
        if ev.empty:
            return math.nan
        v = self.scenario.victim
        mine = ev[(ev["peer"] == v) & (ev["about"] == v) & (ev["t"] >= self.t_fault - 1e-3)]
        for kind in kinds:
            hit = mine[mine["event"] == kind]
            if len(hit):
                return float(hit["t"].min())
        return math.nan

    def barrier_threshold(self) -> float:
        m = self.metrics
        before = m[m["peer"].isin(self.survivors) & (m["wall_end"] < self.t_fault)]
        if len(before) < 5:
            return 0.25
        return float(before["t_barrier"].quantile(0.95)) + 0.05

    def normal_round_end(self) -> float:
        """End of the first round every survivor started after the detection (after the fault if it
        was not detected) with a normal barrier time (:meth:`barrier_threshold`); NaN if none."""
        start = self.t_detect if not math.isnan(self.t_detect) else self.t_fault
        m = self.metrics[self.metrics["peer"].isin(self.survivors)]
        limit = self.barrier_threshold()
        for _, g in m.groupby("round"):
            if len(g) == len(self.survivors) and (g["wall_begin"] >= start).all() and (g["t_barrier"] <= limit).all():
                return float(g["wall_end"].max())
        return math.nan

    # -- measures ----------------------------------------------------------------------------------
    @property
    def t_detect(self) -> float:
        return self.fault.detected_at(self)

    @property
    def detection_s(self) -> float:
        return self.t_detect - self.t_fault

    @property
    def recovery_s(self) -> float:
        return self.fault.recovered_at(self) - self.t_fault

    def expected_start(self, i: int) -> int:
        """First round peer i was expected to take part in (a newcomer: the round it joined in)."""
        if self.scenario.fault_class.fate is Fate.JOINS and i == self.scenario.victim:
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
        if ev.empty or math.isnan(self.t_fault):
            return ""
        v = self.scenario.victim
        mine = ev[(ev["peer"] == v) & (ev["about"] == v) & (ev["t"] >= self.t_fault - 1e-3)]
        return " ".join(f"{e}@{int(r)}" for e, r in zip(mine["event"], mine["round"], strict=True))

    def disagreement_summary(self) -> dict:
        """The honest peers' disagreement over the run: rounds they ended with more than one model, the
        largest distance between two of them, and the lowest accuracy of their average model then."""
        d = self.disagreement
        if d is None or d.empty:
            return {"disagreeing_rounds": 0, "max_honest_distance": float("nan"),
                    "min_average_accuracy": float("nan")}
        split = d[d["honest_states"] > 1]
        return {"disagreeing_rounds": len(split), "max_honest_distance": float(d["honest_distance"].max()),
                "min_average_accuracy": float(split["honest_average_accuracy"].min()) if len(split) else float("nan")}

    def row(self, reference: float | None = None) -> dict:
        s = self.scenario
        ref = float("nan") if reference is None else reference
        m = self.metrics
        last = m[m["round"] == self.rounds - 1] if len(m) else m
        return {
            "scenario": s.name,
            "fault": s.description,
            "fate": str(s.fault_class.fate),
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
            **self.disagreement_summary(),
            "victim_events": self.victim_story(),
            "wall_s": self.wall_s,
        }


# -- running ------------------------------------------------------------------------------------------

def run_scenario(scenario: Scenario | str, overrides: dict | None = None, *, timeout_s: float = 600.0) -> ScenarioResult:
    """Train with the scenario's fault injected; returns the measurements (see :mod:`spirt.faults`)."""
    s = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
    fault = s.fault_class()
    cfg, _ = scenario_config(s, overrides)
    initial = list(range(cfg.peers.count))
    newcomers = [s.victim] if fault.fate is Fate.JOINS else []
    t_wall = time.perf_counter()
    slots = len(initial) + len(newcomers)
    cuts = {"hosts": True} if s.network == "netns" else {"links": fault.links}
    with Cluster(cfg, slots=slots, initial=initial, newcomers=newcomers, **cuts) as cl:
        deadline = time.monotonic() + timeout_s
        fault.aim(cl, s, timeout_s=timeout_s)
        before = cl.completed(s.victim) if not newcomers else None
        t_fault = fault.inject(cl, s)
        survivors = s.survivors(slots)
        cl.wait_finished(survivors, timeout_s=max(10.0, deadline - time.monotonic()))
        metrics, events = cl.metrics(survivors), cl.events()
        t_fault = fault.fault_time(s, t_fault, events)
        params = {i: cl.params(i) for i in survivors}
        t_start = cl.t_start
        cl.observer.stop()
        disagreement = cl.observer.table(functools.partial(accuracy_of, cfg))
    missing = [i for i, p in params.items() if p is None]
    if missing:
        raise ClusterError(f"no final parameters from survivors {missing}")
    digests = {i: hashlib.sha256(p).hexdigest()[:16] for i, p in params.items()}
    acc_by_digest = {d: accuracy_of(cfg, params[i]) for d, i in {d: i for i, d in digests.items()}.items()}
    accuracy = {i: acc_by_digest[d] for i, d in digests.items()}
    return ScenarioResult(s, slots, cfg.run.rounds, survivors, t_start, t_fault, metrics, events, accuracy,
                          digests, time.perf_counter() - t_wall, before, disagreement)


_REFERENCES: dict[str, float] = {}


def fault_free_accuracy(survivors: int, overrides: dict | None = None, *, timeout_s: float = 600.0) -> float:
    """Final test accuracy of the fault-free run with ``survivors`` peers (peers 0..survivors-1, each with
    the same data part as in the scenarios). Cached per configuration within the process."""
    over, n = _peer_slots(overrides)
    over.update({"data.parts": n, "peers.count": survivors})
    key = json.dumps(over, sort_keys=True, default=str)
    if key not in _REFERENCES:
        res = run_scenario(Scenario("fault_free", NoFault.name, victim=0), over, timeout_s=timeout_s)
        _REFERENCES[key] = res.final_accuracy
    return _REFERENCES[key]


def reference_for(scenario: Scenario, overrides: dict | None = None, **kw) -> float:
    """:func:`fault_free_accuracy` with the scenario's survivors."""
    _, n = _peer_slots(overrides)
    return fault_free_accuracy(len(scenario.survivors(n)), overrides, **kw)
