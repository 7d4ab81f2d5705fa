"""Identity, admission and least-privilege database access, against real servers (both flavors)."""

from __future__ import annotations

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spirt.keys import Keys
from spirt.security import acl
from spirt.security.admission import Applicant, Desk, wait_admitted
from spirt.security.identity import (
    AdmissionError,
    Challenge,
    Identity,
    MalformedInput,
    Response,
    TrustStore,
    Verifier,
    issue_certificate,
    make_group,
    respond,
)
from spirt.servers import make_client, start_server

GROUP = "test-group"
BINDING = "ab" * 32


@pytest.fixture
def group(tmp_path):
    ids = make_group(tmp_path, 3, GROUP)
    return ids, TrustStore.load(tmp_path, GROUP)


@pytest.fixture
def fresh_server(server_flavor):
    """A server of its own per test: the tests below disable its default user."""
    srv = start_server(server_flavor)
    try:
        yield srv
    finally:
        srv.stop()


# -- identity and challenge-response ---------------------------------------------------------------

def test_keys_round_trip_through_files(tmp_path, group):
    ids, trust = group
    again = Identity.load(tmp_path, 1)
    assert again.public_hex == ids[1].public_hex
    assert (tmp_path / "peer-1.key").stat().st_mode & 0o077 == 0
    assert trust.key_for(2).public_bytes_raw() == ids[2].public_key.public_bytes_raw()


def test_valid_response_admitted(group):
    ids, trust = group
    v = Verifier(trust, 0)
    key = v.verify(respond(ids[1], v.challenge(1), GROUP, BINDING))
    assert key.public_bytes_raw() == ids[1].public_key.public_bytes_raw()


def test_original_spirt_scheme_refused(group):
    """The released SPIRT signed a constant and verified it with the key in the same message: an outsider
    with a key of its own passed. Here the key comes from the trust store, so the outsider is refused,
    whether it signs a constant or the fresh challenge with its own key."""
    ids, trust = group
    v = Verifier(trust, 0)
    outsider = Identity.generate(1)  # claims to be peer 1
    ch = v.challenge(1)
    with pytest.raises(AdmissionError, match="bad signature"):
        v.verify(respond(outsider, ch, GROUP, BINDING))
    # a self-made "certificate" carrying its own key does not help: it is not signed by a CA we trust
    ch = v.challenge(1)
    forged = respond(outsider, ch, GROUP, BINDING)
    forged = Response(forged.verifier, 1, forged.nonce, forged.timestamp, forged.binding, forged.signature,
                      {"peer": 1, "key": outsider.public_hex, "sig": "00" * 64})
    with pytest.raises(AdmissionError, match="bad signature"):
        v.verify(forged)


def test_signature_over_constant_refused(group):
    ids, trust = group
    v = Verifier(trust, 0)
    ch = v.challenge(1)
    const = ids[1].sign(b"spirt")
    resp = Response(0, 1, ch.nonce, respond(ids[1], ch, GROUP, BINDING).timestamp, BINDING, const)
    with pytest.raises(AdmissionError, match="bad signature"):
        v.verify(resp)


def test_replayed_response_refused(group):
    ids, trust = group
    v = Verifier(trust, 0)
    resp = respond(ids[1], v.challenge(1), GROUP, BINDING)
    v.verify(resp)
    with pytest.raises(AdmissionError, match="replayed"):
        v.verify(resp)
    # nor does it answer a later challenge (fresh nonce)
    v.challenge(1)
    with pytest.raises(AdmissionError, match="replayed"):
        v.verify(resp)
    # a response recorded at another verifier does not pass here either
    other = Verifier(trust, 2)
    resp2 = respond(ids[1], other.challenge(1), GROUP, BINDING)
    with pytest.raises(AdmissionError, match="did not issue"):
        v.verify(resp2)


