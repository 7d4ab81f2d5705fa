"""The Byzantine benchmark grid: attack x defense x Byzantine fraction x data partition, on real training.

Every cell is a real short peer-to-peer training run (:func:`spirt.runner.run_training`): ``n_peers`` peers
as threads of one process, each with its own database server, inline gradient functions, a small CNN on
Fashion-MNIST. The last ``n_byzantine`` peers run the attack; every peer aggregates with the defense. A
cell records the final honest accuracy (mean over the honest peers after the last round, on the whole
``limit_test`` test slice) and the honest accuracy curve (every ``eval_every`` rounds, on ``eval_samples``
test images).

What the grid contains
----------------------
- attacks: every registered attack (``attacks.names()``), with the registry's defaults, except that an
  attack taking ``f`` (ALIE derives its z from (n, f)) receives the cell's number of Byzantine peers;
- defenses: every registered aggregator (``defenses.names("aggregator")``) on its own, plus the composed
  configurations of :data:`COMPOSED` (a pre-aggregator chain in front of an aggregator) whose parts are
  registered. Each defense gets ``f`` = the cell's number of Byzantine peers (``f = 0`` at fraction 0:
  every rule accepts it, Krum then needs n > 2 and Bulyan n >= 3);
- fractions of Byzantine peers :data:`FRACTIONS` (``n_byzantine = round(fraction * n_peers)``);
- partitions ``iid`` and ``dirichlet`` (alpha from the training settings).

A cell whose defense refuses (n, f) — ``rule.check(n_peers, f)`` raises, e.g. Krum needs n > 2f + 2,
Bulyan n >= 4f + 3, bucketing (s = 2) + median needs ceil(n/2) > 2f — is recorded with status
``"refused"`` and the rule's message, and not run. At fraction 0 the attack plays no part: each defense x
partition is trained once (attack ``None``) and that run is reported in every attack's 0 % row. A run
that fails is recorded with status ``"error"`` and its message; the grid carries on.

Cache: each finished run is a JSON file in ``cache_dir`` named by a hash of the cell, the training
settings and :data:`VERSION`, so a rerun computes only what is missing (failures are not cached).
Cells run in a spawn process pool (one torch thread per worker).

Entry points: :func:`run_grid` and :func:`main` (``spirt bench byzantine``); profiles :data:`PROFILES`
(``reduced`` for ``tox -e bench``, ``full`` for the whole grid, ``target`` for the 30%-IID headline slice
trained 60 rounds with peer momentum, reported as ``byzantine_target.*``), chosen by ``--profile`` or the
environment variable ``SPIRT_BYZ_PROFILE``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

#: Part of every cache key: bump it when a change makes cached results stale (the key does not cover
#: the code of the peers, functions and rules). byz-2: results after the warm-worker parameter-cache fix
#: (5d2d544; before it, peers sharing the inline worker could compute gradients on another peer's model).
VERSION = "byz-2"

FRACTIONS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4)
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet")

#: Composed configurations of the grid: (pre-aggregators applied in order, aggregator). Only those whose
#: parts are registered are used; the pre-aggregators inherit the aggregator's ``f``.
COMPOSED: tuple[tuple[tuple[str, ...], str], ...] = (
    (("nnm",), "trimmed_mean"),
    (("bucketing",), "median"),
)

#: Hyperparameters the grid sets besides ``f`` (everything else is the registry's default):
#:
#: - the geometric median's Weiszfeld loop (started at the coordinate-wise median) is capped at 5
#:   iterations: with the default stopping rule (step <= 1e-6 x median distance, at most 100 iterations)
#:   one cell took 253 s instead of ~20 s. On 7 honest + 3 Byzantine vectors of this model's size, 5
#:   iterations land within 0.01% (sign flip) and 3% (ALIE) of the honest spread from the converged
#:   point, at 40 ms per aggregation instead of 60 ms for 10;
#: - centered clipping's radius is set to the scale of this setting's honest vectors: their distance to
#:   their coordinate-wise median measured 2.2-2.6 over the first 30 rounds (norms 2.6-3.3); the registry
#:   default tau = 10 is four times that and let three sign-flipping peers through (accuracy 0.34 at 30%).
GRID_PARAMS: dict[str, dict[str, Any]] = {
    "geometric_median": {"max_iter": 5},
    "centered_clipping": {"tau": 2.0},
}

#: Largest accepted drop of a defense's accuracy below the attack-free mean run (the target).
TARGET_GAP = 0.03

#: Attacks shown first in the curves figure (if in the grid).
CURVE_ATTACKS = ("sign_flip", "alie", "ipm", "min_max", "label_flip", "gaussian", "scaling", "mimic")

def _reports_dir() -> Path:
    from .update import reports_dir

    return Path(reports_dir())


#: ``$SPIRT_REPORTS_DIR`` or ``reports/`` in the working directory (as the other benchmarks), and its cache.
DEFAULT_OUT = _reports_dir()
DEFAULT_CACHE = DEFAULT_OUT / "cache" / "byzantine"
CELL_TIMEOUT_S = 1800.0

#: Known failure modes, reported as what they are when the measurements show them.
KNOWN_WEAKNESSES: dict[str, str] = {
    "alie": "ALIE (Baruch et al., NeurIPS 2019) shifts every coordinate of the honest mean by z standard "
            "deviations, inside the honest spread: coordinate-wise rules (median, trimmed mean) and "
            "distance-based selection (Krum, Bulyan) keep it by construction. It was designed to defeat "
            "exactly these rules; nearest-neighbour mixing (NNM, Allouah et al., AISTATS 2023) is the "
            "pre-aggregator proposed against it.",
    "ipm": "IPM (Xie et al., UAI 2020) publishes -epsilon times the honest mean: with a small epsilon it "
           "sits close to the honest vectors, so selection rules accept it and it biases every "
           "robust rule toward a zero or reversed step.",
    "min_max": "Min-Max (Shejwalkar & Houmansadr, NDSS 2021) places the malicious vector as far as "
               "possible while staying within the honest vectors' largest pairwise distance, which "
               "distance-based rules cannot tell apart from an honest one.",
    "mimic": "Mimic (Karimireddy et al., ICLR 2022) copies one honest peer: harmless under IID data, it "
             "over-weights one peer's data under heterogeneity.",
    "label_flip": "Label flipping poisons the data (y -> 9 - y): the Byzantine gradients are genuine "
                  "gradients of a wrong task and are not outliers in norm.",
}


# ----------------------------------------------------------------------------------------------------
# Settings, profiles, cells
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Training:
    """Training settings shared by every cell of a grid (part of the cache key)."""

    n_peers: int = 10
    rounds: int = 20
    eval_every: int = 5
    eval_samples: int = 250
    batch_size: int = 32
    functions: int = 1
    limit_train: int | None = 12000
    limit_test: int | None = 1000
    lr: float = 0.1
    momentum: float = 0.5
    peer_momentum: float = 0.0
    alpha: float = 0.5
    seed: int = 0
    model: str = "cnn"
    dataset: str = "fashion-mnist"
    backend: str = "module"
    server: str = "valkey"


@dataclass(frozen=True)
class Profile:
    """What a profile runs; ``None`` means everything the registries offer."""

    name: str
    attacks: tuple[str, ...] | None
    defenses: tuple[str, ...] | None
    fractions: tuple[float, ...]
    partitions: tuple[str, ...]
    training: Training = field(default_factory=Training)
    #: file name stem of the reports (``<report>.csv``, ``.md``, ``_heatmap.png``, ``_curves.png``)
    report: str = "byzantine"


#: Both profiles share the training settings, so the reduced grid's cells are cached cells of the full one.
PROFILES: dict[str, Profile] = {
    "reduced": Profile(
        "reduced",
        attacks=("sign_flip", "alie", "gaussian", "ipm"),
        defenses=("mean", "median", "trimmed_mean", "krum", "centered_clipping", "nnm+trimmed_mean"),
        fractions=(0.0, 0.3),
        partitions=("iid",),
    ),
    "full": Profile("full", attacks=None, defenses=None, fractions=FRACTIONS, partitions=PARTITIONS),
    # The headline slice (10 peers, 3 Byzantine, IID) trained long enough to compare accuracies near
    # convergence, with peer momentum, which the robust-aggregation literature pairs with its rules (it
    # shrinks the honest spread that ALIE and min-max hide in; see the README). Measured here: ALIE
    # against nnm+trimmed_mean is 1.1 points below clean after 60 rounds with peer momentum 0.9, 6.1
    # without it, and 4.3 after the grid's 20 rounds even with it.
    "target": Profile(
        "target", attacks=None, defenses=None, fractions=(0.3,), partitions=("iid",),
        training=Training(rounds=60, eval_every=10, lr=0.2, momentum=0.0, peer_momentum=0.9),
        report="byzantine_target",
    ),
}


@dataclass(frozen=True)
class DefenseConfig:
    """One defense configuration of the grid: ``label`` is what the tables show."""

    label: str
    name: str
    pre: tuple[str, ...] = ()

    def params(self, f: int) -> dict[str, Any]:
        return {**GRID_PARAMS.get(self.name, {}), "f": int(f)}

    def build(self, f: int):
        import defenses

        return defenses.get(self.name, pre=list(self.pre) or None, **self.params(f))


def defense_configs() -> list[DefenseConfig]:
    """Every registered aggregator alone, then the :data:`COMPOSED` chains whose parts are registered."""
    import defenses

    aggs = defenses.names("aggregator")
    pres = set(defenses.names("preaggregator"))
    aggs = sorted(aggs, key=lambda a: a != "mean")  # the reference first in tables and plots
    out = [DefenseConfig(a, a) for a in aggs]
    for pre, agg in COMPOSED:
        if agg in aggs and all(p in pres for p in pre):
            out.append(DefenseConfig("+".join([*pre, agg]), agg, tuple(pre)))
    return out


def attack_names() -> list[str]:
    import attacks

    return attacks.names()


def attack_params(name: str, n_byzantine: int) -> dict[str, Any]:
    """The registry's defaults, plus ``f`` for an attack that takes it and has no default (ALIE)."""
    import attacks

    accepted = attacks.info(name).params
    if "f" in accepted and accepted["f"] is None:
        return {"f": int(n_byzantine)}
    return {}


