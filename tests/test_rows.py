"""A peer's own report (its per-round metrics and events), read back from its database, is hostile input:
``spirt collect`` reads it from another host, and a peer that writes a bad row must be left out and named,
never crash the collection or slip into the reports (spirt.rows)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spirt.config import load_config
from spirt.host import collect
from spirt.keys import Keys
from spirt.rows import MAX_ROW_BYTES, parse_event_row, parse_metric_row, read_reports
from spirt.servers import make_client, start_server
from spirt.wire import BadValue

ROW = {"round": 3, "peer": 1, "loss": 0.5, "accuracy": float("nan"), "test_loss": float("nan"), "functions_ok": 2,
       "functions_failed": 0, "functions_retried": 0, "peers_aggregated": 3, "peers_excluded": "2(heartbeat expired)",
       "updates_rejected": 0, "members": 3, "byzantine": False, "wall_begin": 1.7e9, "wall_end": 1.7e9 + 1,
       "t_compute": 0.25, "t_round": 0.5}
EVENT = {"t": 1.7e9, "round": 3, "peer": 1, "event": "excluded", "about": 2, "detail": "missed the 3 s deadline"}


def _row(**change) -> str:
    return json.dumps({**ROW, **change})


def test_a_peers_own_rows_parse():
    row = parse_metric_row(_row(), peer=1, rounds=10)
    assert parse_metric_row(_row(loss=float("inf")), peer=1, rounds=10)["loss"] == float("inf")  # diverged
    assert row["t_compute"] == 0.25 and math.isnan(row["accuracy"]) and row["peers_excluded"].startswith("2(")
    assert parse_event_row(json.dumps(EVENT), peer=1, rounds=10) == EVENT
    assert parse_event_row(json.dumps({**EVENT, "round": -1}), peer=1, rounds=10)["round"] == -1
    assert parse_event_row(json.dumps({**EVENT, "round": 10}), peer=1, rounds=10)["round"] == 10  # the end


@pytest.mark.parametrize("raw, why", [
    (b"\x00not json", "not JSON"),
    (b"[1]", "not a JSON object"),
    (("[" * 5000 + "]" * 5000).encode(), "not"),  # deep nesting: refused, never a RecursionError
    (b" " * (MAX_ROW_BYTES + 1), "bytes"),
    (_row(peer=2), "about peer 2, in peer 1's database"),
    (_row(round=10), "not a round of this training"),
    (_row(round=-1), "round"),
    (_row(round=3.0), "round"),
    (_row(loss="0.5"), "loss"),
    (_row(wall_end=float("inf")), "wall_end"),
    (_row(accuracy=1.5), "accuracy"),
    (_row(functions_ok=True), "functions_ok"),
    (_row(peers_aggregated=-1), "peers_aggregated"),
    (_row(byzantine=0), "byzantine"),
    (_row(peers_excluded=["x"]), "peers_excluded"),
    (_row(t_compute="fast"), "t_compute"),
    (_row(t_compute=float("-inf")), "t_compute"),
    (_row(**{"<script>": 1.0}), "unknown column"),
    (json.dumps({k: v for k, v in ROW.items() if k != "loss"}), "loss"),
])
def test_a_bad_metrics_row_is_refused(raw, why):
    with pytest.raises(BadValue, match=why):
        parse_metric_row(raw, peer=1, rounds=10)


@pytest.mark.parametrize("change, why", [
    ({"peer": 0}, "logged by peer 0"),
    ({"event": "Excluded!"}, "not a lower-case word"),
    ({"event": "x" * 49}, "event"),
    ({"round": 11}, "not a round of this training"),
    ({"round": -2}, "round"),
    ({"t": float("nan")}, "wall-clock"),
    ({"about": "2"}, "about"),
    ({"detail": "x" * 40_000}, "detail"),
    ({"extra": 1}, "extra"),
])
def test_a_bad_event_is_refused(change, why):
    with pytest.raises(BadValue, match=why):
        parse_event_row(json.dumps({**EVENT, **change}), peer=1, rounds=10)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(obj=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                        max_leaves=20),
       field=st.sampled_from(sorted(ROW)))
def test_rows_only_ever_raise_bad_value(obj, field):
    for raw in (json.dumps(obj), _row(**{field: obj})):
        for parse in (parse_metric_row, parse_event_row):
            try:
                parse(raw, peer=1, rounds=10)
            except BadValue:
                pass


@pytest.fixture(scope="module")
def two_databases():
    servers = [start_server("valkey") for _ in range(2)]
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


def _write(db, peer: int, rows: list[str], events: list[str]) -> None:
    K = Keys(peer)
    db.delete(K.metrics, K.events)
    if rows:
        db.rpush(K.metrics, *rows)
    if events:
        db.rpush(K.events, *events)
    db.set(K.state, f"1|{'a' * 40}")


def test_an_oversized_report_is_refused_before_it_is_read(two_databases):
    db = make_client(url=two_databases[0].url)
    try:
        _write(db, 1, [_row(round=r % 10) for r in range(41)], [])
        with pytest.raises(BadValue, match="41 metrics rows"):
            read_reports(db, 1, rounds=10)
    finally:
        db.close()


def test_collect_leaves_out_and_names_a_peer_whose_report_does_not_parse(two_databases, tmp_path):
    """Peer 1 wrote a row that is not a metrics row into its own database: ``spirt collect`` keeps peer 0's
    report, leaves peer 1's out (its final state too), says why in an event and in the reports, and
    exits with an error; it does not crash."""
    urls = [s.url for s in two_databases]
    dbs = [make_client(url=u) for u in urls]
    try:
        _write(dbs[0], 0, [_row(peer=0, round=r) for r in range(2)], [json.dumps({**EVENT, "peer": 0})])
        _write(dbs[1], 1, [_row(round=0), '{"round": 1, "peer": 1, "loss": "NaN; DROP"}'],
               [json.dumps(EVENT)])
        cfg = load_config(None, {"peers.count": 2, "peers.urls": urls, "run.rounds": 10})
        df, missing = collect(cfg)
        assert missing == [] and sorted(df["peer"].unique()) == [0]
        assert list(df.attrs["rejected"]) == [1] and "metrics row 1" in df.attrs["rejected"][1]
        said = df.attrs["events"]
        rejected = said[said["event"] == "report_rejected"]
        assert list(rejected["about"]) == [1] and set(said["peer"]) == {-1, 0}
        assert df.attrs["final_states"] == 1

        path = tmp_path / "group.json"
        path.write_text(cfg.model_dump_json())
        out = subprocess.run([sys.executable, "-m", "spirt", "collect", str(path), "--out", str(tmp_path / "out")],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1, out.stderr
        assert "peer 1's report is left out, it does not parse: metrics row 1" in out.stderr
        assert "reports_rejected: peer 1: metrics row 1" in (tmp_path / "out" / "rounds_collected.md").read_text()
    finally:
        for db in dbs:
            db.close()
