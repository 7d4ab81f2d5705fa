"""The users of one peer's database, each limited to the keys and commands its role needs.

Key permissions use Redis 7 / Valkey selectors: ``%R~pattern`` read only, ``%W~pattern`` write only,
``~pattern`` both. The roles at peer p's database:

========== ====================================================================================
user       may
========== ====================================================================================
orch-p     everything except the server-wide dangerous commands it does not need (it owns the
           database: it also creates the other users)
fn-p-k     read ``params`` and ``version``; write only its own slot ``grad:*:k`` (gradient function k:
           one cannot overwrite another's gradient)
peer-q     read what p publishes (``alive``, ``joining``, ``ready``, ``done``, ``state``, ``aggset:*``,
           ``digest:*``, ``heard:*``, ``snap:*``); write only keys of its own: its inbox ``in:q:*``,
           its wake-up list ``notify:q`` and its join request ``join:q``
hello      before admission: write ``hello:*``, read ``challenge:*`` (nothing else)
default    disabled
========== ====================================================================================

No key is writable by two remote peers, so none can speak in another's name; what a peer writes in
its own keys is still parsed as hostile input.
"""

from __future__ import annotations

import hashlib
import secrets

import redis

from ..keys import START_KEY, Keys

ORCHESTRATOR_COMMANDS = ["+@all", "-@dangerous", "+info", "+acl|setuser", "+acl|deluser", "+acl|getuser",
                         "+acl|whoami", "+acl|save", "+config|set", "+config|get", "+command"]
FUNCTION_COMMANDS = ["-@all", "+get", "+set", "+multi", "+exec", "+ping"]
REMOTE_COMMANDS = ["-@all", "+get", "+getrange", "+set", "+exists", "+strlen", "+rpush", "+ltrim", "+multi", "+exec",
                   "+ping"]
HELLO_COMMANDS = ["-@all", "+get", "+set", "+ping"]


def orchestrator_user(p: int) -> str:
    return f"orch-{p}"


def function_user(p: int, k: int) -> str:
    return f"fn-{p}-{k}"


def remote_user(q: int) -> str:
    return f"peer-{q}"


HELLO_USER = "hello"
LAUNCHER_USER = "launcher"


def hello_key(p: int, q: int) -> str:
    return Keys(p).hello(q)


def response_key(p: int, q: int) -> str:
    return Keys(p).hello_response(q)


def challenge_key(p: int, q: int) -> str:
    return Keys(p).challenge(q)


def orchestrator_rules(p: int) -> list[str]:
    return ["resetkeys", "~*", "resetchannels", "&*", *ORCHESTRATOR_COMMANDS]


def function_rules(p: int, k: int) -> list[str]:
    K = Keys(p)
    return ["resetkeys", f"%R~{K.params}", f"%R~{K.version}", f"%W~{K.grad_slot_pattern(k)}", "resetchannels",
            *FUNCTION_COMMANDS]


def remote_rules(p: int, q: int) -> list[str]:
    K = Keys(p)
    reads = [K.alive, K.joining, K.ready, K.done, K.state, K.aggset_pattern, K.digest_pattern,
             K.heard_pattern, K.snapshot_pattern]
    writes = [K.inbox_pattern(q), K.notify(q), K.join(q)]
    return ["resetkeys", *[f"%R~{k}" for k in reads], *[f"%W~{k}" for k in writes], "resetchannels",
            *REMOTE_COMMANDS]


def launcher_rules(p: int) -> list[str]:
    """The process that started the run: sees progress, results and the models (to measure how far
    apart the peers are), starts the peers, nothing else."""
    K = Keys(p)
    reads = [K.up, K.metrics, K.events, K.done, K.state, K.params]  # params: the disagreement observer
    return ["resetkeys", *[f"%R~{k}" for k in reads], f"~{START_KEY}", "resetchannels",
            "-@all", "+get", "+set", "+del", "+exists", "+llen", "+lindex", "+lrange", "+ping"]


def hello_rules(p: int) -> list[str]:
    K = Keys(p)
    return ["resetkeys", f"%W~{K.hello_pattern}", f"%R~{K.challenge_pattern}", "resetchannels", *HELLO_COMMANDS]


def password_hash(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def set_user(admin: redis.Redis, name: str, rules: list[str], *, password: str | None = None,
             password_sha256: str | None = None, nopass: bool = False) -> None:
    """(Re)create user ``name`` from scratch: ``reset`` first, so no permission survives a redefinition.
    Only the hash of a password is sent (``#``), so it does not reach the server's command log in clear."""
    if password is not None:
        password_sha256 = password_hash(password)
    if password_sha256 is None and not nopass:
        raise ValueError(f"user {name}: a password (or its SHA-256) is required")
    cred = ["nopass"] if nopass else [f"#{password_sha256}"]
    admin.execute_command("ACL", "SETUSER", name, "reset", "on", *cred, *rules)


def disable_default(admin: redis.Redis) -> None:
    admin.execute_command("ACL", "SETUSER", "default", "off", "resetpass", "nopass", "-@all", "resetkeys",
                          "resetchannels")


def save(client: redis.Redis) -> None:
    """Write the users to the server's ACL file, where it has one (started with persistence): a
    restarted database then comes back with its users and its default user disabled. Without an ACL
    file the users live in memory only, as the data does."""
    try:
        client.execute_command("ACL", "SAVE")
    except redis.ResponseError as exc:
        if "acl file" not in str(exc).lower() and "aclfile" not in str(exc).lower():
            raise


def _as_user(client: redis.Redis, username: str, password: str) -> redis.Redis:
    """A client of the same server (same address, TLS options) logged in as another user."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "username": username, "password": password}
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))


class DatabaseUsers:
    """Fresh random passwords for the local roles of peer ``p``, created in its database by
    :meth:`install` through a client with full rights (the one the database was started with)."""

    def __init__(self, p: int, functions: int = 1):
        self.p = p
        self.orchestrator_password = secrets.token_urlsafe(32)
        #: one user per gradient function, each with its own password
        self.function_passwords = [secrets.token_urlsafe(32) for _ in range(functions)]

    def __repr__(self) -> str:  # passwords never in reprs, logs or tracebacks
        return f"DatabaseUsers(p={self.p})"

    def install(self, admin: redis.Redis, launcher_sha256: str | None = None) -> None:
        p = self.p
        set_user(admin, orchestrator_user(p), orchestrator_rules(p), password=self.orchestrator_password)
        for k, password in enumerate(self.function_passwords):
            set_user(admin, function_user(p, k), function_rules(p, k), password=password)
        set_user(admin, HELLO_USER, hello_rules(p), nopass=True)
        if launcher_sha256 is not None:
            set_user(admin, LAUNCHER_USER, launcher_rules(p), password_sha256=launcher_sha256)
        disable_default(admin)
        # saved by the orchestrator: the default user can no longer run anything
        orch = _as_user(admin, orchestrator_user(p), self.orchestrator_password)
        try:
            save(orch)
        finally:
            orch.close()

    @staticmethod
    def admit(orch: redis.Redis, p: int, q: int, password_sha256: str) -> None:
        set_user(orch, remote_user(q), remote_rules(p, q), password_sha256=password_sha256)
        save(orch)

    @staticmethod
    def revoke(orch: redis.Redis, q: int) -> None:
        orch.execute_command("ACL", "DELUSER", remote_user(q))
        save(orch)
