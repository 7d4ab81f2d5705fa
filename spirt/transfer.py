"""State transfer: join requests, admitting joiners, snapshots, catching up, agreement on a state.

A new peer, or one that fell behind, joins through the live peers:

1. it asks each live peer to admit it from a round R a little ahead of theirs (``join:q`` in their
   databases: ``url|R``);
2. each live peer, at the end of round R - 1, admits it (awaits its vectors from round R on) and
   snapshots its state after round R - 1: parameters, momentum, and the membership (``snap:R:*``);
3. the joiner takes the state that f + 1 peers (all of them when fewer are live) hand over
   identically, with f the number of Byzantine members the group tolerates (the defense's ``f``), and
   the membership those peers agree on, and trains from round R. It does so only when more sources
   serve R than trained past it without serving it: only those serving R aggregate its vector there, so
   the others would otherwise be the larger part of the group ending round R on another state.

A join that fails (no live peer, no f + 1 identical snapshots in time) is retried with backoff,
re-reading liveness each time, until ``membership.join_timeout_s``. Members sitting out for a state
transfer of their own are asked too (they admit the joiner when they are back) but hand over nothing.
R is at most the last round; when the live peers went past it without serving the joiner, it asks
again, and once they finished it takes the state they end the training with (each leaves a snapshot of
it, ``snap:<rounds>:*``, when it finishes). A peer waiting for a quorum (:mod:`spirt.agreement`) serves joins too: it moves its round counter to the round the joiners asked
for (the rounds in between are skipped by the whole re-forming group) and snapshots its state there.
When a peer must resynchronise is decided in :mod:`spirt.agreement`; f members alone can neither make
an honest peer resynchronise nor choose the round it joins at or the state it adopts.

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
from collections.abc import Callable

import redis

from .agreement import queue_digest
from .backends import get_backend
from .config import Config
from .events import EventLog
from .exchange import ROUND_KEY_TTL_MS
from .guard import Guard
from .keys import Keys
from .membership import Membership
from .wire import (
    MAX_SINCE_AHEAD,
    BadValue,
    SnapshotMeta,
    parse_join_request,
    parse_mark,
    parse_snapshot_meta,
)

#: a joiner asks to be admitted this many rounds after the latest round the live peers announced
JOIN_AHEAD = 3


class JoinFailed(RuntimeError):
    """One attempt to join did not work out (it is retried until ``membership.join_timeout_s``).
    ``overtaken``: the sources trained past the round we asked for without serving us (our request came
    too late); the group is training, so the next attempt is made at once rather than after a pause."""

    def __init__(self, message: str, overtaken: bool = False):
        super().__init__(message)
        self.overtaken = overtaken


class StateTransfer:
    """Peer ``index``'s side of joining: serving joiners between rounds, and joining itself."""

    def __init__(self, index: int, url: str, db: redis.Redis, membership: Membership, guard: Guard,
                 events: EventLog, cfg: Config):
        self.index, self.url, self.db = index, url, db
        self.membership, self.guard, self.events, self.cfg = membership, guard, events, cfg
        self.keys = Keys(index)
        self._bad: set[tuple[int, str]] = set()  # the bad values said, by sender and reason
        self._finished: set[int] = set()  # members found done by the last liveness read
        self._joining: set[int] = set()  # members found sitting out for a state transfer of their own
        self._requested: set[tuple[int, tuple[int, ...]]] = set()  # (round, peers) of the requests said
        #: (params, momentum) -> the state we hand to joiners; None: our own (a Byzantine peer's attack
        #: may change it, see spirt.byzantine)
        self.served_state: Callable[[bytes, bytes | None], tuple[bytes, bytes | None]] | None = None

    # -- serving joiners ----------------------------------------------------------------------------
    def requests(self, r: int, scanned: tuple[int, list] | None = None) -> list[tuple[bytes, int, str, int]]:
        """The join requests in our database: (key, peer, its URL, its first round). One that does not
        parse, or in our own name, or from a peer that was not admitted, is deleted with an event.
        ``scanned``: the reply of a first ``SCAN 0 MATCH join_pattern`` already made."""
        K = self.keys
        keys = self.matching(K.join_pattern, scanned)
        values = self.db.mget(keys) if keys else []
        out = []
        for key, raw in zip(keys, values, strict=True):
            if raw is None:
                continue
            try:  # written by another peer: a request that does not parse is dropped, with the reason
                q, url, first = parse_join_request(K.suffix_after(K.join_pattern, key), raw)
            except BadValue as exc:
                self.db.delete(key)
                self.events(r, "join_rejected", -1, str(exc))
                continue
            banned = q in self.membership and self.membership[q].banned
            if q == self.index or banned or not self.guard.may_join(q):
                self.db.delete(key)
                self.events(r, "join_rejected", q, "a join request in our own name" if q == self.index
                            else "excluded for good (equivocation)" if banned
                            else "not admitted by challenge-response")
                continue
            out.append((key, q, url, first))
        return out

    def serve_joins(self, r: int, scanned: tuple[int, list] | None = None) -> None:
        """Admit peers that asked to join; snapshot our state for those starting at round r + 1.
        ``scanned``: the reply of a first ``SCAN 0 MATCH join_pattern`` already made. Every request is
        admitted before the snapshot is made: its meta tells the joiners of round r + 1 about the members
        that join later (they must not wait for them in between, as we do not)."""
        requests = self.requests(r, scanned)
        for _, q, url, first in requests:
            mb = self.membership.members.get(q)
            if mb is None or mb.removed or mb.since < first:
                # a member we know keeps its route (the address we were given, or first learnt): a join
                # request cannot redirect our traffic for it
                self.membership.add(q, url if mb is None else mb.url, since=first)
                self.events(r, "admitted", q, f"joins at round {first}")
        if any(first == r + 1 for _, _, _, first in requests):
            self.snapshot(r + 1)
        for key, _, _, first in requests:
            if first <= r + 1:
                self.db.delete(key)

    def serve_waiting(self, r: int) -> int:
        """Serve joins while we wait for a quorum before round r: the group is not training, so we move
        to the earliest round a joiner asked for (the state is unchanged; the rounds in between are
        skipped, an event) and snapshot there. Returns the round we train next."""
        # the earliest round asked for: later joiners are served as the group trains on, and one that
        # asked for an earlier round than ours retries (its sources went past it). A request moves us
        # JOIN_AHEAD rounds at most: an honest joiner asks for JOIN_AHEAD rounds after the marks it read
        # (ours among them), and one member's request must not make us skip the rest of the training
        target = min((first for _, _, _, first in self.requests(r - 1) if r <= first <= r + JOIN_AHEAD),
                     default=r)
        if r < target < self.cfg.run.rounds:
            raw = self.db.get(self.keys.state)
            if raw is not None:
                K, digest = self.keys, raw.decode().partition("|")[2]
                pipe = self.db.pipeline(transaction=True)
                pipe.set(K.completed, target - 1)
                pipe.set(K.ready, target - 1)
                pipe.set(K.digest(target - 1), digest, px=ROUND_KEY_TTL_MS)
                pipe.set(K.state, f"{target - 1}|{digest}")
                pipe.execute()
                self.events(r, "skipped", self.index, f"rounds {r} to {target - 1}: the group re-forms at "
                            f"round {target}, as a joiner asked")
                r = target
                # before the joiners take our snapshot: they train round r as soon as they have it, and
                # an inbox still closed to round r would refuse their vectors
                self.guard.open_inbox(r, 0)
        self.serve_joins(r - 1)
        return r

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
        current = self.membership.current()
        meta = {"round": first - 1, "from": self.index, "members": {str(q): m.url for q, m in current.items()},
                "self_url": self.url}
        # capped where the joiner's parser stops: one member's request for a round far ahead must not
        # make every honest snapshot unreadable (the joiner then waits for it from the cap, in vain)
        later = {str(q): min(m.since, first + MAX_SINCE_AHEAD) for q, m in current.items() if m.since > first}
        if later:  # the joiner must not wait for them before we do
            meta["since"] = later
        if self.guard.signs or self.served_state is not None:
            # the state is read (atomically), maybe changed, signed, and written back with its signature
            params, momentum = self.db.pipeline(transaction=True).get(K.params).get(K.momentum).execute()
            if self.served_state is not None:
                params, momentum = self.served_state(params, momentum)
            pipe = self.db.pipeline(transaction=True)
            pipe.set(K.snapshot(first, "params"), params, px=ROUND_KEY_TTL_MS)
            if momentum is not None:
                pipe.set(K.snapshot(first, "momentum"), momentum, px=ROUND_KEY_TTL_MS)
            sig = self.guard.sign_snapshot(first - 1, params, momentum)
            if sig is not None:
                pipe.set(K.snapshot(first, "sig"), sig, px=ROUND_KEY_TTL_MS)
        else:  # nothing crosses the wire
            pipe = self.db.pipeline(transaction=True)
            pipe.execute_command("COPY", K.params, K.snapshot(first, "params"), "REPLACE")
            pipe.execute_command("COPY", K.momentum, K.snapshot(first, "momentum"), "REPLACE")
            for what in ("params", "momentum"):
                pipe.pexpire(K.snapshot(first, what), ROUND_KEY_TTL_MS)
        pipe.set(K.snapshot(first, "meta"), json.dumps(meta), px=ROUND_KEY_TTL_MS)  # last: it says "ready"
        pipe.execute()

    # -- catching up --------------------------------------------------------------------------------
    @property
    def f(self) -> int:
        """How many Byzantine members the group tolerates: the defense's ``f``, less the members proven to
        be Byzantine (banned for equivocating: among the others there are at most that many)."""
        proven = sum(m.banned for m in self.membership.members.values())
        return max(0, self.cfg.byzantine_bound - proven)

    def bad_value(self, r: int, q: int, exc: BadValue) -> None:
        """A value peer q wrote does not parse: it is dropped, and said once per sender and reason (the
        same bad mark would otherwise be logged every round)."""
        if (q, str(exc)) not in self._bad:
            self._bad.add((q, str(exc)))
            self.events(r, "bad_value", q, str(exc))

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
        deadline = time.monotonic() + self.cfg.membership.join_timeout_s
        delay, said = 0.25, set()
        self._requested = set()
        while True:
            try:
                return self._join_once(total, deadline)
            except JoinFailed as exc:
                # the members must not wait for us in the round we asked for any more
                self.membership.joining_at(self.db, -1)
                left = deadline - time.monotonic()
                if left <= delay:
                    raise RuntimeError(f"peer {self.index}: could not join within "
                                       f"{self.cfg.membership.join_timeout_s:g} s: {exc}") from None
                if str(exc) not in said:  # a failure is said once, however often it repeats
                    said.add(str(exc))
                    self.events(-1, "join_retry", self.index, f"{exc}; retrying")
                if exc.overtaken:  # pausing while the group trains on would only lose more rounds
                    time.sleep(0.05)  # (a round takes longer than that; asking in a busy loop gains none)
                else:
                    time.sleep(delay)
                    delay = min(2 * delay, 5.0)

    def _join_once(self, total: int, deadline: float) -> tuple[int, int]:
        """One attempt of :meth:`join`; raises :class:`JoinFailed` when it did not work out."""
        self.guard.admit(self.membership.members, wait_for=set())  # let in before we can ask anything
        live = self._live_marks()
        if not live and not self._finished:
            raise JoinFailed("no live peer to join")
        # they are done, or half the group or more is (and at least f + 1: f Byzantine members claiming
        # it cannot): the rest, us included, is no strict majority and completes no round any more, so
        # there is no round left to join at, and we take the state they ended the training with
        ended = len(self._finished) > self.f and 2 * len(self._finished) >= len(self.membership.members) + 1
        if not live or ended:
            return self._join_final(total, deadline, dict.fromkeys(self._finished, total - 1))
        # near the end we ask for the last round, also when they are in it already: a source that passes
        # it without serving us (our request came too late) makes us retry, and once it finished we take
        # the final state. Taking the final state at once would wait for ever on sources that wait for a
        # quorum in the last round (which needs us): a waiting source serves a join for its round.
        first = min(self.attested_round(live) + JOIN_AHEAD, total - 1)
        # members sitting out for a state transfer of their own are asked too (they admit us when they
        # are back), but they hand over nothing
        self.guard.open_inbox(first, 0)  # before they can push our first round
        self.membership.joining_at(self.db, first)  # before they can reach it: they wait for us in it
        asked = self._ask({**live, **dict.fromkeys(self._joining, -1)}, first)
        live = {q: mark for q, mark in live.items() if q in asked}
        if (first, tuple(sorted(asked))) not in self._requested:  # a request repeated while overtaken is said once
            self._requested.add((first, tuple(sorted(asked))))
            self.events(first, "join_request", self.index, f"asked peers {sorted(asked)} to admit us from round {first}")
        return self._take(live, first, deadline)

    def _join_final(self, total: int, deadline: float, sources: dict[int, int]) -> tuple[int, int]:
        """Join with the state the sources end the training with (each leaves a snapshot of it when it
        finishes): a peer that must resynchronise in the last rounds ends with the group's model."""
        self.events(total, "join_final", self.index, f"the training ends at round {total - 1}: taking the "
                    f"final state of peers {sorted(sources)}")
        return self._take(sources, total, deadline)

    def _take(self, live: dict[int, int], first: int, deadline: float) -> tuple[int, int]:
        """Collect the sources' snapshots for round ``first`` and install the state enough of them agree
        on, with the membership they agree on."""
        states, overtaken = self._collect(live, first, deadline)
        chosen = self.agreeing(states, self.sources_needed(len(live)))
        if chosen is None:
            raise JoinFailed(f"state transfer for round {first}: {len(states)} snapshot(s) from "
                             f"{sorted(live)}, fewer than {self.sources_needed(len(live))} agree"
                             + (f"; peers {sorted(overtaken)} went past it" if overtaken else ""),
                             overtaken=bool(overtaken) and not states)
        sources, (params, momentum) = chosen
        if len(overtaken) >= len(sources):
            # as many sources trained round `first` without us as serve it: only the ones serving it
            # would aggregate our vector there, and they would end the round on a state the others do
            # not have. We ask again for a later round; the sources that served this one exclude us
            # from it (our `joining` key no longer names it), as the others did.
            raise JoinFailed(f"state transfer for round {first}: peers {sorted(overtaken)} went past it, "
                             f"only {sources} serve it", overtaken=True)
        self._install(params, momentum, first)
        metas = {q: states[q][2] for q in sources}
        self.membership.adopt(self.agreed_members(metas), first, self.agreed_since(metas))
        self.events(first, "joined", self.index, f"state of round {first - 1} from peers {sources}")
        return first, len(params)

    def sources_needed(self, live: int) -> int:
        """How many sources must hand over the same state: f + 1; all of them when fewer are live."""
        return min(self.f + 1, live)

    def attested_round(self, live: dict[int, int]) -> int:
        """The latest round that at least f + 1 of the live peers announced (all of them when fewer):
        f peers announcing a later round cannot move a joiner's first round."""
        marks = sorted(live.values(), reverse=True)
        return marks[min(self.f, len(marks) - 1)]

    def _live_marks(self) -> dict[int, int]:
        """The members that are alive and not done, with the last round they announced (-1: none); a
        member whose mark does not parse is not asked."""
        live = {}
        self._finished, self._joining = set(), set()
        for q, m in self.membership.members.items():
            if m.banned:
                continue
            K = Keys(q)
            try:
                pipe = m.probe.pipeline(transaction=False)
                pipe.get(K.ready)
                pipe.exists(K.alive)
                pipe.exists(K.done)
                pipe.exists(K.joining)
                v, alive, done, joining = pipe.execute()
            except redis.RedisError:
                continue
            if done:
                self._finished.add(q)
            elif joining and not alive:
                self._joining.add(q)
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

    def _collect(self, live: dict[int, int], first: int,
                 deadline: float) -> tuple[dict[int, tuple[bytes, bytes | None, SnapshotMeta]], set[int]]:
        """The snapshots for round ``first`` (and the sources that went past it without serving us),
        until enough agree, all arrived, or this attempt times out (the sources serve them within a few
        rounds: at most JOIN_AHEAD + 1 barrier deadlines). A snapshot whose meta does not parse is
        dropped (and its source not asked again)."""
        need = self.sources_needed(len(live))
        attempt_s = (JOIN_AHEAD + 1) * self.cfg.barrier.timeout_s + 5
        deadline = min(deadline, time.monotonic() + attempt_s)
        states: dict[int, tuple[bytes, bytes | None, SnapshotMeta]] = {}
        bad: set[int] = set()
        passed: set[int] = set()  # sources that went past round `first` without serving us
        max_peers = max(self.cfg.max_group, self.index + 1, *(q + 1 for q in self.membership))
        while time.monotonic() < deadline and live:
            for q in live:
                if q in states or q in bad:
                    continue
                K = Keys(q)
                try:
                    pipe = self.membership[q].client.pipeline(transaction=True)
                    for what in ("params", "momentum", "meta", "sig"):
                        pipe.get(K.snapshot(first, what))
                    pipe.get(K.ready)
                    p, mom, meta, sig, mark = pipe.execute()
                except redis.RedisError:
                    continue
                if p is None or meta is None:
                    try:  # it published round `first` without a snapshot for us: it missed our request
                        published = parse_mark(mark, self.cfg.run.rounds)
                        if published is not None and published >= first:
                            passed.add(q)
                    except BadValue as exc:
                        self.bad_value(first, q, exc)
                    continue
                try:
                    parsed = parse_snapshot_meta(meta, source=q, round=first - 1, max_peers=max_peers)
                    if not self.guard.snapshot_signed(q, first - 1, p, mom, sig):
                        raise BadValue(f"snapshot for round {first} is not signed by peer {q}")
                    states[q] = (p, mom, parsed)
                except BadValue as exc:
                    bad.add(q)
                    self.bad_value(first, q, exc)
            # enough agree and they are most of the sources (or every source answered): the first
            # snapshots to arrive do not decide alone when more sources are coming
            chosen = self.agreeing(states, need)
            if (chosen is not None and 2 * len(chosen[0]) > len(live)) or len(states) + len(bad | passed) == len(live):
                break
            self.guard.serve(self.membership.members)
            time.sleep(0.05)
        return states, passed

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
        queue_digest(pipe, K, first - 1, get_backend(self.cfg.aggregation.backend))  # as after a round
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

    @staticmethod
    def agreed_since(metas: dict[int, SnapshotMeta]) -> dict[int, int]:
        """The members the agreeing sources admitted for a round after our first: the round a strict
        majority of them give (one source cannot make us skip a member's vectors that others await)."""
        votes: dict[int, Counter] = {}
        for meta in metas.values():
            for q, r in meta.since.items():
                votes.setdefault(q, Counter())[r] += 1
        return {q: r for q, c in votes.items() for r, k in c.most_common(1) if 2 * k > len(metas)}

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
