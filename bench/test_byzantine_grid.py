"""The Byzantine benchmark grid (attack x defense x Byzantine fraction x partition x seed) on real P2P training.

Runs the profile named by ``SPIRT_BYZ_PROFILE`` (default ``reduced``: four attacks and six defenses at
30% Byzantine, IID, one seed, about 8 minutes on 2 cores; ``full``: the whole grid with three seeds, many
hours, see ``spirt bench byzantine -- --profile full --estimate``) through
:func:`spirt.benchmarks.byzantine.run_grid`, cached under ``reports/cache/byzantine`` so a rerun only
computes what is missing, and writes ``reports/<stem>.{csv,md}``, ``<stem>_seeds.csv``,
``<stem>_worstcase.{csv,png}``, ``<stem>_heatmap.png``, ``<stem>_curves.png`` (stem ``byzantine_reduced``,
``byzantine`` or ``byzantine_target``) and adds its runs to the run archive it reads like the cache
(``byzantine_runs.jsonl``, which the reduced grid shares with the full one, or ``byzantine_target_runs.jsonl``). Then checks the outputs and the qualitative
results (on the mean over seeds).
"""

from __future__ import annotations

import os

import pandas as pd
import pytest

from spirt.benchmarks import byzantine as bz

# No pytest time limit: the grid bounds each cell itself (CELL_TIMEOUT_S, stall detection of the pool), and
# its length depends on the profile and on what the cache already holds (``--estimate`` prints it).
pytestmark = [pytest.mark.byzantine, pytest.mark.timeout(0)]

PROFILE = bz.selected_profile()
STEM = bz.PROFILES[PROFILE].report
OUT = bz.DEFAULT_OUT
CACHE = os.environ.get("SPIRT_BYZ_CACHE", str(bz.DEFAULT_CACHE))


@pytest.fixture(scope="module")
def grid() -> pd.DataFrame:
    return bz.run_grid(PROFILE, OUT, CACHE, workers=2)


def test_byzantine_grid_outputs(grid):
    for suffix in (".csv", ".md", "_seeds.csv", "_worstcase.csv", "_heatmap.png", "_worstcase.png", "_curves.png"):
        assert (OUT / f"{STEM}{suffix}").stat().st_size > 0, suffix
    assert bz.runs_path(OUT, bz.PROFILES[PROFILE].archive_stem).stat().st_size > 0
    csv = pd.read_csv(OUT / f"{STEM}.csv")
    for col in ("attack", "strength", "defense", "n_peers", "n_byzantine", "partition", "accuracy",
                "clean_accuracy", "status", "error", "seconds", "seeds", "mean", "std", "ci95_low", "ci95_high",
                "per_seed"):
        assert col in csv.columns, col
    failed = grid[grid.status == "error"]
    assert failed.empty, f"failed cells: {failed[['attack', 'defense', 'n_byzantine', 'partition', 'error']]}"
    assert (grid[grid.status == "ok"].seeds == bz.PROFILES[PROFILE].seeds).all()


def test_byzantine_grid_clean_run_learns(grid):
    assert (grid.clean_accuracy > 0.70).all()


def test_byzantine_grid_mean_collapses_under_sign_flip(grid):
    """Plain averaging has no Byzantine tolerance: 30% sign-flipping peers destroy it."""
    row = grid[(grid.attack == "sign_flip") & (grid.defense == "mean") & (grid.n_byzantine == 3)
               & (grid.partition == "iid")]
    assert len(row) == 1
    acc, clean = float(row.accuracy.iloc[0]), float(row.clean_accuracy.iloc[0])
    assert acc < clean - 0.25, f"mean under sign_flip at 30%: {acc:.3f} vs clean {clean:.3f}"


def test_byzantine_grid_robust_rules_survive_sign_flip(grid):
    """A crude attack far outside the honest spread: the robust rules keep most of the accuracy."""
    rows = grid[(grid.attack == "sign_flip") & (grid.n_byzantine == 3) & (grid.partition == "iid")
                & (grid.status == "ok") & (grid.defense != "mean")]
    assert len(rows) >= 3
    for r in rows.itertuples():
        assert r.accuracy > r.clean_accuracy - 0.10, f"{r.defense} under sign_flip at 30%: {r.accuracy:.3f}"


def test_byzantine_grid_worst_case_table(grid):
    """Every defense that ran has a worst case over the attacks, and each column a max-min choice."""
    wc = bz.worst_case_frame(grid)
    ok = wc[wc.status == "ok"]
    assert len(ok) and ok.worst_attack.astype(bool).all()
    assert (ok.groupby(["partition", "n_byzantine"]).maxmin.apply(lambda s: (s == "best").sum()) == 1).all()
