"""State transfer: join requests, admitting joiners, snapshots, catching up, agreement on a state.

A new peer, or one that fell behind, joins through the live peers:

1. it asks each live peer to admit it from a round R a little ahead of theirs (``join:q`` in their
   databases: ``url|R``);
2. each live peer, at the end of round R - 1, admits it (awaits its vectors from round R on) and
   snapshots its state after round R - 1: parameters, momentum, and the membership (``snap:R:*``);
3. the joiner takes the state that two peers hand over identically (the only one, with one live peer),
   and its membership, and trains from round R.

A peer finds out it must resynchronise (:meth:`StateTransfer.behind`) when most members already
published the next round (it lags), or when a strict majority of the peers that finished the last
round aggregated a different set of peers than it did (its parameters diverged).

Every value read here was written by another peer: join requests are parsed strictly
(:func:`parse_join_request`) and a bad one is dropped with an event naming the reason.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time

import redis

from .config import Config
from .events import EventLog
from .exchange import ROUND_KEY_TTL_MS
from .functions import as_int
from .guard import Guard
from .keys import Keys
from .membership import Membership
from .servers import pipelines_at_once

MAX_JOIN_REQUEST_BYTES = 2048
#: a joiner asks to be admitted this many rounds after the latest round the live peers announced
JOIN_AHEAD = 3


def parse_join_request(raw_q, raw) -> tuple[int, str, int]:
    """(peer, database URL, first round) of one join request (the requester's index, as found in the
    key name, and the value); ValueError saying what is wrong otherwise."""
    if raw is None or len(raw) > MAX_JOIN_REQUEST_BYTES:
        raise ValueError(f"join request of {0 if raw is None else len(raw)} bytes (at most {MAX_JOIN_REQUEST_BYTES})")
    try:
        text_q = raw_q.decode("ascii") if isinstance(raw_q, bytes) else str(raw_q)
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as exc:
        raise ValueError("join request is not text") from exc
    if not text_q.isdigit() or len(text_q) > 9:
        raise ValueError(f"join request field {text_q[:20]!r} is not a peer index")
    if "|" not in text:
        raise ValueError("join request is not url|first-round")
    url, first = text.rsplit("|", 1)
    if not (first.isascii() and first.isdigit()) or len(first) > 18:
        raise ValueError(f"join request's first round {first[:20]!r} is not a round number")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("join request's URL is not a redis://, rediss:// or unix:// URL")
    return int(text_q), url, int(first)


class StateTransfer:
    """Peer ``index``'s side of joining: serving joiners between rounds, and joining itself."""

    def __init__(self, index: int, url: str, db: redis.Redis, membership: Membership, guard: Guard,
                 events: EventLog, cfg: Config):
        self.index, self.url, self.db = index, url, db
        self.membership, self.guard, self.events, self.cfg = membership, guard, events, cfg
        self.keys = Keys(index)

    # -- serving joiners ----------------------------------------------------------------------------
    def serve_joins(self, r: int, scanned: tuple[int, list] | None = None) -> None:
        """Admit peers that asked to join; snapshot our state for those starting at round r + 1.
        ``scanned``: the reply of a first ``SCAN 0 MATCH join_pattern`` already made."""
        K = self.keys
        keys = self.matching(K.join_pattern, scanned)
        values = self.db.mget(keys) if keys else []
        for key, raw in zip(keys, values, strict=True):
            if raw is None:
                continue
            try:  # written by another peer: a request that does not parse is dropped, with the reason
                q, url, first = parse_join_request(K.suffix_after(K.join_pattern, key), raw)
            except ValueError as exc:
                self.db.delete(key)
                self.events(r, "join_rejected", -1, str(exc))
                continue
            if q == self.index or not self.guard.may_join(q):
                self.db.delete(key)
                self.events(r, "join_rejected", q, "a join request in our own name" if q == self.index
                            else "not admitted by challenge-response")
                continue
            mb = self.membership.members.get(q)
            if mb is None or mb.url != url or mb.since < first:
                self.membership.add(q, url, since=first)
                self.events(r, "admitted", q, f"joins at round {first}")
            if first == r + 1:
                self.snapshot(first)
            if first <= r + 1:
                self.db.delete(key)

    def matching(self, pattern: str, scanned: tuple[int, list] | None = None) -> list[bytes]:
        """Keys of our database matching ``pattern`` (a handful: one per peer); ``scanned`` is the
        reply of a first ``SCAN 0`` with that pattern, when already made."""
        cursor, keys = scanned if scanned is not None else self.db.scan(0, match=pattern, count=1000)
        keys = list(keys)
        while int(cursor) != 0:
            cursor, more = self.db.scan(cursor, match=pattern, count=1000)
            keys += more
        return keys

    def snapshot(self, first: int) -> None:
        """Our state after round ``first - 1``, for the peers joining at round ``first``."""
        K = self.keys
        meta = {"round": first - 1, "from": self.index,
                "members": {str(q): m.url for q, m in self.membership.current().items()},
                "self_url": self.url}
        pipe = self.db.pipeline(transaction=True)
        pipe.execute_command("COPY", K.params, K.snapshot(first, "params"), "REPLACE")
        pipe.execute_command("COPY", K.momentum, K.snapshot(first, "momentum"), "REPLACE")
        pipe.set(K.snapshot(first, "meta"), json.dumps(meta))
        for what in ("params", "momentum", "meta"):
            pipe.pexpire(K.snapshot(first, what), ROUND_KEY_TTL_MS)
        pipe.execute()

    # -- catching up --------------------------------------------------------------------------------
    def behind(self, r: int, mine: str | None) -> str | None:
        """Why we must resynchronise before round r, or None. ``mine``: the peers we aggregated in
        round r - 1 (None: read it from our database).

        - lagging: most current members already published round r + 1 (they finished round r
          without us);
        - diverged: a strict majority of the peers that finished round r - 1 aggregated a different set
          of peers than we did (they excluded us, or we them, e.g. after we stalled past their deadline
          while their vectors still reached us): our parameters differ from theirs.
        """
        marks: list[int] = []
        sets: list[str] = []
        replies = pipelines_at_once({q: (m.client, [("GET", Keys(q).ready), ("GET", Keys(q).aggset(r - 1))])
                                     for q, m in self.membership.current().items()})
        for reply in replies.values():
            if isinstance(reply, redis.RedisError) or any(isinstance(x, redis.RedisError) for x in reply):
                continue
            v, agg = reply
            if as_int(v) is not None:
                marks.append(as_int(v))
            if agg is not None:
                sets.append(agg.decode(errors="replace"))
        if marks and sorted(marks)[len(marks) // 2] >= r + 1:
            return f"lagging: the peers published round {sorted(marks)[len(marks) // 2]}, we are at {r}"
        if mine is None:
            raw = self.db.get(self.keys.aggset(r - 1))
            mine = raw.decode() if raw is not None else None
        if mine is not None and sets:
            counts: dict[str, int] = {}
            for x in [mine, *sets]:
                counts[x] = counts.get(x, 0) + 1
            top, n_top = max(counts.items(), key=lambda kv: kv[1])
            if top != mine and n_top * 2 > len(sets) + 1:
                return (f"diverged: round {r - 1} aggregated peers {mine} here, {top} at {n_top} of "
                        f"{len(sets) + 1} peers")
        return None

    # -- joining ------------------------------------------------------------------------------------
    def join(self, bootstrap: dict[int, str] | None = None, total: int | None = None) -> tuple[int, int]:
        """Join a running training (or resynchronise after falling behind).

        Asks the live peers to admit us from a round R a little ahead of theirs, then takes the
        parameters, optimizer state, round and membership they snapshot after round R - 1, from at
        least two peers where there are two, and only if they agree (so one faulty peer cannot hand us
        a corrupt model). Returns (R, the byte width of the parameters); R is ``total``, the number of
        rounds, when the training ends before R (there is nothing left to join; the width is 0 then).
        The caller has stopped advertising liveness (:meth:`Membership.sit_out`).
        """
        total = total or self.cfg.run.rounds
        for q, u in (bootstrap or {}).items():
            if q != self.index and q not in self.membership:
                self.membership.add(q, u, since=0)
        self.guard.admit(self.membership.members, wait_for=set())  # let in before we can ask anything
        live = self._live_marks()
        if not live:
            raise RuntimeError(f"peer {self.index}: no live peer to join")
        first = max(live.values()) + JOIN_AHEAD
        if first >= total:
            self.events(first, "join_too_late", self.index, f"the training ends at round {total - 1}")
            return total, 0
        live = self._ask(live, first)
        self.events(first, "join_request", self.index, f"asked peers {sorted(live)} to admit us from round {first}")
        states = self._collect(live, first)
        need = min(2, len(live))
        chosen = self.agreeing(states) if len(states) >= need else None
        if chosen is None:
            raise RuntimeError(f"peer {self.index}: state transfer for round {first} failed: "
                               f"{len(states)} snapshot(s) from {sorted(live)}, "
                               f"{'no two agree' if len(states) >= need else 'too few'}")
        params, momentum, meta = chosen
        self._install(params, momentum, first)
        # the membership of the peers we join: theirs, plus the peer that served the state
        current = {int(q): u for q, u in meta["members"].items()}
        current.setdefault(int(meta["from"]), self.membership[int(meta["from"])].url)
        self.membership.adopt(current, first)
        self.events(first, "joined", self.index, f"state of round {first - 1} from peers {sorted(states)}")
        return first, len(params)

    def _live_marks(self) -> dict[int, int]:
        """The members that are alive and not done, with the last round they announced (-1: none)."""
        live = {}
        for q, m in self.membership.members.items():
            K = Keys(q)
            try:
                pipe = m.client.pipeline(transaction=False)
                pipe.get(K.ready)
                pipe.exists(K.alive)
                pipe.exists(K.done)
                v, alive, done = pipe.execute()
            except redis.RedisError:
                continue
            if alive and not done:
                live[q] = as_int(v) if as_int(v) is not None else -1
        return live

    def _ask(self, live: dict[int, int], first: int) -> dict[int, int]:
        """Write our join request at every live peer; the ones that took it."""
        asked = {}
        for q in live:
            try:
                self.membership[q].client.set(Keys(q).join(self.index), f"{self.url}|{first}")
                asked[q] = live[q]
            except redis.RedisError:
                continue
        return asked

    def _collect(self, live: dict[int, int], first: int) -> dict[int, tuple[bytes, bytes | None, dict]]:
        """The snapshots for round ``first``, until two agree, all arrived, or the join times out."""
        need = min(2, len(live))
        deadline = time.monotonic() + self.cfg.membership.join_timeout_s
        states: dict[int, tuple[bytes, bytes | None, dict]] = {}
        while time.monotonic() < deadline and live:
            for q in live:
                if q in states:
                    continue
                K = Keys(q)
                try:
                    pipe = self.membership[q].client.pipeline(transaction=True)
                    for what in ("params", "momentum", "meta"):
                        pipe.get(K.snapshot(first, what))
                    p, mom, meta = pipe.execute()
                except redis.RedisError:
                    continue
                if p is not None and meta is not None:
                    states[q] = (p, mom, json.loads(meta))
            if len(states) >= need and self.agreeing(states) is not None:
                break
            if len(states) == len(live):
                break
            self.guard.serve(self.membership.members)
            time.sleep(0.05)
        return states

    def _install(self, params: bytes, momentum: bytes | None, first: int) -> None:
        """The state we took over, as our own: we resume at round ``first``."""
        K = self.keys
        pipe = self.db.pipeline(transaction=True)
        pipe.set(K.params, params)
        if momentum is not None:
            pipe.set(K.momentum, momentum)
        else:
            pipe.delete(K.momentum)
        pipe.set(K.completed, first - 1)
        pipe.set(K.ready, first - 1)
        pipe.set(K.version, secrets.randbits(62))
        pipe.execute()

    @staticmethod
    def agreeing(states: dict[int, tuple[bytes, bytes | None, dict]]):
        """The state that at least two sources (or the only source) hand over identically."""
        digests: dict[str, list[int]] = {}
        for q, (p, mom, _) in states.items():
            h = hashlib.sha256(p + b"|" + (mom or b"")).hexdigest()
            digests.setdefault(h, []).append(q)
        best = max(digests.values(), key=len, default=[])
        if len(states) == 1 or len(best) >= 2:
            return states[best[0]]
        return None
