"""Security wired into the peer: admission before the first round, ACL-only access, signed updates
checked before aggregation, hostile input in every key a remote peer can write."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import redis
from peer_threads import in_threads, train

from spirt.config import ConfigError, load_config
from spirt.keys import Keys
from spirt.peer import Peer, parse_join_request
from spirt.security import acl
from spirt.security.identity import Identity, make_group
from spirt.security.signing import sign_update
from spirt.servers import make_client, start_server
from spirt.transfer import JOIN_AHEAD

TINY = {
    "run.rounds": 2, "run.eval_every": 2, "run.eval_samples": 50, "data.limit_train": 300,
    "data.limit_test": 100, "peers.count": 2, "peers.functions": 2, "peers.batch_size": 8,
    "model.name": "mlp", "optim.lr": 0.05, "peers.mode": "thread", "executor.kind": "inline",
    "barrier.timeout_s": 60, "membership.heartbeat_s": 30,
}


def _cfg(keys_dir, **extra):
    return load_config(None, {**TINY, "security.enabled": True, "security.keys_dir": str(keys_dir),
                              "security.group": "g", "security.admission_timeout_s": 30, **extra})


@pytest.fixture
def two_servers(server_flavor):
    servers = [start_server(server_flavor) for _ in range(2)]
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


def _admitted_peers(cfg, servers):
    urls = [s.url for s in servers]
    peers = [Peer(cfg, i, urls) for i in range(2)]
    for p in peers:
        p.init_params()
    errors = in_threads(lambda p: p.guard.admit(p.members), peers, timeout_s=60)
    assert not errors, errors
    return peers


def _run(peers):
    errors = in_threads(lambda p: p.run(), peers)
    assert not errors, errors


def _rows(peer):
    return [json.loads(x) for x in peer.db.lrange(peer.keys.metrics, 0, -1)]


def test_config_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="security"):
        load_config(None, {"security.enabled": True})
    with pytest.raises(ConfigError, match="require_tls"):
        load_config(None, {"security.require_tls": True})
    with pytest.raises(ConfigError, match="security.sign_update"):
        load_config(None, {"security.sign_update": True})
    assert load_config(None, {}).security.enabled is False


def test_secure_training(tmp_path, two_servers):
    make_group(tmp_path, 2, "g")
    cfg = _cfg(tmp_path)
    peers = [Peer(cfg, i, [s.url for s in two_servers]) for i in range(2)]
    try:
        for p in peers:
            p.init_params()
        _run(peers)
        for p in peers:
            rows = _rows(p)
            assert [r["round"] for r in rows] == [0, 1]
            assert all(r["peers_aggregated"] == 2 and r["updates_rejected"] == 0 for r in rows)
        assert peers[0].db.get(Keys(0).params) == peers[1].db.get(Keys(1).params)
        # the default user is off on both databases; only the users the peers created remain
        for s in two_servers:
            with pytest.raises(redis.RedisError):
                make_client(url=s.url, socket_timeout=5).ping()
    finally:
        for p in peers:
            p.close()


def test_outsider_not_admitted(tmp_path, two_servers):
    """Peer 1 runs with a key that is not the one on peer 0's allow-list: it never gets in."""
    make_group(tmp_path, 2, "g")
    impostor_dir = tmp_path / "impostor"
    make_group(impostor_dir, 2, "g")  # same indices and group, other keys
    (impostor_dir / "allow-list.json").write_text((tmp_path / "allow-list.json").read_text())
    urls = [s.url for s in two_servers]
    honest = Peer(_cfg(tmp_path, **{"security.admission_timeout_s": 3}), 0, urls)
    impostor = Peer(_cfg(impostor_dir, **{"security.admission_timeout_s": 3}), 1, urls)
    errors = {}

    def body(p):
        try:
            p.guard.admit(p.members)
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors[p.index] = exc

    try:
        threads = [threading.Thread(target=body, args=(p,)) for p in (honest, impostor)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert "admission not complete" in str(errors[0])
        assert "admission not complete" in str(errors[1])
        assert honest.guard.desk.admitted == {}
        assert any("bad signature" in o.reason for o in honest.guard.desk.refused)
        with pytest.raises(redis.RedisError):
            impostor.members[0].client.set(Keys(0).incoming(1, 0), b"\0" * 8)
    finally:
        honest.close()
        impostor.close()


def _publish(peer_from: Peer, to: Peer, r: int, vec: bytes, env: bytes | None):
    """Peer ``peer_from`` writes a round-r vector (and envelope) into ``to``'s inbox, as a member can: with
    TENSOR.PUSH into a guarded inbox (open for round r: raises if it refuses), else with plain SETs."""
    c = peer_from.members[to.index].client
    K = Keys(to.index)
    if to.guard.inbox_guarded:
        to.guard.open_inbox(r, to.width)
        c.execute_command("TENSOR.PUSH", K.inbox(peer_from.index), K.notify(peer_from.index), r, vec,
                          *(() if env is None else (env,)))
    else:
        if env is not None:
            c.set(K.envelope(peer_from.index, r), env)
        c.set(K.incoming(peer_from.index, r), vec)
    return K.incoming(peer_from.index, r)


def test_a_waiting_peer_that_skips_to_a_joiners_round_opens_its_inbox_to_it_first(tmp_path, two_servers):
    """A peer waiting for a quorum moves to the round a joiner asked for (StateTransfer.serve_waiting) and
    snapshots there. The joiner trains that round as soon as it has the snapshot and pushes its vector:
    the inbox must take that round already. Still open to the old rounds only, TENSOR.PUSH refused the
    joiner's vector, the waiting peer never got it, and the group ended the training apart."""
    make_group(tmp_path, 2, "g")
    p0, p1 = _admitted_peers(_cfg(tmp_path, **{"run.rounds": 20}), two_servers)
    try:
        assert p0.guard.inbox_guarded
        p0.guard.open_inbox(0, p0.width)  # as before round 0, where it waits
        p0.db.set(p0.keys.state, "-1|" + "a" * 40)  # the state it holds (before any update)
        target = JOIN_AHEAD  # the round the joiner asked to start at (as far as a request moves us)
        c = p1.members[0].client
        c.set(Keys(0).join(1), f"{two_servers[1].url}|{target}")
        assert p0.transfer.serve_waiting(0) == target
        assert int(p0.db.get(p0.keys.ready)) == target - 1
        vec = np.zeros(p0.width // 4, dtype="<f4").tobytes()
        c.execute_command("TENSOR.PUSH", Keys(0).inbox(1), Keys(0).notify(1), target, vec,
                          sign_update(p1.guard.identity, "g", target, vec))  # raises if refused
        assert p0.db.get(Keys(0).incoming(1, target)) == vec
    finally:
        p0.close()
        p1.close()


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "raw"])
def test_updates_checked_before_aggregation(tmp_path, two_servers, guarded):
    """Every received vector is checked before it is aggregated. Behind a guarded inbox, TENSOR.PUSH
    refuses the wrong sizes already; the rest is for the check. Behind a raw one, all is for the check."""
    make_group(tmp_path, 2, "g")
    peers = _admitted_peers(_cfg(tmp_path, **{"security.inbox_guard": guarded}), two_servers)
    p0, p1 = peers
    try:
        ident1, outsider = p1.guard.identity, Identity.generate(1)
        n = p0.width // 4
        good = np.arange(n, dtype="<f4").tobytes()
        other = (np.arange(n, dtype="<f4") + 1).tobytes()
        nan = np.full(n, np.nan, dtype="<f4").tobytes()
        cases = {
            "valid": (5, good, sign_update(ident1, "g", 5, good), None),
            "tampered": (6, other, sign_update(ident1, "g", 6, good), "tampered"),
            "replayed": (7, good, sign_update(ident1, "g", 3, good), "replayed"),
            "forged": (8, good, sign_update(outsider, "g", 8, good), "forged"),
            "other group": (9, good, sign_update(ident1, "h", 9, good), "forged"),
            "unsigned": (10, good, None, "malformed"),
            "garbage envelope": (11, good, b"\x00" * 37, "malformed"),
            "non-finite": (12, nan, sign_update(ident1, "g", 12, nan), "non_finite"),
            "wrong size": (13, good + b"\0" * 4, sign_update(ident1, "g", 13, good + b"\0" * 4), "size"),
            "truncated": (14, good[:-2], sign_update(ident1, "g", 14, good[:-2]), "size"),
        }
        for what, (r, vec, env, expect) in cases.items():
            try:
                key = _publish(p1, p0, r, vec, env)
            except redis.ResponseError as exc:
                assert guarded and expect in ("malformed", "size"), (what, exc)
                continue
            inputs = {0: "unused", 1: key}
            rejected = p0.guard.screen(r, inputs, p0.width)
            if expect is None:
                assert rejected == [] and 1 in inputs, what
            else:
                assert [x[:2] for x in rejected] == [(1, expect)], what
                assert 1 not in inputs and 0 in inputs, what
    finally:
        for p in peers:
            p.close()


