"""Agreement on the group's state against Byzantine members, with real database servers.

The attacker holds an admitted member's rights: it writes what it likes into its own database (its
round mark, its aggregated set, its snapshots and their meta), which is where the others read them.
One peer's state-transfer part (spirt.transfer.StateTransfer) is driven directly against those
databases, so each attack is mounted exactly and each test fails if the defence is removed: catching up
needs a strict majority and f + 1 of the members, a joiner's round is one f + 1 members announced, a
state is adopted from f + 1 identical snapshots, and a value that does not parse is the sender's fault.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from spirt.agreement import Agreement, Probe, Verdict, decide, winner
from spirt.config import load_config
from spirt.events import EventLog
from spirt.guard import Guard
from spirt.keys import Keys
from spirt.membership import Membership, member_client
from spirt.servers import make_client, start_server
from spirt.transfer import JOIN_AHEAD, StateTransfer

ROUNDS = 100


@pytest.fixture(scope="module")
def servers():
    started = []
    try:
        for _ in range(6):
            started.append(start_server("valkey"))
        yield started
    finally:
        for s in started:
            s.stop()


@pytest.fixture
def group(servers):
    """``make(n, f)``: peer 0's state transfer in a group of n members with tolerance f, plus a client
    of every member's database (flushed), all members alive."""
    made: list = []

    def make(n: int, f: int = 0, me: int = 0, **settings) -> tuple[StateTransfer, list]:
        urls = [s.url for s in servers[:n]]
        dbs = [make_client(url=u) for u in urls]
        for db in dbs:
            db.flushall()
        for q, db in enumerate(dbs):
            db.set(Keys(q).alive, q, px=600_000)
        params = {"f": f} if f else {}
        cfg = load_config(None, {"peers.count": max(n, 2 * f + 1), "run.rounds": ROUNDS,
                                 "aggregation.defense": "median" if f else "mean", "aggregation.params": params,
                                 "membership.join_timeout_s": 20, **settings})
        own = dbs[me]
        membership = Membership(me, cfg.membership, EventLog(own, Keys(me).events, me),
                                connect=lambda q, u, timeout_s: member_client(u, {}, timeout_s),
                                own=lambda **kw: make_client(url=urls[me], **kw), rounds=ROUNDS)
        for q in range(n):
            if q != me:
                membership.add(q, urls[q])
        t = StateTransfer(me, urls[me], own, membership, Guard(), membership.events, cfg)
        made.append((membership, dbs))
        return t, dbs

    yield make
    for membership, dbs in made:
        membership.close()
        for db in dbs:
            db.close()


def _events(db, me: int = 0) -> list[dict]:
    return [json.loads(e) for e in db.lrange(Keys(me).events, 0, -1)]


def _marks(dbs, marks: dict[int, object]) -> None:
    for q, v in marks.items():
        dbs[q].set(Keys(q).ready, v)


# -------------------------------------------------------------------------------- catching up


def _check(t: StateTransfer, r: int) -> Verdict:
    """Peer t's verdict before round r, as its run loop reaches it."""
    return Agreement(t.index, t.db, t.membership, t.f, ROUNDS, t.bad_value, max_group=t.cfg.max_group).check(r)


def _digests(dbs, r: int, digests: dict[int, str]) -> None:
    """Members' states after round r: a digest each (a letter, repeated to the SHA-1 length)."""
    for q, d in digests.items():
        dbs[q].set(Keys(q).digest(r), d * 40)
        dbs[q].set(Keys(q).state, f"{r}|{d * 40}")


def test_byzantine_an_inflated_mark_does_not_make_a_peer_resync(group):
    t, dbs = group(3)
    r = 7
    _marks(dbs, {0: r, 1: r, 2: 10**6})  # implausible: beyond the training's last round
    assert _check(t, r).train
    _marks(dbs, {2: r + 5})  # plausible, but one member of three is not a majority
    assert _check(t, r).train
    bad = [e for e in _events(dbs[0]) if e["event"] == "bad_value"]
    assert [(e["about"], "not a round of this training" in e["detail"]) for e in bad] == [(2, True)]
    _marks(dbs, {1: r + 1})  # now both others finished round r: we lag
    v = _check(t, r)
    assert v.kind == "resync" and v.why.startswith("lagging")


def test_byzantine_an_implausible_mark_is_not_followed_by_the_liveness_check(group):
    # the barrier reads a member's mark with its heartbeat: a round beyond the training's is dropped
    t, dbs = group(3)
    _marks(dbs, {1: 10**6, 2: 7})
    assert t.membership.alive(1) == (True, "", None) and t.membership.alive(2) == (True, "", 7)
    assert t.membership.alive(1) == (True, "", None)
    bad = [e for e in _events(dbs[0]) if e["event"] == "bad_value"]
    assert [(e["about"], "not a round of this training" in e["detail"]) for e in bad] == [(1, True)]


def test_byzantine_lagging_needs_f_plus_one_members(group):
    t, dbs = group(5, f=2)
    r = 3
    _marks(dbs, {0: r, 1: r, 2: r, 3: r + 4, 4: r + 4})  # f = 2 colluders ahead
    assert _check(t, r).train
    _marks(dbs, {2: r + 1})  # 3 of 4: a strict majority and f + 1
    assert "lagging" in _check(t, r).why


