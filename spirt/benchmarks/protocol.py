"""The peer-to-peer attacks benchmark: each attack on the protocol, in real training, against the group's
defenses, with and without signed updates.

Every run is a real peer-to-peer training (:func:`spirt.runner.run_training`): ``n`` peers as threads,
each with its own database server, the last ``f`` of them Byzantine and running one attack of kind
``"protocol"`` (:func:`attacks.names`), every peer aggregating with the trimmed mean tolerating f (so the
agreement needs f + 1 peers to call a peer lagging, to take a state, to win a comparison of states).
Each attack runs for (n, f) in :data:`SETTINGS` and in two modes:

- ``open``: no security section: the databases take any client's writes, updates are not signed;
- ``signed``: ``[security] enabled`` with signed updates: identities, database ACLs (a member writes
  only its own slots, through the inbox command), envelopes compared for equivocation.

``state_poisoning`` needs a peer that takes a state from the others: its runs (and their attack-free
references) have the last honest peer join after round :data:`JOIN_AFTER`; the others do not. A setting
whose group breaks the rule's n > 2f at some point (before the join) is ``refused``.

Per run (honest peers only): the final accuracy (on ``limit_test`` test images), the number of distinct
models they held per round (``honest_states``, from :mod:`spirt.disagreement`) and the rounds where it
was above one, distinct final models, the first round an honest peer excluded, rejected or banned a
Byzantine peer (the detection round), which peers the honest peers excluded (Byzantine and honest ones
counted apart), how often honest peers resynchronised, and the median round time. Each result is cached
as JSON (``reports/cache/protocol``), keyed by a hash of what it depends on.

Entry points: :func:`run_protocol_grid`, :func:`main` (``spirt bench protocol``); reports
``reports/byzantine_protocol.{csv,md,png}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

#: Part of every cache key, changed whenever the protocol's behaviour changes (a cached run would be
#: another protocol's result). proto-6: members that finished the training count as ahead, a joiner takes
#: their final state once half the group finished, and one join request moves a waiting peer
#: JOIN_AHEAD rounds at most
VERSION = "proto-6"
SETTINGS: tuple[tuple[int, int], ...] = ((5, 1), (5, 2), (10, 1), (10, 2))
MODES: tuple[str, ...] = ("open", "signed")
#: the joiner of the state-poisoning runs asks to join once peer 0 completed this round
JOIN_AFTER = 4
#: events by which an honest peer holds a Byzantine peer at fault (excluded from a round, rejected,
#: removed, banned, a bad value dropped)
FAULT_EVENTS = ("excluded", "removed", "equivocation", "update_rejected", "rejected", "bad_value")
#: how an honest peer excluding another peer is written in the events
EXCLUSION_EVENTS = ("excluded", "removed", "equivocation", "update_rejected", "rejected")
#: events by which an honest peer holds another at fault for what it sent
ACCUSATIONS = ("equivocation", "update_rejected", "rejected")
RUN_TIMEOUT_S = 1200.0

#: What defends against each attack, in a sentence (the report's last column).
DEFENDED_BY: dict[str, str] = {
    "equivocation": "signed: two envelopes of one round over different vectors ban the sender; open: "
                    "nothing, the honest models part",
    "dissensus": "as equivocation: caught by the envelopes the peers compare when updates are signed",
    "omission": "the barrier's deadline; misses exclude, then remove the sender; the agreement (f + 1, "
                "majority) resynchronises the peers whose model parted",
    "rushing": "the barrier's deadline bounds the wait; the rule bounds the vector's influence",
    "mark_inflation": "lagging needs f + 1 peers ahead and a majority; marks beyond the last round "
                      "do not parse",
    "state_poisoning": "a joiner takes only a state f + 1 sources hand over identically",
    "framing": "ACLs refuse writes in another member's name; a proof of equivocation needs the "
               "accused's own two signatures",
    "stale_replay": "signed: an envelope binds its round, a replay is rejected; open: the rule must "
                    "absorb a genuine but stale vector",
}


def _reports_dir() -> Path:
    from .update import reports_dir

    return Path(reports_dir())


DEFAULT_OUT = _reports_dir()
DEFAULT_CACHE = DEFAULT_OUT / "cache" / "protocol"


@dataclass(frozen=True)
class Training:
    """Settings shared by every run (part of the cache key)."""

    rounds: int = 20
    batch_size: int = 32
    limit_train: int | None = 12000
    limit_test: int | None = 2000
    lr: float = 0.1
    momentum: float = 0.5
    model: str = "mlp"
    dataset: str = "fashion-mnist"
    barrier_timeout_s: float = 3.0
    heartbeat_s: float = 1.0
    #: an honest peer without a quorum for this long gives up (an attack's effect, reported)
    quorum_timeout_s: float = 30.0
    seed: int = 0


@dataclass(frozen=True)
class Run:
    """One training: ``attack`` None is the attack-free reference of its setting and mode."""

    attack: str | None
    n: int
    f: int
    mode: str
    joiner: bool = False

    def describe(self) -> str:
        return (f"{self.attack or 'no attack'}, n={self.n}, f={self.f}, {self.mode}"
                f"{', with a joiner' if self.joiner else ''}")


def needs_joiner(attack: str | None) -> bool:
    return attack == "state_poisoning"


def plan(attacks: Iterable[str] | None = None, settings: Iterable[tuple[int, int]] = SETTINGS,
         modes: Iterable[str] = MODES) -> list[Run]:
    """Every attack run and the attack-free references they are compared to."""
    import attacks as registry

    names = list(attacks) if attacks is not None else registry.names(kind="protocol")
    unknown = [a for a in names if a not in registry.names(kind="protocol")]
    if unknown:
        raise ValueError(f"not attacks on the protocol: {', '.join(unknown)} "
                         f"(they are: {', '.join(registry.names(kind='protocol'))})")
    runs = []
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
        for n, f in settings:
            for joiner in sorted({needs_joiner(a) for a in names}):
                runs.append(Run(None, n, f, mode, joiner))
            runs += [Run(a, n, f, mode, needs_joiner(a)) for a in names]
    return runs


def refusal(run: Run) -> str | None:
    """Why the run cannot be made, or None."""
    smallest = run.n - (1 if run.joiner else 0)
    if smallest <= 2 * run.f:
        return (f"trimmed_mean needs n > 2f: the group has {smallest} peers "
                f"{'before the join ' if run.joiner else ''}with f = {run.f}")
    return None


def run_key(run: Run, t: Training) -> str:
    blob = json.dumps({"version": VERSION, "run": asdict(run), "training": asdict(t)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def make_config(run: Run, t: Training, keys_dir: str | None = None, attack_params: dict | None = None):
    from ..config import load_config

    over: dict[str, Any] = {
        "run.rounds": t.rounds, "run.eval_every": t.rounds, "run.seed": t.seed,
        "data.dataset": t.dataset, "data.limit_train": t.limit_train, "data.limit_test": t.limit_test,
        "model.name": t.model, "peers.count": run.n, "peers.functions": 1, "peers.batch_size": t.batch_size,
        "peers.mode": "thread", "executor.kind": "inline", "optim.lr": t.lr, "optim.momentum": t.momentum,
        "aggregation.defense": "trimmed_mean", "aggregation.params": {"f": run.f},
        "barrier.timeout_s": t.barrier_timeout_s, "membership.heartbeat_s": t.heartbeat_s,
        "membership.quorum_timeout_s": t.quorum_timeout_s,
    }
    if run.attack is not None:
        over.update({"attack.name": run.attack, "attack.byzantine": run.f, "attack.params": attack_params or {}})
    if run.mode == "signed":
        over.update({"security.enabled": True, "security.keys_dir": keys_dir, "security.group": "protocol"})
    return load_config(None, over)


def _events_about(events: pd.DataFrame, reporters: set[int], kinds: Sequence[str]) -> pd.DataFrame:
    return events[events["peer"].isin(reporters) & events["event"].isin(kinds)]


def measure(df: pd.DataFrame, run: Run) -> dict[str, Any]:
    """The run's figures from its rounds table and events (honest peers' view)."""
    honest = set(range(run.n - (run.f if run.attack else 0)))
    byz = set(range(run.n)) - honest
    events: pd.DataFrame = df.attrs.get("events", pd.DataFrame(columns=["round", "peer", "event", "about"]))
    rows = df[df["peer"].isin(honest)]
    last = rows[rows["round"] == rows["round"].max()]
    faults = _events_about(events, honest, FAULT_EVENTS)
    on_byz = faults[faults["about"].isin(byz)]
    excl = _events_about(events, honest, EXCLUSION_EVENTS)
    # a peer sitting out for a state transfer is excluded from the rounds it misses: a cost (counted in
    # the resyncs), not an accusation
    excl = excl[~excl["detail"].astype(str).str.startswith("sitting out")]
    states = df.groupby("round")["honest_states"].max() if "honest_states" in df else pd.Series(dtype=float)
    return {
        "accuracy": float(last["accuracy"].mean()),
        "accuracy_min": float(last["accuracy"].min()),
        "rounds_done": int(rows["round"].max()) + 1 if len(rows) else 0,
        # the observer samples states between rounds; the final states are read after the last one
        "max_honest_states": max(int(states.max()) if len(states) and states.notna().any() else 1,
                                 int(df.attrs.get("final_states", 1))),
        "rounds_disagreeing": int((states > 1).sum()) if len(states) else 0,
        "disagreement": [[int(r), int(v)] for r, v in states.dropna().items()],
        "final_states": int(df.attrs.get("final_states", 0)),
        "detection_round": int(on_byz["round"].min()) if len(on_byz) else None,
        "byzantine_excluded": sorted(int(q) for q in set(excl["about"]) & byz),
        "honest_excluded": sorted(int(q) for q in set(excl["about"]) & honest),
        "honest_exclusion_events": int(excl["about"].isin(honest).sum()),
        # honest peers an honest peer held at fault for what they sent (rejected, banned): an accusation,
        # where an exclusion from a round can be collateral (a peer resynchronising misses rounds)
        "honest_accused": sorted(int(q) for q in set(_events_about(events, honest, ACCUSATIONS)["about"]) & honest),
        "honest_resyncs": int(((events["event"] == "resync") & events["peer"].isin(honest)).sum()),
        # rounds an honest peer found the models parted with no state held by f + 1 peers
        "honest_splits": int(((events["event"] == "split") & events["peer"].isin(honest)).sum()),
        "round_time_ms": 1000 * float(rows["t_round"].median()) if "t_round" in rows else float("nan"),
        "events": {str(k): int(v) for k, v in faults["event"].value_counts().items()},
        # honest peers that stopped with an error (gave up without a quorum, say), and why
        "honest_failed": {str(q): e for q, e in df.attrs.get("peer_failures", {}).items() if q in honest},
        # what the attacker tried that the honest peers' databases refused (said once per kind)
        "attack_refused": sorted({str(d).split(":")[0] for d in
                                  events[(events["event"] == "attack_refused") & events["peer"].isin(byz)]["detail"]}),
    }


def train(run: Run, t: Training, attack_params: dict | None = None) -> pd.DataFrame:
    """The run's rounds table (events in ``attrs["events"]``); keys for signed runs are made and dropped."""
    from ..runner import run_training

    with tempfile.TemporaryDirectory(prefix="spirt-protocol-") as tmp:
        keys = None
        if run.mode == "signed":
            from ..security.provision import provision_group

            keys = str(provision_group(Path(tmp) / "keys", run.n, "protocol"))
        cfg = make_config(run, t, keys, attack_params)
        joiners = {run.n - run.f - 1 if run.attack else run.n - 1: JOIN_AFTER} if run.joiner else None
        # an honest peer that gives up (no quorum for long) is the attack's effect, measured, not an error
        return run_training(cfg, progress=False, timeout_s=RUN_TIMEOUT_S, joiners=joiners,
                            peer_failures="report")


