"""The benchmark over emulated links (``spirt bench network``), small: real servers in network
namespaces, real torch training, every backend measured; the report has every part."""

from __future__ import annotations

import pandas as pd
import pytest

from spirt.benchmarks import network


@pytest.fixture(autouse=True)
def _root_and_namespaces():
    from spirt import netns

    ok, why = netns.available()
    if not ok:
        pytest.skip(why)


@pytest.mark.timeout(600)
def test_network_benchmark_writes_every_part(tmp_path):
    rows = network.run(cells=[(100_000, 2)], links=[(1000, None), (1000, 0.5)], budget_s=0.2, log=lambda m: None)
    backends = {"module", "module-unfused", "client", "client-default-allocator"}
    for link in ((1000, None), (1000, 0.5)):
        got = [r for r in rows if (r["link_mbit"], r["rtt_requested_ms"]) == link]
        assert {r["backend"] for r in got} == backends, link
        assert all(r["median_s"] > 0 for r in got)
    delayed = [r for r in rows if r["rtt_requested_ms"] == 0.5]
    assert all(r["delay"] == "proxy" and r["rtt_measured_ms"] >= 0.5 for r in delayed), delayed  # the delay line
    assert all(r["rtt_measured_ms"] < 0.5 for r in rows if r["rtt_requested_ms"] is None)
    rounds = network.round_times({"mlp": (2, 1, 32, 2)}, networks=[("loopback", None), ("netns", 1000)],
                                 backends=("module",), log=lambda m: None)
    assert [(r["network"], r["link_mbit"]) for r in rounds] == [("loopback", None), ("netns", 1000)]
    assert all(r["mean_round_s"] > 0 and r["t_exchange"] >= 0 for r in rounds)
    assert rounds[0]["vs_loopback"] == 1.0
    network.write_reports(rows, tmp_path, "spirt bench network -- --test", rounds)
    df = pd.read_csv(tmp_path / "network.csv")
    assert list(df.columns) == network.COLUMNS and len(df) == 8
    assert len(pd.read_csv(tmp_path / "network_rounds.csv")) == 2
    md = (tmp_path / "network.md").read_text()
    assert "Round time with every peer on its own emulated host" in md and "--test" in md
    assert (tmp_path / "network.png").stat().st_size > 0
