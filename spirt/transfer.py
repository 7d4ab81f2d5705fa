"""State transfer: join requests, admitting joiners, snapshots, catching up, agreement on a state.

A new peer, or one that fell behind, joins through the live peers:

1. it asks each live peer to admit it from a round R a little ahead of theirs (``join:q`` in their
   databases: ``url|R``);
2. each live peer, at the end of round R - 1, admits it (awaits its vectors from round R on) and
   snapshots its state after round R - 1: parameters, momentum, and the membership (``snap:R:*``);
3. the joiner takes the state that f + 1 peers (at least two, all of them when fewer are live) hand
   over identically, with f the number of Byzantine members the group tolerates (the defense's ``f``),
   and the membership those peers agree on, and trains from round R.

A peer finds out it must resynchronise (:meth:`StateTransfer.behind`) when a strict majority of the
other members, and at least f + 1 of them, already published the next round (it lags), or when a
strict majority of the peers that finished the last round aggregated a different set of peers than it
did (its parameters diverged). f members alone can therefore neither make an honest peer resynchronise
nor choose the round it joins at or the state it adopts.

Every value read here was written by another peer and is parsed strictly (:mod:`spirt.wire`): a value
that does not parse, or an implausible one (a round beyond the training's last), is dropped and held
against its sender with a ``bad_value`` event naming it and the reason.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections import Counter

import redis

from .config import Config
from .events import EventLog
from .exchange import ROUND_KEY_TTL_MS
from .guard import Guard
from .keys import Keys
from .membership import Membership
from .servers import pipelines_at_once
from .wire import (
    BadValue,
    SnapshotMeta,
    parse_join_request,
    parse_mark,
    parse_member_set,
    parse_snapshot_meta,
)

#: a joiner asks to be admitted this many rounds after the latest round the live peers announced
JOIN_AHEAD = 3


class StateTransfer:
    """Peer ``index``'s side of joining: serving joiners between rounds, and joining itself."""

    def __init__(self, index: int, url: str, db: redis.Redis, membership: Membership, guard: Guard,
                 events: EventLog, cfg: Config):
        self.index, self.url, self.db = index, url, db
        self.membership, self.guard, self.events, self.cfg = membership, guard, events, cfg
        self.keys = Keys(index)
        self._bad: dict[int, str] = {}  # the last bad value said of each sender

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
            except BadValue as exc:
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
    @property
    def f(self) -> int:
        """How many Byzantine members the group tolerates: the defense's ``f``."""
        return self.cfg.byzantine_bound

    def bad_value(self, r: int, q: int, exc: BadValue) -> None:
        """A value peer q wrote does not parse: it is dropped, and said once per sender and reason (the
        same bad mark would otherwise be logged every round)."""
        if self._bad.get(q) != str(exc):
            self._bad[q] = str(exc)
            self.events(r, "bad_value", q, str(exc))

    def behind(self, r: int, mine: str | None) -> str | None:
        """Why we must resynchronise before round r, or None. ``mine``: the peers we aggregated in
        round r - 1 (None: read it from our database).

        - lagging: a strict majority of the other current members, and at least f + 1 of them, already
          published round r + 1 (they finished round r without us);
        - diverged: a strict majority of the peers that finished round r - 1 aggregated a different set
          of peers than we did (they excluded us, or we them, e.g. after we stalled past their deadline
          while their vectors still reached us): our parameters differ from theirs.
        """
        current = self.membership.current()
        group = set(self.membership) | {self.index}
        ahead: list[int] = []
        sets: list[str] = []
        replies = pipelines_at_once({q: (m.probe, [("GET", Keys(q).ready), ("GET", Keys(q).aggset(r - 1))])
                                     for q, m in current.items()})
        for q, reply in replies.items():
            if isinstance(reply, redis.RedisError) or any(isinstance(x, redis.RedisError) for x in reply):
                continue
            raw_mark, raw_set = reply
            try:
                mark = parse_mark(raw_mark, self.cfg.run.rounds)
                agg = parse_member_set(raw_set, group) if raw_set is not None else None
            except BadValue as exc:
                self.bad_value(r, q, exc)
                continue
            if mark is not None and mark >= r + 1:
                ahead.append(q)
            if agg is not None:
                sets.append(agg)
        if len(ahead) * 2 > len(current) and len(ahead) >= self.f + 1:
            return f"lagging: peers {sorted(ahead)} of {sorted(current)} published a round after {r}"
        if mine is None:
            raw = self.db.get(self.keys.aggset(r - 1))
            mine = raw.decode() if raw is not None else None
        if mine is not None and sets:
            top, n_top = Counter([mine, *sets]).most_common(1)[0]
            if top != mine and n_top * 2 > len(sets) + 1:
                return (f"diverged: round {r - 1} aggregated peers {mine} here, {top} at {n_top} of "
                        f"{len(sets) + 1} peers")
        return None

    # -- joining ------------------------------------------------------------------------------------
    def join(self, bootstrap: dict[int, str] | None = None, total: int | None = None) -> tuple[int, int]:
        """Join a running training (or resynchronise after falling behind).

        Asks the live peers to admit us from a round R a little ahead of the round at least f + 1 of
        them announced, then takes the parameters, optimizer state, round and membership they snapshot
        after round R - 1, once f + 1 of them (at least two where there are two; all of them when fewer
        are live) hand over the same state, so that f faulty peers cannot hand us a model of theirs.
        Returns (R, the byte width of the parameters); R is ``total``, the number of rounds, when the
        training ends before R (there is nothing left to join; the width is 0 then). The caller has
        stopped advertising liveness (:meth:`Membership.sit_out`).
        """
        total = total or self.cfg.run.rounds
        for q, u in (bootstrap or {}).items():
            if q != self.index and q not in self.membership:
                self.membership.add(q, u, since=0)
        self.guard.admit(self.membership.members, wait_for=set())  # let in before we can ask anything
        live = self._live_marks()
        if not live:
            raise RuntimeError(f"peer {self.index}: no live peer to join")
        first = self.attested_round(live) + JOIN_AHEAD
        if first >= total:
            self.events(first, "join_too_late", self.index, f"the training ends at round {total - 1}")
            return total, 0
        live = self._ask(live, first)
        self.events(first, "join_request", self.index, f"asked peers {sorted(live)} to admit us from round {first}")
        states = self._collect(live, first)
        chosen = self.agreeing(states, self.sources_needed(len(live)))
        if chosen is None:
            raise RuntimeError(f"peer {self.index}: state transfer for round {first} failed: "
                               f"{len(states)} snapshot(s) from {sorted(live)}, fewer than "
                               f"{self.sources_needed(len(live))} agree")
        sources, (params, momentum) = chosen
        self._install(params, momentum, first)
        self.membership.adopt(self.agreed_members({q: states[q][2] for q in sources}), first)
        self.events(first, "joined", self.index, f"state of round {first - 1} from peers {sources}")
        return first, len(params)

    def sources_needed(self, live: int) -> int:
        """How many sources must hand over the same state: f + 1, at least two; all of them when fewer
        are live (a group of one can only be trusted)."""
        return min(max(2, self.f + 1), live)

    def attested_round(self, live: dict[int, int]) -> int:
        """The latest round that at least f + 1 of the live peers announced (all of them when fewer):
        f peers announcing a later round cannot move a joiner's first round."""
        marks = sorted(live.values(), reverse=True)
        return marks[min(self.f, len(marks) - 1)]

    def _live_marks(self) -> dict[int, int]:
        """The members that are alive and not done, with the last round they announced (-1: none); a
        member whose mark does not parse is not asked."""
        live = {}
        for q, m in self.membership.members.items():
            K = Keys(q)
            try:
                pipe = m.probe.pipeline(transaction=False)
                pipe.get(K.ready)
                pipe.exists(K.alive)
                pipe.exists(K.done)
                v, alive, done = pipe.execute()
            except redis.RedisError:
                continue
            if alive and not done:
                try:
                    mark = parse_mark(v, self.cfg.run.rounds)
                except BadValue as exc:
                    self.bad_value(-1, q, exc)
                    continue
                live[q] = -1 if mark is None else mark
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

    def _collect(self, live: dict[int, int], first: int) -> dict[int, tuple[bytes, bytes | None, SnapshotMeta]]:
        """The snapshots for round ``first``, until enough agree, all arrived, or the join times out. A
        snapshot whose meta does not parse is dropped (and its source not asked again)."""
        need = self.sources_needed(len(live))
        deadline = time.monotonic() + self.cfg.membership.join_timeout_s
        states: dict[int, tuple[bytes, bytes | None, SnapshotMeta]] = {}
        bad: set[int] = set()
        max_peers = max(self.cfg.peers.count, self.index + 1, *(q + 1 for q in self.membership))
        while time.monotonic() < deadline and live:
            for q in live:
                if q in states or q in bad:
                    continue
                K = Keys(q)
                try:
                    pipe = self.membership[q].client.pipeline(transaction=True)
                    for what in ("params", "momentum", "meta"):
                        pipe.get(K.snapshot(first, what))
                    p, mom, meta = pipe.execute()
                except redis.RedisError:
                    continue
                if p is None or meta is None:
                    continue
                try:
                    states[q] = (p, mom, parse_snapshot_meta(meta, source=q, round=first - 1, max_peers=max_peers))
                except BadValue as exc:
                    bad.add(q)
                    self.bad_value(first, q, exc)
            if self.agreeing(states, need) is not None or len(states) + len(bad) == len(live):
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
    def agreeing(states: dict[int, tuple[bytes, bytes | None, object]], need: int):
        """(the sources, (params, momentum)) of the state at least ``need`` sources hand over
        identically (the largest such group; the lowest source index breaks a tie), or None."""
        digests: dict[str, list[int]] = {}
        for q, (p, mom, _) in sorted(states.items()):
            h = hashlib.sha256(p + b"|" + (mom or b"")).hexdigest()
            digests.setdefault(h, []).append(q)
        best = max(digests.values(), key=len, default=[])
        if not best or len(best) < need:
            return None
        p, mom, _ = states[best[0]]
        return best, (p, mom)

    def agreed_members(self, metas: dict[int, SnapshotMeta]) -> dict[int, str]:
        """The group's membership from the agreeing sources: a member is in when a strict majority of
        them list it (with the URL most of them give), and every source is in. One source cannot add or
        drop members the others do not."""
        votes: dict[int, Counter] = {}
        for meta in metas.values():
            for q, url in meta.members.items():
                votes.setdefault(q, Counter())[url] += 1
        current = {q: c.most_common(1)[0][0] for q, c in votes.items() if sum(c.values()) * 2 > len(metas)}
        for q in metas:
            current.setdefault(q, self.membership[q].url)
        return current