def test_stale_and_future_timestamps_refused(group):
    ids, trust = group
    v = Verifier(trust, 0, max_skew_s=5)
    ch = v.challenge(1)
    with pytest.raises(AdmissionError, match="off our clock"):
        v.verify(respond(ids[1], ch, GROUP, BINDING, now=ch.issued - 60))
    ch = v.challenge(1)
    with pytest.raises(AdmissionError, match="off our clock"):
        v.verify(respond(ids[1], ch, GROUP, BINDING, now=ch.issued + 60))
    ch = v.challenge(1)
    v.verify(respond(ids[1], ch, GROUP, BINDING, now=ch.issued + 4))


def test_expired_nonce_refused(group):
    ids, trust = group
    v = Verifier(trust, 0, nonce_ttl_s=10)
    ch = v.challenge(1, now=1000.0)
    with pytest.raises(AdmissionError, match="did not issue"):
        v.verify(respond(ids[1], ch, GROUP, BINDING, now=1011.0), now=1011.0)


def test_nonce_bound_to_prover_and_binding_signed(group):
    ids, trust = group
    v = Verifier(trust, 0)
    ch = v.challenge(1)
    # peer 2 (a member) cannot answer peer 1's challenge as itself
    stolen = respond(ids[2], Challenge(0, 2, ch.nonce, ch.issued), GROUP, BINDING)
    with pytest.raises(AdmissionError, match="did not issue"):
        v.verify(stolen)
    # a man in the middle swapping the password binding breaks the signature
    ch = v.challenge(1)
    good = respond(ids[1], ch, GROUP, BINDING)
    swapped = Response(good.verifier, good.prover, good.nonce, good.timestamp, "cd" * 32, good.signature)
    with pytest.raises(AdmissionError, match="bad signature"):
        v.verify(swapped)


def test_unknown_peer_refused(group):
    ids, trust = group
    v = Verifier(trust, 0)
    stranger = Identity.generate(7)
    with pytest.raises(AdmissionError, match="not on the allow-list"):
        v.verify(respond(stranger, v.challenge(7), GROUP, BINDING))


def test_ca_group(tmp_path):
    ids = make_group(tmp_path, 2, GROUP, ca=True)
    trust = TrustStore.load(tmp_path, GROUP)
    assert trust.allow == {}
    v = Verifier(trust, 0)
    loaded = Identity.load(tmp_path, 1)
    assert loaded.cert == ids[1].cert
    v.verify(respond(loaded, v.challenge(1), GROUP, BINDING))
    # a certificate from another CA, or issued for another index, is refused
    rogue_ca = Ed25519PrivateKey.generate()
    intruder = Identity.generate(5)
    intruder = Identity(5, intruder.key, issue_certificate(rogue_ca, 5, intruder.public_key, GROUP))
    with pytest.raises(AdmissionError, match="not signed by the group CA"):
        v.verify(respond(intruder, v.challenge(5), GROUP, BINDING))
    borrowed = Identity(5, ids[1].key, ids[1].cert)  # peer 1's certificate presented for index 5
    with pytest.raises(AdmissionError, match="certificate is for peer 1"):
        v.verify(respond(borrowed, v.challenge(5), GROUP, BINDING))
    # a certificate of the right CA for another group does not transfer
    with pytest.raises(AdmissionError, match="not signed by the group CA"):
        Verifier(TrustStore("other", {}, trust.ca), 0).trust.key_for(1, ids[1].cert)


@pytest.mark.parametrize("raw", [None, b"", b"[]", b"{", b"\xff\xfe", b'{"v": 1}', b"x" * 5000,
                                 b'{"v":1,"verifier":0,"prover":1,"nonce":"zz","ts":"1","binding":"","sig":""}'])
def test_malformed_responses_are_clear_errors(raw):
    with pytest.raises(MalformedInput):
        Response.decode(raw)


# -- least privilege in the database ---------------------------------------------------------------

def _client(srv, user, password):
    return make_client(url=srv.url, username=user, password=password, socket_timeout=5)