def test_byzantine_garbage_digests_are_dropped_and_a_majority_state_wins(group):
    t, dbs = group(3)
    r = 5
    _marks(dbs, {0: r - 1, 1: r - 1, 2: r - 1})
    _digests(dbs, r - 1, {0: "a", 1: "a"})
    dbs[2].set(Keys(2).digest(r - 1), b"\xff\x00" * 20)
    assert _check(t, r).train
    dbs[2].set(Keys(2).digest(r - 1), "b" * 39 + "g")  # not hex
    assert _check(t, r).train
    assert [e["about"] for e in _events(dbs[0]) if e["event"] == "bad_value"] == [2, 2]
    _digests(dbs, r - 1, {1: "b", 2: "b"})  # both others hold another state: ours diverged
    v = _check(t, r)
    assert v.kind == "resync" and v.why.startswith("diverged") and "peers [1, 2]" in v.why


def test_byzantine_f_colluding_digests_do_not_make_a_peer_resync(group):
    # f = 1 of 4: the colluder's state (or a copy of it) needs f + 1 holders; honest peers hold theirs
    t, dbs = group(4, f=1)
    r = 9
    _marks(dbs, {q: r - 1 for q in range(4)})
    _digests(dbs, r - 1, {0: "a", 1: "a", 2: "a", 3: "c"})
    assert _check(t, r).train
    # an honest split (0 | 1, 2) plus the colluder echoing peer 0's digest: the tie goes to the lowest
    # index, and peer 0 keeps its state, which is an honest peer's; the colluder cannot win alone
    _digests(dbs, r - 1, {1: "b", 2: "b", 3: "a"})
    assert _check(t, r).train
    _digests(dbs, r - 1, {3: "c"})
    assert _check(t, r).kind == "resync"


def test_an_aggregated_set_naming_a_peer_that_joined_from_beyond_the_list_is_no_bad_value(group):
    """Peers 1 and 2 aggregated peer 3, which joined from beyond the list (the data has 4 parts) while we
    were away: their sets are not held against them. An index the group cannot have still is."""
    t, dbs = group(3, **{"data.parts": 4})
    r = 6
    _marks(dbs, {q: r - 1 for q in range(3)})
    _digests(dbs, r - 1, {0: "a", 1: "b", 2: "b"})
    for q in (1, 2):
        dbs[q].set(Keys(q).aggset(r - 1), "1,2,3")
    v = _check(t, r)
    assert v.kind == "resync" and "they aggregated peers 1,2,3" in v.why
    assert not [e for e in _events(dbs[0]) if e["event"] == "bad_value"]
    dbs[2].set(Keys(2).aggset(r - 1), "1,2,4")
    _check(t, r)
    assert [e["about"] for e in _events(dbs[0]) if e["event"] == "bad_value"] == [2]


def test_a_peer_without_a_quorum_waits_and_rejoins_the_state_of_the_majority(group):
    t, dbs = group(5)
    r = 20
    _marks(dbs, {q: r - 1 for q in range(5)})
    _digests(dbs, r - 1, {0: "a", 1: "b", 2: "b", 3: "b", 4: "b"})
    for q in (1, 2, 3, 4):  # we removed them all (isolated from them)
        t.membership[q].removed = True
    v = _check(t, r)
    assert v.kind == "resync" and v.why.startswith("rejoin") and "[1, 2, 3, 4]" in v.why
    for q in (2, 3, 4):  # they are gone too: nobody to rejoin, and one of five is no quorum
        dbs[q].delete(Keys(q).alive)
    v = _check(t, r)
    assert v.kind == "wait" and "no quorum" in v.why


def test_the_first_peers_to_finish_a_round_do_not_decide_a_divergence_alone():
    # peer 0 alone finished round 8 with another digest than ours (peer 4's) while peers 1 and 2 still
    # finish it: a tie for now that peer 0's lower index would win, but they may side with us, so we
    # keep training; once they ended with peer 0's digest, we resynchronise
    def probe(mark, d):
        return Probe(True, True, False, mark, d and d * 40, None)

    def verdict(others):
        return decide(4, 9, others, removed=set(), f=0, my_digest="a" * 40, my_state=(8, "a" * 40))

    assert verdict({0: probe(8, "c"), 1: probe(8, None), 2: probe(8, None), 3: probe(5, None)}).train
    # 3 against us with 1 pending: the other state wins whatever it ends with
    assert verdict({0: probe(8, "c"), 1: probe(8, "c"), 2: probe(8, "c"), 3: probe(8, None)}).kind == "resync"
    assert verdict({0: probe(8, "c"), 1: probe(8, "c"), 2: probe(8, "a"), 3: probe(8, "c")}).kind == "resync"
    # a peer waiting in an earlier round is not finishing this one: the tie is decided (lowest index)
    assert verdict({0: probe(8, "c"), 1: probe(5, None), 2: probe(5, None), 3: probe(5, None)}).kind == "resync"


