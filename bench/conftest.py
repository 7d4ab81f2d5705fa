"""Benchmark fixtures: one server for the whole session, and result collectors that write reports/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spirt.processes import interrupt_on_sigterm, terminated
from spirt.servers import start_server

# The benchmarks refresh the committed figures in the tree's reports/ from whatever directory pytest
# (or tox) starts in; SPIRT_REPORTS_DIR still sends them elsewhere. Set before the benchmark modules
# import and read it.
os.environ.setdefault("SPIRT_REPORTS_DIR", str(Path(__file__).resolve().parent.parent / "reports"))

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


def pytest_configure(config) -> None:
    # a SIGTERMed run (tox stopped, a CI job cancelled) ends like Ctrl-C: tests and fixtures tear down
    # what they started instead of leaving it behind
    interrupt_on_sigterm()


@pytest.fixture(scope="session")
def interrupted(request):
    """For a fixture that writes a report after its module's tests: ``interrupted()`` is True when the run
    was stopped (Ctrl-C, or SIGTERM, which ``pytest_configure`` turns into the same). The fixture then
    writes nothing: the rows of the tests that ran so far would replace the committed report with a part
    of it. (A selection, ``-k``, still writes what it ran, on purpose.)"""
    return lambda: terminated.is_set() or request.session.exitstatus == pytest.ExitCode.INTERRUPTED


@pytest.fixture(scope="session")
def bench_server():
    srv = start_server(os.environ.get("SPIRT_BENCH_SERVER", "valkey"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def bench_client(bench_server):
    # long Lua / JSON reference calls run for tens of seconds at ResNet-18 size
    c = bench_server.client(socket_timeout=1800)
    yield c
    c.close()