def test_forging_peer_rejected_and_counted(tmp_path, two_servers):
    """Peer 1 publishes envelopes signed with a key that is not its own: peer 0 trains on alone, counts
    every rejection and logs the reason; peer 1 is not harmed by peer 0's honest updates."""
    make_group(tmp_path, 2, "g")
    peers = _admitted_peers(_cfg(tmp_path), two_servers)
    p0, p1 = peers
    outsider = Identity.generate(1)
    p1.guard.sign_outgoing = lambda r, out: {q: sign_update(outsider, "g", r, v) for q, v in out.items()}
    p1.agreement.check_state = False  # an attacker does not mind that its state differs from peer 0's
    try:
        _run(peers)
        rows0, rows1 = _rows(p0), _rows(p1)
        assert [r["updates_rejected"] for r in rows0] == [1, 1]
        assert [r["peers_aggregated"] for r in rows0] == [1, 1]
        assert all("rejected: forged" in r["peers_excluded"] for r in rows0)
        assert [r["updates_rejected"] for r in rows1] == [0, 0]
        events = [json.loads(e) for e in p0.db.lrange(p0.keys.events, 0, -1)]
        assert sum(e["event"] == "update_rejected" for e in events) == 2
        assert np.isfinite(np.frombuffer(p0.db.get(p0.keys.params), dtype="<f4")).all()
    finally:
        for p in peers:
            p.close()


