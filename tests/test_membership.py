"""Membership bookkeeping against a real database: every change of a peer's member table is an event.

The scenarios of ``tests/test_faults.py`` exercise membership end to end (heartbeats, exclusion,
removal); these tests pin the accounting rules on one peer's table.
"""

from __future__ import annotations

import json

import pytest

from spirt.config import MembershipSection
from spirt.events import EventLog
from spirt.keys import Keys
from spirt.membership import Membership


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
    assert _kinds(adopted) == [("readmitted", 2), ("removed", 3)]
    assert all("state we took over" in e["detail"] for e in adopted)
