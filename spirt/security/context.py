"""What a peer's orchestrator does differently when security is on, in one place.

- at start: installs the users of its own database (fresh random passwords for itself and its
  functions, the default user disabled) and from then on talks to it as its own user;
- admission: takes part in the challenge-response with every member, both ways, before the first
  round; peers reach each other's databases only as the user the admission created;
- publish: signs its outgoing vectors (one envelope per distinct vector);
- barrier and aggregate: checks every received vector (size, envelope, finiteness) on a copy the
  sender cannot write, as it arrives, and excludes what fails;
- caps the size of any single value a client can send, just above the parameter vector's size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import redis

from ..exchange import NOTIFY_KEEP, ROUND_KEY_TTL_MS
from ..guard import Guard
from ..keys import SIG_SUFFIX, Keys
from ..servers import has_command, make_client
from . import acl
from .admission import Applicant, Desk
from .identity import AdmissionError, Identity, MalformedInput, TrustStore, Verifier
from .provision import peer_folder, tls_for, tls_required
from .signing import (
    ENVELOPE_BYTES,
    UpdateRejected,
    sign_snapshot,
    sign_update,
    split_heard,
    verify_signature,
    verify_snapshot,
    verify_update,
)
from .tls import TlsFiles, peer_uri

if TYPE_CHECKING:
    from ..config import SecuritySection

log = logging.getLogger("spirt.security")

MIN_BULK_LIMIT = 1024 * 1024  # the smallest proto-max-bulk-len the servers accept
#: how many rounds ahead of ours the inbox takes vectors for: a faster peer is at most a round or two ahead
#: while it still waits for us; further ahead, we are the one behind and take its state instead
INBOX_AHEAD = 2


def value_limit(width: int) -> int:
    """The largest value a client may send a secured peer's database: a parameter vector, with room."""
    return max(MIN_BULK_LIMIT, 2 * width + 4096)


#: what the server keeps per key beside its value (the key's name, object header, dictionary and expiry
#: entries); MEMORY USAGE counts 40 to 60 bytes for our key names on Valkey 9 and Redis 7
KEY_OVERHEAD = 128