def _denied(fn) -> bool:
    try:
        fn()
    except (redis.exceptions.NoPermissionError, redis.AuthenticationError):
        return True
    except redis.ResponseError as exc:
        return "NOPERM" in str(exc) or "WRONGPASS" in str(exc) or "NOAUTH" in str(exc)
    return False


@pytest.fixture
def secured(fresh_server):
    """Peer 0's database with its users installed and peer 1 admitted; returns handles."""
    admin = fresh_server.client()
    users = acl.DatabaseUsers(0, functions=2)
    users.install(admin)
    admin.close()
    orch = _client(fresh_server, acl.orchestrator_user(0), users.orchestrator_password)
    peer1 = Identity.generate(1)
    pw1 = peer1.database_password(0, GROUP)
    acl.DatabaseUsers.admit(orch, 0, 1, acl.password_hash(pw1))
    K = Keys(0)
    orch.set(K.params, b"\0" * 16)
    orch.set(K.version, 1)
    orch.set(K.ready, 3)
    orch.set(K.alive, 0)
    orch.set(K.avg(3), b"\0" * 16)
    orch.set(K.incoming(2, 3), b"\1" * 16)
    fn = _client(fresh_server, acl.function_user(0, 0), users.function_passwords[0])
    remote = _client(fresh_server, acl.remote_user(1), pw1)
    hello = _client(fresh_server, acl.HELLO_USER, "x")
    try:
        yield fresh_server, users, orch, fn, remote, hello
    finally:
        for c in (orch, fn, remote, hello):
            c.close()


def test_default_user_disabled(secured):
    srv, users, *_ = secured
    anon = make_client(url=srv.url, socket_timeout=5)
    assert _denied(anon.ping)
    assert _denied(lambda: anon.get(Keys(0).params))
    wrong = _client(srv, acl.orchestrator_user(0), "not-the-password")
    assert _denied(wrong.ping)
    assert _client(srv, acl.orchestrator_user(0), users.orchestrator_password).ping()


def test_function_user_least_privilege(secured):
    srv, users, orch, fn, *_ = secured
    K = Keys(0)
    assert fn.get(K.params) == b"\0" * 16
    assert fn.get(K.version) == b"1"
    assert fn.set(K.grad(3, 0), b"\2" * 16, px=1000)
    pipe = fn.pipeline(transaction=True)
    pipe.get(K.version)
    pipe.get(K.params)
    assert pipe.execute()[1] == b"\0" * 16
    forbidden = {
        "overwrite params": lambda: fn.set(K.params, b"\3" * 16),
        "read a gradient": lambda: fn.get(K.grad(3, 0)),
        "read the average": lambda: fn.get(K.avg(3)),
        "read an inbox": lambda: fn.get(K.incoming(2, 3)),
        "delete params": lambda: fn.delete(K.params),
        "module command": lambda: fn.execute_command("TENSOR.AVG", K.grad(3, 1), K.grad(3, 0)),
        "keys": lambda: fn.keys("*"),
        "flushall": fn.flushall,
        "config": lambda: fn.config_get("*"),
        "acl": lambda: fn.execute_command("ACL", "LIST"),
        "other peer's grad": lambda: fn.set(Keys(1).grad(3, 0), b"x"),
        "another function's slot": lambda: fn.set(K.grad(3, 1), b"\3" * 16),
        "a slot with a longer index": lambda: fn.set(K.grad(3, 10), b"\3" * 16),
        "eval": lambda: fn.eval("return 1", 0),
    }
    for what, op in forbidden.items():
        assert _denied(op), what
    assert orch.get(K.params) == b"\0" * 16


