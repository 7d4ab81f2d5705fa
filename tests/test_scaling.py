"""The scaling benchmark (spirt.benchmarks.scaling): a real quick run (database servers, torch training),
the exchange counted by the servers, and the cost model's fit on synthetic points of known constants."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import psutil
import pytest

from spirt.benchmarks import scaling
from spirt.cli import build_parser

pytestmark = pytest.mark.timeout(300)


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``spirt bench scaling -- --quick``: P = 2 and 3, mlp, 2 measured rounds, run from a fresh working
    directory without ``--out``; the report directory and the child processes that outlived it (none
    expected). A smoke run writes to results/, never over the committed reports/."""
    cwd = tmp_path_factory.mktemp("scaling")
    before = _children()
    home = os.getcwd()
    os.chdir(cwd)
    try:
        assert scaling.main(["--quick", "--quiet"]) == 0
    finally:
        os.chdir(home)
    left = {pid for pid in _children() - before if psutil.pid_exists(pid)}
    assert not (cwd / "reports").exists()
    return cwd / "results", left


def test_quick_run_writes_the_three_reports(quick):
    out, _ = quick
    assert {f.name for f in out.iterdir()} >= {"scaling.csv", "scaling.md", "scaling.png"}
    df = pd.read_csv(out / "scaling.csv")
    assert list(df["peers"]) == [2, 3] and set(df["model"]) == {"mlp"}
    expected = set(scaling.TABLE) | {"t_cleanup", "d_bytes", "d_floats", "push_bytes", "exchange_out_bytes",
                                     "net_in_bytes", "net_out_bytes", "cpu_process_s", "cpu_servers_s",
                                     "calls_set", "calls_ltrim", "calls_tensor.avg", "other_cpu_cores"}
    assert expected <= set(df.columns)
    assert (df["excluded"] == 0).all()
    assert (df[[c for c in df if c.startswith("t_")]] > 0).all().all()
    assert (df["cpu_process_peer_s"] > 0).all() and (df["cpu_servers_peer_s"] > 0).all()
    md = (out / "scaling.md").read_text()
    assert "Command: `spirt bench scaling -- --quick --quiet`" in md
    assert "2 cores" in md and "P = 1,000" in md and "every round of every cell had exactly P(P - 1)" in md


def test_pushes_grow_as_p_times_p_minus_1(quick):
    """Counted by the receiving servers, every round: 2 pushes for 2 peers, 6 for 3 (not 4 and 9, P^2;
    nor 3 and 4.5, P)."""
    df = pd.read_csv(quick[0] / "scaling.csv")
    p = df["peers"]
    for col in ("exchange_messages", "exchange_messages_min_round", "exchange_messages_max_round"):
        assert list(df[col]) == list(p * (p - 1)), col
    assert list(df["exchange_commands"]) == list(3 * p * (p - 1))  # vector, RPUSH and LTRIM of the wake-up
    # bytes: each push is the whole vector and a little framing, and the group's total is P(P - 1) of them
    h = df["push_bytes"] - df["d_bytes"]
    assert ((h > 0) & (h < 1000)).all()
    assert np.allclose(df["exchange_in_bytes"], p * (p - 1) * df["push_bytes"])
    assert np.allclose(df["exchange_bytes_peer"], (p - 1) * df["push_bytes"])
    # the local traffic (the functions' gradients, K per peer) is apart from it
    assert (df["local_in_bytes"] > p * df["functions"] * df["d_bytes"]).all()


def test_every_server_and_process_is_stopped(quick):
    assert quick[1] == set()
    from spirt import servers

    assert not [s for s in list(servers._live) if s.alive()]


def _synthetic(consts: dict[str, float], peers, functions: int = 2) -> pd.DataFrame:
    """Points that follow the model exactly, written out independently of the module's own terms."""
    rows = []
    for model, d_floats in (("mlp", 199_210), ("cnn", 207_018)):
        for p in peers:
            s = max(1.0, p / scaling.CORES)
            d = 4 * d_floats
            big_d = d + consts["h"]
            rows.append({
                "model": model, "peers": p, "functions": functions, "d_floats": d_floats, "d_bytes": d,
                "push_bytes": big_d, "exchange_bytes_peer": (p - 1) * big_d,
                "exchange_messages": p * (p - 1),
                "t_compute": s * functions * consts[f"c_{model}"] * 0.75, "t_store": s * functions * consts[f"c_{model}"] * 0.25,
                "t_average": s * consts["u"] * d / 2, "t_update": s * consts["u"] * d / 2, "t_cleanup": 0.0,
                "t_exchange": s * (consts["e0"] + consts["e1"] * (p - 1) * big_d),
                "t_barrier": s * (consts["b0"] + consts["b1"] * (p - 1)),
                "t_aggregate": s * (consts["g0"] + consts["g1"] * p * d_floats),
            })
    df = pd.DataFrame(rows)
    df["t_round"] = df[[f"t_{ph}" for ph in scaling.PHASES]].sum(axis=1)
    return df


