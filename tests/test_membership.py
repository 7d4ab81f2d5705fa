"""Membership bookkeeping against a real database: every change of a peer's member table is an event.

The scenarios of ``tests/test_faults.py`` exercise membership end to end (heartbeats, exclusion,
removal); these tests pin the accounting rules on one peer's table.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from spirt.config import MembershipSection
from spirt.events import EventLog
from spirt.keys import Keys
from spirt.membership import Membership
from spirt.servers import make_client


@pytest.fixture
def table(valkey_server):
    db = valkey_server.client(decode_responses=False)
    events = EventLog(db, Keys(0).events, 0)
    m = Membership(0, MembershipSection(max_misses=2), events, connect=lambda q, url, timeout_s: None, own=lambda: db)
    for q in (1, 2, 3):
        m.add(q, f"unix:///peer{q}.sock")
    try:
        yield m, lambda: [json.loads(e) for e in db.lrange(Keys(0).events, 0, -1)]
    finally:
        db.close()


def _kinds(events: list[dict]) -> list[tuple[str, int]]:
    return [(e["event"], e["about"]) for e in events]


def test_misses_exclude_then_remove(table):
    m, events = table
    m.account(5, ready=[1, 2], missing={3: ("no heartbeat", 0.0)})
    assert not m[3].removed and m.awaited(6) == [1, 2, 3]
    m.account(6, ready=[1], missing={2: ("deadline", 0.0), 3: ("no heartbeat", 0.0)})
    assert m[3].removed and not m[2].removed and m.awaited(7) == [1, 2]
    m.account(7, ready=[1, 2], missing={})
    assert m[2].misses == 0  # misses count in a row
    assert m.size() == 3 and m.awaited(8) == [1, 2]  # a removed member comes back only by state transfer
    assert _kinds(events()) == [("excluded", 3), ("excluded", 2), ("excluded", 3), ("removed", 3)]


def test_adopting_a_groups_membership_logs_every_change(table):
    # after a state transfer the peer takes over the group's member table: a member the group dropped
    # is removed here too, one it still has is readmitted, a newcomer is awaited from the first round
    m, events = table
    m.account(3, ready=[1], missing={2: ("deadline", 0.0)})
    m.account(4, ready=[1], missing={2: ("deadline", 0.0)})
    assert m[2].removed
    m.adopt({0: "unix:///peer0.sock", 1: "unix:///peer1.sock", 2: "unix:///peer2.sock",
             4: "unix:///peer4.sock"}, first=9)
    assert not m[2].removed and m[3].removed and m[4].since == 9
    assert m.awaited(8) == [1, 2] and m.awaited(9) == [1, 2, 4]
    assert all(m[q].misses == 0 for q in m)
    adopted = [e for e in events() if e["round"] == 9]
    # the newcomer too: a group that grows through a state transfer says so (it once said nothing)
    assert _kinds(adopted) == [("admitted", 4), ("readmitted", 2), ("removed", 3)]
    assert all("state we took over" in e["detail"] for e in adopted)
    assert adopted[0]["detail"].endswith("awaited from round 9") and adopted[1]["detail"].endswith("awaited from round 9")
    # a member the group admitted as a joiner for a later round is awaited from that round, and says so
    m.account(9, ready=[1, 4], missing={2: ("deadline", 0.0)})
    m.account(10, ready=[1, 4], missing={2: ("deadline", 0.0)})
    assert m[2].removed
    m.adopt({0: "unix:///peer0.sock", 1: "unix:///peer1.sock", 2: "unix:///peer2.sock",
             4: "unix:///peer4.sock"}, first=12, since={2: 14})
    assert m.awaited(13) == [1, 4] and m.awaited(14) == [1, 2, 4]
    back = [e for e in events() if e["round"] == 12]
    assert _kinds(back) == [("readmitted", 2)] and back[0]["detail"].endswith("awaited from round 14")


# ----------------------------------------------------------------- a peer's limits on waiting and failing

TINY = {
    "run.rounds": 10, "run.eval_every": 100, "data.limit_train": 300, "data.limit_test": 100,
    "peers.count": 2, "peers.functions": 1, "peers.batch_size": 8, "model.name": "mlp",
    "peers.mode": "thread", "executor.kind": "inline", "barrier.timeout_s": 60,
    "membership.heartbeat_s": 0.2, "membership.quorum_timeout_s": 1.0,
}


@pytest.fixture
def peer(valkey_pair):
    """Peer 0 of a group of two, its model stored and its heartbeat on."""
    from spirt.config import load_config
    from spirt.peer import Peer

    p = Peer(load_config(None, TINY), 0, [s.url for s in valkey_pair])
    p.init_params()
    try:
        yield p
    finally:
        p.close()


def _peer_events(p) -> list[dict]:
    return [json.loads(e) for e in p.db.lrange(p.keys.events, 0, -1)]


def test_the_quorum_timeout_counts_every_wait_since_the_last_completed_round(peer, monkeypatch):
    """A quorum that comes back for rounds that never complete is no progress: the quorum timeout
    (1 s here) runs over every wait since the peer's last completed round. Restarted at each "quorum
    back", it never ran out, and a peer in that state waited for ever."""
    from spirt.agreement import TRAIN, Verdict

    monkeypatch.setattr(peer.agreement, "check", lambda r: TRAIN)  # the quorum is back at once, each time
    assert peer._wait(3, 10, Verdict("wait", "2 of 2 needed")) == 3
    time.sleep(0.5)
    assert peer._wait(3, 10, Verdict("wait", "2 of 2 needed")) == 3
    time.sleep(0.6)
    with pytest.raises(RuntimeError, match="no quorum for 1 s before round 3"):
        peer._wait(3, 10, Verdict("wait", "2 of 2 needed"))
    assert [e["event"] for e in _peer_events(peer)].count("gave_up") == 1
    peer._waiting_since = None  # what a completed round does: the next wait starts afresh
    assert peer._wait(4, 10, Verdict("wait", "2 of 2 needed")) == 4


