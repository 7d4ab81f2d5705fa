"""Fault-injection scenarios with real processes and signals -> reports/faults.{csv,md} (and, for the
faults that cut links, the honest peers' disagreement per round -> reports/partitions.{csv,md,png}).

Per registered fault (see :mod:`spirt.faults`; ``spirt bench faults -- --list``): detection latency,
recovery time, rounds lost, the survivors' final accuracy on the full test set next to the fault-free
run with the same surviving peers.
``SPIRT_FAULT_SCENARIOS=kill_peer,join`` runs a subset (the report then holds only those).
"""

from __future__ import annotations

import os

import pandas as pd
import pytest

from spirt import faults
from spirt.benchmarks.update import reports_dir

SELECTED = [s for s in os.environ.get("SPIRT_FAULT_SCENARIOS", ",".join(faults.SCENARIOS)).split(",") if s]
_rows: list[dict] = []
_rounds: list[pd.DataFrame] = []


@pytest.fixture(scope="module", autouse=True)
def _write(interrupted):
    yield
    if _rows and not interrupted():
        order = {name: i for i, name in enumerate(faults.SCENARIOS)}
        df = faults.write_reports(sorted(_rows, key=lambda r: order[r["scenario"]]), reports_dir())
        if _rounds:
            faults.write_partition_reports(df, pd.concat(_rounds, ignore_index=True), reports_dir())


@pytest.mark.faults
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", SELECTED)
def test_fault_scenario(name):
    s = faults.SCENARIOS[name]
    reference = faults.reference_for(s)
    res = faults.run_scenario(s)
    _rows.append(res.row(reference))
    if s.fault_class.links and res.disagreement is not None:
        _rounds.append(res.disagreement.assign(scenario=name, fault=s.description))
    assert res.survivors_identical, res.digests
    m = res.metrics
    for i in res.survivors:  # the survivors trained to the end
        assert m[m["peer"] == i]["round"].max() == res.rounds - 1