@dataclass(frozen=True)
class Cell:
    """One training run of the grid (``attack`` is None for the attack-free runs at fraction 0)."""

    attack: str | None
    defense: str  # DefenseConfig.label
    n_byzantine: int
    partition: str

    def describe(self, n_peers: int) -> str:
        pct = 100 * self.n_byzantine / n_peers
        return f"{self.attack or 'no attack'} x {self.defense}, {self.n_byzantine}/{n_peers} ({pct:.0f}%), {self.partition}"


def _defense_by_label() -> dict[str, DefenseConfig]:
    return {d.label: d for d in defense_configs()}


def cell_spec(cell: Cell, training: Training) -> dict[str, Any]:
    """Everything that determines the run's result (hashed into the cache key)."""
    d = _defense_by_label()[cell.defense]
    return {
        "version": VERSION,
        "attack": cell.attack,
        "attack_params": attack_params(cell.attack, cell.n_byzantine) if cell.attack else {},
        "defense": d.name,
        "pre": list(d.pre),
        "defense_params": d.params(cell.n_byzantine),
        "n_byzantine": cell.n_byzantine,
        "partition": cell.partition,
        "training": asdict(training),
    }


def cell_key(cell: Cell, training: Training) -> str:
    blob = json.dumps(cell_spec(cell, training), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def refusal(cell: Cell, training: Training) -> str | None:
    """The defense's (or attack's) message if it refuses the cell's (n, f), else None."""
    d = _defense_by_label()[cell.defense]
    try:
        d.build(cell.n_byzantine).check(training.n_peers, cell.n_byzantine)
    except ValueError as exc:
        return str(exc)
    if cell.attack:
        import attacks

        try:
            attacks.get(cell.attack, **attack_params(cell.attack, cell.n_byzantine))
        except ValueError as exc:
            return str(exc)
    return None


def make_config(cell: Cell, training: Training, data_dir: str | None = None):
    from ..config import load_config

    d = _defense_by_label()[cell.defense]
    t = training
    over: dict[str, Any] = {
        "run.name": f"byz-{cell.attack or 'clean'}-{cell.defense}-{cell.n_byzantine}-{cell.partition}",
        "run.seed": t.seed, "run.rounds": t.rounds, "run.eval_every": t.eval_every,
        "run.eval_samples": t.eval_samples,
        "model.name": t.model,
        "data.dataset": t.dataset, "data.data_dir": data_dir, "data.partition": cell.partition, "data.alpha": t.alpha,
        "data.limit_train": t.limit_train, "data.limit_test": t.limit_test,
        "peers.count": t.n_peers, "peers.functions": t.functions, "peers.batch_size": t.batch_size,
        "peers.server": t.server, "peers.mode": "thread",
        "executor.kind": "inline",
        "optim.lr": t.lr, "optim.momentum": t.momentum, "optim.peer_momentum": t.peer_momentum,
        "aggregation.backend": t.backend, "aggregation.defense": d.name,
        "aggregation.params": d.params(cell.n_byzantine), "aggregation.pre": list(d.pre),
    }
    if cell.attack and cell.n_byzantine:
        over.update({"attack.name": cell.attack, "attack.byzantine": cell.n_byzantine,
                     "attack.params": attack_params(cell.attack, cell.n_byzantine)})
    return load_config(None, over)


# ----------------------------------------------------------------------------------------------------
# Running one cell (in a worker process)
# ----------------------------------------------------------------------------------------------------


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _base_record(cell: Cell, training: Training, key: str) -> dict[str, Any]:
    return {"key": key, "attack": cell.attack, "defense": cell.defense, "n_peers": training.n_peers,
            "n_byzantine": cell.n_byzantine, "partition": cell.partition, "status": "", "error": "",
            "accuracy": float("nan"), "accuracy_min": float("nan"), "test_loss": float("nan"),
            "train_loss": float("nan"), "curve": [], "seconds": 0.0, "cpu_seconds": 0.0, "version": VERSION,
            "spec": cell_spec(cell, training)}


def data_cache_dir() -> Path:
    """Where :func:`prepare_data` keeps the uncompressed IDX files (``$XDG_CACHE_HOME`` or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spirt" / "idx" / "fashion-mnist"


def prepare_data(training: Training) -> str | None:
    """An uncompressed copy of Debian's gzipped Fashion-MNIST IDX files (see :func:`data_cache_dir`).

    Every peer of every run loads the data set once (its evaluation copy) and ungzipping the 26 MB of
    training images costs 0.3 s each time: 3 s of CPU per cell, a quarter of a cell's whole cost. The
    copy holds the same bytes (``read_idx`` accepts both forms), so results do not depend on it. Returns
    the directory, or None (then the default location is used) for another data set or when the copy
    cannot be made.
    """
    import gzip

    from ..data import FASHION_MNIST_DIR

    src = Path(FASHION_MNIST_DIR)
    if training.dataset != "fashion-mnist" or not src.is_dir():
        return None
    dst = data_cache_dir()
    names = [f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    if all((dst / n).is_file() for n in names):
        return str(dst)
    if not all((src / f"{n}.gz").is_file() for n in names):
        return None
    try:
        dst.mkdir(parents=True, exist_ok=True)
        for n in names:
            if not (dst / n).is_file():
                tmp = dst / f".{n}.{os.getpid()}.tmp"
                tmp.write_bytes(gzip.decompress((src / f"{n}.gz").read_bytes()))
                tmp.replace(dst / n)
    except OSError:
        return None
    return str(dst)


def run_cell(cell: Cell, training: Training, cache_dir: str | None = None,
             data_dir: str | None = None) -> dict[str, Any]:
    """Train one cell; never raises. With ``cache_dir``, a successful result is written there."""
    import resource

    key = cell_key(cell, training)
    rec = _base_record(cell, training, key)
    t0 = time.perf_counter()
    cpu0 = _cpu(resource)
    try:
        from ..runner import run_training

        df = run_training(make_config(cell, training, data_dir), progress=False, timeout_s=CELL_TIMEOUT_S)
        honest = df[~df["byzantine"].astype(bool)]
        evals = honest.dropna(subset=["accuracy"])
        last = honest[honest["round"] == honest["round"].max()]
        curve = evals.groupby("round")["accuracy"].mean()
        rec.update({
            "status": "ok",
            "accuracy": float(last["accuracy"].mean()),
            "accuracy_min": float(last["accuracy"].min()),
            "test_loss": float(last["test_loss"].mean()),
            "train_loss": float(last["loss"].mean()),
            "curve": [[int(r) + 1, float(a)] for r, a in curve.items()],
            "functions_failed": int(df["functions_failed"].sum()),
        })
    except Exception as exc:  # noqa: BLE001 - a failed cell is a result, never the end of the grid
        rec.update({"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
                    "traceback": traceback.format_exc()[-4000:]})
    rec["seconds"] = time.perf_counter() - t0
    rec["cpu_seconds"] = _cpu(resource) - cpu0  # this process + its reaped children (the servers)
    if cache_dir and rec["status"] == "ok":
        _cache_write(Path(cache_dir), key, rec)
    return rec


def _cpu(resource) -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key}.json"


def _cache_write(cache_dir: Path, key: str, rec: dict) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(rec, indent=1, default=str))
    tmp.replace(_cache_path(cache_dir, key))  # atomic: a reader never sees half a file


def cache_read(cache_dir: str | Path, key: str) -> dict | None:
    p = _cache_path(Path(cache_dir), key)
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("key") != key or rec.get("version") != VERSION or rec.get("status") != "ok":
        return None
    return rec


# ----------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------


def _pick(what: str, wanted: Iterable[Any] | None, default: Sequence[Any], allowed: Sequence[Any]) -> list:
    items = list(default if wanted is None else wanted)
    bad = [x for x in items if x not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {', '.join(map(str, bad))}; allowed: {', '.join(map(str, allowed))}")
    return list(dict.fromkeys(items))


def plan(profile: str | Profile = "reduced", *, attacks: Iterable[str] | None = None,
         defenses: Iterable[str] | None = None, fractions: Iterable[float] | None = None,
         partitions: Iterable[str] | None = None, training: Training | None = None
         ) -> tuple[Training, list[tuple[str, str, int, str]], list[Cell]]:
    """Rows of the grid (attack, defense, n_byzantine, partition) and the distinct runs they need.

    Filters replace the profile's list for their dimension (validated against the registries).
    """
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    t = training or prof.training
    all_attacks = attack_names()
    all_defs = [d.label for d in defense_configs()]
    atk = _pick("attack", attacks, prof.attacks or all_attacks, all_attacks)
    dfs = _pick("defense", defenses, prof.defenses or all_defs, all_defs)
    fr = [float(x) for x in (prof.fractions if fractions is None else fractions)]
    for x in fr:
        if not 0 <= x < 1:
            raise ValueError(f"Byzantine fraction must be in [0, 1) (got {x})")
    parts = _pick("partition", partitions, prof.partitions, PARTITIONS)
    nbyz = sorted({int(round(x * t.n_peers)) for x in fr})
    if any(b >= t.n_peers for b in nbyz):
        raise ValueError(f"a fraction gives every one of the {t.n_peers} peers Byzantine")
    rows = [(a, d, b, p) for p in parts for b in nbyz for a in atk for d in dfs]
    runs = list(dict.fromkeys(Cell(a if b else None, d, b, p) for a, d, b, p in rows))
    for p in parts:  # the reference every target compares to: plain mean, no Byzantine peer
        ref = Cell(None, "mean", 0, p)
        if ref not in runs:
            runs.append(ref)
    # run order: the references and the headline slice (30% Byzantine) first, so that a partial grid
    # already answers the main question
    head = int(round(0.3 * t.n_peers))
    runs.sort(key=lambda c: (c.n_byzantine != 0, c.n_byzantine != head, parts.index(c.partition), c.n_byzantine))
    return t, rows, runs


def run_grid(profile: str | Profile = "reduced", out_dir: str | Path | None = DEFAULT_OUT,
             cache_dir: str | Path | None = DEFAULT_CACHE, workers: int = 2, *,
             attacks: Iterable[str] | None = None, defenses: Iterable[str] | None = None,
             fractions: Iterable[float] | None = None, partitions: Iterable[str] | None = None,
             use_cache: bool = True, training: Training | None = None, progress: bool = True,
             compute: bool = True) -> pd.DataFrame:
    """Run (or read from the cache) the grid of ``profile``; write the reports to ``out_dir`` (if given).

    Returns one row per (attack, defense, n_byzantine, partition) with the columns of
    :data:`CSV_COLUMNS`. ``workers`` <= 1 runs the cells in this process (no pool). ``use_cache=False``
    ignores cached results (new results are still stored); ``cache_dir=None`` disables the cache.
    ``compute=False`` runs nothing: cells not in the cache are reported with status ``"missing"``.
    """
    t, rows, runs = plan(profile, attacks=attacks, defenses=defenses, fractions=fractions,
                         partitions=partitions, training=training)
    stem = (PROFILES[profile] if isinstance(profile, str) else profile).report
    cache = Path(cache_dir) if cache_dir else None
    results: dict[Cell, dict] = {}
    todo: list[Cell] = []
    for c in runs:
        key = cell_key(c, t)
        msg = refusal(c, t)
        if msg is not None:
            rec = _base_record(c, t, key)
            rec.update({"status": "refused", "error": msg})
            results[c] = rec
            continue
        rec = cache_read(cache, key) if (cache and use_cache) else None
        if rec is not None:
            rec["cached"] = True
            results[c] = rec
        else:
            todo.append(c)
    if not compute:
        for c in todo:
            results[c] = {**_base_record(c, t, cell_key(c, t)), "status": "missing", "error": "not computed yet"}
        todo = []
    log = _Log(progress, len(todo), len(runs) - len(todo))
    t_grid = time.perf_counter()
    data_dir = prepare_data(t) if todo else None
    for c, rec in _execute(todo, t, str(cache) if cache else None, workers, log, data_dir):
        rec["cached"] = False
        results[c] = rec
    df = assemble(rows, results, t)
    df.attrs["wall_s"] = time.perf_counter() - t_grid
    df.attrs["computed"] = len(todo)
    df.attrs["training"] = asdict(t)
    if out_dir is not None:
        write_reports(df, out_dir, t, stem)
    log.done(df.attrs["wall_s"])
    return df


class _Log:
    def __init__(self, enabled: bool, todo: int, known: int):
        self.enabled, self.todo, self.n, self.t0 = enabled, todo, 0, time.perf_counter()
        if enabled:
            print(f"byzantine grid: {known} cells cached or refused, {todo} to run", file=sys.stderr, flush=True)

    def cell(self, c: Cell, rec: dict, n_peers: int) -> None:
        self.n += 1
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        eta = el / self.n * (self.todo - self.n)
        res = f"{rec['accuracy']:.3f}" if rec["status"] == "ok" else f"{rec['status']}: {rec['error'][:120]}"
        print(f"[{self.n}/{self.todo}] {c.describe(n_peers)}: {res} ({rec['seconds']:.1f} s; "
              f"elapsed {el / 60:.1f} min, left ~{eta / 60:.1f} min)", file=sys.stderr, flush=True)

    def done(self, wall: float) -> None:
        if self.enabled:
            print(f"byzantine grid: done in {wall / 60:.1f} min", file=sys.stderr, flush=True)


#: One thread per math library in the workers: the client-side rules (geometric median, centered
#: clipping, NNM, Bulyan) call BLAS from ten peer threads at once, and OpenBLAS's own thread pool then
#: spins on the two cores (2.6x the CPU time of the geometric median, measured).
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


#: Cells per worker process: the pool is replaced after every ``WORKER_TASKS x workers`` cells. A cell
#: peaks at 1-2 GB (ten peers each load the data set) and a fresh process returns that memory and anything
#: a failed cell left behind. (Not ``max_tasks_per_child``: on Python 3.11 the pool hung for good when
#: both workers reached the limit together.)
WORKER_TASKS = 40
#: If no cell finishes for this long, the pool is considered stuck: its workers are killed and the
#: unfinished cells resubmitted (at most twice).
STALL_S = CELL_TIMEOUT_S + 600


class _Env:
    """Set environment variables for the processes started inside the block, restore them after."""

    def __init__(self, values: dict[str, str]):
        self.values, self.saved = values, {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _execute(todo: list[Cell], t: Training, cache: str | None, workers: int, log: _Log,
             data_dir: str | None = None):
    """Yield (cell, record) as cells finish; a dead worker costs only the cells it was running."""
    if not todo:
        return
    if workers <= 1:
        for c in todo:
            rec = run_cell(c, t, cache, data_dir)
            log.cell(c, rec, t.n_peers)
            yield c, rec
        return
    pending = list(todo)
    retries: dict[Cell, int] = {}
    while pending:
        size = WORKER_TASKS * workers
        batch, pending = pending[:size], pending[size:]
        lost = yield from _run_pool(batch, t, cache, workers, log, data_dir)
        again = []
        for c in lost:
            retries[c] = retries.get(c, 0) + 1
            if retries[c] < 3:
                again.append(c)
                continue
            rec = _base_record(c, t, cell_key(c, t))
            rec.update({"status": "error", "error": "worker process died or hung (three attempts)"})
            log.cell(c, rec, t.n_peers)
            yield c, rec
        pending = again + pending


def _run_pool(batch: list[Cell], t: Training, cache: str | None, workers: int, log: _Log,
              data_dir: str | None):
    """One fresh spawn pool for ``batch``; yields finished cells, returns the cells it lost."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, wait

    lost: list[Cell] = []
    with _Env(SINGLE_THREAD_ENV):
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init)
    try:
        futs = {pool.submit(run_cell, c, t, cache, data_dir): c for c in batch}
        remaining = set(futs)
        while remaining:
            done, remaining = wait(remaining, timeout=STALL_S, return_when=FIRST_COMPLETED)
            if not done:  # stuck: nothing finished for STALL_S
                lost += [futs[f] for f in remaining]
                break
            for fut in done:
                c = futs[fut]
                try:
                    rec = fut.result()
                except BrokenProcessPool:
                    lost.append(c)
                    continue
                except Exception as exc:  # noqa: BLE001 - e.g. a pickling problem: recorded, not raised
                    rec = _base_record(c, t, cell_key(c, t))
                    rec.update({"status": "error", "error": f"{type(exc).__name__}: {exc}"})
                log.cell(c, rec, t.n_peers)
                yield c, rec
    finally:
        _shutdown(pool)
    return lost


