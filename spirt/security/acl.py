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
           its wake-up list ``notify:q`` and its join request ``join:q``. With the inbox guard (the
           default; the database has the tensor module), the inbox and the wake-up list only through
           TENSOR.PUSH (open rounds, exact sizes, a time to live, a trimmed list: a bounded budget per
           member), and SET only on ``join:q``
hello      before admission, no password: read ``challenge:*``; append to ``hello:q`` only for an
           index q that could be admitted (on the allow-list, or below ``security.max_peers`` in a CA
           group), and with the tensor module only through TENSOR.HELLO (short messages, a few per
           index, a time to live): what can wait in the database before admission is bounded
admin      the server starts with it (see :func:`bootstrap_users`); the peer installs the others
           through it, then deletes it
default    disabled, from the server's start on
========== ====================================================================================

There is no window in which anyone else can reach a fresh database: whoever starts the server writes
its ACL file first (:func:`bootstrap_users`: the default user off, an ``admin`` user whose random
password only the starter and the peer know). The peer then installs exactly its users, and removes
any other it finds, on install and whenever its database comes back from its files
(:meth:`DatabaseUsers.check`).

No key is writable by two remote peers, so none can speak in another's name; what a peer writes in
its own keys is still parsed as hostile input.
"""

from __future__ import annotations

import hashlib
import secrets

import redis

from ..keys import START_KEY, Keys

ORCHESTRATOR_COMMANDS = ["+@all", "-@dangerous", "+info", "+acl|setuser", "+acl|deluser", "+acl|getuser",
                         "+acl|whoami", "+acl|users", "+acl|save", "+client|kill", "+config|set", "+config|get", "+command"]
FUNCTION_COMMANDS = ["-@all", "+get", "+set", "+multi", "+exec", "+ping"]
REMOTE_COMMANDS = ["-@all", "+get", "+getrange", "+set", "+exists", "+strlen", "+rpush", "+ltrim", "+multi", "+exec",
                   "+ping"]
HELLO_COMMANDS = ["-@all", "+get", "+ping"]
#: the pre-admission area (TENSOR.DESK): the longest message (a response with its CA certificate takes
#: about 700 bytes), messages waiting per index, and how long an area lives after its last message
HELLO_MAX_BYTES = 2048
HELLO_SLOTS = 8
HELLO_TTL_MS = 60_000
GUARDED_READ_COMMANDS = ["-@all", "+get", "+getrange", "+exists", "+strlen", "+multi", "+exec", "+ping"]


def orchestrator_user(p: int) -> str:
    return f"orch-{p}"


def function_user(p: int, k: int) -> str:
    return f"fn-{p}-{k}"


def remote_user(q: int) -> str:
    return f"peer-{q}"


def is_remote_user(name: str) -> bool:
    return name.startswith("peer-") and name[5:].isdigit()


HELLO_USER = "hello"
LAUNCHER_USER = "launcher"
ADMIN_USER = "admin"
#: The default user: off (no client can log in as it, none is logged in as it on connecting). Its rights
#: stay whole: when a server replays its append-only file, it re-checks each transaction's commands
#: against the default user's rights at EXEC (Redis 7.0), and would silently drop every transaction of
#: the file otherwise. Connections that were logged in as it before are closed (:func:`lock_out_default`).
DEFAULT_OFF = ["off", "resetpass", "~*", "&*", "+@all"]


def hello_key(p: int, q: int) -> str:
    return Keys(p).hello(q)


def challenge_key(p: int, q: int) -> str:
    return Keys(p).challenge(q)


def orchestrator_rules(p: int) -> list[str]:
    return ["resetkeys", "~*", "resetchannels", "&*", *ORCHESTRATOR_COMMANDS]


def function_rules(p: int, k: int) -> list[str]:
    K = Keys(p)
    return ["resetkeys", f"%R~{K.params}", f"%R~{K.version}", f"%W~{K.grad_slot_pattern(k)}", "resetchannels",
            *FUNCTION_COMMANDS]


def remote_rules(p: int, q: int, guarded: bool = False) -> list[str]:
    """Peer q at peer p's database. ``guarded`` (the database has the tensor module): q writes into
    its inbox and wake-up list only through TENSOR.PUSH, which bounds what it keeps there, and SETs
    nothing but its join request (ACL selectors: each command with its own keys)."""
    K = Keys(p)
    reads = [K.alive, K.joining, K.ready, K.done, K.state, K.aggset_pattern, K.digest_pattern,
             K.heard_pattern, K.snapshot_pattern]
    read_rules = ["resetkeys", *[f"%R~{k}" for k in reads], "resetchannels"]
    if guarded:
        return [*read_rules, *GUARDED_READ_COMMANDS,
                f"(~{K.inbox(q)} ~{K.notify(q)} resetchannels -@all +tensor.push)",
                f"(%W~{K.join(q)} resetchannels -@all +set)"]
    writes = [K.inbox_pattern(q), K.notify(q), K.join(q)]
    return [*read_rules, *[f"%W~{k}" for k in writes], *REMOTE_COMMANDS]


def launcher_rules(p: int) -> list[str]:
    """The process that started the run: sees progress, results and the models (to measure how far
    apart the peers are), starts the peers, nothing else."""
    K = Keys(p)
    reads = [K.up, K.metrics, K.events, K.done, K.state, K.params]  # params: the disagreement observer
    return ["resetkeys", *[f"%R~{k}" for k in reads], f"~{START_KEY}", "resetchannels",
            "-@all", "+get", "+set", "+del", "+exists", "+llen", "+lindex", "+lrange", "+ping"]


def hello_rules(p: int, admissible=(), guarded: bool = False) -> list[str]:
    """The pre-admission user at peer p: it reads its challenges, and appends to the areas of the peer
    indices that could be admitted (``admissible``) and no other. ``guarded`` (the database has the tensor
    module): only through TENSOR.HELLO, which bounds every area (:data:`HELLO_SLOTS` messages of at most
    :data:`HELLO_MAX_BYTES`); else with RPUSH, unbounded."""
    K = Keys(p)
    rules = ["resetkeys", f"%R~{K.challenge_pattern}", "resetchannels", *HELLO_COMMANDS]
    areas = [K.hello(q) for q in sorted(set(admissible)) if q != p]
    if not areas:
        return rules
    if guarded:
        return [*rules, f"({' '.join('~' + a for a in areas)} resetchannels -@all +tensor.hello)"]
    return [*rules, *[f"%W~{a}" for a in areas], "+rpush"]


def open_desk(client: redis.Redis) -> None:
    """The bounds of the pre-admission area, in the tensor module (not in the server's files: set at
    install and again when the database comes back from them; until then TENSOR.HELLO refuses)."""
    client.execute_command("TENSOR.DESK", "MAXLEN", HELLO_MAX_BYTES, "SLOTS", HELLO_SLOTS, "TTL", HELLO_TTL_MS)


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
    admin.execute_command("ACL", "SETUSER", "default", *DEFAULT_OFF)


def lock_out_default(orch: redis.Redis) -> None:
    """Close every connection still logged in as the default user (made while it was on: a user off keeps
    the connections it has)."""
    orch.execute_command("CLIENT", "KILL", "USER", "default")


def bootstrap_users(admin_password: str) -> dict[str, str]:
    """The users a peer's database starts with, as ACL file lines by user name (for
    :func:`spirt.servers.start_server`): the default user disabled, and ``admin`` with all rights and
    ``admin_password``, which the peer installs its users with."""
    return {"default": " ".join(["user", "default", *DEFAULT_OFF]),
            ADMIN_USER: f"user {ADMIN_USER} on #{password_hash(admin_password)} ~* &* +@all"}


def users(client: redis.Redis) -> list[str]:
    return sorted(u.decode() if isinstance(u, bytes) else u for u in client.execute_command("ACL", "USERS"))


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

    def __init__(self, p: int, functions: int = 1, settings: dict | None = None, guarded: bool = False,
                 admissible=()):
        self.p = p
        #: remote peers push through TENSOR.PUSH and TENSOR.HELLO only (see :func:`remote_rules`)
        self.guarded = guarded
        #: the peer indices whose pre-admission areas are open (see :func:`hello_rules`)
        self.admissible = tuple(sorted(set(admissible)))
        self.launcher_sha256: str | None = None
        #: server settings in force before any other user exists (proto-max-bulk-len: the largest value
        #: a client may send; maxmemory): not in the server's files, so set again when it comes back
        self.settings = dict(settings or {})
        self.orchestrator_password = secrets.token_urlsafe(32)
        #: one user per gradient function, each with its own password
        self.function_passwords = [secrets.token_urlsafe(32) for _ in range(functions)]

    def __repr__(self) -> str:  # passwords never in reprs, logs or tracebacks
        return f"DatabaseUsers(p={self.p})"

    def install(self, admin: redis.Redis, launcher_sha256: str | None = None) -> list[str]:
        """Create this peer's users through ``admin`` (the server's ``admin`` user, or the default user of
        a server started without one), remove every other user, the ``admin`` one last, and save.
        Returns the names of the users removed that were not ours (a backdoor, a stale member)."""
        self.launcher_sha256 = launcher_sha256
        removed = self._apply(admin, {})
        orch = _as_user(admin, orchestrator_user(self.p), self.orchestrator_password)
        try:  # through our own user: the admin loses its rights (and connections) with this
            orch.execute_command("ACL", "DELUSER", ADMIN_USER)  # (none on a server started without one)
            lock_out_default(orch)
            save(orch)
        finally:
            orch.close()
        return removed

    def check(self, orch: redis.Redis, admitted: dict[int, str]) -> list[str]:
        """After our database came back from its files: every user as we defined it (the members in
        ``admitted``, peer -> password hash, with theirs), none other; saved. Returns the names of the
        users removed."""
        removed = self._apply(orch, admitted)
        lock_out_default(orch)
        save(orch)
        return removed

    def _apply(self, admin: redis.Redis, admitted: dict[int, str]) -> list[str]:
        p = self.p
        for name, value in self.settings.items():
            admin.config_set(name, value)
        set_user(admin, orchestrator_user(p), orchestrator_rules(p), password=self.orchestrator_password)
        for k, password in enumerate(self.function_passwords):
            set_user(admin, function_user(p, k), function_rules(p, k), password=password)
        if self.guarded:
            open_desk(admin)
        set_user(admin, HELLO_USER, hello_rules(p, self.admissible, self.guarded), nopass=True)
        launcher = self.launcher_sha256
        if launcher is not None:
            set_user(admin, LAUNCHER_USER, launcher_rules(p), password_sha256=launcher)
        for q, sha in admitted.items():
            set_user(admin, remote_user(q), remote_rules(p, q, self.guarded), password_sha256=sha)
        ours = {"default", ADMIN_USER, orchestrator_user(p), HELLO_USER, *(remote_user(q) for q in admitted),
                *(function_user(p, k) for k in range(len(self.function_passwords)))}
        if launcher is not None:
            ours.add(LAUNCHER_USER)
        removed = [u for u in users(admin) if u not in ours]
        for u in removed:
            admin.execute_command("ACL", "DELUSER", u)
        disable_default(admin)  # last: ``admin`` may be the default user (a server started without users)
        return removed

    @staticmethod
    def admit(orch: redis.Redis, p: int, q: int, password_sha256: str, guarded: bool = False) -> None:
        set_user(orch, remote_user(q), remote_rules(p, q, guarded), password_sha256=password_sha256)
        save(orch)

    @staticmethod
    def revoke(orch: redis.Redis, q: int) -> None:
        orch.execute_command("ACL", "DELUSER", remote_user(q))
        save(orch)
