"""No unprotected window: a secured peer's database starts with its users in place (the default user off,
an ``admin`` only the starter and the peer know), and the peer keeps exactly its own users, at start and
whenever its database comes back from its files. Each attack is mounted on a real server."""

from __future__ import annotations

import json
import secrets
import signal

import pytest
import redis

from spirt.config import load_config
from spirt.keys import Keys
from spirt.peer import Peer
from spirt.security import acl
from spirt.security.identity import make_group
from spirt.servers import start_server

TINY = {
    "run.rounds": 2, "run.eval_every": 2, "run.eval_samples": 50, "data.limit_train": 300,
    "data.limit_test": 100, "peers.count": 2, "peers.functions": 2, "peers.batch_size": 8,
    "model.name": "mlp", "optim.lr": 0.05, "peers.mode": "thread", "executor.kind": "inline",
    "barrier.timeout_s": 60, "membership.heartbeat_s": 30,
}
BACKDOOR = ("ACL", "SETUSER", "backdoor", "on", ">letmein", "~*", "&*", "+@all")


def _cfg(keys_dir, **extra):
    return load_config(None, {**TINY, "security.enabled": True, "security.keys_dir": str(keys_dir),
                              "security.group": "g", "security.admission_timeout_s": 30, **extra})


def _removed(p: Peer) -> list[str]:
    events = [json.loads(e) for e in p.db.lrange(Keys(p.index).events, 0, -1)]
    return [e["detail"] for e in events if e["event"] == "user_removed"]


def test_a_fresh_database_refuses_everyone_but_its_admin(server_flavor, tmp_path):
    """The attack: a local process reaches the database the moment it listens, before the peer installed
    its users, and adds a user with full rights. The server starts with the default user off."""
    password = secrets.token_urlsafe(16)
    aclfile = tmp_path / "db" / "users.acl"
    aclfile.parent.mkdir()
    aclfile.write_text("")
    aclfile.chmod(0o644)
    with start_server(server_flavor, users=acl.bootstrap_users(password), workdir=aclfile.parent) as srv:
        anyone = srv.client(socket_timeout=2)
        for attempt in (BACKDOOR, ("SET", "{p0}:params", b"\0" * 8), ("PING",)):
            with pytest.raises(redis.RedisError, match="(?i)auth"):
                anyone.execute_command(*attempt)
        admin = srv.client(username=acl.ADMIN_USER, password=password)
        assert acl.users(admin) == [acl.ADMIN_USER, "default"]
        with pytest.raises(redis.AuthenticationError):
            srv.client(username=acl.ADMIN_USER, password="guess").ping()
        anyone.close()
        admin.close()
    assert aclfile.stat().st_mode & 0o777 == 0o600  # also for a file that was there


def test_a_secured_peer_installs_through_the_admin_then_deletes_it(server_flavor, tmp_path):
    make_group(tmp_path / "keys", 2, "g")
    password = secrets.token_urlsafe(16)
    with start_server(server_flavor, users=acl.bootstrap_users(password)) as srv:
        p = Peer(_cfg(tmp_path / "keys"), 0, [srv.url, None], admin=password)
        try:
            assert acl.ADMIN_USER not in acl.users(p.db)
            assert set(acl.users(p.db)) == {"default", acl.orchestrator_user(0), acl.HELLO_USER,
                                            acl.function_user(0, 0), acl.function_user(0, 1)}
            with pytest.raises(redis.RedisError):
                srv.client(username=acl.ADMIN_USER, password=password).ping()
            assert _removed(p) == []
        finally:
            p.close()


def test_install_removes_a_user_planted_before_it_and_says_so(server_flavor, tmp_path):
    """A server started without its users (one the user runs): whatever reached it first and left a user
    behind loses it when the peer installs its own, and the run says so; a connection it kept open as
    the default user is closed."""
    make_group(tmp_path / "keys", 2, "g")
    with start_server(server_flavor) as srv:
        srv.client().execute_command(*BACKDOOR)
        lurker = srv.client()  # logged in as the default user, and staying (make_client never re-sends)
        lurker.ping()
        p = Peer(_cfg(tmp_path / "keys"), 0, [srv.url, None])
        try:
            with pytest.raises(redis.RedisError):  # its connection was closed; a new one gets nothing
                lurker.set(Keys(0).params, b"\0" * 8)
            assert "backdoor" not in acl.users(p.db)
            with pytest.raises(redis.RedisError):
                srv.client(username="backdoor", password="letmein").ping()
            assert len(_removed(p)) == 1 and "'backdoor'" in _removed(p)[0]
        finally:
            p.close()