def test_garbage_in_remote_writable_keys(tmp_path, two_servers):
    """Everything peer 1 may write at peer 0 filled with garbage: peer 0 keeps working and drops it.
    Behind an unguarded inbox, where a member can write anything into its keys (a guarded one takes
    TENSOR.PUSH only: tests/test_security_quotas.py)."""
    make_group(tmp_path, 2, "g")
    peers = _admitted_peers(_cfg(tmp_path, **{"security.inbox_guard": False}), two_servers)
    p0, p1 = peers
    c = p1.members[0].client
    K = Keys(0)
    try:
        c.rpush(K.notify(1), b"\xff\x00garbage", b"", b"9" * 1000)
        c.set(K.join(1), b"no-separator")  # peer 1 may write its own request only
        # what other writers could leave (written here with the orchestrator's rights)
        for suffix, value in {b"\xff": b"x", b"7": b"redis://x|notanumber", b"5": b"http://evil|3",
                              b"0": b"redis://self|3", b"8": b"\xff\xfe|1",
                              b"6": b"redis://127.0.0.1:1|3"}.items():  # 6: well formed, never admitted
            p0.db.set(f"{K.tag}:join:".encode() + suffix, value)
        c.set(K.incoming(1, 99) + ":sig", b"\x00" * 200)
        c.set(K.incoming(1, 0), b"\x01\x02\x03")  # truncated: not a multiple of 4 bytes
        p1.db.set(Keys(1).ready, b"\xffnot a round")  # read by peer 0 from peer 1's own database
        p1.db.set(Keys(1).digest(0), b"\xff" * 40)
        p1.db.set(Keys(1).state, b"0|" + b"z" * 40)
        p1.db.set(Keys(1).heard(0), b"\x00" * (1 << 20))  # far more than one envelope per member
        assert p0.membership.alive(1) == (True, "", None)
        assert p0.agreement.check(1).train
        assert p0.agreement.probe(1)[1].heard == (None, None)  # read bounded, and dropped
        from spirt.agreement import ENVELOPE_BYTES
        from spirt.security.signing import ENVELOPE_BYTES as SIGNED

        assert ENVELOPE_BYTES == SIGNED
        p0.transfer.serve_joins(0)
        assert p0.transfer.matching(K.join_pattern) == []
        assert set(p0.members) == {1}
        events = [json.loads(e) for e in p0.db.lrange(p0.keys.events, 0, -1)]
        rejected = [e for e in events if e["event"] == "join_rejected"]
        assert len(rejected) == 7
        assert any(e["about"] == 6 and "not admitted" in e["detail"] for e in rejected)
        # an oversized value is refused by the server before it is buffered
        p0.guard.limit_value_size(p0.width)
        with pytest.raises(redis.RedisError):
            c.set(K.incoming(1, 1), b"\0" * (4 * 1024 * 1024))
        assert not p0.db.exists(K.incoming(1, 1))
    finally:
        for p in peers:
            p.close()