def test_remote_peer_least_privilege(secured):
    srv, users, orch, fn, remote, _ = secured
    K = Keys(0)
    assert remote.set(K.incoming(1, 3), b"\4" * 16, px=1000)
    assert remote.set(f"{K.incoming(1, 3)}:sig", b"s", px=1000)
    assert remote.rpush(K.notify(1), 3)
    assert remote.ltrim(K.notify(1), -1000, -1)
    assert remote.get(K.ready) == b"3"
    assert remote.exists(K.alive) == 1
    assert remote.set(K.join(1), "url|5")
    forbidden = {
        "write another peer's inbox": lambda: remote.set(K.incoming(2, 3), b"\5" * 16),
        "read another peer's inbox": lambda: remote.get(K.incoming(2, 3)),
        "read its own inbox back": lambda: remote.get(K.incoming(1, 3)),
        "read params": lambda: remote.get(K.params),
        "write params": lambda: remote.set(K.params, b"x"),
        "write ready": lambda: remote.set(K.ready, 99),
        "write alive": lambda: remote.set(K.alive, 1),
        "read the average": lambda: remote.get(K.avg(3)),
        "read a gradient": lambda: remote.get(K.grad(3, 0)),
        "delete an inbox": lambda: remote.delete(K.incoming(2, 3)),
        "delete params": lambda: remote.delete(K.params),
        "module command": lambda: remote.execute_command("TENSOR.AVG", K.incoming(1, 9), K.incoming(1, 3)),
        "read its join request back": lambda: remote.get(K.join(1)),
        "join in another peer's name": lambda: remote.set(K.join(2), "redis://x|5"),
        "wake-up list of another peer": lambda: remote.rpush(K.notify(2), 3),
        "trim another peer's wake-up list": lambda: remote.ltrim(K.notify(2), 0, 0),
        "keys": lambda: remote.keys("*"),
        "flushall": remote.flushall,
        "acl setuser": lambda: remote.execute_command("ACL", "SETUSER", "x", "on", "nopass", "+@all"),
        "config set": lambda: remote.config_set("maxmemory", "1"),
        "eval": lambda: remote.eval("return redis.call('get', KEYS[1])", 1, K.params),
        "another database's tag": lambda: remote.set(Keys(1).incoming(1, 3), b"x"),
        "write a checked copy": lambda: remote.set(f"{K.tag}:vin:1:3", b"x"),
        "write events": lambda: remote.rpush(K.events, "x"),
        "write metrics": lambda: remote.rpush(K.metrics, "x"),
    }
    for what, op in forbidden.items():
        assert _denied(op), what
    assert orch.get(K.incoming(2, 3)) == b"\1" * 16
    assert orch.get(K.params) == b"\0" * 16


def test_hello_user_confined(secured):
    srv, users, orch, fn, remote, hello = secured
    K = Keys(0)
    admin = _client(srv, acl.orchestrator_user(0), users.orchestrator_password)
    acl.set_user(admin, acl.HELLO_USER, acl.hello_rules(0, [1, 5]), nopass=True)
    assert hello.rpush(acl.hello_key(0, 5), b"{}")
    orch.set(acl.challenge_key(0, 5), b"c")
    assert hello.get(acl.challenge_key(0, 5)) == b"c"
    forbidden = {
        "read params": lambda: hello.get(K.params),
        "write an inbox": lambda: hello.set(K.incoming(1, 3), b"x"),
        "notify": lambda: hello.rpush(K.notify(5), "x"),
        "join": lambda: hello.set(K.join(5), "redis://x|5"),
        "write a challenge": lambda: hello.set(acl.challenge_key(0, 5), b"mine"),
        "read an area": lambda: hello.lrange(acl.hello_key(0, 5), 0, -1),
        "set an area": lambda: hello.set(acl.hello_key(0, 5), b"x"),
        "an index that cannot be admitted": lambda: hello.rpush(acl.hello_key(0, 7), b"{}"),
        "a key beside an area": lambda: hello.rpush(acl.hello_key(0, 5) + ":resp", b"{}"),
        "ready": lambda: hello.get(K.ready),
    }
    for what, op in forbidden.items():
        assert _denied(op), what
    admin.close()