def test_a_user_planted_in_the_persisted_acl_file_is_removed_when_the_database_comes_back(server_flavor, tmp_path):
    """The attack: a backdoor written into the ACL file of a persisted database (it would come back with
    every restart). The peer checks its users when its database comes back from its files: the
    backdoor goes, an admitted member's user stays, a stranger's ``peer-*`` user goes."""
    make_group(tmp_path / "keys", 2, "g")
    password = secrets.token_urlsafe(16)
    workdir = tmp_path / "db"
    with start_server(server_flavor, users=acl.bootstrap_users(password), persistence=True, fsync="always",
                      workdir=workdir) as srv:
        p = Peer(_cfg(tmp_path / "keys"), 0, [srv.url, None], admin=password)
        try:
            p.init_params()
            member = acl.password_hash("member-1")
            acl.DatabaseUsers.admit(p.guard.orch, 0, 1, member)  # as the admission desk does
            p.guard.desk.admitted[1] = member
            srv.kill(signal.SIGKILL)
            aclfile = workdir / "users.acl"
            with aclfile.open("a") as f:
                f.write(f"user backdoor on #{acl.password_hash('letmein')} ~* &* +@all\n")
                f.write(f"user {acl.remote_user(5)} on #{acl.password_hash('x')} ~* +@all\n")
            srv.restart()
            resume = p._recover_own_db(0, redis.ConnectionError("killed"))
            assert resume == 0
            users = acl.users(p.db)
            assert "backdoor" not in users and acl.remote_user(5) not in users and acl.remote_user(1) in users
            removed = _removed(p)
            assert len(removed) == 2 and "'backdoor'" in " ".join(removed), removed
            assert "backdoor" not in aclfile.read_text()  # saved: it does not come back with the next restart
        finally:
            p.close()


def test_values_are_capped_before_any_other_user_exists_and_again_after_a_restart(server_flavor, tmp_path):
    """The attack: as the pre-admission ``hello`` user (no password), SET a value of hundreds of MB
    before the peer lowers the server's limit. The limit is set before any user is created, and set
    again when the database comes back (it is a setting, not in the server's files); so is the memory
    limit, with no eviction."""
    make_group(tmp_path / "keys", 2, "g")
    password = secrets.token_urlsafe(16)
    with start_server(server_flavor, users=acl.bootstrap_users(password), persistence=True,
                      workdir=tmp_path / "db") as srv:
        p = Peer(_cfg(tmp_path / "keys"), 0, [srv.url, None], admin=password)
        try:
            p.init_params()
            limit = int(p.db.config_get("proto-max-bulk-len")["proto-max-bulk-len"])
            assert limit < 4 * p.width  # the mlp's vector: 0.8 MB; the servers' default: 512 MB
            hello = srv.client(username=acl.HELLO_USER, password="-")
            with pytest.raises(redis.RedisError):
                hello.set(Keys(0).hello(1), b"\0" * (limit + 1))
            srv.kill(signal.SIGKILL)
            srv.restart()
            p._recover_own_db(0, redis.ConnectionError("killed"))
            assert int(p.db.config_get("proto-max-bulk-len")["proto-max-bulk-len"]) == limit
            memory = p.db.config_get("maxmemory*")  # a memory limit too, with no eviction: both set again
            assert int(memory["maxmemory"]) > 0 and memory["maxmemory-policy"] == "noeviction"
            hello.close()
        finally:
            p.close()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_spirt_run_starts_every_database_closed(tmp_path, monkeypatch, mode):
    """``spirt run`` secured: the moment each server answers, before any peer exists, a client gets
    nothing; the peers still install their users (through ``admin``) and train."""
    import spirt.runner as runner

    make_group(tmp_path, 2, "g")
    tried: list[str] = []
    real = runner.start_servers

    def start_and_try(options):
        servers = real(options)
        for srv in servers:
            c = srv.client(socket_timeout=2)
            try:
                c.execute_command(*BACKDOOR)
                tried.append("open")
            except redis.RedisError as exc:
                tried.append(str(exc))
            finally:
                c.close()
        return servers

    monkeypatch.setattr(runner, "start_servers", start_and_try)
    df = runner.run_training(_cfg(tmp_path, **{"peers.mode": mode}), progress=False, timeout_s=300)
    assert len(tried) == 2 and "open" not in tried, tried
    assert sorted(df["round"]) == [0, 0, 1, 1] and (df["peers_aggregated"] == 2).all()