@pytest.mark.parametrize("raw_q, raw, ok", [
    (b"1", b"redis://127.0.0.1:6379|5", True),
    (b"3", b"unix:///tmp/x.sock|0", True),
    (b"1", b"redis://a|b|7", True),
    (b"x", b"redis://a|5", False),
    (b"-1", b"redis://a|5", False),
    (b"1", b"redis://a|-5", False),
    (b"1", b"redis://a", False),
    (b"1", None, False),
    (b"1", b"ftp://a|5", False),
    (b"1", b"redis://a|" + b"9" * 40, False),
    (b"1", b"\xff|1", False),
])
def test_parse_join_request(raw_q, raw, ok):
    if ok:
        q, url, first = parse_join_request(raw_q, raw)
        assert q == int(raw_q) and raw.decode().startswith(url)
    else:
        with pytest.raises(ValueError):
            parse_join_request(raw_q, raw)


def test_functions_confined_in_training(tmp_path, two_servers):
    """The gradient functions get only their own user: it cannot touch the parameters."""
    make_group(tmp_path, 2, "g")
    cfg = _cfg(tmp_path)
    p = Peer(cfg, 0, [two_servers[0].url, None])
    try:
        p.init_params()
        creds = p.guard.function_credentials(0)
        fn = make_client(url=two_servers[0].url, username=creds["db_username"], password=creds["db_password"])
        assert fn.get(Keys(0).params) == p.db.get(Keys(0).params)
        with pytest.raises(redis.RedisError):
            fn.set(Keys(0).params, b"\0" * 8)
        assert acl.function_user(0, 0) == creds["db_username"]
        other = p.guard.function_credentials(1)
        assert other["db_username"] == acl.function_user(0, 1) and other["db_password"] != creds["db_password"]
        assert fn.set(Keys(0).grad(4, 0), b"\0" * 8)
        with pytest.raises(redis.RedisError):  # another function's slot
            fn.set(Keys(0).grad(4, 1), b"\0" * 8)
        assert creds["db_password"] not in repr(p.guard) + repr(p.guard.users)
        fn.close()
    finally:
        p.close()


def test_newcomer_admitted_by_challenge_response(tmp_path):
    """A peer on the allow-list joins a running training: it is admitted at the live peers, they are
    admitted at its database, and it takes the state over and trains with them."""
    make_group(tmp_path, 3, "g")
    cfg = _cfg(tmp_path, **{"peers.count": 3, "run.rounds": 40, "run.eval_every": 40,
                            "membership.join_timeout_s": 60})
    servers = [start_server("valkey") for _ in range(3)]
    urls = [s.url for s in servers]
    peers = [Peer(cfg, i, [urls[0], urls[1], None]) for i in range(2)]
    newcomer = None
    errors = []

    try:
        for p in peers:
            p.init_params()
        threads = [train(p, errors) for p in peers]
        deadline = time.monotonic() + 60
        while peers[0].db.llen(peers[0].keys.metrics) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        newcomer = Peer(cfg, 2, urls)
        t2 = train(newcomer, errors, join=True)
        for t in [*threads, t2]:
            t.join(300)
        assert not errors, errors
        rows = _rows(newcomer)
        assert rows and rows[-1]["round"] == 39 and rows[0]["round"] > 2
        assert rows[-1]["peers_aggregated"] == 3
        assert 2 in peers[0].guard.desk.admitted and 0 in newcomer.guard.desk.admitted
        assert peers[0].db.get(Keys(0).params) == newcomer.db.get(Keys(2).params)
        assert all(r["updates_rejected"] == 0 for p in [*peers, newcomer] for r in _rows(p))
    finally:
        for p in [*peers, newcomer]:
            if p is not None:
                p.close()
        for s in servers:
            s.stop()


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "raw"])
def test_checked_copy_is_what_is_aggregated(tmp_path, two_servers, guarded):
    """A vector checked while the barrier waits is copied out of the sender's slot: overwriting the slot
    afterwards (with NaN) changes nothing that is aggregated, and the copy is out of the sender's reach."""
    make_group(tmp_path, 2, "g")
    peers = _admitted_peers(_cfg(tmp_path, **{"security.inbox_guard": guarded}), two_servers)
    p0, p1 = peers
    try:
        n, r = p0.width // 4, 4
        good = np.ones(n, dtype="<f4").tobytes()
        key = _publish(p1, p0, r, good, sign_update(p1.guard.identity, "g", r, good))
        p0.guard.during_barrier(p0.members, r, [1], p0.width)
        assert p0.guard._checked[(r, 1)] is None
        nan = np.full(n, np.nan, dtype="<f4").tobytes()
        _publish(p1, p0, r, nan, sign_update(p1.guard.identity, "g", r, nan))  # the slot overwritten
        inputs = {0: Keys(0).avg(r), 1: key}
        assert p0.guard.screen(r, inputs, p0.width) == []
        assert inputs[1] != key and p0.db.get(inputs[1]) == good
        with pytest.raises(redis.RedisError):
            p1.members[0].client.set(inputs[1], b"\0" * len(good))
        # cleanup removes the copies
        p0.db.delete(*p0.guard.round_keys(r, p0.members))
        assert not p0.db.exists(inputs[1]) and (r, 1) not in p0.guard._checked
    finally:
        for p in peers:
            p.close()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_launcher_runs_secured_peers(tmp_path, mode):
    """``spirt run`` with security on: the launcher starts the servers, the peers secure them and admit
    each other, the launcher starts and follows them through its own read-only user."""
    from spirt.runner import START_KEY, run_training

    assert START_KEY == acl.START_KEY
    make_group(tmp_path, 2, "g")
    df = run_training(_cfg(tmp_path, **{"peers.mode": mode}), progress=False, timeout_s=300)
    assert sorted(df["round"]) == [0, 0, 1, 1]
    assert (df["peers_aggregated"] == 2).all() and (df["updates_rejected"] == 0).all()