def _shutdown(pool: ProcessPoolExecutor) -> None:
    """Stop the pool without waiting on a stuck worker; no process is left behind."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


CSV_COLUMNS = ["attack", "defense", "n_peers", "n_byzantine", "fraction", "partition", "accuracy",
               "clean_accuracy", "gap", "status", "error", "seconds", "accuracy_min", "test_loss",
               "train_loss", "curve", "shared_run", "cached", "key"]


def assemble(rows: list[tuple[str, str, int, str]], results: dict[Cell, dict], t: Training) -> pd.DataFrame:
    """One row per grid row; fraction-0 rows point at their shared attack-free run."""
    clean = {p: results.get(Cell(None, "mean", 0, p), {}) for p in {r[3] for r in rows}}
    out = []
    for a, d, b, p in rows:
        run = Cell(a if b else None, d, b, p)
        rec = results[run]
        ref = clean.get(p, {})
        ref_acc = ref.get("accuracy", float("nan")) if ref.get("status") == "ok" else float("nan")
        acc = rec["accuracy"] if rec["status"] == "ok" else float("nan")
        out.append({
            "attack": a, "defense": d, "n_peers": t.n_peers, "n_byzantine": b, "fraction": b / t.n_peers,
            "partition": p, "accuracy": acc, "clean_accuracy": ref_acc, "gap": ref_acc - acc,
            "status": rec["status"], "error": rec.get("error", ""), "seconds": rec.get("seconds", 0.0),
            "accuracy_min": rec.get("accuracy_min", float("nan")), "test_loss": rec.get("test_loss", float("nan")),
            "train_loss": rec.get("train_loss", float("nan")),
            "curve": json.dumps(rec.get("curve", [])), "shared_run": b == 0, "cached": rec.get("cached", False),
            "key": rec["key"],
        })
    return pd.DataFrame(out, columns=CSV_COLUMNS)


# ----------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------


def best_defenses(df: pd.DataFrame, n_byzantine: int | None = None, partition: str = "iid") -> pd.DataFrame:
    """Per attack, the defense with the highest accuracy in the (n_byzantine, partition) slice (default:
    3 Byzantine of 10 if present, else the largest fraction run), with its gap to the clean accuracy."""
    sub = df[(df["partition"] == partition) & (df["n_byzantine"] > 0)]
    if sub.empty:
        return pd.DataFrame(columns=["attack", "n_byzantine", "best_defense", "accuracy", "clean_accuracy",
                                     "gap", "within_target", "runner_up", "mean_accuracy"])
    if n_byzantine is None:
        have = set(sub["n_byzantine"])
        n_byzantine = 3 if 3 in have else max(have)
    sub = sub[sub["n_byzantine"] == n_byzantine]
    rows = []
    for atk, g in sub.groupby("attack", sort=True):
        ok = g[g["status"] == "ok"].sort_values("accuracy", ascending=False)
        mean_acc = g.loc[g["defense"] == "mean", "accuracy"]
        if ok.empty:
            rows.append({"attack": atk, "n_byzantine": n_byzantine, "best_defense": "(none ran)",
                         "accuracy": float("nan"), "clean_accuracy": float(g["clean_accuracy"].iloc[0]),
                         "gap": float("nan"), "within_target": False, "runner_up": "",
                         "mean_accuracy": float(mean_acc.iloc[0]) if len(mean_acc) else float("nan")})
            continue
        best = ok.iloc[0]
        runner = f"{ok.iloc[1]['defense']} ({ok.iloc[1]['accuracy']:.3f})" if len(ok) > 1 else ""
        rows.append({"attack": atk, "n_byzantine": n_byzantine, "best_defense": best["defense"],
                     "accuracy": float(best["accuracy"]), "clean_accuracy": float(best["clean_accuracy"]),
                     "gap": float(best["gap"]), "within_target": bool(best["gap"] <= TARGET_GAP + 1e-12),
                     "runner_up": runner,
                     "mean_accuracy": float(mean_acc.iloc[0]) if len(mean_acc) else float("nan")})
    return pd.DataFrame(rows)


def _fmt_cell(row) -> str:
    if row["status"] == "ok":
        return f"{row['accuracy']:.3f}"
    return {"refused": "refused", "error": "error", "missing": "-"}.get(row["status"], row["status"])


def _grid_tables(df: pd.DataFrame) -> str:
    parts = []
    defs = list(dict.fromkeys(df["defense"]))
    for p in dict.fromkeys(df["partition"]):
        for b in sorted(df["n_byzantine"].unique()):
            sub = df[(df["partition"] == p) & (df["n_byzantine"] == b)]
            if sub.empty:
                continue
            n = int(sub["n_peers"].iloc[0])
            head = f"### {p}, {b} of {n} peers Byzantine ({100 * b / n:.0f}%)"
            if b == 0:
                first = sub.drop_duplicates("defense")
                tab = pd.DataFrame([{d: _fmt_cell(first[first["defense"] == d].iloc[0]) for d in defs}])
                tab.insert(0, "attack", "(none: one run per defense, shared by every attack)")
            else:
                tab = sub.assign(v=sub.apply(_fmt_cell, axis=1)).pivot(index="attack", columns="defense",
                                                                        values="v")
                tab = tab[[d for d in defs if d in tab.columns]].reset_index()
            parts.append(f"{head}\n\n{tab.to_markdown(index=False)}\n")
    return "\n".join(parts)


def worst_case(df: pd.DataFrame) -> pd.DataFrame:
    """Per defense, the lowest accuracy over the attacks, for each (partition, Byzantine count) column."""
    sub = df[df["n_byzantine"] > 0]
    if sub.empty:
        return pd.DataFrame()
    n = int(df["n_peers"].iloc[0])
    cols = {}
    for (p, b), g in sub.groupby(["partition", "n_byzantine"], sort=False):
        name = f"{p} {100 * b / n:.0f}%"
        vals = {}
        for d, gd in g.groupby("defense", sort=False):
            ok = gd[gd["status"] == "ok"]
            if (gd["status"] == "refused").all():
                vals[d] = "refused"
            elif ok.empty:
                vals[d] = "-"
            else:
                worst = ok.loc[ok["accuracy"].idxmin()]
                part = "" if len(ok) == len(gd) else f", {len(ok)} of {len(gd)} attacks"
                vals[d] = f"{worst['accuracy']:.3f} ({worst['attack']}{part})"
        cols[name] = vals
    out = pd.DataFrame(cols)
    out = out.reindex([d for d in dict.fromkeys(df["defense"]) if d in out.index])
    out = out[sorted(out.columns, key=lambda c: (c.split()[0] != "iid", float(c.split()[1][:-1])))]
    return out.rename_axis("defense").reset_index()


def write_markdown(df: pd.DataFrame, path: str | Path, t: Training, csv_name: str = "byzantine.csv") -> Path:
    best = best_defenses(df)
    pct = f"{100 * TARGET_GAP:.0f}"
    runs = df.drop_duplicates("key")
    ok = runs[runs["status"] == "ok"]
    missing = runs[runs["status"] == "missing"]
    lines = ["# Byzantine benchmark grid" + ("" if csv_name == "byzantine.csv" else f" ({Path(csv_name).stem})"), ""]
    lines += [
        f"Real P2P training per cell: {t.n_peers} peers (threads, each with its own database server, "
        f"`{t.backend}` aggregation backend), {t.model.upper()} on {t.dataset} "
        f"(first {t.limit_train} training / {t.limit_test} test images), {t.rounds} rounds, "
        f"{t.functions} gradient function(s) x batch {t.batch_size} per peer per round, SGD lr {t.lr} "
        f"momentum {t.momentum}" + (f", peer momentum {t.peer_momentum}" if t.peer_momentum else "")
        + f", seed {t.seed}; dirichlet partition alpha = {t.alpha}. Honest accuracy is "
        f"evaluated every {t.eval_every} rounds on {t.eval_samples} test images (curves) and after the last "
        f"round on all {t.limit_test}.",
        "",
        "Accuracy = mean over the honest peers after the last round; `clean_accuracy` = plain mean with no "
        "Byzantine peer on the same partition; `gap` (CSV) = clean_accuracy - accuracy. Each defense runs "
        "with f = the number of Byzantine peers (f = 0 at 0%, which every rule accepts). A cell whose "
        f"defense refuses (n, f) is `refused` (the rule's message is below and in `{csv_name}`); `error` "
        "= the run failed. At 0% the attack plays no part: one run per defense and partition serves every "
        "attack's row. Grid-specific hyperparameters: " + ", ".join(
            f"{d} {', '.join(f'{k}={v}' for k, v in ps.items())}" for d, ps in GRID_PARAMS.items()) + " (see "
        "`GRID_PARAMS` in `spirt/benchmarks/byzantine.py` for why); everything else is the registries' "
        "defaults, except ALIE's f = the number of Byzantine peers.",
        "",
        f"Runs: {len(ok)} distinct trainings, median {ok['seconds'].median():.1f} s wall each "
        f"(server start-up included, two cells running side by side)." if len(ok) else "No run finished.",
    ]
    if len(missing):
        lines += [f"**Partial grid: {len(missing)} of {len(runs)} runs not computed yet** (status `missing`)."]
    lines.append("")
    if not best.empty:
        b = int(best["n_byzantine"].iloc[0])
        n = int(df["n_peers"].iloc[0])
        lines += [f"## Best defense per attack ({n} peers, {b} Byzantine, iid)", "",
                  f"Target: the best defense within {pct} points of the clean accuracy "
                  f"({best['clean_accuracy'].iloc[0]:.3f}). One seed, final accuracy on {t.limit_test} test "
                  "images: differences of 1-2 points are within the noise of a single run.", ""]
        show = best.copy()
        for c in ("accuracy", "clean_accuracy", "mean_accuracy"):
            show[c] = show[c].map(lambda v: f"{v:.3f}")
        show["gap"] = best["gap"].map(lambda v: f"{100 * v:.1f}")
        show["within_target"] = best["within_target"].map({True: "yes", False: "**no**"})
        show = show.rename(columns={"mean_accuracy": "plain mean under attack", "gap": "points below clean",
                                    "within_target": f"within {pct} points"}).drop(columns="n_byzantine")
        lines += [show.to_markdown(index=False), ""]
        miss = best[~best["within_target"]]
        if miss.empty:
            lines += [f"Every attack has a defense within {pct} points of the clean accuracy.", ""]
        else:
            lines += [f"**Attacks where no defense stays within {pct} points:** "
                      + ", ".join(f"{r.attack} (best: {r.best_defense}, {100 * r.gap:.1f} points below)"
                                  for r in miss.itertuples()) + ".", ""]
        mean_best = best[best["best_defense"] == "mean"]["attack"].tolist()
        if mean_best:
            lines += [f"Plain mean is the best rule under {', '.join(mean_best)}: the attack stays inside the "
                      "honest spread, so it moves the mean little, while the robust rules both discard honest "
                      "information and are steered by the attackers' coordinated vectors.", ""]
        notes = []
        sl = df[(df["partition"] == "iid") & (df["n_byzantine"] == b) & (df["status"] == "ok")
                & (df["defense"] != "mean")]
        for atk, text in KNOWN_WEAKNESSES.items():
            g = sl[sl["attack"] == atk]
            broken = g[g["gap"] > TARGET_GAP]
            if len(broken):
                lost = ", ".join(f"{r.defense} {r.accuracy:.3f}" for r in broken.itertuples())
                notes.append(f"- **{atk}** — robust rules more than {pct} points below clean: {lost}. {text}")
        if notes:
            lines += ["Known weaknesses seen in this slice (properties of the rules against attacks built "
                      "to defeat them, not failures of the harness):", "", *notes, ""]
    wc = worst_case(df)
    if not wc.empty:
        lines += ["## Worst case over attacks", "",
                  "Per defense and column: the lowest final accuracy over the attacks (and which attack).", "",
                  wc.to_markdown(index=False), ""]
    refused = df[df["status"] == "refused"].drop_duplicates(["defense", "n_byzantine"])
    if len(refused):
        lines += ["## Refused cells", "", "Not run: the defense's (n, f) condition does not hold.", ""]
        lines += [f"- {r.defense} at {r.n_byzantine} Byzantine of {r.n_peers}: {r.error}" for r in refused.itertuples()]
        lines.append("")
    errors = df[df["status"] == "error"].drop_duplicates("key")
    if len(errors):
        lines += ["## Failed cells", ""]
        lines += [f"- {r.attack} x {r.defense}, {r.n_byzantine} Byzantine, {r.partition}: {r.error}"
                  for r in errors.itertuples()]
        lines.append("")
    lines += ["## Accuracy per cell", "", _grid_tables(df)]
    Path(path).write_text("\n".join(lines))
    return Path(path)


def plot_heatmap(df: pd.DataFrame, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sub = df[df["n_byzantine"] > 0]
    parts = list(dict.fromkeys(sub["partition"])) or ["iid"]
    fr = sorted(sub["n_byzantine"].unique()) or [0]
    attacks = sorted(sub["attack"].unique())
    defs = list(dict.fromkeys(sub["defense"]))
    w = max(4.0, 0.55 * len(defs) + 1.8)
    h = max(2.5, 0.4 * len(attacks) + 1.6)
    fig, axes = plt.subplots(len(parts), len(fr), figsize=(w * len(fr) + 1.2, h * len(parts) + 0.6),
                             squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    marks = {"refused": "R", "error": "E", "missing": ""}
    im = None
    for i, p in enumerate(parts):
        for j, b in enumerate(fr):
            ax = axes[i][j]
            g = sub[(sub["partition"] == p) & (sub["n_byzantine"] == b)]
            mat = np.full((len(attacks), len(defs)), np.nan)
            for r in g.itertuples():
                if r.status == "ok":
                    mat[attacks.index(r.attack), defs.index(r.defense)] = r.accuracy
            im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
            for r in g.itertuples():
                y, x = attacks.index(r.attack), defs.index(r.defense)
                txt = f"{100 * r.accuracy:.0f}" if r.status == "ok" else marks.get(r.status, "?")
                val = r.accuracy if r.status == "ok" else 1.0
                ax.text(x, y, txt, ha="center", va="center", fontsize=7, color="white" if val < 0.6 else "black")
            ax.set_xticks(range(len(defs)), defs, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(attacks)), attacks, fontsize=7)
            n = int(g["n_peers"].iloc[0]) if len(g) else 0
            clean = g["clean_accuracy"].iloc[0] if len(g) else float("nan")
            ax.set_title(f"{p}, {b}/{n} Byzantine ({100 * b / max(n, 1):.0f}%); clean {clean:.3f}", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6, label="final honest accuracy")
    fig.suptitle("Byzantine grid: final honest accuracy (%), attack x defense; R = refused by the rule's "
                 "(n, f) condition, E = run failed, blank = not computed", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_curves(df: pd.DataFrame, path: str | Path, max_attacks: int = 4) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = df[(df["n_byzantine"] > 0) & (df["status"] == "ok")]
    if sub.empty:
        sub = df[df["status"] == "ok"]
    nb = 3 if 3 in set(sub["n_byzantine"]) else (max(sub["n_byzantine"]) if len(sub) else 0)
    sub = sub[sub["n_byzantine"] == nb]
    present = list(dict.fromkeys(sub["attack"]))
    attacks = [a for a in CURVE_ATTACKS if a in present] + [a for a in present if a not in CURVE_ATTACKS]
    attacks = attacks[:max_attacks] or ["(none)"]
    parts = list(dict.fromkeys(sub["partition"])) or ["iid"]
    fig, axes = plt.subplots(len(parts), len(attacks), figsize=(4.2 * len(attacks), 3.4 * len(parts)),
                             squeeze=False, sharey=True)
    defs = list(dict.fromkeys(df["defense"]))
    colors = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(defs)}
    for i, p in enumerate(parts):
        clean = df[(df["partition"] == p) & (df["n_byzantine"] == 0) & (df["defense"] == "mean")
                   & (df["status"] == "ok")]
        for j, a in enumerate(attacks):
            ax = axes[i][j]
            for r in sub[(sub["partition"] == p) & (sub["attack"] == a)].itertuples():
                pts = json.loads(r.curve)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=r.defense, color=colors[r.defense])
            if len(clean):
                pts = json.loads(clean["curve"].iloc[0])
                if pts:
                    ax.plot(*zip(*pts, strict=True), color="black", ls="--", lw=1, label="mean, no attack")
            n = int(df["n_peers"].iloc[0]) if len(df) else 0
            ax.set_title(f"{a}, {nb}/{n} Byzantine, {p}", fontsize=9)
            ax.set_xlabel("round")
            ax.set_ylim(0, 1)
            ax.grid(True, alpha=0.3)
        axes[i][0].set_ylabel("honest test accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7,
                   bbox_to_anchor=(0.5, -0.02 - 0.03 * (len(labels) // 6)))
    fig.suptitle("Honest accuracy during training under attack", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def write_reports(df: pd.DataFrame, out_dir: str | Path, t: Training, stem: str = "byzantine") -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md",
             "heatmap": out / f"{stem}_heatmap.png", "curves": out / f"{stem}_curves.png"}
    df.to_csv(paths["csv"], index=False)
    write_markdown(df, paths["md"], t, csv_name=paths["csv"].name)
    plot_heatmap(df, paths["heatmap"])
    plot_curves(df, paths["curves"])
    return paths


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="spirt bench byzantine", description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="grid to run (default: $SPIRT_BYZ_PROFILE or 'reduced')")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"report directory (default: {DEFAULT_OUT})")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help=f"cache directory (default: {DEFAULT_CACHE})")
    p.add_argument("--workers", type=int, default=2, help="parallel cells (process pool; <= 1: in-process)")
    p.add_argument("--attack", action="append", help="only this attack (repeatable)")
    p.add_argument("--defense", action="append", help="only this defense configuration (repeatable)")
    p.add_argument("--fraction", action="append", type=float, help="only this Byzantine fraction (repeatable)")
    p.add_argument("--partition", action="append", choices=PARTITIONS, help="only this partition (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="recompute every cell (results are still cached)")
    p.add_argument("--list", action="store_true", help="print the grid's cells and their status, run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="write the reports from the cached cells only (the others are 'missing'), run nothing")
    return p


def selected_profile(name: str | None = None) -> str:
    name = name or os.environ.get("SPIRT_BYZ_PROFILE") or "reduced"
    if name not in PROFILES:
        raise ValueError(f"unknown Byzantine grid profile {name!r}; allowed: {', '.join(sorted(PROFILES))}")
    return name


def run_args(args: argparse.Namespace) -> int:
    try:
        profile = selected_profile(args.profile)
        if args.list:
            t, rows, runs = plan(profile, attacks=args.attack, defenses=args.defense, fractions=args.fraction,
                                 partitions=args.partition)
            for c in runs:
                msg = refusal(c, t)
                state = "refused" if msg else ("cached" if cache_read(args.cache, cell_key(c, t)) else "to run")
                print(f"{state:8s} {c.describe(t.n_peers)}")
            return 0
        df = run_grid(profile, args.out, args.cache, args.workers, attacks=args.attack, defenses=args.defense,
                      fractions=args.fraction, partitions=args.partition, use_cache=not args.no_cache,
                      compute=not args.report_only)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    best = best_defenses(df)
    if not best.empty:
        print(best.to_string(index=False))
    n_err = int((df.drop_duplicates("key")["status"] == "error").sum())
    print(f"{len(df)} rows, {df.attrs['computed']} runs computed in {df.attrs['wall_s'] / 60:.1f} min, "
          f"{n_err} failed; reports in {args.out}")
    return 1 if n_err else 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_args(build_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["run_grid", "main", "plan", "run_cell", "Training", "Profile", "PROFILES", "Cell", "DefenseConfig",
           "defense_configs", "best_defenses", "write_reports", "cell_key", "refusal", "VERSION"]