def test_after_the_last_round_a_peer_still_finishing_it_does_not_keep_the_models_apart(group):
    # the closing comparison waits for the members still finishing the last round (they published it,
    # no digest yet); one that is still at it after the wait (e.g. waiting for a quorum of its own)
    # would otherwise hold the tie undecided for good: every peer that finished ends with its own model
    last = ROUNDS - 1
    t, dbs = group(3, me=1)
    _marks(dbs, {0: last, 1: last, 2: last})
    _digests(dbs, last, {0: "a", 1: "b"})

    agreement = Agreement(1, t.db, t.membership, 0, ROUNDS, t.bad_value, max_group=3)
    kept = decide(1, ROUNDS, agreement.probe(ROUNDS), set(), 0, my_digest="b" * 40, my_state=(last, "b" * 40))
    assert kept.train, "before the wait, peer 2 may still side with us"
    t0 = time.monotonic()
    v = agreement.close(ROUNDS, 0.5)
    assert v.kind == "resync" and "diverged" in v.why and "[0]" in v.why, v
    assert time.monotonic() - t0 >= 0.5  # it waited for peer 2 first
    # peer 2 ends with our model within the wait: 2 holders against 1, we keep it
    threading.Timer(0.3, _digests, (dbs, last, {2: "b"})).start()
    t0 = time.monotonic()
    assert agreement.close(ROUNDS, 10).train
    assert time.monotonic() - t0 < 5


def test_a_peer_before_the_last_round_follows_the_members_that_finished_the_training():
    """Members that finished the training (``done``) published nothing after the last round, so their
    marks do not say they are ahead, and they send no more vectors: a peer still before the last round
    (its vectors did not reach it) waited for a quorum that never came, and gave up. Done members count
    as ahead before any round of the training, under the same f + 1 and majority rule as marks."""
    last = ROUNDS - 1

    def probe(done, mark=last):
        return Probe(True, not done, done, mark, "a" * 40, (last - 1, "a" * 40))

    def verdict(others, r=last):
        return decide(4, r, others, removed=set(), f=1, my_digest="a" * 40, my_state=(last - 1, "a" * 40),
                      rounds=ROUNDS)

    finished = {0: probe(True), 1: probe(True), 2: probe(True), 3: probe(False)}
    assert verdict(finished).kind == "resync" and "finished the training" in verdict(finished).why
    # f = 1 member claiming to be done cannot make us resync
    assert verdict({0: probe(True), 1: probe(False), 2: probe(False), 3: probe(False)}).train
    # after the last round (the closing comparison) being done is no lead
    assert verdict(finished, r=ROUNDS).train


def test_decide_breaks_ties_deterministically():
    # a 2|2 split that healed: both halves wait (2 of 4 is no quorum); the later state wins, then the
    # half with the lowest index; each side reaches the same verdict from its own probes
    def probe(c, d):
        return Probe(True, True, False, c, d * 40, (c, d * 40))

    def verdict(me, mine, others):
        return decide(me, mine[0] + 1, others, removed={q for q, p in others.items() if p.state != mine}, f=0,
                      my_digest=mine[1], my_state=mine)

    a, b = (30, "a" * 40), (30, "b" * 40)
    probes = {0: probe(30, "a"), 1: probe(30, "a"), 2: probe(30, "b"), 3: probe(30, "b")}
    assert verdict(0, a, {q: p for q, p in probes.items() if q != 0}).kind == "wait"
    assert verdict(2, b, {q: p for q, p in probes.items() if q != 2}).kind == "resync"
    later = {0: probe(30, "a"), 1: probe(30, "a"), 2: probe(33, "b"), 3: probe(33, "b")}
    assert verdict(0, a, {q: p for q, p in later.items() if q != 0}).kind == "resync"
    assert winner({"x": [3, 1], "y": [0, 2]}, need=2) == "y"
    assert winner({"x": [3, 1, 4], "y": [0, 2]}, need=2) == "x"
    assert winner({"x": [3], "y": [0]}, need=2) is None


# -------------------------------------------------------------------------------- joining


def _snapshot(db, q: int, first: int, params: bytes, members: dict[int, str], url: str,
              since: dict[int, int] | None = None) -> None:
    K = Keys(q)
    db.set(K.snapshot(first, "params"), params)
    db.set(K.snapshot(first, "momentum"), params[::-1])
    meta = {"round": first - 1, "from": q, "self_url": url, "members": {str(m): u for m, u in members.items()}}
    if since:
        meta["since"] = {str(m): r for m, r in since.items()}
    db.set(K.snapshot(first, "meta"), json.dumps(meta))


def test_byzantine_inflated_marks_do_not_move_a_joiners_round(group):
    t, dbs = group(5, f=2)
    assert t.attested_round({1: 10, 2: 10, 3: 40, 4: 40}) == 10
    # three announced 12 or later: at least one of them is honest, so round 12 was reached
    assert t.attested_round({1: 10, 2: 12, 3: 40, 4: 40}) == 12
    t0, _ = group(3)
    assert t0.attested_round({1: 10, 2: 11}) == 11  # f = 0: the latest


