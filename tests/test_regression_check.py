"""The update-time regression check's decision (bench/test_regression.py and ``spirt bench update
--check``): a ratio below the tolerance is measured again, its cells alone, and fails only when it
stays low. The measurements are scripted here; the check against real servers is the bench test."""

from __future__ import annotations

import pytest

from spirt.benchmarks import update as ub

BASE = {"profile": "regression", "tolerance": 0.25,
        "speedups": {"median/module/1000000/16": 31.2, "update/module/1000000/4": 4.6}}


@pytest.fixture
def measured(monkeypatch):
    """Replaces the measurement with scripted ratios: ``script`` is a list of what each call returns;
    ``calls`` records the cells each call was limited to."""
    calls: list = []
    script: list[dict[str, float]] = []

    def fake(client, profile, repeats=3, progress=None, only=None):
        calls.append(only)
        return dict(script[len(calls) - 1])

    monkeypatch.setattr(ub, "repeated_profile", fake)
    monkeypatch.setattr(ub, "wait_for_quiet", lambda: 0.1)
    return script, calls


def test_a_ratio_low_once_is_measured_again_alone_and_passes_when_it_recovers(measured):
    script, calls = measured
    script += [{"median/module/1000000/16": 20.1, "update/module/1000000/4": 8.3},
               {"median/module/1000000/16": 35.0}]
    current, failures, again = ub.checked_profile(None, BASE)
    assert failures == []
    assert current["median/module/1000000/16"] == 35.0
    assert calls == [None, {("median", 1_000_000, 16)}]  # only the low ratio's cells again
    assert again == ["other processes kept 0.10 cores busy before the measurement",
                     "median/module/1000000/16: 20.10x, measured again 35.00x (0.10 cores busy before)"]


def test_a_ratio_that_stays_low_fails_after_the_confirmations(measured):
    script, calls = measured
    script += [{"median/module/1000000/16": 20.1, "update/module/1000000/4": 8.3},
               {"median/module/1000000/16": 21.0}, {"median/module/1000000/16": 19.0}]
    current, failures, again = ub.checked_profile(None, BASE, confirmations=2)
    assert len(calls) == 3
    assert current["median/module/1000000/16"] == 21.0  # the best measurement counts
    assert failures == ["median/module/1000000/16: 21.00x is more than 25% below the baseline 31.20x"]
    assert len(again) == 1 + 2


def test_ratios_within_the_tolerance_are_measured_once(measured):
    script, calls = measured
    script += [{"median/module/1000000/16": 24.0, "update/module/1000000/4": 3.5}]
    _, failures, again = ub.checked_profile(None, BASE)
    assert failures == [] and len(again) == 1 and calls == [None]


def test_the_machine_load_is_read_from_the_processes_running():
    """A busy loop in another process shows as about one busy core (the check waits for it to end)."""
    import multiprocessing as mp
    import time

    def spin(until: float) -> None:
        while time.time() < until:
            pass

    p = mp.get_context("fork").Process(target=spin, args=(time.time() + 3,))
    p.start()
    try:
        time.sleep(0.2)
        assert ub.busy_cores(1.0) > 0.7
    finally:
        p.join()


def test_a_quick_profile_writes_its_own_report_and_leaves_the_full_one(tmp_path):
    """``spirt bench update`` (small by default) and ``SPIRT_BENCH_PROFILE=small`` wrote ``update_time.*``,
    replacing the committed full-profile report with a quick one."""
    assert ub.report_stem("full") == "update_time"
    assert {ub.report_stem(p) for p in ub.PROFILES if p != "full"} == {f"update_time_{p}" for p in ub.PROFILES
                                                                        if p != "full"}
    row = {"op": "update", "backend": "client", "size": "1M", "n_floats": 10**6, "k": 4, "rounds": 3,
           "median_s": 0.01, "min_s": 0.01, "speedup_vs_client": 1.0, "time_vs_unfused": float("nan"),
           "gbytes_per_s": 1.0}
    rows = [{c: {**row, "backend": b}.get(c, float("nan")) for c in ub.COLUMNS} for b in ("client", "module")]
    ub.write_reports(ub.with_speedups(rows), tmp_path, profile="small", stem=ub.report_stem("small"))
    assert (tmp_path / "update_time_small.md").exists() and not (tmp_path / "update_time.md").exists()
