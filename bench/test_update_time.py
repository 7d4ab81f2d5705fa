"""Model-update time of one peer, per backend x tensor size x K (pytest-benchmark).

Writes reports/update_time.{csv,md,png} at the end of the session. Run with ``tox -e bench`` or
``pytest bench/test_update_time.py --benchmark-enable``; ``SPIRT_BENCH_PROFILE=small`` for a quick run.
"""

from __future__ import annotations

import time

import pytest

from spirt.benchmarks import update as ub

PROFILE = ub.bench_profile()
REPORTS = ub.reports_dir()
CELLS = ub.profile_cells(PROFILE)
_rows: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _write_reports():
    yield
    if _rows:
        ub.write_reports(ub.with_speedups(list(_rows)), REPORTS, profile=PROFILE)


@pytest.mark.parametrize(("op", "n_floats", "k", "backend"), CELLS,
                         ids=[f"{op}-{ub.SIZE_NAMES.get(n, n)}-K{k}-{b}" for op, n, k, b in CELLS])
def test_update_time(benchmark, bench_client, op, n_floats, k, backend):
    cell, fn = ub.prepare_cell(bench_client, backend, n_floats, k, op=op)
    times: list[float] = []

    def timed():
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)

    benchmark.extra_info.update(op=op, backend=backend, n_floats=n_floats, k=k)
    benchmark.pedantic(timed, rounds=cell.rounds, iterations=1, warmup_rounds=0)
    cell = ub.finish_cell(bench_client, cell, times)
    _rows.append(cell.row())
    assert cell.median_s > 0