def test_byzantine_colluding_snapshots_are_not_adopted(group, servers):
    """Two colluding members of six (f = 2) announce a later round and publish identical poisoned
    snapshots at once; the honest ones publish theirs when their round ends. The joiner waits for f + 1
    identical ones and takes the honest state, at the honest round."""
    t, dbs = group(6, f=2, me=5)
    urls = [s.url for s in servers[:6]]
    honest_at = 20
    _marks(dbs, {0: honest_at, 1: honest_at, 2: honest_at, 3: honest_at + 30, 4: honest_at + 30})
    first = honest_at + JOIN_AHEAD
    poison, good = b"\x7f" * 64, b"\x01" * 64
    members = {q: urls[q] for q in range(5)}
    for q in (3, 4):
        for at in (first, honest_at + 30 + JOIN_AHEAD):  # wherever the joiner looks
            _snapshot(dbs[q], q, at, poison, members, urls[q])

    def honest_peers_serve():
        for q in (0, 1, 2):
            threading.Event().wait(0.3)
            _snapshot(dbs[q], q, first, good, members, urls[q])

    server = threading.Thread(target=honest_peers_serve)
    server.start()
    try:
        start, width = t.join(total=ROUNDS)
    finally:
        server.join()
    assert (start, width) == (first, len(good))
    own = dbs[5]
    assert own.get(Keys(5).params) == good and own.get(Keys(5).momentum) == good[::-1]
    joined = [e for e in _events(own, 5) if e["event"] == "joined"]
    assert len(joined) == 1 and joined[0]["detail"].endswith("from peers [0, 1, 2]")


def test_byzantine_bad_snapshot_meta_is_the_senders_fault(group, servers):
    t, dbs = group(4, f=0, me=3)
    urls = [s.url for s in servers[:4]]
    _marks(dbs, {0: 5, 1: 5, 2: 5})
    first = 5 + JOIN_AHEAD
    members = {q: urls[q] for q in range(3)}
    state = b"\x02" * 32
    dbs[0].set(Keys(0).snapshot(first, "params"), state)
    dbs[0].set(Keys(0).snapshot(first, "meta"), b"\xff\xfe not UTF-8 JSON")
    for q in (1, 2):
        _snapshot(dbs[q], q, first, state, members, urls[q])
    assert t.join(total=ROUNDS) == (first, len(state))
    ev = _events(dbs[3], 3)
    assert [(e["event"], e["about"]) for e in ev if e["event"] == "bad_value"] == [("bad_value", 0)]
    assert [e["detail"] for e in ev if e["event"] == "joined"] == [f"state of round {first - 1} from peers [1, 2]"]


def test_byzantine_one_source_cannot_change_the_membership_a_joiner_adopts(group, servers):
    t, dbs = group(4, f=0, me=3)
    urls = [s.url for s in servers[:4]]
    _marks(dbs, {0: 5, 1: 5, 2: 5})
    first = 5 + JOIN_AHEAD
    state = b"\x03" * 16
    honest = {q: urls[q] for q in range(3)}
    _snapshot(dbs[0], 0, first, state, {1: urls[1], 5: "redis://attacker:1"}, urls[0])  # drops 2, adds 5
    for q in (1, 2):
        _snapshot(dbs[q], q, first, state, honest, urls[q])
    t.join(total=ROUNDS)
    current = t.membership.current()
    assert sorted(current) == [0, 1, 2] and all(current[q].url == urls[q] for q in current)


def test_a_peer_resyncs_from_sources_that_admitted_a_peer_from_beyond_the_list(group, servers):
    """A group of three whose data has a fourth part: peer 3 joined from beyond the list while peer 2 was
    away, so peer 2 never heard of it. The sources' snapshots list it; they are readable, and peer 2
    adopts it. (They were refused as naming a member outside 0 to 2, so peer 2 could never rejoin.)"""
    t, dbs = group(3, me=2, **{"data.parts": 4})
    urls = [s.url for s in servers[:4]]
    _marks(dbs, {0: 5, 1: 5})
    first = 5 + JOIN_AHEAD
    members = {q: urls[q] for q in range(4)}
    for q in (0, 1):
        _snapshot(dbs[q], q, first, b"\x05" * 16, members, urls[q])
    assert t.join(total=ROUNDS) == (first, 16)
    assert sorted(t.membership.current()) == [0, 1, 3]
    assert not [e for e in _events(dbs[2], 2) if e["event"] == "bad_value"]


def test_a_joiner_awaits_a_member_admitted_for_a_later_round_only_from_that_round(group, servers):
    """Two joiners ask for rounds R and R + 1. The sources await the second from R + 1 on, and so must
    the first: it waited a whole deadline for a vector that never comes in round R, came late to the
    next round, and the members that excluded it there diverged from those that did not."""
    t, dbs = group(4, f=0, me=3)
    urls = [s.url for s in servers[:4]]
    _marks(dbs, {0: 5, 1: 5})
    first = 5 + JOIN_AHEAD
    for q in (0, 1):
        _snapshot(dbs[q], q, first, b"\x05" * 16, {q: urls[q] for q in range(3)}, urls[q], since={2: first + 1})
    t.join(total=ROUNDS)
    assert t.membership.awaited(first) == [0, 1] and t.membership.awaited(first + 1) == [0, 1, 2]