def run_one(run: Run, t: Training, cache_dir: str | None = None) -> dict[str, Any]:
    """Train one run; never raises. A successful result is cached in ``cache_dir``."""
    key = run_key(run, t)
    rec: dict[str, Any] = {"key": key, "version": VERSION, **asdict(run)}
    why = refusal(run)
    if why:
        return {**rec, "status": "refused", "error": why}
    t0 = time.perf_counter()
    try:
        rec.update({"status": "ok", **measure(train(run, t), run)})
    except Exception as exc:  # noqa: BLE001 - a failed run is a result, never the end of the benchmark
        rec.update({"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
                    "traceback": traceback.format_exc()[-4000:]})
    rec["seconds"] = time.perf_counter() - t0
    if cache_dir and rec["status"] == "ok":
        path = Path(cache_dir)
        path.mkdir(parents=True, exist_ok=True)
        tmp_file = path / f".{key}.{os.getpid()}.tmp"
        tmp_file.write_text(json.dumps(rec, indent=1, default=str))
        tmp_file.replace(path / f"{key}.json")
    return rec


def cached(cache_dir: str | Path, key: str) -> dict | None:
    try:
        rec = json.loads((Path(cache_dir) / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("key") == key and rec.get("status") == "ok" else None


def run_protocol_grid(out_dir: str | Path | None = DEFAULT_OUT, cache_dir: str | Path | None = DEFAULT_CACHE,
                      workers: int = 2, *, attacks: Iterable[str] | None = None,
                      settings: Iterable[tuple[int, int]] = SETTINGS, modes: Iterable[str] = MODES,
                      training: Training | None = None, progress: bool = True) -> pd.DataFrame:
    """Run (or read from the cache) every run of :func:`plan`; write the reports to ``out_dir``."""
    import multiprocessing as mp

    from .byzantine import submit_all, worker_init

    t = training or Training()
    runs = plan(attacks, settings, modes)
    results: dict[Run, dict] = {}
    todo = []
    for run in runs:
        rec = cached(cache_dir, run_key(run, t)) if cache_dir else None
        if rec is not None:
            results[run] = rec
        elif refusal(run):
            results[run] = run_one(run, t)
        else:
            todo.append(run)
    start = time.monotonic()
    say = print if progress else (lambda *a, **k: None)
    say(f"protocol benchmark: {len(runs)} runs, {len(todo)} to train, {len(runs) - len(todo)} cached or refused")
    cache = None if cache_dir is None else str(cache_dir)
    if todo:
        with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=mp.get_context("spawn"),
                                 initializer=worker_init, initargs=(os.getpid(),)) as pool:
            futures = submit_all(pool, run_one, todo, t, cache)
            for done, fut in enumerate(as_completed(futures), 1):
                run = futures[fut]
                results[run] = fut.result()
                elapsed = time.monotonic() - start
                eta = elapsed / done * (len(todo) - done)
                say(f"[{done}/{len(todo)}] {run.describe()}: {results[run]['status']} "
                    f"({results[run].get('seconds', 0):.0f} s; about {eta / 60:.0f} min left)")
    df = assemble(runs, results)
    if out_dir is not None:
        write_reports(df, Path(out_dir), t)
    return df


CSV_COLUMNS = ["attack", "n", "f", "mode", "joiner", "status", "accuracy", "clean_accuracy",
               "points_below_clean", "max_honest_states", "rounds_disagreeing", "final_states",
               "detection_round", "byzantine_excluded", "honest_excluded", "honest_accused", "honest_exclusion_events",
               "honest_resyncs", "honest_splits", "attack_refused", "honest_failed", "round_time_ms", "clean_round_time_ms", "rounds_done", "events", "disagreement",
               "error"]


def assemble(runs: list[Run], results: dict[Run, dict]) -> pd.DataFrame:
    """One row per attack run, beside its attack-free reference."""
    rows = []
    for run in runs:
        if run.attack is None:
            continue
        rec = results.get(run, {"status": "missing"})
        ref = results.get(Run(None, run.n, run.f, run.mode, run.joiner), {})
        row = {c: rec.get(c) for c in CSV_COLUMNS}
        row.update({"attack": run.attack, "n": run.n, "f": run.f, "mode": run.mode, "joiner": run.joiner,
                    "status": rec.get("status"), "clean_accuracy": ref.get("accuracy"),
                    "clean_round_time_ms": ref.get("round_time_ms")})
        if rec.get("status") == "ok" and ref.get("status") == "ok":
            row["points_below_clean"] = round(100 * (ref["accuracy"] - rec["accuracy"]), 1)
        for c in ("byzantine_excluded", "honest_excluded", "honest_accused", "events", "disagreement", "attack_refused",
                  "honest_failed"):
            if row[c] is not None and not isinstance(row[c], str):
                row[c] = json.dumps(row[c])
        rows.append(row)
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


def _verdict(row) -> str:
    """What happened, in a few words, from the figures."""
    if row["status"] != "ok":
        return row["status"]
    parts = []
    failed = json.loads(row["honest_failed"] or "{}")
    if failed:
        why = sorted({e.split(":")[0] + ": " + e.split(":", 1)[1].strip()[:60] for e in failed.values()})
        parts.append(f"HONEST PEER(S) {sorted(int(q) for q in failed)} STOPPED ({'; '.join(why)})")
    if row["max_honest_states"] and row["max_honest_states"] > 1:
        ended = "ended apart" if row["final_states"] and row["final_states"] > 1 else "agreed again"
        parts.append(f"honest models parted in {row['rounds_disagreeing']} rounds, {ended}")
    byz = json.loads(row["byzantine_excluded"] or "[]")
    if byz:
        parts.append(f"attacker(s) {byz} excluded from round {row['detection_round']}")
    elif row["detection_round"] is not None and not pd.isna(row["detection_round"]):
        parts.append(f"attacker faulted from round {int(row['detection_round'])}")
    honest = json.loads(row["honest_excluded"] or "[]")
    accused = json.loads(row["honest_accused"] or "[]")
    if accused:
        parts.append(f"honest peer(s) {accused} ACCUSED (rejected or banned)")
    if honest:
        parts.append(f"honest peer(s) {honest} excluded from some round")
    if row["honest_resyncs"]:
        parts.append(f"{row['honest_resyncs']} honest resyncs")
    refused = json.loads(row["attack_refused"] or "[]")
    if refused:
        parts.append("refused: " + ", ".join(refused))
    if row["honest_splits"]:
        parts.append(f"{row['honest_splits']} split events (no state with f + 1 holders)")
    return "; ".join(parts) or "no effect seen"


def write_reports(df: pd.DataFrame, out: Path, t: Training) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "byzantine_protocol.csv", "md": out / "byzantine_protocol.md",
             "png": out / "byzantine_protocol.png"}
    df.to_csv(paths["csv"], index=False)
    paths["md"].write_text(markdown(df, t))
    plot(df, paths["png"])
    return paths


