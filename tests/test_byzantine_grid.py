"""The Byzantine benchmark grid's machinery on a tiny grid (`pytest -k byzantine`).

Real training runs, made tiny (3 peers, 2 rounds, 300 training images), so the cache, refusal,
fraction-0 reuse, failure and report logic is exercised end to end in a few seconds per run.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

import attacks
import defenses
from spirt.benchmarks import byzantine as bz

pytestmark = pytest.mark.byzantine

TINY = bz.Training(n_peers=3, rounds=2, eval_every=1, eval_samples=50, limit_train=300, limit_test=100)
# 3 peers, 1/3 -> 1 Byzantine peer: Krum (n > 2f + 2) refuses it, the mean runs.
GRID = {"attacks": ["sign_flip", "gaussian"], "defenses": ["mean", "krum"], "fractions": [0.0, 1 / 3],
        "partitions": ["iid"], "training": TINY}
REQUIRED = ["attack", "defense", "n_peers", "n_byzantine", "partition", "accuracy", "clean_accuracy", "status",
            "error", "seconds"]


def test_byzantine_grid_lists_come_from_the_registries():
    t, rows, runs = bz.plan("full")
    labels = [d.label for d in bz.defense_configs()]
    assert sorted({r[0] for r in rows}) == attacks.names()
    assert set(defenses.names("aggregator")) <= set(labels)
    assert "nnm+trimmed_mean" in labels and "bucketing+median" in labels
    assert len(attacks.names()) >= 8 and len(labels) >= 9
    fractions = sorted({b / t.n_peers for _, _, b, _ in rows})
    assert fractions == pytest.approx(list(bz.FRACTIONS))
    assert len(rows) == len(attacks.names()) * len(labels) * len(bz.FRACTIONS) * len(bz.PARTITIONS)
    # fraction 0: one attack-free run per defense x partition, shared by every attack's row
    clean = [c for c in runs if c.n_byzantine == 0]
    assert all(c.attack is None for c in clean)
    assert len(clean) == len(labels) * len(bz.PARTITIONS)
    assert len(runs) == len(clean) + len(attacks.names()) * len(labels) * (len(bz.FRACTIONS) - 1) * 2


def test_byzantine_grid_reduced_profile_is_a_subset_of_full():
    _, red_rows, red_runs = bz.plan("reduced")
    _, full_rows, full_runs = bz.plan("full")
    assert set(red_runs) <= set(full_runs)
    assert {r[0] for r in red_rows} >= {"sign_flip", "alie"}
    assert bz.PROFILES["reduced"].training == bz.PROFILES["full"].training  # shared cache


def test_byzantine_grid_target_profile_is_the_headline_slice_with_its_own_reports(tmp_path):
    t, rows, runs = bz.plan("target")
    labels = [d.label for d in bz.defense_configs()]
    assert {(a, d) for a, d, b, p in rows if b == 3 and p == "iid"} == {(a, d) for a in attacks.names() for d in labels}
    assert {b for _, _, b, _ in rows} == {3} and {p for *_, p in rows} == {"iid"} and t.n_peers == 10
    assert bz.Cell(None, "mean", 0, "iid") in runs  # the clean reference
    assert t.peer_momentum > 0 and t.rounds > bz.PROFILES["full"].training.rounds
    # its own cache entries: never mistaken for the full grid's cells
    cell = bz.Cell("alie", "mean", 3, "iid")
    assert bz.cell_key(cell, t) != bz.cell_key(cell, bz.PROFILES["full"].training)
    df = bz.run_grid("target", tmp_path, tmp_path / "cache", workers=1, progress=False, compute=False)
    assert set(df.status) <= {"missing", "refused"}
    assert (tmp_path / "byzantine_target.csv").exists() and not (tmp_path / "byzantine.csv").exists()
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
        assert g.key.nunique() == 1 and g.accuracy.nunique() == 1 and set(g.attack) == {"sign_flip", "gaussian"}
    clean = zero[zero.defense == "mean"].accuracy.iloc[0]
    assert (df.clean_accuracy == clean).all()
    curve = json.loads(ok.curve.iloc[0])
    assert [r for r, _ in curve] == [1, 2]

    # reports
    for name in ("byzantine.csv", "byzantine.md", "byzantine_heatmap.png", "byzantine_curves.png"):
        assert (out / name).stat().st_size > 0, name
    csv = pd.read_csv(out / "byzantine.csv")
    assert set(REQUIRED) <= set(csv.columns) and len(csv) == 8
    md = (out / "byzantine.md").read_text()
    assert "Best defense per attack" in md and "refused" in md

    # rerun: everything from the cache, same numbers
    again = bz.run_grid("reduced", None, cache, workers=1, progress=False, **GRID)
    assert again.attrs["computed"] == 0 and again[again.status == "ok"].cached.all()
    pd.testing.assert_series_equal(again.accuracy, df.accuracy)

    # a missing entry is recomputed, and only that one
    victim = df[(df.attack == "gaussian") & (df.n_byzantine == 1) & (df.defense == "mean")].key.iloc[0]
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
    assert (tmp_path / "out" / "byzantine.md").read_text().count("injected failure") >= 1


def test_byzantine_grid_process_pool(tmp_path):
    """The spawn pool path: the cell comes back from a worker, which cached it (one cell: one worker)."""
    grid = {**GRID, "attacks": ["sign_flip"], "defenses": ["mean"], "fractions": [0.0]}
    df = bz.run_grid("reduced", None, tmp_path / "cache", workers=2, progress=False, **grid)
    assert df.attrs["computed"] == 1 and (df.status == "ok").all()
    assert bz.cache_read(tmp_path / "cache", df.key.iloc[0])["cpu_seconds"] > 0


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