def test_byzantine_one_source_cannot_make_a_joiner_skip_a_member(group, servers):
    t, dbs = group(4, f=1, me=3)
    urls = [s.url for s in servers[:4]]
    _marks(dbs, {0: 5, 1: 5, 2: 5})
    first = 5 + JOIN_AHEAD
    members = {q: urls[q] for q in range(3)}
    _snapshot(dbs[0], 0, first, b"\x05" * 16, members, urls[0], since={1: first + 40})  # skip 1's vectors
    for q in (1, 2):
        _snapshot(dbs[q], q, first, b"\x05" * 16, members, urls[q])
    t.join(total=ROUNDS)
    assert t.membership.awaited(first) == [0, 1, 2]


def _served_meta(group, servers, monkeypatch, r: int, firsts: dict[int, int]) -> bytes:
    """Peer 0 of five serves the join requests of the peers in ``firsts`` (peer -> first round, in that
    order) at the end of round r; the meta of its snapshot for round r + 1."""
    t, dbs = group(5)
    urls = [s.url for s in servers[:5]]
    dbs[0].set(Keys(0).params, b"\x01" * 16)
    dbs[0].set(Keys(0).momentum, b"\x02" * 16)
    requests = [(Keys(0).join(q), q, urls[q], first) for q, first in firsts.items()]
    monkeypatch.setattr(t, "requests", lambda *a, **kw: requests)
    t.serve_joins(r)
    return dbs[0].get(Keys(0).snapshot(r + 1, "meta"))


def test_a_source_admits_every_joiner_before_its_snapshot_says_who_joins_later(group, servers, monkeypatch):
    r = 7  # the joiner of round r + 1 comes first
    meta = json.loads(_served_meta(group, servers, monkeypatch, r, {3: r + 1, 4: r + 2}))
    assert meta["since"] == {"4": r + 2} and {"3", "4"} <= set(meta["members"])


def test_byzantine_a_join_request_far_ahead_does_not_make_honest_snapshots_unreadable(group, servers, monkeypatch):
    from spirt.wire import MAX_SINCE_AHEAD, parse_snapshot_meta

    r = 7
    raw = _served_meta(group, servers, monkeypatch, r, {3: r + 1, 4: r + 1000})
    meta = parse_snapshot_meta(raw, source=0, round=r, max_peers=5)
    assert meta.since == {4: r + 1 + MAX_SINCE_AHEAD}


# -------------------------------------------------------------------------------- sitting out


def test_a_member_sitting_out_for_a_state_transfer_is_excluded_but_not_removed(group):
    """A member resynchronising keeps ``joining`` instead of its heartbeat: it misses rounds, but is not
    removed (it comes back with the group's state, maybe through other members than us, and we must
    aggregate its vectors then). Once the key expires (it died while joining), misses count again."""
    t, dbs = group(3)
    m = t.membership
    dbs[1].delete(Keys(1).alive)
    dbs[1].set(Keys(1).joining, 1, px=600_000)
    for r in range(5):
        alive, why, _ = m.alive(1)
        assert not alive and why == "sitting out for a state transfer"
        m.account(r, ready=[2], missing={1: (why, 0.0)})
    assert not m[1].removed and m.awaited(5) == [1, 2]
    dbs[1].delete(Keys(1).joining)
    for r in range(5, 5 + m.cfg.max_misses):
        alive, why, _ = m.alive(1)
        assert why == "heartbeat expired"
        m.account(r, ready=[2], missing={1: (why, 0.0)})
    assert m[1].removed


def test_sitting_out_switches_the_heartbeat_to_joining_and_back(group):
    t, dbs = group(2)
    m, K = t.membership, Keys(0)
    m.start_heartbeat()
    _wait_for(lambda: dbs[0].exists(K.alive) and not dbs[0].exists(K.joining))
    m.sit_out(dbs[0])
    assert not dbs[0].exists(K.alive) and dbs[0].exists(K.joining)
    threading.Event().wait(2 * m.cfg.heartbeat_s)  # the heartbeat thread keeps it, not the heartbeat
    assert not dbs[0].exists(K.alive) and dbs[0].exists(K.joining)
    m.start_heartbeat()
    _wait_for(lambda: dbs[0].exists(K.alive) and not dbs[0].exists(K.joining))


def _barrier(t: StateTransfer, r: int, peers: list[int], timeout_s: float):
    from spirt.exchange import Exchange

    ex = Exchange(t.index, t.db, t.membership, Guard(), barrier_timeout_s=timeout_s,
                  heartbeat_s=t.membership.cfg.heartbeat_s)
    t0 = time.monotonic()
    ready, missing = ex.barrier(r, peers, 8)
    return ready, missing, time.monotonic() - t0