def _strengths() -> str:
    import attacks

    lines = []
    for name in attacks.names(kind="protocol"):
        info = attacks.info(name)
        params = ", ".join(f"{k}={v}" for k, v in info.params.items()) or "no parameters"
        lines.append(f"- `{name}` ({info.reference}): {info.summary} Strength: {params}.")
    return "\n".join(lines)


def markdown(df: pd.DataFrame, t: Training) -> str:
    show = df.copy()
    show["accuracy (clean)"] = [
        "" if pd.isna(a) else f"{a:.3f} ({c:.3f})" if not pd.isna(c) else f"{a:.3f}"
        for a, c in zip(show["accuracy"], show["clean_accuracy"], strict=True)]
    show["round ms (clean)"] = [
        "" if pd.isna(a) else f"{a:.0f} ({c:.0f})" if not pd.isna(c) else f"{a:.0f}"
        for a, c in zip(show["round_time_ms"], show["clean_round_time_ms"], strict=True)]
    show["what happened"] = [_verdict(r) for _, r in df.iterrows()]
    cols = ["attack", "n", "f", "accuracy (clean)", "max_honest_states", "final_states", "detection_round",
            "byzantine_excluded", "honest_excluded", "honest_accused", "honest_resyncs", "honest_splits", "round ms (clean)", "what happened"]
    parts = [
        "# Peer-to-peer attacks\n",
        f"Real peer-to-peer training per run: n peers as threads, each with its own database server, the last "
        f"f Byzantine; {t.model.upper()} on {t.dataset} (first {t.limit_train} training images), {t.rounds} "
        f"rounds, 1 gradient function x batch {t.batch_size} per peer per round, SGD lr {t.lr} momentum "
        f"{t.momentum}, seed {t.seed}; every peer aggregates with the trimmed mean tolerating f (so the "
        f"agreement needs f + 1 peers); barrier deadline {t.barrier_timeout_s:g} s, heartbeat "
        f"{t.heartbeat_s:g} s; an honest peer without a quorum for {t.quorum_timeout_s:g} s gives up (reported, "
        f"not an error). `state_poisoning` runs (and their references) have the last honest peer "
        f"join after round {JOIN_AFTER}.\n",
        "Honest peers only: `accuracy` is their mean final accuracy on the first "
        f"{t.limit_test} test images, beside the attack-free run of the same setting and mode (one seed: "
        "differences of 1-2 points are noise, not a ranking); `max_honest_states` is the largest number of "
        "distinct models they held after one round (1: they agreed throughout), `final_states` after the "
        "last; `detection_round` the first round an honest peer excluded, rejected, removed or banned a "
        "Byzantine peer or dropped a value it wrote; `byzantine_excluded` and `honest_excluded` which peers "
        "honest peers excluded from at least one round (an honest peer sitting out for a state transfer not "
        "counted), `honest_accused` the honest peers an honest peer rejected a vector of or banned; "
        "`honest_resyncs` the state transfers honest peers "
        "made. Per-round disagreement is the `disagreement` column of `byzantine_protocol.csv`.\n",
        "Modes: **open**, no security section (the databases take any client's writes, updates are not "
        "signed); **signed**, `[security] enabled` with signed updates (identities, ACLs: a member writes "
        "only its own slots, envelopes compared for equivocation).\n",
        "## The attacks and their strengths\n",
        _strengths() + "\n",
    ]
    for mode in MODES:
        part = show[show["mode"] == mode]
        if part.empty:
            continue
        parts.append(f"## Mode: {mode}\n")
        parts.append(part[cols].fillna("").to_markdown(index=False) + "\n")
    parts.append("## What defends against each attack\n")
    parts += [f"- `{a}`: {DEFENDED_BY.get(a, '')}" for a in sorted(set(df["attack"]))]
    errors = df[df["status"].isin(["error", "refused"])]
    if len(errors):
        parts.append("\n## Runs not made or failed\n")
        parts += [f"- {r['attack']}, n={r['n']}, f={r['f']}, {r['mode']}: {r['status']}: {r['error']}"
                  for _, r in errors.iterrows()]
    return "\n".join(parts) + "\n"