def test_byzantine_equivocating_peer_is_caught_with_a_proof(tmp_path):
    """Peer 2 sends validly signed but different vectors to peers 0 and 1 (an attacker that read the
    honest vectors and wants to split them). The honest peers compare the signed envelopes they
    accepted: both exclude peer 2 for good within two rounds, the event carries the two envelopes, and
    they end with one model. Without the comparison they would end with two."""
    make_group(tmp_path, 3, "g")
    cfg = _cfg(tmp_path, **{"peers.count": 3, "run.rounds": 6, "barrier.timeout_s": 3,
                            "membership.heartbeat_s": 0.5, "membership.quorum_timeout_s": 30})
    servers = [start_server("valkey") for _ in range(3)]
    peers: list = []
    try:
        urls = [s.url for s in servers]
        peers = [Peer(cfg, i, urls) for i in range(3)]
        for p in peers:
            p.init_params()
        assert not in_threads(lambda p: p.guard.admit(p.members), peers, timeout_s=60)
        liar = peers[2]
        liar.agreement.check_state = False  # an attacker does not mind its own state
        honest_publish = liar.publish

        def equivocate(r, own):
            vec = np.frombuffer(own, dtype="<f4")
            outgoing = {0: own, 1: (vec * -3.0).astype("<f4").tobytes()}
            liar.exchange.push(r, outgoing, liar.guard.sign_outgoing(r, outgoing))

        liar.publish = lambda r, own: (equivocate if r >= 2 else honest_publish)(r, own)
        def run(p):
            try:
                p.run()
            except Exception:  # noqa: BLE001 - the liar, shut out, may fail to finish: that is its business
                if p is not liar:
                    raise

        errors = in_threads(run, peers, timeout_s=120)
        assert not errors, errors
        for p in peers[:2]:
            events = [json.loads(e) for e in p.db.lrange(p.keys.events, 0, -1)]
            caught = [e for e in events if e["event"] == "equivocation"]
            assert len(caught) == 1 and caught[0]["about"] == 2, events
            assert caught[0]["round"] <= 2 + 2  # within two rounds of the first lie (round 2)
            assert "two envelopes signed by peer 2" in caught[0]["detail"]
            assert p.members[2].banned
        assert peers[0].db.get(Keys(0).params) == peers[1].db.get(Keys(1).params)
    finally:
        for p in peers:
            p.close()
        for s in servers:
            s.stop()


def test_byzantine_snapshots_must_carry_their_sources_signature(tmp_path, two_servers):
    """With signed updates a joiner adopts a snapshot only with its source's signature over exactly that
    state and round: a tampered state, another round, another signer or no signature is refused."""
    make_group(tmp_path, 2, "g")
    peers = _admitted_peers(_cfg(tmp_path), two_servers)
    p0, p1 = peers
    try:
        params, mom = b"\1" * 64, b"\2" * 64
        sig = p1.guard.sign_snapshot(7, params, mom)
        assert p0.guard.snapshot_signed(1, 7, params, mom, sig)
        refused = {
            "tampered": (1, 7, b"\3" * 64, mom, sig),
            "other round": (1, 8, params, mom, sig),
            "other signer": (1, 7, params, mom, p0.guard.sign_snapshot(7, params, mom)),
            "unsigned": (1, 7, params, mom, None),
            "garbage": (1, 7, params, mom, b"\0" * 64),
        }
        for what, args in refused.items():
            assert not p0.guard.snapshot_signed(*args), what
    finally:
        for p in peers:
            p.close()