def test_a_member_joining_at_this_round_is_awaited_until_the_deadline(group):
    """A member sitting out that asked to join at round r is taking the state made for it: everyone
    waits for its round-r vector until the deadline. Excluded at once at some members and not at others
    (its vector arriving in between), the group aggregated different sets in the joiner's first round,
    and the joiner found itself diverged or behind there and started over, round after round."""
    t, dbs = group(3)
    r = 5
    dbs[1].delete(Keys(1).alive)
    dbs[1].set(Keys(1).joining, r, px=600_000)
    dbs[0].set(Keys(0).incoming(2, r), b"\0" * 8)

    def arrive() -> None:  # the joiner has its state, trains round r and pushes its vector
        time.sleep(1.0)
        dbs[1].set(Keys(1).alive, 1, px=600_000)
        dbs[1].delete(Keys(1).joining)
        dbs[0].set(Keys(0).incoming(1, r), b"\0" * 8)

    th = threading.Thread(target=arrive)
    th.start()
    try:
        ready, missing, _ = _barrier(t, r, [1, 2], timeout_s=10)
    finally:
        th.join()
    assert ready == [1, 2] and not missing
    # one that asked for a later round, or has not asked yet, is not waited for in this one
    for joins_at in (r + 3, -1):
        dbs[1].delete(Keys(1).alive)
        dbs[1].set(Keys(1).joining, joins_at, px=600_000)
        ready, missing, took = _barrier(t, r + 1, [1], timeout_s=10)
        assert missing[1][0] == "sitting out for a state transfer" and took < 5


def test_byzantine_a_bad_joining_round_is_the_senders_fault(group):
    t, dbs = group(3)
    dbs[1].delete(Keys(1).alive)
    dbs[1].set(Keys(1).joining, "5; or not", px=600_000)
    ready, missing, took = _barrier(t, 5, [1], timeout_s=10)
    assert missing[1][0] == "sitting out for a state transfer" and took < 5
    said = [e for e in _events(dbs[0]) if e["event"] == "bad_value"]
    assert said and said[0]["about"] == 1 and "joining round" in said[0]["detail"]


def test_a_joiner_says_the_round_it_joins_at_and_is_live_again_at_once(group):
    t, dbs = group(2)
    m, K = t.membership, Keys(0)
    m.start_heartbeat()
    _wait_for(lambda: dbs[0].exists(K.alive))
    m.sit_out(dbs[0])
    assert dbs[0].get(K.joining) == b"-1"
    m.joining_at(dbs[0], 12)
    assert dbs[0].get(K.joining) == b"12"
    threading.Event().wait(2 * m.cfg.heartbeat_s)  # the heartbeat thread keeps the round
    assert dbs[0].get(K.joining) == b"12"
    m.start_heartbeat(dbs[0])  # our state is installed: no beat's wait before the others see us
    assert dbs[0].exists(K.alive) and not dbs[0].exists(K.joining)


def _join_served_by(t: StateTransfer, serve) -> tuple[int, int]:
    """Peer t joins while ``serve`` (a thread) plays its sources' part."""
    th = threading.Thread(target=serve)
    th.start()
    try:
        return t.join(total=ROUNDS)
    finally:
        th.join()


def test_a_joiner_overtaken_by_the_group_asks_again_at_once(group, servers, monkeypatch):
    """Sources that trained past the round a joiner asked for did not serve it (its request came too
    late). The group is training, so the joiner asks again at once for a round ahead of the new marks;
    pausing (as after a failure) made it lose more rounds with each attempt until the training ended."""
    import spirt.transfer as transfer

    t, dbs = group(3)
    urls = [s.url for s in servers[:3]]
    _marks(dbs, {1: 5, 2: 5})
    late = 5 + JOIN_AHEAD
    served = late + JOIN_AHEAD
    pauses = []
    real_sleep = time.sleep
    monkeypatch.setattr(transfer.time, "sleep", lambda s: (pauses.append(s) if s > 0.1 else None, real_sleep(s)))

    def asked(first: int) -> bool:
        return all(dbs[q].get(Keys(q).join(0)) == f"{urls[0]}|{first}".encode() for q in (1, 2))

    def serve() -> None:
        for _ in range(400):
            if asked(late) and int(dbs[1].get(Keys(1).ready)) < late:
                _marks(dbs, {1: late, 2: late})  # they published our round before reading our request
            if asked(served):  # the next request, ahead of the marks they published, is served
                for q in (1, 2):
                    _snapshot(dbs[q], q, served, b"\x07" * 16, {q: urls[q] for q in range(3)}, urls[q])
                return
            real_sleep(0.02)

    assert _join_served_by(t, serve) == (served, 16)
    retries = [e["detail"] for e in _events(dbs[0]) if e["event"] == "join_retry"]
    assert len(retries) == 1 and "peers [1, 2] went past it" in retries[0]
    assert pauses == []