def test_launcher_user_read_only(secured):
    srv, users, orch, *_ = secured
    K = Keys(0)
    acl.set_user(orch, acl.LAUNCHER_USER, acl.launcher_rules(0), password="launcher-pw")
    launcher = _client(srv, acl.LAUNCHER_USER, "launcher-pw")
    orch.rpush(K.metrics, "{}")
    assert launcher.lrange(K.metrics, 0, -1) == [b"{}"]
    assert launcher.set(acl.START_KEY, 1)
    assert launcher.get(K.params) == b"\0" * 16  # read only: the observer measures how far apart peers are
    forbidden = {
        "write params": lambda: launcher.set(K.params, b"x"),
        "write metrics": lambda: launcher.rpush(K.metrics, "x"),
        "write an inbox": lambda: launcher.set(K.incoming(1, 3), b"x"),
        "acl": lambda: launcher.execute_command("ACL", "SETUSER", "x", "on", "nopass", "+@all"),
        "flushall": launcher.flushall,
    }
    for what, op in forbidden.items():
        assert _denied(op), what
    launcher.close()


def test_revoked_peer_loses_access(secured):
    srv, users, orch, fn, remote, _ = secured
    acl.DatabaseUsers.revoke(orch, 1)
    fresh = _client(srv, acl.remote_user(1), Identity.generate(1).database_password(0, GROUP))
    assert _denied(fresh.ping)


# -- admission over the database -------------------------------------------------------------------

def _desk(srv, trust, p=0):
    admin = srv.client()
    users = acl.DatabaseUsers(p, admissible=trust.allow)
    users.install(admin)
    admin.close()
    orch = _client(srv, acl.orchestrator_user(p), users.orchestrator_password)
    return Desk(p, orch, Verifier(trust, p), tuple(trust.allow)), orch


def test_admission_over_database(fresh_server, group):
    ids, trust = group
    desk, orch = _desk(fresh_server, trust)
    hello = _client(fresh_server, acl.HELLO_USER, "x")
    app = Applicant(ids[1], 0, GROUP, hello)
    member = _client(fresh_server, acl.remote_user(1), app.password)
    assert _denied(member.ping)  # no access before admission
    assert wait_admitted(app, member, 10, serve=desk.serve)
    assert desk.admitted == {1: acl.password_hash(app.password)}
    assert member.set(Keys(0).incoming(1, 0), b"\0" * 8)
    # the verifier never learns the password itself, and nothing of it is in the server's ACL list
    listing = str(orch.execute_command("ACL", "GETUSER", acl.remote_user(1)))
    assert acl.password_hash(app.password) in listing and app.password not in listing
    for c in (hello, member, orch):
        c.close()


def test_admission_refuses_impostor_and_replay(fresh_server, group):
    ids, trust = group
    desk, orch = _desk(fresh_server, trust)
    hello = _client(fresh_server, acl.HELLO_USER, "x")
    impostor = Identity.generate(1)  # peer 1's index, not its key
    app = Applicant(impostor, 0, GROUP, hello)
    member = _client(fresh_server, acl.remote_user(1), app.password)
    assert not wait_admitted(app, member, 1.5, serve=desk.serve)
    assert desk.admitted == {}
    assert any("bad signature" in o.reason for o in desk.refused)

    # the genuine peer 1 is admitted; replaying its recorded response later is refused
    good = Applicant(ids[1], 0, GROUP, hello)
    member = _client(fresh_server, acl.remote_user(1), good.password)
    assert wait_admitted(good, member, 10, serve=desk.serve)
    recorded = good.sent  # what an eavesdropper on the hello area saw
    assert Response.decode(recorded).prover == 1
    acl.DatabaseUsers.revoke(orch, 1)
    desk.admitted.clear()
    hello.rpush(acl.hello_key(0, 1), b'{"peer": 1}')
    desk.serve(now=1e9)  # issues a fresh challenge
    hello.rpush(acl.hello_key(0, 1), recorded)
    outcomes = desk.serve(now=2e9)
    assert [o.admitted for o in outcomes] == [False]
    assert "replayed" in outcomes[0].reason
    assert desk.admitted == {}
    for c in (hello, member, orch):
        c.close()


