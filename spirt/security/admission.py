"""Challenge-response admission carried over the verifier's database.

Before admission a peer q reaches peer p's database only as the ``hello`` user, which can write
``hello:*`` and read ``challenge:*`` and nothing else. The exchange:

1. q writes ``{p}:hello:q`` (a request: its index and, in a CA group, its certificate);
2. p answers with a fresh challenge in ``{p}:challenge:q`` (nonce, p's clock);
3. q writes its signed response to ``{p}:hello:q:resp``; it binds the SHA-256 of the password q will
   use at p's database;
4. p verifies it against its trust store and creates the user ``peer-q`` with that password hash.

Every value read here is hostile until verified: parse errors, wrong signatures, unknown peers,
replays and stale timestamps are refused with the reason logged; nothing raises into the caller.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import redis

from ..keys import RESPONSE_SUFFIX, Keys
from .acl import DatabaseUsers, challenge_key, hello_key, password_hash, response_key
from .identity import AdmissionError, Challenge, Identity, MalformedInput, Response, Verifier, respond

log = logging.getLogger("spirt.security")

CHALLENGE_TTL_MS = 60_000
RETRY_S = 5.0
MAX_REQUESTS_PER_PASS = 64  # bound the work one pass does, whatever the hello user wrote


@dataclass
class Outcome:
    peer: int
    admitted: bool
    reason: str = ""


@dataclass
class Desk:
    """Peer p's side: turns hello requests into challenges and admits peers whose responses verify."""

    p: int
    orch: redis.Redis
    verifier: Verifier
    admitted: dict[int, str] = field(default_factory=dict)  # peer -> password hash granted
    refused: list[Outcome] = field(default_factory=list)
    keys: dict = field(default_factory=dict)  # peer -> the public key it proved to hold
    guarded: bool = False  # the database's inbox takes TENSOR.PUSH only (see acl.remote_rules)

    def serve(self) -> list[Outcome]:
        """One pass over the pending requests and responses."""
        out: list[Outcome] = []
        K = Keys(self.p)
        seen = 0
        for key in self.orch.scan_iter(match=K.hello_pattern, count=100):
            seen += 1
            if seen > MAX_REQUESTS_PER_PASS:
                break
            name = key.decode(errors="replace") if isinstance(key, bytes) else key
            rest = K.suffix_after(K.hello_pattern, key)
            try:
                if rest.endswith(RESPONSE_SUFFIX):
                    q = _index(rest[: -len(RESPONSE_SUFFIX)])
                    out.append(self._check(q, key))
                else:
                    q = _index(rest)
                    self._challenge(q, key)
            except MalformedInput as exc:
                self.orch.delete(key)
                out.append(Outcome(-1, False, f"{name!r}: {exc}"))
        for o in out:
            if not o.admitted:
                self.refused.append(o)
                log.warning("peer %s: admission refused: %s", self.p, o.reason)
        del self.refused[:-100]  # a flood of garbage must not grow memory
        return out

    def _challenge(self, q: int, key) -> None:
        raw = self.orch.get(key)
        self.orch.delete(key)
        if raw is None:
            return
        # the request carries nothing we trust; it only asks for a challenge
        ch = self.verifier.challenge(q)
        self.orch.set(challenge_key(self.p, q), ch.encode(), px=CHALLENGE_TTL_MS)

    def _check(self, q: int, key) -> Outcome:
        raw = self.orch.get(key)
        self.orch.delete(key, challenge_key(self.p, q))
        try:
            resp = Response.decode(raw)
            if resp.prover != q:
                raise AdmissionError(f"response in peer {q}'s slot names peer {resp.prover}")
            key = self.verifier.verify(resp)
        except (MalformedInput, AdmissionError) as exc:
            return Outcome(q, False, str(exc))
        DatabaseUsers.admit(self.orch, self.p, q, resp.binding, self.guarded)
        self.admitted[q] = resp.binding
        self.keys[q] = key
        log.info("peer %s: admitted peer %s", self.p, q)
        return Outcome(q, True)


def _index(text: str) -> int:
    if not text.isdigit() or len(text) > 9:
        raise MalformedInput("hello key does not end in a peer index")
    return int(text)


@dataclass
class Applicant:
    """Peer q's side of its admission at peer p, driven by :meth:`step` (no blocking)."""

    identity: Identity
    p: int
    group: str
    hello: redis.Redis  # client of p's database as the hello user
    requested: bool = False
    requested_at: float = 0.0
    answered: bytes | None = None  # nonce answered last
    sent: bytes | None = field(default=None, repr=False)  # the last response written

    @property
    def password(self) -> str:
        return self.identity.database_password(self.p, self.group)

    def step(self) -> None:
        q = self.identity.index
        raw = self.hello.get(challenge_key(self.p, q))
        if raw is None:
            # ask (again, when an earlier request or our response was refused or lost)
            if not self.requested or time.monotonic() - self.requested_at > RETRY_S:
                self.hello.set(hello_key(self.p, q), json.dumps({"peer": q}), px=CHALLENGE_TTL_MS)
                self.requested, self.requested_at = True, time.monotonic()
            return
        try:
            ch = Challenge.decode(raw)
        except MalformedInput as exc:
            log.warning("peer %s: malformed challenge from peer %s: %s", q, self.p, exc)
            return
        if ch.nonce == self.answered or ch.verifier != self.p or ch.prover != q:
            return
        resp = respond(self.identity, ch, self.group, password_hash(self.password))
        self.sent = resp.encode()
        self.hello.set(response_key(self.p, q), self.sent, px=CHALLENGE_TTL_MS)
        self.answered = ch.nonce

    def restart(self) -> None:
        self.requested, self.answered = False, None


def wait_admitted(applicant: Applicant, member: redis.Redis, timeout_s: float, *, serve=None) -> bool:
    """Drive ``applicant`` until ``member`` (a client with our credentials at p) authenticates.
    ``serve`` is called every iteration: our own desk, so that two peers admitting each other progress."""
    deadline = time.monotonic() + timeout_s
    last_request = time.monotonic()
    while time.monotonic() < deadline:
        if serve is not None:
            serve()
        try:
            member.ping()
            return True
        except redis.AuthenticationError:
            pass
        except redis.ResponseError as exc:  # WRONGPASS / NOAUTH come as ResponseError in some versions
            if "WRONGPASS" not in str(exc) and "NOAUTH" not in str(exc):
                raise
        except redis.ConnectionError:
            pass
        try:
            applicant.step()
        except redis.RedisError:
            pass
        if time.monotonic() - last_request > 5:  # our response was refused or lost: ask again
            applicant.restart()
            last_request = time.monotonic()
        time.sleep(0.02)
    return False