def test_a_joiner_served_by_no_more_sources_than_went_past_its_round_asks_again(group, servers, monkeypatch):
    """One source serves the round a joiner asked for; three trained past it without serving it (the
    request came too late for them). Taking the one source's state, the joiner would train that round
    with it alone: those two would aggregate a vector the other three did not, and end the round on a
    state of their own. The joiner asks again for a later round, which all of them serve; in between,
    its `joining` key no longer names the round it gave up (the source that served it stops waiting)."""
    import spirt.transfer as transfer

    t, dbs = group(5)
    t.membership.sit_out(dbs[0])
    joining_when_paused = []  # our `joining` key whenever the joiner (this thread) pauses
    real_sleep = time.sleep
    main = threading.current_thread()
    monkeypatch.setattr(transfer.time, "sleep", lambda s: (
        joining_when_paused.append(dbs[0].get(Keys(0).joining)) if threading.current_thread() is main else None,
        real_sleep(s)))
    urls = [s.url for s in servers[:5]]
    _marks(dbs, dict.fromkeys(range(1, 5), 5))
    late = 5 + JOIN_AHEAD
    served = late + JOIN_AHEAD
    members = {q: urls[q] for q in range(5)}

    def asked(first: int) -> bool:
        return all(dbs[q].get(Keys(q).join(0)) == f"{urls[0]}|{first}".encode() for q in range(1, 5))

    def serve() -> None:
        for _ in range(400):
            if asked(late) and dbs[1].get(Keys(1).snapshot(late, "meta")) is None:
                _snapshot(dbs[1], 1, late, b"\x01" * 16, members, urls[1])
                _marks(dbs, dict.fromkeys(range(2, 5), late))
            if asked(served):
                for q in range(1, 5):
                    _snapshot(dbs[q], q, served, b"\x07" * 16, members, urls[q])
                return
            time.sleep(0.02)

    assert _join_served_by(t, serve) == (served, 16)
    assert dbs[0].get(Keys(0).params) == b"\x07" * 16
    retries = [e["detail"] for e in _events(dbs[0]) if e["event"] == "join_retry"]
    assert any("peers [2, 3, 4] went past it, only [1] serve it" in d for d in retries), retries
    # it waited for round `late`'s snapshots naming that round, then paused after giving it up with
    # its key no longer naming it
    said = joining_when_paused
    assert str(late).encode() in said and b"-1" in said[said.index(str(late).encode()):], said


def test_byzantine_a_minority_claiming_it_went_past_a_joiners_round_does_not_block_the_join(group, servers):
    """f = 1 of four: the Byzantine source publishes the joiner's round without serving it, to make the
    joiner give the round up again and again. The two honest sources that serve it outnumber it: the
    joiner takes their state."""
    t, dbs = group(4, f=1)
    urls = [s.url for s in servers[:4]]
    _marks(dbs, {1: 5, 2: 5, 3: 5})
    first = 5 + JOIN_AHEAD
    members = {q: urls[q] for q in range(4)}

    def serve() -> None:
        for _ in range(400):
            if all(dbs[q].get(Keys(q).join(0)) for q in (1, 2, 3)):
                _marks(dbs, {3: first})  # claims to have trained our round, serves nothing
                for q in (1, 2):
                    _snapshot(dbs[q], q, first, b"\x06" * 16, members, urls[q])
                return
            time.sleep(0.02)

    assert _join_served_by(t, serve) == (first, 16)
    assert not [e for e in _events(dbs[0]) if e["event"] == "join_retry"]


def _wait_for(cond, timeout_s: float = 5.0) -> None:
    deadline = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if cond():
            return
        deadline.wait(0.05)
    raise AssertionError("condition not reached in time")


def test_a_joiner_asks_members_sitting_out_too_but_takes_state_from_live_ones(group, servers):
    t, dbs = group(4, me=3)
    urls = [s.url for s in servers[:4]]
    _marks(dbs, {0: 5, 1: 5})
    dbs[2].delete(Keys(2).alive)
    dbs[2].set(Keys(2).joining, 1, px=600_000)  # resynchronising itself: it will admit us when back
    first = 5 + JOIN_AHEAD
    state = b"\x04" * 16
    for q in (0, 1):
        _snapshot(dbs[q], q, first, state, {q: urls[q] for q in range(3)}, urls[q])
    assert t.join(total=ROUNDS) == (first, len(state))
    assert all(dbs[q].get(Keys(q).join(3)) == f"{urls[3]}|{first}".encode() for q in (0, 1, 2))
    assert [e["detail"] for e in _events(dbs[3], 3) if e["event"] == "join_request"] == [
        f"asked peers [0, 1, 2] to admit us from round {first}"]


def test_byzantine_one_join_request_cannot_make_a_waiting_peer_skip_the_training(group, servers):
    """A peer waiting for a quorum moves to the round a joiner asks for (the group is not training).
    One member's request for a round far ahead made every waiting peer skip the rest of the training;
    a request moves a waiting peer JOIN_AHEAD rounds at most, as far as an honest joiner ever asks."""
    t, dbs = group(3)
    urls = [s.url for s in servers[:3]]
    r = 5
    dbs[0].set(Keys(0).state, f"{r - 1}|" + "a" * 40)
    dbs[0].set(Keys(0).join(2), f"{urls[2]}|{ROUNDS - 1}")  # the last round: skip everything
    assert t.serve_waiting(r) == r
    assert "skipped" not in [e["event"] for e in _events(dbs[0])]
    dbs[0].set(Keys(0).join(2), f"{urls[2]}|{r + JOIN_AHEAD}")  # as an honest joiner asks
    assert t.serve_waiting(r) == r + JOIN_AHEAD
    assert int(dbs[0].get(Keys(0).ready)) == r + JOIN_AHEAD - 1