def test_admission_garbage_in_hello_area(fresh_server, group):
    ids, trust = group
    desk, orch = _desk(fresh_server, trust)
    hello = _client(fresh_server, acl.HELLO_USER, "x")
    for q, v in [(1, b"\x00garbage"), (2, b'{"v": 1}'), (1, b'{"peer": 2}'), (2, b'{"peer": -1}'),
                 (1, b'{"peer": 1, "x": 1}'), (2, b"[" * 3000), (1, b'{"nonce": "00"}'), (2, b"x" * 5000),
                 (1, b"[" * 2000), (2, b'{"peer": ' * 600)]:  # nested deeper than the parser goes, in size
        hello.rpush(acl.hello_key(0, q), v)
    outcomes = desk.serve()
    assert len(outcomes) == 10 and not any(o.admitted for o in outcomes)
    assert desk.admitted == {} and desk.refusals == 10
    # the desk still works afterwards
    app = Applicant(ids[2], 0, GROUP, hello)
    member = _client(fresh_server, acl.remote_user(2), app.password)
    assert wait_admitted(app, member, 10, serve=desk.serve)
    for c in (hello, member, orch):
        c.close()


def test_users_survive_a_database_restart(server_flavor, tmp_path):
    """With persistence on, the users are saved to the server's ACL file: after a SIGKILL and a restart
    the database comes back with its default user disabled and every role as it was, so a secured peer
    resumes after a database crash like any other."""
    srv = start_server(server_flavor, persistence=True, workdir=tmp_path / "db")
    try:
        admin = srv.client()
        users = acl.DatabaseUsers(0)
        users.install(admin)
        admin.close()
        orch = _client(srv, acl.orchestrator_user(0), users.orchestrator_password)
        acl.DatabaseUsers.admit(orch, 0, 1, acl.password_hash("peer-1-secret"))
        orch.set(Keys(0).params, b"\1" * 16)
        orch.close()

        srv.process.kill()  # SIGKILL: nothing is written on the way down
        srv.process.wait(10)
        srv.restart()

        assert _denied(make_client(url=srv.url, socket_timeout=5).ping)
        orch = _client(srv, acl.orchestrator_user(0), users.orchestrator_password)
        assert orch.get(Keys(0).params) == b"\1" * 16
        remote = _client(srv, acl.remote_user(1), "peer-1-secret")
        assert remote.set(Keys(0).incoming(1, 5), b"\0" * 16)
        assert _denied(lambda: remote.get(Keys(0).params))
        fn = _client(srv, acl.function_user(0, 0), users.function_passwords[0])
        assert _denied(lambda: fn.set(Keys(0).params, b"x"))
        for c in (orch, remote, fn):
            c.close()
    finally:
        srv.stop()


def test_database_passwords_rotate_per_session(group):
    """A peer's password at another's database is derived from its key, the group, the verifier and the
    run's session: the same within a run (after a restart too), another one in the next run."""
    ids, _ = group
    a = ids[1].database_password(0, GROUP, "aa" * 16)
    assert a == ids[1].database_password(0, GROUP, "aa" * 16)
    others = {ids[1].database_password(0, GROUP, "bb" * 16), ids[1].database_password(2, GROUP, "aa" * 16),
              ids[2].database_password(0, GROUP, "aa" * 16), ids[1].database_password(0, "other", "aa" * 16)}
    assert a not in others and len(others) == 4


def test_the_launcher_draws_a_session_per_run():
    from spirt.config import load_config
    from spirt.runner import _launcher_access

    cfg = load_config(None, {"security.enabled": True, "security.keys_dir": "/nonexistent"})
    sessions = {_launcher_access(cfg)[0].security.session for _ in range(3)}
    assert len(sessions) == 3 and all(s and len(s) == 32 for s in sessions)