def plot(df: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    ax = axes[0]
    names = sorted(set(df["attack"]))
    combos = [(m, n, f) for m in MODES for n, f in SETTINGS]
    width = 0.8 / len(combos)
    x = np.arange(len(names))
    for i, (m, n, f) in enumerate(combos):
        vals = []
        for a in names:
            hit = df[(df["attack"] == a) & (df["mode"] == m) & (df["n"] == n) & (df["f"] == f)]
            v = hit["points_below_clean"].iloc[0] if len(hit) else np.nan
            vals.append(np.nan if v is None else float(v))
        ax.bar(x + (i - len(combos) / 2 + 0.5) * width, vals, width, label=f"{m} n={n} f={f}",
               hatch="//" if m == "signed" else None, alpha=0.85)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("honest accuracy: points below the attack-free run")
    ax.set_title("Damage per attack (one seed)")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    for _, row in df[(df["n"] == 10) & (df["f"] == 2) & (df["status"] == "ok")].iterrows():
        curve = json.loads(row["disagreement"] or "[]")
        if not curve or max(v for _, v in curve) <= 1:
            continue
        rs, vs = zip(*curve, strict=True)
        ax.step(rs, vs, where="post", label=f"{row['attack']} ({row['mode']})")
    ax.set_xlabel("round")
    ax.set_ylabel("distinct honest models")
    ax.set_title("Honest disagreement over rounds, n=10, f=2 (attacks that caused any)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="spirt bench protocol", description=__doc__.split("\n")[0])
    p.add_argument("--attacks", nargs="+", help="attacks of kind protocol (default: all)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--settings", nargs="+", metavar="N:F", help="groups as n:f (default: 5:1 5:2 10:1 10:2)")
    p.add_argument("--rounds", type=int, default=Training.rounds)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--list", action="store_true", help="print the runs and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = SETTINGS
    if args.settings:
        settings = tuple(tuple(int(x) for x in s.split(":")) for s in args.settings)
    if args.list:
        for run in plan(args.attacks, settings, args.modes):
            why = refusal(run)
            print(run.describe() + (f"  (refused: {why})" if why else ""))
        return 0
    df = run_protocol_grid(args.out, None if args.no_cache else args.cache, args.workers, attacks=args.attacks,
                           settings=settings, modes=args.modes, training=Training(rounds=args.rounds))
    bad = df[df["status"] == "error"]
    return 1 if len(bad) else 0