def test_a_peer_that_must_resync_in_the_last_round_takes_the_final_state(group, servers):
    """The others are in the last round (or done): there is no round left to join at, so the joiner
    takes the state they end the training with (each leaves a snapshot of it when it finishes), once
    they agree, and ends with the group's model instead of its own."""
    t, dbs = group(3, me=2)
    urls = [s.url for s in servers[:3]]
    _marks(dbs, {0: ROUNDS - 1, 1: ROUNDS - 1})
    final = b"\x05" * 16

    def finish():
        for q in (0, 1):
            threading.Event().wait(0.3)
            _snapshot(dbs[q], q, ROUNDS, final, {q: urls[q] for q in range(3)}, urls[q])
            dbs[q].set(Keys(q).done, 1)

    finisher = threading.Thread(target=finish)
    finisher.start()
    try:
        assert t.join(total=ROUNDS) == (ROUNDS, len(final))
    finally:
        finisher.join()
    assert dbs[2].get(Keys(2).params) == final
    ev = _events(dbs[2], 2)
    assert [e["event"] for e in ev if e["event"] in ("join_final", "joined")] == ["join_final", "joined"]
    assert [e["detail"] for e in ev if e["event"] == "joined"] == [f"state of round {ROUNDS - 1} from peers [0, 1]"]


def test_a_peer_takes_the_final_state_once_half_the_group_finished_though_some_are_live(group, servers):
    """Half the group finished the training; the other members are live but behind, like us. Without
    them no round can complete any more, so asking that member for the last round led to a
    state that the next check showed behind again, and again, until the peer gave up. The joiner takes
    the state the finished majority ended with instead."""
    t, dbs = group(6, f=1, me=5)  # half the group finished: the other half is no quorum either
    urls = [s.url for s in servers[:6]]
    _marks(dbs, {0: ROUNDS - 1, 1: ROUNDS - 1, 2: ROUNDS - 1, 3: ROUNDS - 2, 4: ROUNDS - 2})
    final = b"\x07" * 16
    for q in (0, 1, 2):
        _snapshot(dbs[q], q, ROUNDS, final, {m: urls[m] for m in range(6)}, urls[q])
        dbs[q].set(Keys(q).done, 1)
    assert t.join(total=ROUNDS) == (ROUNDS, len(final))
    assert dbs[5].get(Keys(5).params) == final
    assert "join_final" in [e["event"] for e in _events(dbs[5], 5)]
    assert dbs[3].get(Keys(3).join(5)) is None and dbs[4].get(Keys(4).join(5)) is None  # not asked


def test_a_peer_that_must_resync_joins_the_last_round_when_the_others_wait_for_it_there(group, servers):
    """The others published the last round but wait for a quorum in it, which needs us: they never
    finish, so their final state never comes. A waiting peer serves a join for its round: the joiner
    asks for the last round and trains it with them (taking the final state at once waited for ever)."""
    t, dbs = group(3, me=2)
    urls = [s.url for s in servers[:3]]
    last = ROUNDS - 1
    _marks(dbs, {0: last, 1: last})
    state = b"\x06" * 16
    stop = threading.Event()

    def serve_waiting():  # what Transfer.serve_waiting does at a peer waiting before the last round
        served = set()
        while not stop.is_set() and len(served) < 2:
            for q in {0, 1} - served:
                if dbs[q].get(Keys(q).join(2)) == f"{urls[2]}|{last}".encode():
                    _snapshot(dbs[q], q, last, state, {m: urls[m] for m in range(3)}, urls[q])
                    served.add(q)
            stop.wait(0.05)

    server = threading.Thread(target=serve_waiting)
    server.start()
    try:
        assert t.join(total=ROUNDS) == (last, len(state))
    finally:
        stop.set()
        server.join()
    assert dbs[2].get(Keys(2).params) == state
    assert "join_final" not in [e["event"] for e in _events(dbs[2], 2)]


@pytest.mark.parametrize("backend", ["client", "lua", "module"])
def test_the_state_digest_after_an_update_is_the_databases_own(backend):
    """The client backend computes its digest on the client, from the bytes it stores: it must equal
    the backend's in-database digest of the stored parameters, or its peers would see a divergence."""
    import numpy as np

    from spirt.agreement import queue_digest
    from spirt.backends import SGDConfig, get_backend

    b, K = get_backend(backend), Keys(0)
    rng = np.random.default_rng(3)
    with start_server("valkey") as srv:
        c = srv.client()
        b.prepare(c)
        c.set(K.params, rng.standard_normal(1000, dtype=np.float32).tobytes())
        c.set(K.agg(0), rng.standard_normal(1000, dtype=np.float32).tobytes())
        pipe = c.pipeline(transaction=True)
        digest = b.queue_update(pipe, c, K.params, K.momentum, K.agg(0), SGDConfig(0.1, 0.9, 0.0))
        queue_digest(pipe, K, 0, b, digest)
        pipe.execute()
        assert (digest is not None) == (backend == "client")
        stored = c.eval(f"return {b.digest_lua}", 1, K.params)
        assert c.get(K.digest(0)) == stored and c.get(K.state) == b"0|" + stored