def test_a_peer_gives_up_after_too_many_state_transfers_before_the_same_round(peer, monkeypatch):
    """A state transfer that lands us before the same round again and again is no progress (a source
    that keeps its heartbeat but does not train): after MAX_RESYNCS the peer gives up with an event,
    instead of looping through transfers for ever."""
    from spirt.peer import MAX_RESYNCS

    monkeypatch.setattr(peer, "join", lambda bootstrap=None, total=None: 4)  # the transfer lands at round 4
    for _ in range(MAX_RESYNCS):
        assert peer._resync(4, 10, "behind") == 4
    with pytest.raises(RuntimeError, match=f"{MAX_RESYNCS} state transfers before round 4"):
        peer._resync(4, 10, "behind")
    assert peer._resync(5, 10, "behind") == 4  # each round has its own count
    kinds = [e["event"] for e in _peer_events(peer)]
    assert kinds.count("resync") == MAX_RESYNCS + 1 and kinds.count("gave_up") == 1


def test_a_peer_thread_that_fails_stops_its_heartbeat_at_once(valkey_pair, monkeypatch):
    """Peers as threads: one that fails must look failed to the others at once, as a crashed process
    does. With its heartbeat kept until the whole run ended, the others counted it live and took its
    snapshots (one resynchronised from it in a loop)."""
    from spirt.config import load_config
    from spirt.peer import Peer
    from spirt.runner import _run_threads

    cfg = load_config(None, TINY)
    hb = cfg.membership.heartbeat_s
    urls = [s.url for s in valkey_pair]
    failed_at, seen = threading.Event(), {}

    def run(self, rounds=None, progress=None):
        alive = Keys(1).alive
        if self.index == 1:
            for _ in range(50):  # its heartbeat is on
                if self.db.get(alive) is not None:
                    break
                time.sleep(hb / 4)
            failed_at.set()
            raise RuntimeError("peer 1 fails here")
        assert failed_at.wait(30)
        t0 = time.monotonic()
        with make_client(url=urls[1]) as c:
            while c.get(alive) is not None and time.monotonic() - t0 < 10 * hb:
                time.sleep(hb / 10)
            seen["gone"] = c.get(alive) is None
        seen["after_s"] = time.monotonic() - t0
        return []

    monkeypatch.setattr(Peer, "run", run)
    failed = _run_threads(cfg, urls, timeout_s=60, raise_failures=False)
    assert list(failed) == [1] and "peer 1 fails here" in failed[1]
    assert seen["gone"], "the failed peer's heartbeat went on"
    assert seen["after_s"] <= 3 * hb + 0.5, seen  # its liveness key expired within its time to live
