"""The Byzantine benchmark grid's machinery on a tiny grid (`pytest -k byzantine`).

Real training runs, made tiny (3 peers, 2 rounds, 300 training images), so the cache, refusal,
fraction-0 reuse, failure and report logic is exercised end to end in a few seconds per run.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

import attacks
import defenses
from spirt.benchmarks import byzantine as bz

pytestmark = pytest.mark.byzantine

TINY = bz.Training(n_peers=3, rounds=2, eval_every=1, eval_samples=50, limit_train=300, limit_test=100)
# 3 peers, 1/3 -> 1 Byzantine peer: Krum (n > 2f + 2) refuses it, the mean runs.
GRID = {"attacks": ["sign_flip", "gaussian"], "defenses": ["mean", "krum"], "fractions": [0.0, 1 / 3],
        "partitions": ["iid"], "training": TINY, "seeds": 1}
REQUIRED = ["attack", "strength", "defense", "n_peers", "n_byzantine", "partition", "accuracy", "clean_accuracy",
            "status", "error", "seconds", "seeds", "mean", "std", "ci95_low", "ci95_high", "per_seed"]


def test_byzantine_grid_lists_come_from_the_registries():
    t, rows, runs = bz.plan("full")
    labels = [d.label for d in bz.defense_configs()]
    skipped = bz.PROFILES["full"].skip_attacks
    atk = [a for a in bz.attack_names() if a not in skipped]
    registered = attacks.names(kind="data") + attacks.names(kind="model")
    assert set(registered) - set(skipped) < set(atk) and {"alie(z=1.5)", "ipm(eps=2)"} <= set(atk)
    assert {r[0] for r in rows} == set(atk)
    # left out of "everything" only: the target slice runs it, and naming it runs it in the full grid
    assert skipped == ("adaptive_equivocation",)
    assert "adaptive_equivocation" in {r[0] for r in bz.plan("target")[1]}
    assert {r[0] for r in bz.plan("full", attacks=skipped)[1]} == set(skipped)
    assert set(defenses.names("aggregator")) <= set(labels)
    assert "nnm+trimmed_mean" in labels and "bucketing+median" in labels
    assert len(attacks.names()) >= 8 and len(labels) >= 9
    fractions = sorted({b / t.n_peers for _, _, b, _ in rows})
    assert fractions == pytest.approx(list(bz.FRACTIONS))
    assert len(rows) == len(atk) * len(labels) * len(bz.FRACTIONS) * len(bz.PARTITIONS)
    # every run once per seed; fraction 0: one attack-free run per defense x partition x seed, shared by
    # every attack's row
    seeds = bz.PROFILES["full"].seeds
    assert seeds == 3 and bz.grid_seeds(runs) == [0, 1, 2]
    clean = [c for c in runs if c.n_byzantine == 0]
    assert all(c.attack is None for c in clean)
    assert len(clean) == len(labels) * len(bz.PARTITIONS) * seeds
    assert len(runs) == len(clean) + len(atk) * len(labels) * (len(bz.FRACTIONS) - 1) * 2 * seeds


def test_byzantine_grid_reduced_profile_is_a_subset_of_full():
    _, red_rows, red_runs = bz.plan("reduced")
    _, full_rows, full_runs = bz.plan("full")
    assert set(red_runs) <= set(full_runs)
    assert {r[0] for r in red_rows} >= {"sign_flip", "alie"}
    assert 1 <= bz.PROFILES["reduced"].seeds <= bz.PROFILES["full"].seeds
    assert bz.PROFILES["reduced"].training == bz.PROFILES["full"].training  # shared cache


def test_byzantine_grid_target_profile_is_the_headline_slice_with_its_own_reports(tmp_path):
    t, rows, runs = bz.plan("target")
    labels = [d.label for d in bz.defense_configs()]
    assert {(a, d) for a, d, b, p in rows if b == 3 and p == "iid"} == {(a, d) for a in bz.attack_names() for d in labels}
    assert {b for _, _, b, _ in rows} == {3} and {p for *_, p in rows} == {"iid"} and t.n_peers == 10
    assert bz.Cell(None, "mean", 0, "iid") in runs  # the clean reference
    assert t.peer_momentum > 0 and t.rounds > bz.PROFILES["full"].training.rounds
    # its own cache entries: never mistaken for the full grid's cells
    cell = bz.Cell("alie", "mean", 3, "iid")
    assert bz.cell_key(cell, t) != bz.cell_key(cell, bz.PROFILES["full"].training)
    df = bz.run_grid("target", tmp_path, tmp_path / "cache", workers=1, progress=False, compute=False)
    assert set(df.status) <= {"missing", "refused"}
    assert (tmp_path / "byzantine_target.csv").exists() and not (tmp_path / "byzantine.csv").exists()
    assert (tmp_path / "byzantine_target_worstcase.png").exists() and (tmp_path / "byzantine_target_seeds.csv").exists()
    md = (tmp_path / "byzantine_target.md").read_text()
    assert "peer momentum 0.9" in md and "byzantine_target.csv" in md


@pytest.mark.parametrize(("defense", "f", "needle"), [
    ("krum", 4, "n > 2f + 2"),
    ("multi_krum", 4, "n > 2f + 2"),
    ("bulyan", 2, "n >= 4f + 3"),
    ("bucketing+median", 3, "after bucketing"),
])
def test_byzantine_grid_refusal_names_the_condition(defense, f, needle):
    msg = bz.refusal(bz.Cell("sign_flip", defense, f, "iid"), bz.Training())
    assert msg is not None and needle in msg


def test_byzantine_grid_accepts_f0_and_tolerable_f():
    t = bz.Training()
    for d in bz.defense_configs():
        assert bz.refusal(bz.Cell(None, d.label, 0, "iid"), t) is None, d.label
    for d in ("median", "trimmed_mean", "geometric_median", "centered_clipping", "nnm+trimmed_mean"):
        assert bz.refusal(bz.Cell("alie", d, 4, "iid"), t) is None, d


def test_byzantine_grid_alie_gets_f_and_keys_differ():
    assert bz.attack_params("alie", 3) == {"f": 3}
    assert bz.attack_params("sign_flip", 3) == {}
    a = bz.cell_key(bz.Cell("alie", "median", 3, "iid"), TINY)
    assert a == bz.cell_key(bz.Cell("alie", "median", 3, "iid"), TINY)
    assert a != bz.cell_key(bz.Cell("alie", "median", 3, "dirichlet"), TINY)
    assert a != bz.cell_key(bz.Cell("alie", "median", 3, "iid"), bz.Training(n_peers=3, rounds=3))


def test_byzantine_grid_unknown_filter_is_an_error():
    with pytest.raises(ValueError, match="unknown attack"):
        bz.plan("reduced", attacks=["nope"])
    with pytest.raises(ValueError, match="unknown defense"):
        bz.plan("reduced", defenses=["nope"])
    assert bz.main(["--list", "--attack", "nope"]) == 2


def test_byzantine_grid_cache_reuse_refusal_and_reports(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    df = bz.run_grid("reduced", out, cache, workers=1, progress=False, **GRID)

    # 2 attacks x 2 defenses x 2 fractions; runs: clean mean, clean krum, 2 attacked means; krum refused
    assert len(df) == 8 and df.attrs["computed"] == 4
    assert set(REQUIRED) <= set(df.columns)
    assert len(list(cache.glob("*.json"))) == 4
    refused = df[df.status == "refused"]
    assert len(refused) == 2 and set(refused.defense) == {"krum"}
    assert refused.error.str.contains("n > 2f + 2", regex=False).all() and refused.accuracy.isna().all()
    ok = df[df.status == "ok"]
    assert len(ok) == 6 and ok.accuracy.between(0, 1).all()

    # fraction 0: the same run in every attack's row
    zero = df[df.n_byzantine == 0]
    for _d, g in zero.groupby("defense"):
        assert g["keys"].nunique() == 1 and g.accuracy.nunique() == 1 and set(g.attack) == {"sign_flip", "gaussian"}
    clean = zero[zero.defense == "mean"].accuracy.iloc[0]
    assert (df.clean_accuracy == clean).all()
    curve = json.loads(ok.curve.iloc[0])
    assert [r for r, _ in curve] == [1, 2]
    assert (ok.seeds == 1).all() and ok["std"].isna().all()  # one seed: no spread, no interval
    rec = bz.cache_read(cache, json.loads(ok["keys"].iloc[0])[0])
    assert rec["distinct_models"] >= 1 and set(rec["phases"]) == {"startup", "training", "final_eval", "teardown"}

    # reports
    for name in ("byzantine_reduced.csv", "byzantine_reduced.md", "byzantine_reduced_heatmap.png",
                 "byzantine_reduced_curves.png", "byzantine_reduced_seeds.csv", "byzantine_reduced_worstcase.csv",
                 "byzantine_reduced_worstcase.png"):
        assert (out / name).stat().st_size > 0, name
    csv = pd.read_csv(out / "byzantine_reduced.csv")
    assert set(REQUIRED) <= set(csv.columns) and len(csv) == 8
    md = (out / "byzantine_reduced.md").read_text()
    assert "Best defense per attack" in md and "refused" in md

    # rerun: everything from the cache, same numbers
    again = bz.run_grid("reduced", None, cache, workers=1, progress=False, **GRID)
    assert again.attrs["computed"] == 0 and again[again.status == "ok"].cached.all()
    pd.testing.assert_series_equal(again.accuracy, df.accuracy)

    # a missing entry is recomputed, and only that one
    victim = json.loads(df[(df.attack == "gaussian") & (df.n_byzantine == 1) & (df.defense == "mean")]["keys"].iloc[0])[0]
    (cache / f"{victim}.json").unlink()
    third = bz.run_grid("reduced", None, cache, workers=1, progress=False, **GRID)
    assert third.attrs["computed"] == 1

    # a stale entry (other version) is a miss; --no-cache recomputes a cached one
    rec = json.loads((cache / f"{victim}.json").read_text())
    rec["version"] = "old"
    (cache / f"{victim}.json").write_text(json.dumps(rec))
    assert bz.cache_read(cache, victim) is None
    one = {**GRID, "attacks": ["gaussian"], "defenses": ["mean"], "fractions": [0.0]}
    assert bz.run_grid("reduced", None, cache, workers=1, progress=False, **one).attrs["computed"] == 0
    assert bz.run_grid("reduced", None, cache, workers=1, progress=False, use_cache=False,
                       **one).attrs["computed"] == 1


def test_byzantine_grid_failed_cell_is_recorded_not_cached(tmp_path, monkeypatch):
    import spirt.runner

    def boom(cfg, **kw):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(spirt.runner, "run_training", boom)
    grid = {**GRID, "attacks": ["sign_flip"], "defenses": ["mean"]}
    df = bz.run_grid("reduced", tmp_path / "out", tmp_path / "cache", workers=1, progress=False, **grid)
    assert (df.status == "error").all() and df.error.str.contains("injected failure").all()
    assert not list((tmp_path / "cache").glob("*.json"))
    assert (tmp_path / "out" / "byzantine_reduced.md").read_text().count("injected failure") >= 1


def test_byzantine_grid_process_pool(tmp_path):
    """The spawn pool path: the cell comes back from a worker, which cached it (one cell: one worker)."""
    grid = {**GRID, "attacks": ["sign_flip"], "defenses": ["mean"], "fractions": [0.0]}
    df = bz.run_grid("reduced", None, tmp_path / "cache", workers=2, progress=False, **grid)
    assert df.attrs["computed"] == 1 and (df.status == "ok").all()
    rec = bz.cache_read(tmp_path / "cache", json.loads(df["keys"].iloc[0])[0])
    assert rec["cpu_seconds"] > 0
    assert rec["environment"] == bz.run_environment() and rec["environment"]["isa"]


def test_byzantine_grid_workers_start_in_the_worker_environment():
    """One BLAS thread per worker: a pool's workers start at its first submissions, so an environment
    set only around the pool's creation never reached them."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    assert os.environ.get("OPENBLAS_NUM_THREADS") is None  # else the test would prove nothing
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        futures = bz.submit_all(pool, os.getenv, list(bz.WORKER_ENV))
        assert {name: fut.result() for fut, name in futures.items()} == bz.WORKER_ENV
    assert os.environ.get("OPENBLAS_NUM_THREADS") is None