def test_cost_model_fit_reproduces_known_constants():
    known = {"c_cnn": 0.02, "c_mlp": 0.006, "u": 2e-9, "e0": 1.5e-3, "e1": 3e-10, "b0": 4e-3, "b1": 1e-3,
             "g0": 1e-3, "g1": 5e-12, "h": 160.0}
    df = _synthetic(known, peers=(2, 3, 4, 6, 8, 16, 32))
    got = scaling.fit(df, fit_max=8)
    assert set(got) == set(known)
    for k, v in known.items():
        assert got[k] == pytest.approx(v, rel=1e-6), k
    chk = scaling.checks(df, got, fit_max=8)
    assert set(chk.loc[chk["peers"] > 8, "set"]) == {"held out"}
    errs = chk[[c for c in chk if c.endswith("_err")]].to_numpy(float)
    assert np.nanmax(np.abs(errs)) < 1e-6
    # the extrapolation: all-to-all moves P(P - 1) messages, the sparse and tree topologies far fewer
    w = scaling.Workload("mlp", 199_210, 0.012)
    full = scaling.dedicated(w, 1000, 1e9, got)
    assert full["messages_group"] == 1000 * 999 and full["bytes_peer"] == pytest.approx(999 * (4 * 199_210 + 160))
    assert full["exchange_s"] == pytest.approx(scaling.RTT_S + 999 * (4 * 199_210 + 160) * 8 / 1e9)
    for topo in ("gossip", "tree"):
        alt = scaling.dedicated(w, 1000, 1e9, got, topo)
        assert alt["messages_group"] < full["messages_group"] / 10 and alt["round_s"] < full["round_s"]


def test_exchange_commands_are_told_from_local_ones():
    assert scaling.is_exchange([b"SET", b"{p1}:in:0:3", b"...", b"PX", b"600000"])
    assert scaling.is_exchange([b"RPUSH", b"{p1}:notify:0", b"3"])
    assert scaling.is_exchange([b"LTRIM", b"{p1}:notify:0", b"-1000", b"-1"])
    assert scaling.is_exchange([b"TENSOR.PUSH", b"{p1}:in:0", b"{p1}:notify:0", b"3", b"..."])
    assert not scaling.is_exchange([b"SET", b"{p1}:grad:3:0", b"..."])  # a function's gradient
    assert not scaling.is_exchange([b"EXISTS", b"{p1}:in:0:3"])  # the barrier's own check
    assert not scaling.is_exchange([b"BLPOP", b"{p1}:notify:0", b"0.05"])
    assert scaling.push_round([b"SET", b"{p1}:in:0:12", b"..."]) == 12
    # the command log keeps 32 arguments of a TENSOR.AVG over 40 vectors and says how many more there were
    logged = [b"TENSOR.AVG", b"dst", *[b"k"] * 29, b"... (11 more arguments)"]
    assert scaling.inputs(logged) == 40 and scaling.inputs([b"TENSOR.AVG", b"dst", b"a", b"b"]) == 2


def test_cli_wires_bench_scaling():
    args = build_parser().parse_args(["bench", "scaling", "--", "--quick"])
    assert args.func.__name__ == "_cmd_bench_scaling" and args.rest == ["--", "--quick"]


def test_reports_go_to_out_else_results_for_a_smoke_run_else_reports(monkeypatch):
    from pathlib import Path

    from spirt.benchmarks.update import out_dir

    monkeypatch.delenv("SPIRT_REPORTS_DIR", raising=False)
    assert out_dir("/tmp/x", quick=True) == Path("/tmp/x")
    assert out_dir(None, quick=True) == Path("results")
    assert out_dir(None) == Path("reports")
    monkeypatch.setenv("SPIRT_REPORTS_DIR", "/tmp/r")
    assert out_dir(None) == Path("/tmp/r") and out_dir(None, quick=True) == Path("results")