def value_allocation(n: int) -> int:
    """The most a server's allocator hands out for a value of ``n`` bytes: the value, its string header
    (up to 17 bytes and a terminator) rounded up to the allocator's size class. jemalloc, Redis's
    allocator, has four classes per doubling: a 796,840-byte vector takes 917,504 bytes, 15% more.
    glibc, which the embedded Valkey uses, rounds large values up to a page, which is never more."""
    n += 32
    step = max(16, 1 << ((n - 1).bit_length() - 3))  # a quarter of the power of two below n
    return -(-n // step) * step


def member_budget(width: int, signed: bool) -> int:
    """The most one admitted member can keep in a guarded database, in bytes of the server's memory: its
    vectors (and envelopes) for the open rounds, its announcements (a few bytes each), and its join
    request (one value, at most :func:`value_limit`), each as the allocator hands it out
    (:func:`value_allocation`), and the server's own overhead per key."""
    per_round = value_allocation(width) + (value_allocation(ENVELOPE_BYTES) if signed else 0)
    keys = (INBOX_AHEAD + 1) * (2 if signed else 1) + 2
    return ((INBOX_AHEAD + 1) * per_round + NOTIFY_KEEP * 24 + value_allocation(value_limit(width))
            + keys * KEY_OVERHEAD)


def server_limits(width: int, functions: int, peers: int) -> dict:
    """Settings of a secured peer's database, in force before any other user exists: the value limit,
    and a memory limit with no eviction (a write past it fails, naming the cause; nothing is silently
    dropped). The limit leaves twice the room of a round's own vectors (parameters, momenta, the K
    gradients and their average, a snapshot to hand over, a checked copy per member) on top of what the
    members can keep (:func:`member_budget`, with room for two newcomers), and 64 MiB for the rest."""
    members = peers + 2
    own = (functions + 8 + members) * width
    return {"proto-max-bulk-len": value_limit(width), "maxmemory-policy": "noeviction",
            "maxmemory": (64 << 20) + 2 * own + members * member_budget(width, signed=True)}


class PeerSecurity(Guard):
    """The guard of a secured peer (see :mod:`spirt.guard` for when the round calls what).

    ``admin`` is a client of the peer's freshly started database with full rights; the users are
    installed through it, and it is closed. ``width``: bytes of a parameter vector, and ``peers`` the
    group's size (the value and memory limits are set before the users are created). ``checks_in_database``: the backend can check a vector's
    finiteness inside the database (nothing crosses the wire for unsigned vectors then)."""

    active = True

    def __init__(self, cfg: SecuritySection, index: int, url: str, admin: redis.Redis, *,
                 checks_in_database: Any = None, functions: int = 1, width: int | None = None, peers: int = 2):
        self.cfg, self.index, self.url = cfg, index, url
        self.keys = Keys(index)
        #: queues a finiteness check on a pipeline and says whether it did (a backend's finite_check)
        self._finite_check = checks_in_database
        self.group = cfg.group
        files, self._named = tls_for(cfg, index)  # named: clients pin the peer whose database they mean
        self.tls: TlsFiles | None = None if files is None else files.client
        self._tls_required = tls_required(cfg, files)
        self._check_transport(url)
        folder = peer_folder(cfg.keys_dir, index)  # our own keys only, where the group has a folder per peer
        self.identity = Identity.load(folder, index)
        self.trust = TrustStore.load(folder, cfg.group)
        admin.close()  # made without our TLS options: the one below replaces it
        pool = admin.connection_pool.connection_kwargs
        admin = make_client(url=url, username=pool.get("username"), password=pool.get("password"),
                            **self.transport(url, index))
        if cfg.inbox_guard and not has_command(admin, "tensor.push"):
            admin.close()
            raise AdmissionError(f"peer {index}: security.inbox_guard needs the spirt tensor module in our "
                                 f"database at {_host(url)} (TENSOR.PUSH); load it, or set inbox_guard = false")
        limits = None if width is None else server_limits(width, functions, peers)
        admissible = admissible_indices(self.trust, max(cfg.max_peers, peers))
        self.users = acl.DatabaseUsers(index, functions, limits, guarded=cfg.inbox_guard, admissible=admissible)
        self._removed: list[str] | None = self.users.install(admin, cfg.launcher_password_sha256)  # see check_users
        admin.close()
        self.orch = make_client(url=url, **self.own_credentials())
        self.desk = Desk(index, self.orch, Verifier(self.trust, index, max_skew_s=cfg.max_clock_skew_s),
                         admissible, guarded=cfg.inbox_guard)
        self._inbox_from: int | None = None  # the first round our inbox takes (see open_inbox)
        self._width = width or 0
        self._applicants: dict[int, Applicant] = {}
        self.admitted_at: set[int] = set()  # members whose databases let us in
        self.unreachable: set[int] = set()  # members whose databases did not answer at all
        self._checked: dict[tuple[int, int], tuple[str, str] | None] = {}  # (round, peer) -> verdict
        self._heard: dict[int, dict[int, bytes]] = {}  # round -> sender -> envelope of what we accepted

    def __repr__(self) -> str:
        return f"PeerSecurity(peer={self.index}, group={self.group!r})"

    # -- transport and credentials -----------------------------------------------------------------
    def _check_transport(self, url: str) -> None:
        if self._tls_required and not url.startswith("rediss://"):
            raise AdmissionError(f"security.require_tls: the database at {_host(url)} is not reached over "
                                 "TLS (rediss:// URL); TLS is required whenever certificates are configured")

    def transport(self, url: str, peer: int) -> dict:
        """Client options for peer ``peer``'s database at ``url``: our client certificate, and where the
        group's certificates name their peers, the pin on ``peer``'s (no other member's server passes)."""
        if self.tls is None or not url.startswith("rediss://"):
            return {}
        return self.tls.client_kwargs(pin=peer_uri(self.group, peer) if self._named else None)

    def own_credentials(self) -> dict:
        return {"username": acl.orchestrator_user(self.index), "password": self.users.orchestrator_password,
                **self.transport(self.url, self.index)}

    def function_credentials(self, k: int) -> dict:
        return {"db_username": acl.function_user(self.index, k), "db_password": self.users.function_passwords[k],
                "db_options": self.transport(self.url, self.index) or None}

    def member_credentials(self, q: int, url: str) -> dict:
        self._check_transport(url)
        return {"username": acl.remote_user(self.index),
                "password": self.identity.database_password(q, self.group, cfg_session(self.cfg)),
                **self.transport(url, q)}

    def check_users(self, events, r: int) -> None:
        if self._removed is not None:  # the first call, right after install: what it removed
            removed, self._removed = self._removed, None
        else:
            removed = self.users.check(self.orch, dict(self.desk.admitted))
        for name in removed:
            why = ("a member's user we did not admit since our start (a member is admitted again by "
                   "challenge-response)" if acl.is_remote_user(name) else "not one of ours")
            events(r, "user_removed", self.index, f"user {name!r} in our database: {why}; removed")

    # -- the inbox ---------------------------------------------------------------------------------
    @property
    def inbox_guarded(self) -> bool:
        return self.cfg.inbox_guard

    def open_inbox(self, r: int, width: int) -> None:
        """Before round r: our inbox takes TENSOR.PUSH for rounds r .. r + INBOX_AHEAD only, vectors of
        ``width`` bytes (0: a parameter vector's) and (signed updates) envelopes of their size. Set every
        time: a restarted server starts closed. After a jump (a state transfer), what the others pushed
        for the rounds we skipped is deleted: those keys would otherwise stay until they expire."""
        width = width or self._width
        if not self.cfg.inbox_guard or not width:
            return
        envelope = ENVELOPE_BYTES if self.cfg.sign_updates else 0
        self.orch.execute_command("TENSOR.INBOX", "WIDTH", width, "ENVELOPE", envelope, "ROUNDS", r,
                                  r + INBOX_AHEAD, "TTL", ROUND_KEY_TTL_MS, "KEEP", NOTIFY_KEEP)
        if self._inbox_from is not None and r > self._inbox_from + 1:
            self._purge_inbox(before=r)
        self._inbox_from = r

    def _purge_inbox(self, before: int) -> None:
        stale = []
        for key in self.orch.scan_iter(match=self.keys.inbox_pattern("*"), count=1000):
            name = key.decode(errors="replace") if isinstance(key, bytes) else key
            parts = name.split(":")
            rnd = parts[-2] if name.endswith(SIG_SUFFIX) else parts[-1]
            if rnd.isdigit() and int(rnd) < before:
                stale.append(key)
        for i in range(0, len(stale), 512):
            self.orch.delete(*stale[i:i + 512])

    # -- admission ---------------------------------------------------------------------------------
    def _applicant(self, q: int, url: str) -> Applicant:
        app = self._applicants.get(q)
        if app is None:
            hello = make_client(url=url, username=acl.HELLO_USER, password="-", socket_timeout=5, connect_timeout=2,
                                **self.transport(url, q))
            app = self._applicants[q] = Applicant(self.identity, q, self.group, hello, self.cfg.inbox_guard,
                                                  cfg_session(self.cfg))
        return app

    def admit(self, members: Mapping[int, Any], wait_for: set[int] | None = None) -> None:
        """Until every member lets us in and (for ``wait_for``) we let every member in. Members whose
        databases are unreachable are left to the fault handling (exclusion, later admission between
        rounds) instead of failing the start."""
        wait_for = set(members) if wait_for is None else wait_for
        deadline = time.monotonic() + self.cfg.admission_timeout_s
        while True:
            self.serve(members)
            pending_out = set(members) - self.admitted_at - self.unreachable
            pending_in = wait_for - set(self.desk.admitted) - self.unreachable
            if not pending_out and not pending_in:
                break
            if time.monotonic() > deadline:
                raise AdmissionError(
                    f"peer {self.index}: admission not complete after {self.cfg.admission_timeout_s:g} s "
                    f"(not let in by {sorted(pending_out)}, not admitted here: {sorted(pending_in)}; "
                    f"refusals: {[o.reason for o in self.desk.refused[-3:]]})")
            time.sleep(0.02)
        for app in self._applicants.values():
            app.hello.close()
        self._applicants.clear()

    def close(self) -> None:
        for app in self._applicants.values():
            app.hello.close()
        self._applicants.clear()
        self.orch.close()

    def serve(self, members: Mapping[int, Any]) -> None:
        """One non-blocking pass, between rounds: admit newcomers at our desk, and ask the members
        that do not let us in yet (a newcomer we learnt about from its join request) to admit us.
        ``members``: index -> an object with the member's ``url`` and a ``client`` of its database."""
        try:
            self.desk.serve()
        except redis.RedisError as exc:
            log.warning("peer %s: admission desk: %s", self.index, type(exc).__name__)
        for q, mb in members.items():
            if q in self.admitted_at:
                continue
            try:
                mb.client.ping()
                self.admitted_at.add(q)
                self.unreachable.discard(q)
                app = self._applicants.pop(q, None)
                if app is not None:
                    app.hello.close()
                continue
            except redis.AuthenticationError:  # reachable, not (yet) admitted; a ConnectionError subclass
                self.unreachable.discard(q)
            except (redis.ConnectionError, redis.TimeoutError):
                self.unreachable.add(q)
                continue
            except redis.RedisError:
                self.unreachable.discard(q)
            try:
                self._applicant(q, mb.url).step()
            except redis.RedisError:
                pass

    def may_join(self, q: int) -> bool:
        """A join request names peer q: only honoured for a peer that proved its identity here."""
        return q in self.desk.admitted

    def limit_value_size(self, width: int) -> None:
        """No single value a client sends may be much larger than a parameter vector: a peer cannot
        make our server buffer an arbitrarily large tensor."""
        self.orch.config_set("proto-max-bulk-len", value_limit(width))

    # -- updates -----------------------------------------------------------------------------------
    def sign_outgoing(self, r: int, outgoing: dict[int, bytes]) -> dict[int, bytes]:
        cache: dict[int, bytes] = {}
        out = {}
        for q, vec in outgoing.items():
            env = cache.get(id(vec))
            if env is None:
                env = cache[id(vec)] = sign_update(self.identity, self.group, r, vec)
            out[q] = env
        return out

    def round_keys(self, r: int, members: Mapping[int, Any]) -> list[str]:
        """The envelopes and checked copies of round r (a received vector is checked and aggregated
        from a copy the sender cannot write, so what was checked is what is aggregated)."""
        K = self.keys
        out = []
        for q in members:
            out += [K.envelope(q, r), K.verified(q, r), K.verified_envelope(q, r)]
        for key in [k for k in self._checked if k[0] <= r]:
            del self._checked[key]
        return out

    def _key_of(self, q: int):
        return self.desk.keys.get(q) or self.trust.key_for(q)

    def during_barrier(self, members: Mapping[int, Any], r: int, arrived: list[int], width: int) -> None:
        """While the barrier waits for the slower peers: serve admissions, and check the vectors that
        already arrived, so that only the last one's check remains after the barrier."""
        self.serve(members)
        for q in arrived:
            if (r, q) not in self._checked:
                self._checked[(r, q)] = self._check(r, q, width)

    def _check(self, r: int, q: int, width: int) -> tuple[str, str] | None:
        """Copy peer q's round-r vector (and envelope) out of its inbox slot, atomically with reading
        what is checked; (reason, detail) if it fails, else None."""
        K = self.keys
        src, dst = K.incoming(q, r), K.verified(q, r)
        pipe = self.orch.pipeline(transaction=True)
        pipe.execute_command("COPY", src, dst, "REPLACE")
        in_db = False
        if self.cfg.sign_updates:
            pipe.execute_command("COPY", K.envelope(q, r), K.verified_envelope(q, r), "REPLACE")
            pipe.get(src)
            pipe.get(K.envelope(q, r))
        else:
            pipe.strlen(src)
            # in the database where the backend can: nothing crosses the wire
            in_db = self._finite_check is not None and self._finite_check(pipe, src)
            if not in_db:
                pipe.get(src)
        try:
            res = pipe.execute()
        except redis.ResponseError as exc:  # e.g. TENSOR.FINITE on a value that is not a tensor
            return "malformed", f"malformed: {exc}"
        if not res[0]:
            return "missing", "missing: the vector left the inbox before it was checked"
        try:
            if self.cfg.sign_updates:
                raw, sig = res[2], res[3]
                if len(raw) != width:
                    raise UpdateRejected("size", f"vector of {len(raw)} bytes, expected {width}")
                try:
                    key = self._key_of(q)
                except (AdmissionError, MalformedInput) as exc:
                    raise UpdateRejected("forged", str(exc)) from None
                verify_update(sig, raw, group=self.group, sender=q, r=r, key=key)
                finite = bool(np.isfinite(np.frombuffer(raw, dtype="<f4")).all())
            else:
                n = int(res[1])
                if n != width:
                    raise UpdateRejected("size", f"vector of {n} bytes, expected {width}")
                finite = bool(int(res[2])) if in_db else bool(np.isfinite(np.frombuffer(res[2], dtype="<f4")).all())
            if not finite:
                raise UpdateRejected("non_finite", "NaN or infinite values")
        except UpdateRejected as exc:
            return exc.reason, str(exc)
        if self.cfg.sign_updates:  # what we accepted from q, signed by q: shared for equivocation checks
            self._heard.setdefault(r, {})[q] = bytes(res[3])
        return None

    @property
    def signs(self) -> bool:
        return self.cfg.sign_updates

    def sign_snapshot(self, r: int, params: bytes, momentum: bytes | None) -> bytes | None:
        if not self.cfg.sign_updates:
            return None
        return sign_snapshot(self.identity, self.group, r, params, momentum)

    def snapshot_signed(self, source: int, r: int, params: bytes, momentum: bytes | None, sig: object) -> bool:
        if not self.cfg.sign_updates:
            return True
        try:
            key = self._key_of(source)
        except (AdmissionError, MalformedInput):
            return False
        return verify_snapshot(sig, params, momentum, group=self.group, source=source, r=r, key=key)

    def heard(self, r: int) -> bytes | None:
        if not self.cfg.sign_updates:
            return None
        got = self._heard.pop(r, {})
        for old in [k for k in self._heard if k < r]:
            del self._heard[old]
        return b"".join(got[q] for q in sorted(got))

    def equivocation(self, sender: int, r: int, reports: Mapping[int, bytes]) -> str | None:
        """Two envelopes of ``sender`` for round r, both with its valid signature, over different
        digests: the proof (hex of both, and who reported them)."""
        if not self.cfg.sign_updates:
            return None
        try:
            key = self._key_of(sender)
        except (AdmissionError, MalformedInput):
            return None
        mine = [(reporter, env) for reporter, record in sorted(reports.items()) for env in split_heard(record)
                if env.sender == sender and env.round == r]
        if len({env.digest for _, env in mine}) < 2:
            return None  # one vector for everyone (the common case: no signature to check)
        seen: dict[bytes, tuple[int, bytes]] = {}  # digest -> (reporter, envelope)
        for reporter, env in mine:
            if env.digest in seen:
                continue
            if not verify_signature(env, group=self.group, key=key):
                continue  # not the sender's: the reporter's doing, proves nothing against the sender
            seen[env.digest] = (reporter, env.encode())
            if len(seen) == 2:
                (a, ea), (b, eb) = seen.values()
                return (f"round {r}: two envelopes signed by peer {sender} over different vectors, reported "
                        f"by peers {a} and {b}: {ea.hex()} / {eb.hex()}")
        return None

    def screen(self, r: int, inputs: dict[int, str], width: int) -> list[tuple[int, str, str]]:
        """Check every received vector of round ``r`` (``inputs``: peer -> key; ours is left alone).
        A vector that passes is aggregated from its checked copy (``inputs`` points there), one that
        fails is dropped from ``inputs``. Returns (peer, reason, detail) for each rejected vector."""
        rejected = []
        for q in [q for q in sorted(inputs) if q != self.index]:
            res = self._checked.pop((r, q)) if (r, q) in self._checked else self._check(r, q, width)
            if res is None:
                inputs[q] = self.keys.verified(q, r)
            else:
                rejected.append((q, *res))
                del inputs[q]
        return rejected


def cfg_session(cfg: SecuritySection) -> str:
    return cfg.session or ""


def admissible_indices(trust: TrustStore, max_peers: int) -> tuple[int, ...]:
    """The peer indices that could be admitted: those on the allow-list, and with a CA every index below
    ``max_peers`` (the CA may certify any of them)."""
    return tuple(sorted(set(trust.allow) | (set(range(max_peers)) if trust.ca is not None else set())))


def _host(url: str) -> str:
    """Where a URL points, without user or password."""
    rest = url.split("://", 1)[-1]
    return rest.rsplit("@", 1)[-1]
