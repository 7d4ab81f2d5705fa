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
def _write_reports(interrupted):
    yield
    if _rows and not interrupted():
        ub.write_reports(ub.with_speedups(list(_rows)), REPORTS, profile=PROFILE, stem=ub.report_stem(PROFILE))


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
    if cell.rounds == 0:  # a slow Lua path: its one call so far is the measurement
        times.append(cell.median_s)
    else:
        benchmark.pedantic(timed, rounds=cell.rounds, iterations=1, warmup_rounds=0)
    cell = ub.finish_cell(bench_client, cell, times)
    _rows.append(cell.row())
    assert cell.median_s > 0


# -- what signed updates cost, next to the in-database update they guard ----------------------------
SECURITY_SIZES = (100_000, 1_000_000, ub.MOBILENET_V3_SMALL) if PROFILE == "full" else (100_000, 1_000_000)
_security_rows: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _write_security_report(interrupted):
    yield
    if _security_rows and not interrupted():
        import pandas as pd

        from spirt.reports import write_table

        write_table(pd.DataFrame(_security_rows), REPORTS, "update_time_security",
                    "Signed updates: the receiver's checks next to the in-database update",
                    "Median seconds over 5 repeats, K = 4 received vectors, one server. `update_s`: TENSOR.AVG "
                    "of the K vectors + TENSOR.SGD with momentum, in the database. `check_s`: the receiver's "
                    "checks of all K (copy out of the sender's slot, read, SHA-256 digest, Ed25519 "
                    "signature, finiteness); `check_last_s`: one check, which is what remains after the "
                    "barrier since a peer checks each vector as it arrives while the barrier waits for the "
                    "others. `sign_s`: the sender signs one vector.")


@pytest.mark.parametrize("n_floats", SECURITY_SIZES, ids=[ub.SIZE_NAMES[n] for n in SECURITY_SIZES])
def test_signed_update_cost(bench_client, n_floats):
    from spirt.security.cost import measure

    row = measure(bench_client, n_floats, k=4, reps=5)
    _security_rows.append(row)
    assert row["check_s"] > 0 and row["update_s"] > 0
