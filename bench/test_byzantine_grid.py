"""The Byzantine benchmark grid (attack x defense x Byzantine fraction x partition) on real P2P training.

Runs the profile named by ``SPIRT_BYZ_PROFILE`` (default ``reduced``: a few attacks and defenses at 30%
Byzantine, IID, < 15 minutes on 2 cores; ``full``: the whole grid, < 2 hours) through
:func:`spirt.benchmarks.byzantine.run_grid`, cached under ``reports/cache/byzantine`` so a rerun only
computes what is missing, and writes ``reports/byzantine.{csv,md}``, ``byzantine_heatmap.png`` and
``byzantine_curves.png``. Then checks the outputs and the qualitative results.
"""

from __future__ import annotations

import os

import pandas as pd
import pytest

from spirt.benchmarks import byzantine as bz

pytestmark = pytest.mark.byzantine

PROFILE = bz.selected_profile()
OUT = bz.DEFAULT_OUT
CACHE = os.environ.get("SPIRT_BYZ_CACHE", str(bz.DEFAULT_CACHE))


@pytest.fixture(scope="module")
def grid() -> pd.DataFrame:
    return bz.run_grid(PROFILE, OUT, CACHE, workers=2)


def test_byzantine_grid_outputs(grid):
    for name in ("byzantine.csv", "byzantine.md", "byzantine_heatmap.png", "byzantine_curves.png"):
        assert (OUT / name).stat().st_size > 0, name
    csv = pd.read_csv(OUT / "byzantine.csv")
    for col in ("attack", "defense", "n_peers", "n_byzantine", "partition", "accuracy", "clean_accuracy",
                "status", "error", "seconds"):
        assert col in csv.columns, col
    failed = grid[grid.status == "error"].drop_duplicates("key")
    assert failed.empty, f"failed cells: {failed[['attack', 'defense', 'n_byzantine', 'partition', 'error']]}"


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
