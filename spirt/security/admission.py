"""Challenge-response admission carried over the verifier's database.

Before admission a peer q reaches peer p's database only as the ``hello`` user (no password), which can
read ``challenge:*`` and append short messages to the pre-admission area ``hello:q`` of an index that
could be admitted, and nothing else (:func:`spirt.security.acl.hello_rules`). The exchange:

1. q appends a request (its index) to ``{p}:hello:q``;
2. p answers with a challenge in ``{p}:challenge:q`` (nonce, p's clock): the same one while it is fresh,
   however often it is asked;
3. q appends its signed response to the same area; it binds the SHA-256 of the password q will use at
   p's database;
4. p verifies it against its trust store and creates the user ``peer-q`` with that password hash.

Anyone can write what q writes, so every message is hostile until verified: parse errors, wrong
signatures, unknown peers, replays and stale timestamps are refused with the reason counted; nothing
raises into the caller. Nothing written can take the place of q's own messages: an area is a list that
only p empties, full areas refuse rather than evict (TENSOR.HELLO), and a forged response does not spend
the nonce q is answering. What can wait, and what one pass of the desk works through, is bounded.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import redis

from ..keys import Keys
from .acl import HELLO_MAX_BYTES, HELLO_SLOTS, DatabaseUsers, challenge_key, hello_key, password_hash
from .identity import (
    AdmissionError,
    Challenge,
    Identity,
    MalformedInput,
    Response,
    Verifier,
    _json_object,
    respond,
)

log = logging.getLogger("spirt.security")

RETRY_S = 5.0
MAX_MESSAGES_PER_PASS = 64  # bound the work one pass does (a signature check each), whatever was written
DESK_EVERY_S = 0.02  # a desk looks at its areas at most this often (it is asked between every poll)
LOG_EVERY_S = 5.0  # refusals are counted; a flood of them is logged once in a while, not line by line


@dataclass
class Outcome:
    peer: int
    admitted: bool
    reason: str = ""


@dataclass
class Desk:
    """Peer p's side: turns requests into challenges and admits peers whose responses verify.
    ``admissible``: the peer indices whose areas are open (the others cannot be written)."""

    p: int
    orch: redis.Redis
    verifier: Verifier
    admissible: tuple[int, ...] = ()
    admitted: dict[int, str] = field(default_factory=dict)  # peer -> password hash granted
    refused: list[Outcome] = field(default_factory=list)  # the last 100
    refusals: int = 0  # all of them
    keys: dict = field(default_factory=dict)  # peer -> the public key it proved to hold
    guarded: bool = False  # the database's inbox takes TENSOR.PUSH only (see acl.remote_rules)
    _turn: int = 0
    _last_pass: float = 0.0
    _logged: tuple[float, int] = (0.0, 0)  # when refusals were last logged, and how many there were then

    def serve(self, *, now: float | None = None) -> list[Outcome]:
        """One pass over the waiting messages (at most every :data:`DESK_EVERY_S`)."""
        now = time.monotonic() if now is None else now
        areas = [q for q in self.admissible if q != self.p]
        if not areas or now - self._last_pass < DESK_EVERY_S:
            return []
        self._last_pass = now
        start = self._turn % len(areas)  # a different area first each pass: none can starve the others
        self._turn += 1
        order = areas[start:] + areas[:start]
        K = Keys(self.p)
        pipe = self.orch.pipeline(transaction=False)
        for q in order:
            pipe.lpop(K.hello(q), HELLO_SLOTS)
        taken = pipe.execute(raise_on_error=False)
        out: list[Outcome] = []
        budget = MAX_MESSAGES_PER_PASS
        for q, msgs in zip(order, taken, strict=True):
            if isinstance(msgs, Exception):  # not a list: nothing a hello message could have made
                self.orch.delete(K.hello(q))
                continue
            for raw in msgs or ():
                if budget == 0:
                    out.append(Outcome(q, False, "over this pass's budget of messages; dropped"))
                    continue
                budget -= 1
                o = self._handle(q, raw)
                if o is not None:
                    out.append(o)
        refused = [o for o in out if not o.admitted]
        self.refused += refused
        del self.refused[:-100]  # a flood of garbage must not grow memory
        self.refusals += len(refused)
        self._log_refusals(now)
        return out

    def _log_refusals(self, now: float) -> None:
        at, count = self._logged
        if self.refusals > count and now - at >= LOG_EVERY_S:
            log.warning("peer %s: %d admission message(s) refused (last: %s)", self.p, self.refusals - count,
                        self.refused[-1].reason)
            self._logged = (now, self.refusals)

    def _handle(self, q: int, raw: bytes) -> Outcome | None:
        try:
            if len(raw) > HELLO_MAX_BYTES:
                raise MalformedInput(f"message of {len(raw)} bytes (at most {HELLO_MAX_BYTES})")
            if b'"nonce"' in raw:
                return self._check(q, raw)
            if _request(raw) != q:
                raise MalformedInput("request does not name the index of its area")
        except MalformedInput as exc:
            return Outcome(q, False, f"peer {q}'s area: {exc}")
        ch = self.verifier.challenge(q)  # the open one while fresh: asking again changes nothing
        left_ms = max(1, int((ch.issued + self.verifier.nonce_ttl_s - time.time()) * 1000))
        self.orch.set(challenge_key(self.p, q), ch.encode(), px=left_ms)
        return None

    def _check(self, q: int, raw: bytes) -> Outcome:
        try:
            resp = Response.decode(raw)
            if resp.prover != q:
                raise AdmissionError(f"response in peer {q}'s area names peer {resp.prover}")
            key = self.verifier.verify(resp)
        except (MalformedInput, AdmissionError) as exc:
            return Outcome(q, False, str(exc))
        DatabaseUsers.admit(self.orch, self.p, q, resp.binding, self.guarded)
        self.orch.delete(challenge_key(self.p, q))
        self.admitted[q] = resp.binding
        self.keys[q] = key
        log.info("peer %s: admitted peer %s", self.p, q)
        return Outcome(q, True)


def _request(raw: bytes) -> int:
    """The index a request names: exactly ``{"peer": <index>}`` (parsed like every admission message)."""
    d = _json_object(raw, "request")
    if set(d) != {"peer"} or type(d["peer"]) is not int or d["peer"] < 0:
        raise MalformedInput("request is not {\"peer\": <index>}")
    return d["peer"]


@dataclass
class Applicant:
    """Peer q's side of its admission at peer p, driven by :meth:`step` (no blocking). ``guarded``: p's
    areas take TENSOR.HELLO (its database has the tensor module), else RPUSH."""

    identity: Identity
    p: int
    group: str
    hello: redis.Redis  # client of p's database as the hello user
    guarded: bool = False
    session: str = ""  # the run's session: bound into the password (see Identity.database_password)
    requested: bool = False
    requested_at: float = 0.0
    answered: bytes | None = None  # nonce answered last
    sent: bytes | None = field(default=None, repr=False)  # the last response written

    @property
    def password(self) -> str:
        return self.identity.database_password(self.p, self.group, self.session)

    def _send(self, message: bytes | str) -> bool:
        """Append to our area at p; False when it is full (someone filled it: try again next step)."""
        area = hello_key(self.p, self.identity.index)
        try:
            if self.guarded:
                self.hello.execute_command("TENSOR.HELLO", area, message)
            else:
                self.hello.rpush(area, message)
        except redis.ResponseError as exc:
            if "full" in str(exc):
                return False
            raise
        return True

    def step(self) -> None:
        q = self.identity.index
        raw = self.hello.get(challenge_key(self.p, q))
        if raw is None:
            # ask (again, when an earlier request or our response was refused or lost)
            if not self.requested or time.monotonic() - self.requested_at > RETRY_S:
                if self._send(json.dumps({"peer": q})):
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
        if self._send(resp.encode()):
            self.sent = resp.encode()
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