def mapped_bytes_while_holding(nbytes: int) -> int:
    """glibc's bytes in mmap'ed blocks while an ``nbytes`` array is alive (``mallinfo2().hblkhd``)."""
    import ctypes

    import numpy as np

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2().hblkhd
    block = np.ones(nbytes, dtype=np.uint8)
    held = libc.mallinfo2().hblkhd - before
    del block
    return held


def test_byzantine_grid_workers_keep_large_blocks_on_the_heap():
    """A cell worker takes a 48 MiB temporary from glibc's heap, not from a fresh mmap whose pages the
    kernel zeroes on every touch; a plain process (the control) maps it: 48 MiB is above the largest
    threshold glibc's own dynamic adjustment reaches (32 MiB)."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    size = 48 << 20
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as plain:
        assert plain.submit(mapped_bytes_while_holding, size).result() >= size
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=bz.worker_init, initargs=(os.getpid(),)) as pool:
        assert pool.submit(mapped_bytes_while_holding, size).result() == 0


def test_byzantine_grid_report_says_where_its_runs_were_made(tmp_path, fake_training):
    df = bz.run_grid("reduced", tmp_path, tmp_path / "cache", workers=1, progress=False, seeds=1, **SYN)
    assert df.attrs["environments"] == (1, 0)
    md = (tmp_path / "byzantine_reduced.md").read_text()
    assert "The runs come from 1 environment (CPU" in md
    older = [{"status": "ok"}, {"status": "ok", "environment": {"cpu": "a"}}, {"status": "error"}]
    assert bz.environments(older) == (1, 1)
    assert "1 runs predate the record" in bz._environment_line(*bz.environments(older))


def test_byzantine_grid_profile_selection(monkeypatch):
    monkeypatch.setenv("SPIRT_BYZ_PROFILE", "full")
    assert bz.selected_profile() == "full"
    assert bz.selected_profile("reduced") == "reduced"
    monkeypatch.setenv("SPIRT_BYZ_PROFILE", "huge")
    with pytest.raises(ValueError, match="allowed"):
        bz.selected_profile()


def test_byzantine_grid_cli_list(capsys, tmp_path):
    rc = bz.main(["--list", "--profile", "full", "--attack", "sign_flip", "--defense", "krum", "--defense", "mean",
                  "--fraction", "0.4", "--partition", "iid", "--cache", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "refused" in out and "to run" in out


# ---------------------------------------------------------------------------------------------------
# Seeds, statistics, worst case: on synthetic results (no training)
# ---------------------------------------------------------------------------------------------------

#: synthetic final accuracy of a run: a defense's level, minus what the attack costs it, plus the seed
LEVEL = {"mean": 0.80, "median": 0.70, "krum": 0.60, "trimmed_mean": 0.78}
COST = {"sign_flip": {"mean": 0.70, "median": 0.05, "krum": 0.0, "trimmed_mean": 0.06},
        "alie": {"mean": 0.02, "median": 0.20, "krum": 0.30, "trimmed_mean": 0.15}}


def fake_accuracy(cell: bz.Cell) -> float:
    cost = COST[cell.attack][cell.defense] if cell.attack else 0.0
    return round(LEVEL[cell.defense] - cost + 0.01 * cell.seed, 6)


@pytest.fixture
def fake_training(monkeypatch):
    """Replace the training of a cell (not the grid's cache and bookkeeping) by :func:`fake_accuracy`;
    returns the list of cells trained."""
    calls: list[bz.Cell] = []

    def train(cell, t, data_dir):
        calls.append(cell)
        acc = fake_accuracy(cell)
        return {"accuracy": acc, "accuracy_min": acc, "test_loss": 1.0, "train_loss": 1.0, "distinct_models": 1,
                "curve": [[1, acc - 0.1], [2, acc]], "functions_failed": 0,
                "phases": {"startup": 1.0, "training": 10.0, "final_eval": 3.0, "teardown": 1.0}}

    monkeypatch.setattr(bz, "_train", train)
    monkeypatch.setattr(bz, "prepare_data", lambda t: None)
    return calls


SYN = {"attacks": ["sign_flip", "alie"], "defenses": ["mean", "median", "krum", "trimmed_mean"],
       "fractions": [0.0, 0.3], "partitions": ["iid"]}


def test_byzantine_grid_t_quantiles():
    assert bz.t975(1) == pytest.approx(12.706, abs=1e-3)
    assert bz.t975(2) == pytest.approx(4.303, abs=1e-3)
    assert bz.t975(30) == pytest.approx(2.042, abs=1e-3)
    assert bz.t975(1000) == pytest.approx(1.962, abs=1e-3)
    with pytest.raises(ValueError):
        bz.t975(0)
    try:
        from scipy import stats
    except ImportError:
        return
    for dof in range(1, 80):
        assert bz.t975(dof) == pytest.approx(stats.t.ppf(0.975, dof), abs=2e-4), dof


def test_byzantine_grid_seed_stats_known_values():
    s = bz.seed_stats([0.70, 0.72, 0.74])
    hw = 4.3027 * 0.02 / 3 ** 0.5
    assert s["seeds"] == 3 and s["mean"] == pytest.approx(0.72) and s["std"] == pytest.approx(0.02)
    assert s["ci95_low"] == pytest.approx(0.72 - hw) and s["ci95_high"] == pytest.approx(0.72 + hw)
    # a missing seed (None / NaN) is left out; one value has no spread and no interval
    assert bz.seed_stats([0.5, None, float("nan"), 0.7])["seeds"] == 2
    one = bz.seed_stats([0.6, None])
    assert one["seeds"] == 1 and one["mean"] == 0.6 and math.isnan(one["std"]) and math.isnan(one["ci95_low"])
    assert bz.seed_stats([])["seeds"] == 0
    assert bz.fmt_ci(0.72, 0.70, 0.74) == "0.720 ± 0.020" and bz.fmt_ci(0.72, float("nan"), float("nan")) == "0.720"


def test_byzantine_grid_seed_is_part_of_the_cell():
    t = bz.Training()
    c0, c2 = bz.Cell("alie", "median", 3, "iid"), bz.Cell("alie", "median", 3, "iid", seed=2)
    assert "seed" not in bz.cell_spec(c0, t) and bz.cell_spec(c2, t)["seed"] == 2
    assert bz.cell_key(c0, t) != bz.cell_key(c2, t)
    cfg = bz.make_config(c2, bz.Training(seed=5))
    assert cfg.run.seed == 7  # the run seed draws the partition, the initial model and the minibatches
    # the final evaluation uses the whole test set, the curve a few images
    assert t.limit_test is None and t.eval_samples < 10000
    assert bz.VERSION != "byz-2"


def test_byzantine_grid_adding_a_seed_runs_only_the_new_seed(tmp_path, fake_training):
    cache = tmp_path / "cache"
    one = bz.run_grid("reduced", None, cache, workers=1, progress=False, seeds=1, **SYN)
    n1 = len(fake_training)
    assert n1 == one.attrs["computed"] == 4 + 8  # 4 clean runs, 2 attacks x 4 defenses at 30%
    assert {c.seed for c in fake_training} == {0}
    two = bz.run_grid("reduced", None, cache, workers=1, progress=False, seeds=2, **SYN)
    assert len(fake_training) == 2 * n1 and two.attrs["computed"] == n1
    assert {c.seed for c in fake_training[n1:]} == {1}
    again = bz.run_grid("reduced", None, cache, workers=1, progress=False, seeds=2, **SYN)
    assert again.attrs["computed"] == 0 and len(fake_training) == 2 * n1
    row = two[(two.attack == "alie") & (two.defense == "median") & (two.n_byzantine == 3)].iloc[0]
    assert json.loads(row.per_seed) == pytest.approx([0.50, 0.51]) and row.seeds == 2
    assert json.loads(row["keys"])[0] == json.loads(one[(one.attack == "alie") & (one.defense == "median")
                                                        & (one.n_byzantine == 3)]["keys"].iloc[0])[0]


def test_byzantine_grid_statistics_columns_and_reports(tmp_path, fake_training):
    df = bz.run_grid("reduced", tmp_path, tmp_path / "cache", workers=1, progress=False, seeds=3, **SYN)
    row = df[(df.attack == "sign_flip") & (df.defense == "krum") & (df.n_byzantine == 3)].iloc[0]
    assert row.seeds == 3 and row["mean"] == pytest.approx(0.61) and row["std"] == pytest.approx(0.01)
    assert row.ci95_high - row["mean"] == pytest.approx(4.3027 * 0.01 / 3 ** 0.5)
    assert row.clean_accuracy == pytest.approx(0.81) and row.gap == pytest.approx(0.20)
    assert json.loads(row.curve) == [[1, pytest.approx(0.51)], [2, pytest.approx(0.61)]]
    assert json.loads(row.curve_band)[1] == pytest.approx([2, 0.60, 0.62])

    csv = pd.read_csv(tmp_path / "byzantine_reduced.csv")
    assert set(REQUIRED) <= set(csv.columns) and len(csv) == 16
    seeds = pd.read_csv(tmp_path / "byzantine_reduced_seeds.csv")
    assert len(seeds) == 3 * len(csv) and set(seeds.seed) == {0, 1, 2}
    s = seeds[(seeds.attack == "alie") & (seeds.defense == "mean") & (seeds.n_byzantine == 3)]
    assert list(s.accuracy) == pytest.approx([0.78, 0.79, 0.80])
    assert "z=0.52 from (n=10, f=3)" in set(csv[(csv.attack == "alie") & (csv.n_byzantine == 3)].strength)
    wc = pd.read_csv(tmp_path / "byzantine_reduced_worstcase.csv")
    assert set(wc.columns) >= {"defense", "worst_attack", "mean", "ci95_low", "ci95_high", "maxmin"}
    assert (tmp_path / "byzantine_reduced_worstcase.png").stat().st_size > 0

    md = (tmp_path / "byzantine_reduced.md").read_text()
    assert "3 seeds per cell" in md and "Student-t 95% interval" in md
    assert "0.610 ± 0.025" in md  # krum under sign flip: mean ± half-width
    assert "not distinguishable" in md and "## Worst case per defense" in md and "### Max-min choice" in md
    assert "- `alie`: z=0.52 from (n=10, f=3)" in md
    assert "within the noise of a single run" not in md


def _synthetic(accuracies: dict[tuple[str, str], list[float]], clean: list[float]) -> pd.DataFrame:
    """A grid frame from given per-seed accuracies of (attack, defense) at 3 of 10 Byzantine, iid."""
    t = bz.Training()
    seeds = range(len(clean))
    rows, results = [], {}
    for (a, d), accs in accuracies.items():
        rows.append((a, d, 3, "iid"))
        for s, acc in zip(seeds, accs, strict=True):
            c = bz.Cell(a, d, 3, "iid", s)
            results[c] = {**bz._base_record(c, t, bz.cell_key(c, t)), "status": "ok", "accuracy": acc}
    for s, acc in zip(seeds, clean, strict=True):
        c = bz.Cell(None, "mean", 0, "iid", s)
        results[c] = {**bz._base_record(c, t, bz.cell_key(c, t)), "status": "ok", "accuracy": acc}
    return bz.assemble(rows, results, t, list(seeds))


def test_byzantine_grid_best_defense_lists_the_indistinguishable():
    df = _synthetic({("alie", "median"): [0.70, 0.72, 0.74],      # 0.72 ± 0.050
                     ("alie", "krum"): [0.69, 0.70, 0.71],        # 0.70 ± 0.025: overlaps median's
                     ("alie", "mean"): [0.50, 0.51, 0.52]},       # 0.51: apart
                    clean=[0.75, 0.76, 0.77])
    best = bz.best_defenses(df).iloc[0]
    assert best.best_defense == "median" and best.indistinguishable == "krum" and best.distinguishable
    assert best.accuracy == pytest.approx(0.72) and best.mean_accuracy == pytest.approx(0.51)
    assert best.gap == pytest.approx(0.04) and not best.within_target
    # the lower end of the interval, against the clean mean: 0.76 - (0.72 - 0.0497)
    assert best.low_gap == pytest.approx(0.04 + 4.3027 * 0.02 / 3 ** 0.5) and not best.low_within_target
    # one seed: no interval, nothing can be told apart, no lower bound
    one = bz.best_defenses(_synthetic({("alie", "median"): [0.72], ("alie", "krum"): [0.70]}, clean=[0.76])).iloc[0]
    assert one.indistinguishable == "" and not one.distinguishable and math.isnan(one.low_gap)


def test_byzantine_grid_target_lower_bound_is_reported(tmp_path):
    """The target slice asks for the best defense's 95% lower bound within 3 points of clean: a mean
    within 3 points whose interval reaches further down is named, one whose interval stays inside is not."""
    df = _synthetic({("alie", "median"): [0.73, 0.75, 0.77],    # mean 1 point below, interval 6 below
                     ("ipm", "median"): [0.749, 0.75, 0.751]},  # mean 1 point below, interval 1.2 below
                    clean=[0.75, 0.76, 0.77])
    best = bz.best_defenses(df).set_index("attack")
    assert best.loc["alie"].within_target and not best.loc["alie"].low_within_target
    assert best.loc["ipm"].within_target and best.loc["ipm"].low_within_target
    md = bz.write_markdown(df, tmp_path / "t.md", bz.Training()).read_text()
    assert "starts within 3 points of the clean mean for 1 of 2 attacks. **Not for:** alie (median" in md
    assert "| lower bound within 3" in md


def test_byzantine_grid_worst_case_and_max_min():
    df = _synthetic({("sign_flip", "median"): [0.70, 0.71, 0.72],
                     ("alie", "median"): [0.50, 0.52, 0.54],       # median's worst: 0.52
                     ("sign_flip", "krum"): [0.60, 0.61, 0.62],
                     ("alie", "krum"): [0.40, 0.40, 0.40],         # krum's worst: 0.40 ± 0, apart
                     ("sign_flip", "trimmed_mean"): [0.49, 0.50, 0.51],  # trimmed mean's worst: 0.50,
                     ("alie", "trimmed_mean"): [0.55, 0.56, 0.57]},      # overlaps median's worst
                    clean=[0.75, 0.76, 0.77])
    wc = bz.worst_case_frame(df).set_index("defense")
    assert wc.loc["median", "worst_attack"] == "alie" and wc.loc["median", "mean"] == pytest.approx(0.52)
    assert wc.loc["median", "ci95_high"] == pytest.approx(0.52 + 4.3027 * 0.02 / 3 ** 0.5)
    assert wc.loc["krum", "worst_attack"] == "alie" and wc.loc["trimmed_mean", "worst_attack"] == "sign_flip"
    assert wc.loc["median", "maxmin"] == "best" and wc.loc["trimmed_mean", "maxmin"] == "indistinguishable"
    assert wc.loc["krum", "maxmin"] == ""
    mm = bz.max_min(df).iloc[0]
    assert mm.defense == "median" and mm.indistinguishable == "trimmed_mean" and mm.worst_attack == "alie"
    wide = bz.worst_case(df).set_index("defense")
    assert wide.loc["median", "iid 30%"] == "**0.520 ± 0.050** (alie)"
    assert wide.loc["trimmed_mean", "iid 30%"].startswith("*0.500")


def test_byzantine_grid_literature_strengths():
    t = bz.Training()
    names = bz.attack_names()
    assert "alie(z=1.5)" in names and "ipm(eps=2)" in names
    assert bz.PROFILES["reduced"].attacks is not None and "alie(z=1.5)" not in bz.PROFILES["reduced"].attacks
    spec = bz.cell_spec(bz.Cell("alie(z=1.5)", "median", 3, "iid"), t)
    assert spec["attack"] == "alie" and spec["attack_params"] == {"z": 1.5}
    assert bz.cell_key(bz.Cell("alie(z=1.5)", "median", 3, "iid"), t) != bz.cell_key(bz.Cell("alie", "median", 3, "iid"), t)
    assert bz.refusal(bz.Cell("ipm(eps=2)", "krum", 3, "iid"), t) is None
    cfg = bz.make_config(bz.Cell("ipm(eps=2)", "krum", 3, "iid"), t)
    assert cfg.attack.name == "ipm" and cfg.attack.params == {"epsilon": 2.0}
    assert bz.strength("alie", 3, 10) == "z=0.52 from (n=10, f=3)"
    assert bz.strength("alie(z=1.5)", 3, 10) == "z=1.5"
    assert bz.strength("ipm", 3, 10) == "epsilon=0.1" and bz.strength("ipm(eps=2)", 3, 10) == "epsilon=2"
    assert bz.strength("alie", 0, 10) == ""


def test_byzantine_grid_estimate_and_eta(capsys, tmp_path):
    est = bz.estimate("full", tmp_path, workers=2)
    assert est["runs"] == est["refused"] + est["cached"] + est["to_run"] and est["cached"] == 0
    assert est["seconds"] == pytest.approx(est["to_run"] * est["cell_seconds"] / 2)
    assert bz.estimate("full", tmp_path, workers=2, seeds=1)["to_run"] * 3 == est["to_run"]
    assert bz.main(["--estimate", "--profile", "full", "--seeds", "1", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "to run" in out and "worker(s): about" in out


def test_byzantine_grid_time_left_follows_what_each_cell_costs():
    """The time left counts each unfinished cell at what cells like it took: the same row on another
    seed, else the same attack, else the median of all. The target slice starts with its adaptive
    attacks, 2-5x as long as the others: one median of the first cells put 8 h on a 3.3 h grid."""
    def cell(attack, defense, seed=0):
        return bz.Cell(attack, defense, 3, "iid", seed)

    slow = [cell("adaptive_equivocation", d, s) for s in (0, 1) for d in ("mean", "median", "krum")]
    fast = [cell(a, d, s) for s in (0, 1) for a in ("alie", "ipm") for d in ("mean", "median", "krum")]
    log = bz._Log(False, slow + fast, known=0, workers=2, times=bz.CellTimes(20.0))
    assert log.eta() == pytest.approx(18 * 20.0 / 2)  # nothing timed yet: the prior
    for c, s in zip(slow[:3], (200.0, 300.0, 250.0), strict=True):
        log.cell(c, {"status": "ok", "seconds": s, "accuracy": 0.5}, 10)
    # the same rows on seed 1 as on seed 0; the other attacks at the median of all (3 timed cells)
    assert log.eta() == pytest.approx((200 + 300 + 250 + 12 * 250) / 2)
    log.cell(fast[0], {"status": "ok", "seconds": 30.0, "accuracy": 0.5}, 10)
    log.cell(fast[3], {"status": "ok", "seconds": 40.0, "accuracy": 0.5}, 10)
    # adaptive rows of seed 1 as on seed 0 (750 s); alie's five cells left at alie's 30 s, ipm's at 40 s
    assert log.eta() == pytest.approx((750 + 5 * 30 + 5 * 40) / 2) and log.todo == 18 and log.n == 5
    assert bz.CellTimes(20.0).add_records({fast[0]: {"status": "error", "seconds": 5.0}}).expect(fast[0]) == 20.0


def test_byzantine_grid_goes_on_from_the_run_archive_on_another_machine(tmp_path, fake_training):
    """The reports' run archive carries a grid over to a machine without the cache: only the runs it
    lacks are trained, and every run of both sittings ends up in it."""
    out = tmp_path / "reports"
    one = bz.run_grid("reduced", out, tmp_path / "cache-a", workers=1, progress=False, seeds=1, **SYN)
    n1 = len(fake_training)
    archive = bz.runs_path(out, "byzantine")
    lines = archive.read_text().splitlines()
    assert len(lines) == n1 == one.attrs["archived"]
    rec = json.loads(lines[0])
    assert rec["key"] == bz.spec_key(rec["spec"]) and "cached" not in rec and rec["curve"]

    # another machine: an empty cache, the committed reports
    est = bz.estimate("reduced", tmp_path / "cache-b", 2, out_dir=out, seeds=2, **SYN)
    assert est["cached"] == n1 and est["to_run"] == n1
    two = bz.run_grid("reduced", out, tmp_path / "cache-b", workers=1, progress=False, seeds=2, **SYN)
    assert len(fake_training) == 2 * n1 and two.attrs["computed"] == n1
    assert {c.seed for c in fake_training[n1:]} == {1}
    assert len(archive.read_text().splitlines()) == 2 * n1
    seeds = pd.read_csv(out / "byzantine_reduced_seeds.csv")
    assert seeds[seeds.seed == 0].accuracy.notna().all() and seeds[seeds.seed == 1].accuracy.notna().all()
    # use_cache=False (--no-cache) ignores the archive too, and the archive keeps every run
    assert bz.run_grid("reduced", out, tmp_path / "cache-c", workers=1, progress=False, seeds=1,
                       use_cache=False, **SYN).attrs["computed"] == n1
    assert len(archive.read_text().splitlines()) == 2 * n1



def test_byzantine_grid_reduced_run_leaves_the_full_grids_report_alone(tmp_path, fake_training):
    """``tox -e bench`` runs the reduced grid into the tree's reports/, which hold the full grid's report.
    The reduced grid writes reports of its own (``byzantine_reduced.*``), takes its runs from the full
    grid's archive (they are seed-0 cells of it: nothing is trained again) and leaves ``byzantine.*`` as it
    was. Written as ``byzantine.*``, its 30-run report replaced the full one at every benchmark run."""
    out = tmp_path / "reports"
    full = bz.run_grid("full", out, tmp_path / "cache-a", workers=1, progress=False, seeds=2, **SYN)
    trained = len(fake_training)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "byzantine.md" in before and "byzantine_runs.jsonl" in before
    # another machine (an empty cache), the committed reports
    reduced = bz.run_grid("reduced", out, tmp_path / "cache-b", workers=1, progress=False, **SYN)
    assert len(fake_training) == trained and reduced.attrs["computed"] == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    md = (out / "byzantine_reduced.md").read_text()
    assert md.startswith("# Byzantine benchmark grid (byzantine_reduced)") and "`byzantine_runs.jsonl`" in md
    assert "**1 seed per cell**" in md and "**2 seeds per cell**" in (out / "byzantine.md").read_text()
    # the reduced report's numbers are the full grid's seed-0 runs
    row = reduced[(reduced.attack == "alie") & (reduced.defense == "median") & (reduced.n_byzantine == 3)].iloc[0]
    seed0 = json.loads(full[(full.attack == "alie") & (full.defense == "median") & (full.n_byzantine == 3)]
                       .iloc[0].per_seed)[0]
    assert row.accuracy == pytest.approx(seed0)


def test_byzantine_grid_run_archive_keeps_only_checked_records(tmp_path, fake_training):
    out = tmp_path / "reports"
    bz.run_grid("reduced", out, None, workers=1, progress=False, seeds=1,
                **{**SYN, "attacks": ["sign_flip"], "defenses": ["mean"]})
    archive = bz.runs_path(out, "byzantine")
    good = [json.loads(x) for x in archive.read_text().splitlines()]
    assert len(good) == 2  # the clean run and sign_flip x mean at 30%
    tampered_spec = {**good[1], "spec": {**good[1]["spec"], "n_byzantine": 2}}
    lines = [json.dumps(good[0]), "{not json", json.dumps({**good[1], "accuracy": 1.5}), json.dumps(tampered_spec),
             json.dumps({**good[1], "version": "byz-2"}), json.dumps({**good[1], "status": "error"}), "[1, 2]"]
    archive.write_text("\n".join(lines) + "\n")
    runs, skipped = bz.read_runs(archive)
    assert list(runs) == [good[0]["key"]]
    assert skipped == {"not JSON": 1, "accuracy 1.5 is not in [0, 1]": 1, "its key is not the hash of its spec": 1,
                       f"version 'byz-2', not {bz.VERSION!r}": 1, "status 'error'": 1, "not an object": 1}
    # a refused record is trained again, and the archive is rewritten without the bad lines
    calls = len(fake_training)
    bz.run_grid("reduced", out, None, workers=1, progress=False, seeds=1,
                **{**SYN, "attacks": ["sign_flip"], "defenses": ["mean"]})
    assert len(fake_training) == calls + 1
    assert sorted(json.loads(x)["key"] for x in archive.read_text().splitlines()) == sorted(g["key"] for g in good)
    assert bz.read_runs(tmp_path / "absent.jsonl") == ({}, {})


def test_byzantine_grid_estimate_learns_from_cells_of_other_training_settings(tmp_path):
    """A grid with no timed cell of its own is estimated from the runs of other settings in the cache
    (the target slice's 60-round cells for the 20-round grid): per attack, rounds scaled, the fixed
    phases as they were."""
    target = bz.PROFILES["target"].training
    for attack, seconds in (("alie", 60.0), ("optimal_alie", 180.0)):
        c = bz.Cell(attack, "median", 3, "iid")
        rec = {**bz._base_record(c, target, bz.cell_key(c, target)), "status": "ok", "accuracy": 0.8,
               "seconds": seconds + 5.0,
               "phases": {"startup": 1.0, "training": seconds, "final_eval": 3.0, "teardown": 1.0}}
        bz._cache_write(tmp_path, rec["key"], rec)
    times = bz._cell_times(bz.Training(), {}, tmp_path, None)
    assert times.expect(bz.Cell("alie", "krum", 1, "dirichlet")) == pytest.approx(5.0 + 60.0 / 3)
    assert times.expect(bz.Cell("optimal_alie", "mean", 2, "iid", 2)) == pytest.approx(5.0 + 180.0 / 3)
    assert times.expect(bz.Cell("ipm", "mean", 2, "iid")) == bz.estimate_cell_seconds(bz.Training())  # < 3 timed
    est = bz.estimate("full", tmp_path, 2, attacks=["alie"], fractions=[0.3], partitions=["iid"], seeds=1)
    n = est["to_run"]  # alie's cells, and the clean reference run (no attack: the prior)
    assert est["seconds"] == pytest.approx(((n - 1) * 25.0 + bz.estimate_cell_seconds(bz.Training())) / 2)
    # the grid's own cells come first: a timed row of this grid wins over the scaled ones
    own = bz.Cell("alie", "median", 3, "iid")
    times = bz._cell_times(bz.Training(), {own: {"status": "ok", "seconds": 40.0, "key": "k"}}, tmp_path, None)
    assert times.expect(bz.Cell("alie", "krum", 3, "iid")) == 40.0


def test_byzantine_grid_names_attacks_that_gave_identical_results(tmp_path):
    """Two attacks with the same accuracy on every seed of every cell sent the same vectors: the report
    says so instead of counting them as two results (adaptive equivocation vs optimal ALIE here)."""
    same = {("adaptive_equivocation", "median"): [0.80, 0.81, 0.82], ("optimal_alie", "median"): [0.80, 0.81, 0.82],
            ("adaptive_equivocation", "krum"): [0.70, 0.71, 0.72], ("optimal_alie", "krum"): [0.70, 0.71, 0.72],
            ("alie", "median"): [0.80, 0.81, 0.82], ("alie", "krum"): [0.70, 0.71, 0.73]}
    df = _synthetic(same, clean=[0.83, 0.84, 0.85])
    assert bz.identical_attacks(df) == [["adaptive_equivocation", "optimal_alie"]]  # alie differs in one seed
    md = bz.write_markdown(df, tmp_path / "t.md", bz.Training()).read_text()
    assert "**Identical results:** adaptive_equivocation, optimal_alie gave the same accuracy" in md
    assert "sends each the vector of optimal ALIE" in md
    assert bz.identical_attacks(_synthetic({k: v for k, v in same.items() if k[0] != "optimal_alie"},
                                           clean=[0.83, 0.84, 0.85])) == []


def test_byzantine_grid_report_of_a_part_says_which_part(tmp_path):
    """A report written from a filtered grid names the filters and what the profile has besides; the
    whole profile's report does not claim to be a part."""
    bz.run_grid("full", tmp_path / "part", tmp_path / "cache", workers=1, progress=False, compute=False,
                fractions=[0.3], partitions=["iid"])
    md = (tmp_path / "part" / "byzantine.md").read_text()
    assert "**A part of the `full` grid**, selected with `--fraction`, `--partition`" in md
    assert "Byzantine fractions 30% (of 0%, 10%, 20%, 30%, 40%)" in md and "partitions iid (of iid, dirichlet)" in md
    bz.run_grid("reduced", tmp_path / "whole", tmp_path / "cache", workers=1, progress=False, compute=False,
                partitions=list(bz.PROFILES["reduced"].partitions))
    assert "A part of" not in (tmp_path / "whole" / "byzantine_reduced.md").read_text()


def test_byzantine_grid_report_says_which_columns_ran_fewer_seeds(tmp_path, fake_training):
    """A grid whose fractions ran different numbers of seeds (3 at 0% and 30%, one at 20%) says, per
    column, how many seeds ran, and does not claim its planned seeds for every cell."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    whole = {**SYN, "fractions": [0.0, 0.2, 0.3]}
    bz.run_grid("full", None, cache, workers=1, progress=False, seeds=3, **SYN)
    bz.run_grid("full", None, cache, workers=1, progress=False, seeds=1, **{**SYN, "fractions": [0.2]})
    df = bz.run_grid("full", out, cache, workers=1, progress=False, compute=False, seeds=3, **whole)
    assert set(df[df.n_byzantine == 2].seeds) == {1} and set(df[df.n_byzantine == 3].seeds) == {3}
    # a row is compared with the clean runs of the seeds it ran: seed 0's here, not the mean of three
    clean = [fake_accuracy(bz.Cell(None, "mean", 0, "iid", s)) for s in range(3)]
    one = df[(df.n_byzantine == 2) & (df.attack == "alie") & (df.defense == "median")].iloc[0]
    assert one.clean_accuracy == pytest.approx(clean[0]) and json.loads(one.clean_per_seed) == pytest.approx(clean)
    three = df[(df.n_byzantine == 3) & (df.attack == "alie") & (df.defense == "median")].iloc[0]
    assert three.clean_accuracy == pytest.approx(sum(clean) / 3)
    md = (out / "byzantine.md").read_text()
    assert "**up to 3 seeds per cell**" in md
    assert ("**Seeds run per column** (partition, Byzantine fraction; of 3 planned): iid 0%: 3; iid 20%: 1; "
            "iid 30%: 3.") in md
    assert "A row with one seed has no interval" in md
    full = bz.run_grid("full", tmp_path / "full", cache, workers=1, progress=False, compute=False, seeds=3, **SYN)
    assert set(full.seeds) == {3}
    md = (tmp_path / "full" / "byzantine.md").read_text()
    assert "**3 seeds per cell**" in md and "Seeds run per column" not in md


def test_byzantine_grid_partial_report_counts_trainings_without_refused_cells(tmp_path, fake_training):
    """The partial-grid line counts the trainings to do, not the refused cells, which never run."""
    grid = {**SYN, "fractions": [0.0, 0.4]}  # krum refuses 4 of 10
    df = bz.run_grid("full", tmp_path, tmp_path / "cache", workers=1, progress=False, compute=False, seeds=1, **grid)
    runs = bz.distinct_runs(df)
    refused, missing = int((runs.status == "refused").sum()), int((runs.status == "missing").sum())
    assert refused > 0 and missing == len(runs) - refused
    md = (tmp_path / "byzantine.md").read_text()
    assert f"**Partial grid: {missing} of its {missing} trainings not computed yet**" in md
