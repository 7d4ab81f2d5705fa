"""The pre-admission area: anyone who reaches a secured database can write there without a password, so
what it takes is bounded (TENSOR.HELLO: a few short messages per index that could be admitted, a time to
live), and nothing written there can stop a genuine peer's admission. Each attack is mounted on a real
server, on Valkey and on Redis; each fails if its defense is removed."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from spirt.security import acl, admission
from spirt.security.admission import Applicant, Desk, wait_admitted
from spirt.security.context import server_limits, value_limit
from spirt.security.identity import Challenge, Identity, TrustStore, Verifier, make_group, respond
from spirt.servers import make_client, start_server

GROUP = "g"
WIDTH = 400_000  # bytes of a parameter vector: the value limit follows from it


def _client(srv, user, password):
    return make_client(url=srv.url, username=user, password=password, socket_timeout=10)


@pytest.fixture
def desk_db(server_flavor, tmp_path):
    """Peer 0's guarded database, as a secured peer installs it (value and memory limits, the desk's
    bounds, the hello user open for peers 1 and 2), and its desk."""
    ids = make_group(tmp_path, 3, GROUP)
    trust = TrustStore.load(tmp_path, GROUP)
    srv = start_server(server_flavor, module=True)
    admin = srv.client()
    users = acl.DatabaseUsers(0, settings=server_limits(WIDTH, 1, 3), guarded=True, admissible=trust.allow)
    users.install(admin)
    admin.close()
    orch = _client(srv, acl.orchestrator_user(0), users.orchestrator_password)
    hello = _client(srv, acl.HELLO_USER, "-")
    desk = Desk(0, orch, Verifier(trust, 0), tuple(trust.allow), guarded=True)
    try:
        yield srv, ids, desk, orch, hello
    finally:
        orch.close()
        hello.close()
        srv.stop()


def test_the_desk_takes_short_messages_a_few_per_area(server_flavor):
    with start_server(server_flavor, module=True) as srv:
        c = srv.client()
        with pytest.raises(redis.ResponseError, match="closed"):  # a (re)started server takes nothing
            c.execute_command("TENSOR.HELLO", "a", b"x")
        for bad in (["MAXLEN", 0, "SLOTS", 1, "TTL", 1], ["MAXLEN", 70_000, "SLOTS", 1, "TTL", 1],
                    ["MAXLEN", 8, "SLOTS", 2000, "TTL", 1], ["SLOTS", 8, "MAXLEN", 2, "TTL", 1], ["MAXLEN", 8]):
            with pytest.raises(redis.ResponseError):
                c.execute_command("TENSOR.DESK", *bad)
        assert c.execute_command("TENSOR.DESK", "MAXLEN", 8, "SLOTS", 2, "TTL", 5000) == b"OK"
        for msg in (b"", b"x" * 9):
            with pytest.raises(redis.ResponseError, match="accepted"):
                c.execute_command("TENSOR.HELLO", "a", msg)
        assert c.execute_command("TENSOR.HELLO", "a", b"one") == b"OK"
        assert c.execute_command("TENSOR.HELLO", "a", b"two") == b"OK"
        with pytest.raises(redis.ResponseError, match="full"):  # refused, not evicted: "one" stays
            c.execute_command("TENSOR.HELLO", "a", b"three")
        assert c.lrange("a", 0, -1) == [b"one", b"two"] and 0 < c.pttl("a") <= 5000
        c.set("s", b"x")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            c.execute_command("TENSOR.HELLO", "s", b"x")


def test_pre_admission_flood_is_bounded(desk_db):
    """The attacks: a 300 MB value (the value limit was still 512 MB when the hello user existed), and
    thousands of hello keys, which the verifier stored and walked. Now: the value limit is in force
    before the hello user exists, only the areas of indices that could be admitted take anything, each
    at most HELLO_SLOTS messages of HELLO_MAX_BYTES, and the verifier keeps at most two challenges per
    index however often it is asked."""
    srv, ids, desk, orch, hello = desk_db
    big = b"\0" * (value_limit(WIDTH) + 1)
    with pytest.raises(redis.RedisError):
        hello.execute_command("TENSOR.HELLO", acl.hello_key(0, 1), big)
    refused = written = 0
    for q in range(3000):
        for msg in (json.dumps({"peer": q}), b"x" * acl.HELLO_MAX_BYTES):
            try:
                hello.execute_command("TENSOR.HELLO", acl.hello_key(0, q), msg)
                written += 1
            except redis.ResponseError:
                refused += 1
    for q in range(3000):  # raw writes are refused whatever the key
        with pytest.raises(redis.ResponseError):
            hello.rpush(acl.hello_key(0, q), b"x")
    assert written == 4  # two per open area: peers 1 and 2 (peer 0 is the database's own)
    areas = [k for k in orch.scan_iter(match=acl.Keys(0).hello_pattern)]
    assert sorted(areas) == sorted(acl.hello_key(0, q).encode() for q in (1, 2))
    for _ in range(acl.HELLO_SLOTS):  # fill the areas: every message beyond the slots is refused
        for q in (1, 2):
            try:
                hello.execute_command("TENSOR.HELLO", acl.hello_key(0, q), b"y" * acl.HELLO_MAX_BYTES)
            except redis.ResponseError as exc:
                assert "full" in str(exc)
    area_bytes = sum(orch.memory_usage(k) or 0 for k in areas)
    bound = 2 * acl.HELLO_SLOTS * (acl.HELLO_MAX_BYTES + 64) + 4096
    assert all(orch.llen(k) == acl.HELLO_SLOTS for k in areas) and area_bytes <= bound, (area_bytes, bound)
    # requests in peer 1's name, again and again: one challenge, the same nonce
    nonces = set()
    for _ in range(50):
        for q in (1, 2):
            try:
                hello.execute_command("TENSOR.HELLO", acl.hello_key(0, q), json.dumps({"peer": q}))
            except redis.ResponseError:
                pass
        desk.serve(now=time.monotonic() + 1000 + _)
        nonces.add(Challenge.decode(hello.get(acl.challenge_key(0, 1))).nonce)
    assert len(nonces) == 1 and desk.verifier.open_challenges() <= 4
    assert desk.refusals > 0 and len(desk.refused) <= 100


def test_forged_responses_do_not_block_admission(desk_db):
    """The attack: garbage and forged responses in every response slot, written as fast as one
    connection can, kept up while the genuine peers 1 and 2 apply. An area is a list only the desk
    empties, a full one refuses instead of evicting, and only a valid response spends a nonce: both are
    admitted, and every forged response is refused."""
    srv, ids, desk, orch, hello = desk_db
    stop = threading.Event()
    forged = {"n": 0}

    def attacker():
        c = _client(srv, acl.HELLO_USER, "-")
        mallory = {q: Identity.generate(q) for q in (1, 2)}
        try:
            while not stop.is_set():
                for q in (1, 2):
                    raw = c.get(acl.challenge_key(0, q))
                    msgs = [b"\x00garbage", json.dumps({"peer": q})]
                    if raw is not None:  # answer the genuine peer's nonce with another key
                        ch = Challenge.decode(raw)
                        msgs.append(respond(mallory[q], ch, GROUP, "ab" * 32).encode())
                    for m in msgs:
                        try:
                            c.execute_command("TENSOR.HELLO", acl.hello_key(0, q), m)
                            forged["n"] += 1
                        except redis.ResponseError:
                            pass
        finally:
            c.close()

    t = threading.Thread(target=attacker, daemon=True)
    t.start()
    try:
        time.sleep(0.5)  # the areas are full of the attacker's messages before anyone applies
        apps = {q: Applicant(ids[q], 0, GROUP, _client(srv, acl.HELLO_USER, "-"), guarded=True) for q in (1, 2)}
        members = {q: _client(srv, acl.remote_user(q), apps[q].password) for q in (1, 2)}
        t0 = time.monotonic()
        while set(desk.admitted) != {1, 2} and time.monotonic() - t0 < 30:
            for q in (1, 2):
                if q not in desk.admitted:
                    wait_admitted(apps[q], members[q], 0.05, serve=desk.serve)
        assert set(desk.admitted) == {1, 2}, [o.reason for o in desk.refused[-5:]]
        assert all(members[q].ping() for q in (1, 2))
    finally:
        stop.set()
        t.join(10)
    assert forged["n"] > 10 and any("bad signature" in o.reason for o in desk.refused)
    for c in (*members.values(), *(a.hello for a in apps.values())):
        c.close()


def test_a_pass_of_the_desk_is_bounded(desk_db, monkeypatch):
    """However much waits, one pass checks at most MAX_MESSAGES_PER_PASS messages (a signature each)."""
    srv, ids, desk, orch, hello = desk_db
    stranger = Identity.generate(1)
    ch = desk.verifier.challenge(1)
    for q in (1, 2):
        for _ in range(acl.HELLO_SLOTS):
            hello.execute_command("TENSOR.HELLO", acl.hello_key(0, q), respond(stranger, ch, GROUP, "ab" * 32).encode())
    monkeypatch.setattr(admission, "MAX_MESSAGES_PER_PASS", 5)
    out = desk.serve(now=1e9)
    assert len(out) == 2 * acl.HELLO_SLOTS and sum("budget" in o.reason for o in out) == 2 * acl.HELLO_SLOTS - 5
    assert sum("bad signature" in o.reason for o in out) == 5 and not desk.admitted
    assert not any(orch.llen(acl.hello_key(0, q)) for q in (1, 2))  # taken, checked or not


def test_a_forged_response_ahead_of_the_genuine_one(desk_db):
    """The attacker answers peer 1's challenge first (its own key, peer 1's index and nonce), then fills
    the area behind the genuine response: one pass of the desk refuses the forgery and admits peer 1
    (a forged response does not spend the nonce, and nothing evicts the genuine one)."""
    srv, ids, desk, orch, hello = desk_db
    area = acl.hello_key(0, 1)
    hello.execute_command("TENSOR.HELLO", area, json.dumps({"peer": 1}))
    desk.serve(now=1e9)
    ch = Challenge.decode(hello.get(acl.challenge_key(0, 1)))
    app = Applicant(ids[1], 0, GROUP, hello, guarded=True)
    forged = respond(Identity.generate(1), ch, GROUP, "ab" * 32)
    genuine = respond(ids[1], ch, GROUP, acl.password_hash(app.password))
    hello.execute_command("TENSOR.HELLO", area, forged.encode())
    hello.execute_command("TENSOR.HELLO", area, genuine.encode())
    with pytest.raises(redis.ResponseError, match="full"):
        while True:
            hello.execute_command("TENSOR.HELLO", area, forged.encode())
    out = desk.serve(now=2e9)
    assert [o.admitted for o in out][:2] == [False, True] and "bad signature" in out[0].reason
    assert desk.admitted == {1: acl.password_hash(app.password)}
    assert all("replayed" in o.reason or "bad signature" in o.reason for o in out[2:])
