"""Moving the peers' vectors: push into the others' inboxes, and the barrier over our own inbox.

Pushing (rather than each peer fetching from all others after the barrier) puts the inputs of the
aggregation in place while the slower peers still compute, keeps the barrier a local check, and lets a
Byzantine peer show different vectors to different peers, as the threat model allows.

Everything read from the inbox was written by another peer: the barrier only takes presence and byte
sizes from it; the aggregate phase checks sizes (and the guard screens contents) before anything is used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import redis

from .guard import Guard
from .keys import Keys
from .membership import Membership
from .servers import pipelines_at_once

log = logging.getLogger("spirt.exchange")

#: safety net: round keys expire even if a peer dies before its cleanup
ROUND_KEY_TTL_MS = 10 * 60 * 1000
#: announcements kept per sender in a wake-up list (they only wake the barrier; the inbox is the truth)
NOTIFY_KEEP = 1000


class Behind(RuntimeError):
    """Most peers finished this round without our inbox receiving their vectors: we fell behind."""


class Exchange:
    """Peer ``index``'s side of the exchange: its pushes and its inbox."""

    def __init__(self, index: int, db: redis.Redis, membership: Membership, guard: Guard, *,
                 barrier_timeout_s: float, heartbeat_s: float):
        self.index, self.db, self.membership, self.guard = index, db, membership, guard
        self.keys = Keys(index)
        self.barrier_timeout_s, self.heartbeat_s = barrier_timeout_s, heartbeat_s
        #: this round's inbox: byte size of each peer's vector, as found with it
        self.sizes: dict[int, int] = {}
        #: when this round's push began: the barrier's deadline counts from it
        self.pushed_at: float | None = None

    def begin_round(self) -> None:
        self.sizes = {}
        self.pushed_at = None

    def wake_keys(self) -> list[str]:
        """The lists the other peers announce their vectors on (a pop on them wakes our barrier)."""
        return [self.keys.notify(q) for q in sorted(self.membership)] or [self.keys.notify(self.index)]

    def push(self, r: int, outgoing: Mapping[int, bytes], envelopes: Mapping[int, bytes] | None = None) -> None:
        """Write our round-r vector into each peer's inbox and wake its barrier, all peers at once (one
        round trip in all). Removed peers get it too: a peer coming back can then rejoin without
        waiting. An unreachable peer cannot wait for us anyway: it misses this round. A peer whose
        database did not answer a push within the barrier deadline (it hangs) is not pushed to again
        until it answers a liveness probe (:meth:`Membership.alive`). A push whose connection broke is
        retried once."""
        self.pushed_at = time.monotonic()
        jobs = {}
        for q, data in outgoing.items():
            if self.membership[q].banned or (self.membership[q].stalled and not self.membership.answers(q)):
                continue
            jobs[q] = (self.membership[q].client, self._push_commands(Keys(q), r, data,
                                                                     None if envelopes is None else envelopes[q]))
        replies = pipelines_at_once(jobs)
        # a connection that broke (a server restarted, a link that came back closing what it had
        # swallowed) is retried once on a fresh one: the vector would be lost for the round otherwise
        broken = {q: jobs[q] for q, reply in replies.items() if isinstance(reply, redis.ConnectionError)}
        if broken:
            replies.update(pipelines_at_once(broken))
        for q, reply in replies.items():
            if isinstance(reply, redis.TimeoutError):
                self.membership[q].stalled = True
            refused = [x for x in (reply if isinstance(reply, list) else [reply]) if isinstance(x, redis.ResponseError)]
            if refused:  # its inbox is not open to the round (it is behind, or re-forming): it misses our vector
                log.warning("peer %s: round %s: peer %s refused our vector: %s", self.index, r, q, refused[0])

    def _push_commands(self, K: Keys, r: int, data: bytes, envelope: bytes | None) -> list[tuple]:
        """Our round-r vector into the inbox whose keys are ``K``: through TENSOR.PUSH where inboxes are
        guarded (it checks the round and sizes, bounds what we keep there, announces the round), else
        as plain writes."""
        if self.guard.inbox_guarded:
            return [("TENSOR.PUSH", K.inbox(self.index), K.notify(self.index), r, data,
                     *(() if envelope is None else (envelope,)))]
        cmds = []
        if envelope is not None:  # before the vector: the barrier only looks for the vector
            cmds.append(("SET", K.envelope(self.index, r), envelope, "PX", ROUND_KEY_TTL_MS))
        return [*cmds, ("SET", K.incoming(self.index, r), data, "PX", ROUND_KEY_TTL_MS),
                ("RPUSH", K.notify(self.index), r), ("LTRIM", K.notify(self.index), -NOTIFY_KEEP, -1)]

    def _drop_broken_wake_keys(self, wake: list[str]) -> None:
        """A wake-up list that is not a list (its sender wrote a string there, say) would fail every
        blocking pop on all of them: it goes, and its sender is only woken for by the polling."""
        for key in wake:
            kind = self.db.type(key)
            if kind not in (b"list", b"none", "list", "none"):
                log.warning("peer %s: wake-up key %s held a %s, not a list: deleted", self.index, key, kind)
                self.db.delete(key)

    def inbox(self, r: int, peers: list[int]) -> dict[int, int]:
        """Which of ``peers``' round-r vectors are in our inbox, with their byte sizes (one round trip,
        none for no peers); the sizes are kept for this round's aggregate phase."""
        if not peers:
            return {}
        pipe = self.db.pipeline(transaction=False)
        for q in peers:
            pipe.exists(self.keys.incoming(q, r))
            pipe.strlen(self.keys.incoming(q, r))
        out = pipe.execute()
        found = {q: int(n) for q, e, n in zip(peers, out[::2], out[1::2], strict=True) if e}
        self.sizes.update(found)
        return found

    def barrier(self, r: int, peers: list[int], width: int) -> tuple[list[int], dict[int, tuple[str, float]]]:
        """Wait until the given peers' round-r vectors are in our inbox, a peer is found dead, or the
        deadline (counted from our push of the round) passed. Returns (ready, {missing peer: (reason, wall time found missing)}).

        Everything is local: the others push into our database. Their announcements (a list in our
        database) only wake us up; a blocking pop costs no CPU, unlike polling on a 2-core machine.
        Liveness of the peers still awaited is checked every quarter heartbeat interval (at once for
        peers that already missed a barrier): a heartbeat lives 1.5 intervals after its last refresh, so
        a crashed peer ends the wait within 1.75 intervals instead of at the deadline.

        A peer that already published a later round but whose round-r vector is not here may not send it
        (it was lost, e.g. while our database restarted). If most awaited peers are in that state, we are
        the one behind: :class:`Behind` is raised and the peer resynchronises. One such peer alone is
        still waited for until the deadline: its round mark is a value it controls, and excluding it on
        that mark at some peers and not at others (its vector arriving in between) would make honest
        peers aggregate different vectors.
        """
        # the deadline counts from our push: a push that hung on a peer's database used up part of it
        start = time.monotonic() if self.pushed_at is None else self.pushed_at
        deadline = start + self.barrier_timeout_s
        check_every = self.heartbeat_s / 4
        now = time.monotonic()
        next_check = now if self.membership.suspect(peers) else now + check_every
        waiting = sorted(peers)
        ready: list[int] = []
        dead: dict[int, tuple[str, float]] = {}
        ahead: set[int] = set()
        # announcements only wake us up (old ones were dropped when we announced the round): the keys
        # below are the truth
        wake = self.wake_keys()
        while waiting:
            found = self.inbox(r, waiting)
            ready += [q for q in waiting if q in found]
            waiting = [q for q in waiting if q not in found]
            now = time.monotonic()
            if waiting and now >= next_check:
                next_check = now + check_every
                passed = []
                for q in list(waiting):
                    alive, why, published = self.membership.alive(q)
                    if not alive and self.membership.awaits_joiner(q, r):
                        continue  # it asked to join at this round and is taking its state: awaited
                    if not alive:
                        dead[q] = (why, time.time())
                        waiting.remove(q)
                    elif published is not None and published > r:
                        passed.append(q)
                if passed:  # re-check: the vector may have landed just before the mark moved on
                    late = self.inbox(r, passed)
                    for q in late:
                        waiting.remove(q)
                        ready.append(q)
                    ahead = {q for q in passed if q not in late}
                    if len(ahead) * 2 > len(peers):
                        raise Behind(f"round {r}: peers {sorted(ahead)} of {sorted(peers)} finished it without "
                                     "our inbox receiving their vectors")
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                break
            self.guard.during_barrier(self.membership.members, r, ready, width)
            try:
                self.db.blpop(wake, timeout=min(left, 0.05))
            except redis.ResponseError:  # a member turned its wake-up list into something else
                self._drop_broken_wake_keys(wake)
        t_deadline = time.time()
        missing = {**dead, **{q: (f"missed the {self.barrier_timeout_s:g} s deadline", t_deadline)
                              for q in waiting}}
        return sorted(ready), missing

    def read(self, r: int, peers: list[int], width: int) -> dict[int, bytes]:
        """The round-r vectors of ``peers`` that are in our inbox with ``width`` bytes."""
        raw = self.db.mget([self.keys.incoming(q, r) for q in peers]) if peers else []
        return {q: b for q, b in zip(peers, raw, strict=True) if b is not None and len(b) == width}

    def round_keys(self, r: int) -> list[str]:
        """Our inbox slots of round r (deleted with the round's other keys)."""
        return [self.keys.incoming(q, r) for q in self.membership]

