"""Who a peer trains with: members, heartbeats, liveness, misses, exclusion, removal and readmission.

- Heartbeat: a thread keeps ``alive`` in the peer's own database with a time to live of 1.5 intervals,
  refreshed every half interval. While the peer sits out (state transfer) it deletes the key and keeps
  ``joining`` instead: the others stop waiting for it at once, but do not remove it (see below). Its
  value is the round the peer asked to join at; in that round the others wait for it until their
  deadline like for any member, since it is taking the state they made for it: excluding it at once at
  some members and not at others (its vector arriving in between) would make them aggregate different
  sets, and the joiner would find itself behind or diverged at its first round and start over. When it
  has its state it switches back to ``alive`` at once, not at the next beat.
- Liveness of another peer: its heartbeat key and its database answering, read from its database.
- Accounting after each barrier: a member whose vector arrived has its misses reset; one that was
  missing is excluded from the round (an ``excluded`` event with the reason) and removed from the
  membership after ``membership.max_misses`` misses in a row (``removed``). A member that sits out
  for a state transfer is excluded but misses nothing: it comes back with the group's state at the
  round it asked for, and a peer its request did not reach (one resynchronising itself at the time)
  must not have removed it meanwhile, or the two would aggregate different sets from then on.
- Readmission: only by state transfer. A removed member's state has diverged from ours, so its
  vectors are never aggregated again; it comes back by asking to join (:mod:`spirt.transfer`), which
  adds it afresh.

This is this peer's own view; the peers compare their states before each round
(:mod:`spirt.agreement`), and a peer whose view left it out of the group's state resynchronises.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from .config import MembershipSection
from .events import EventLog
from .keys import Keys
from .servers import make_client
from .wire import BadValue, parse_joining, parse_mark


@dataclass
class Member:
    """This peer's view of another peer."""

    index: int
    url: str
    client: redis.Redis  # vectors and snapshots: calls bounded by the barrier deadline
    probe: redis.Redis  # liveness and round marks: calls bounded by the heartbeat interval
    since: int = 0  # first round in which we wait for it
    misses: int = 0
    removed: bool = False
    #: its database stopped answering a push in time: not pushed to until it answers a probe again, so a
    #: hung database costs one barrier deadline, not one per round
    stalled: bool = False
    next_probe: float = 0.0  # monotonic time a stalled member may be probed again
    #: proven to have shown different vectors to different peers: removed for good (no rejoining)
    banned: bool = False
    #: sitting out for a state transfer (its ``joining`` key, at the last liveness check)
    joining: bool = False
    #: the round it asked to join at while sitting out (its ``joining`` value; -1: not asked yet)
    joins_at: int | None = None

    def close(self) -> None:
        self.client.close()
        self.probe.close()


class Membership:
    """The members of peer ``index`` and its heartbeat.

    ``connect(q, url, timeout_s)`` opens a client of member q's database whose calls give up after
    ``timeout_s`` (with whatever credentials the peer's guard gives); ``own`` opens one of our own
    database (the heartbeat thread's). Each member gets two: one for its vectors and snapshots, bounded
    by the barrier deadline, and one for probing its liveness and round mark, bounded by the heartbeat
    interval, so that a member whose database hangs delays us by at most one of them."""

    def __init__(self, index: int, cfg: MembershipSection, events: EventLog,
                 connect: Callable[[int, str, float], redis.Redis], own: Callable[..., redis.Redis], *,
                 data_timeout_s: float = 30.0, rounds: int | None = None):
        self.index, self.cfg, self.events = index, cfg, events
        self.data_timeout_s = data_timeout_s
        #: the training's rounds: a member's round mark beyond them is implausible (None: unbounded)
        self.rounds = rounds
        self._bad_marks: dict[int, str] = {}  # the last bad mark said of each member
        self._connect, self._own = connect, own
        self.members: dict[int, Member] = {}
        self.keys = Keys(index)
        self._stop = threading.Event()
        self._paused = threading.Event()
        #: held while the heartbeat decides which key to keep and writes it, and while sit_out switches:
        #: a beat that decided "alive" just before sit_out must not write it back after sit_out's switch
        self._switch = threading.Lock()
        self._thread: threading.Thread | None = None
        self._joins_at = -1  # the round we asked to join at, while we sit out (-1: not asked yet)

    # -- the member table ---------------------------------------------------------------------------
    def add(self, q: int, url: str, since: int = 0) -> Member:
        """Add (or replace) member q at ``url``, awaited from round ``since`` on."""
        old = self.members.get(q)
        if old is not None:
            old.close()
        self.members[q] = Member(q, url, self._connect(q, url, self.data_timeout_s),
                                 self._connect(q, url, self.probe_timeout_s), since=since)
        return self.members[q]

    @property
    def probe_timeout_s(self) -> float:
        """How long a liveness probe may take: one heartbeat interval (at least 0.25 s), so that a hung
        database is found within the two intervals a dead peer is."""
        return max(0.25, self.cfg.heartbeat_s)

    def __contains__(self, q: object) -> bool:
        return q in self.members

    def __getitem__(self, q: int) -> Member:
        return self.members[q]

    def __iter__(self):
        return iter(self.members)

    @property
    def clients(self) -> dict[int, redis.Redis]:
        return {q: m.client for q, m in self.members.items()}

    def current(self) -> dict[int, Member]:
        """The members not removed."""
        return {q: m for q, m in self.members.items() if not m.removed}

    def awaited(self, r: int) -> list[int]:
        """The members whose round-r vectors the barrier waits for."""
        return [q for q, m in self.members.items() if not m.removed and m.since <= r]

    def size(self) -> int:
        """Members counted in a round's metrics: ourselves and the members not removed."""
        return 1 + sum(not m.removed for m in self.members.values())

    def adopt(self, current: dict[int, str], first: int, since: dict[int, int] | None = None) -> None:
        """Take over a group's membership (after a state transfer): members not known yet are added;
        every member is awaited from round ``first``, or from the later round in ``since`` it was
        admitted for; those not in ``current`` are marked removed; misses restart."""
        since = since or {}
        for q, url in current.items():
            if q != self.index and q not in self.members:
                # a peer the group admitted while we were away: our group grows, which is an event too
                self.add(q, url, since=first)
                self.events(first, "admitted", q, "by the membership of the state we took over; awaited from "
                            f"round {max(first, since.get(q, first))}")
        for q, m in self.members.items():
            if q in current:
                m.since = max(first, since[q]) if q in since else min(m.since, first)
            removed = q not in current or m.banned
            if removed != m.removed:  # a change of membership is an event, whatever its cause
                # a readmitted member may be a joiner the group awaits only from a later round
                self.events(first, "removed" if removed else "readmitted", q,
                            "by the membership of the state we took over"
                            + ("" if removed else f"; awaited from round {max(first, m.since)}"))
            m.removed, m.misses = removed, 0

    # -- liveness -----------------------------------------------------------------------------------
    def alive(self, q: int) -> tuple[bool, str, int | None]:
        """(alive, why not, last round it published) of member q, from its own database."""
        m = self.members[q]
        K = Keys(q)
        try:
            pipe = m.probe.pipeline(transaction=False)
            pipe.exists(K.alive)
            pipe.get(K.ready)
            pipe.get(K.joining)
            alive, ready, joining = pipe.execute()
        except redis.RedisError as exc:
            return False, f"database unreachable ({type(exc).__name__})", None
        m.stalled = False
        m.joining = joining is not None and not alive
        rounds = self.rounds if self.rounds is not None else 2**62
        # written by the member: a value that does not parse is dropped and said, once per reason
        published = self._parsed(q, parse_mark, ready, rounds)
        m.joins_at = self._parsed(q, parse_joining, joining, rounds) if m.joining else None
        if alive:
            return True, "", published
        return False, "sitting out for a state transfer" if m.joining else "heartbeat expired", published

    def _parsed(self, q: int, parse: Callable[[object, int], int | None], raw: object, rounds: int) -> int | None:
        try:
            return parse(raw, rounds)
        except BadValue as exc:
            if self._bad_marks.get(q) != str(exc):
                self._bad_marks[q] = str(exc)
                self.events(-1, "bad_value", q, str(exc))
            return None

    def awaits_joiner(self, q: int, r: int) -> bool:
        """Whether member q, sitting out at our last liveness check, asked to join at round r: it is
        taking the state made for it, and is waited for until the deadline."""
        m = self.members[q]
        return m.joining and m.joins_at == r

    def answers(self, q: int) -> bool:
        """Whether member q's database answers a probe now (clears its ``stalled`` mark if so); a
        stalled member is probed at most once per two heartbeat intervals (a probe of a hung database
        takes one)."""
        m = self.members[q]
        now = time.monotonic()
        if now < m.next_probe:
            return False
        m.next_probe = now + 2 * self.cfg.heartbeat_s
        try:
            m.probe.ping()
        except redis.RedisError:
            return False
        m.stalled = False
        return True

    def suspect(self, peers: list[int]) -> bool:
        """Whether any of ``peers`` missed a barrier lately (the barrier checks those at once)."""
        return any(self.members[q].misses or self.members[q].joining for q in peers)

    # -- accounting after a barrier -----------------------------------------------------------------
    def account(self, r: int, ready: list[int], missing: dict[int, tuple[str, float]]) -> list[str]:
        """Reset the misses of the ``ready`` members; exclude the ``missing`` ones from round r (peer ->
        (reason, wall time found missing)) and remove those that missed too often. Returns the exclusion
        notes of the round."""
        for q in ready:
            self.members[q].misses = 0
            self.members[q].joining = False
        notes = []
        for q, (why, t_found) in missing.items():
            m = self.members[q]
            notes.append(f"{q}({why})")
            self.events(r, "excluded", q, why, t=t_found)
            if m.joining:  # it comes back with the group's state: excluded, not counted towards removal
                continue
            m.misses += 1
            if m.misses >= self.cfg.max_misses and not m.removed:
                m.removed = True
                self.events(r, "removed", q, f"{m.misses} missed barriers")
        return notes

    def ban(self, r: int, q: int, proof: str) -> None:
        """Member q equivocated (``proof``): removed for good, never awaited, pushed to or admitted again."""
        m = self.members[q]
        if not m.banned:
            m.banned = m.removed = True
            self.events(r, "equivocation", q, f"excluded for good: {proof}")

    def banned(self) -> set[int]:
        return {q for q, m in self.members.items() if m.banned}

    # -- heartbeat ----------------------------------------------------------------------------------
    def start_heartbeat(self, db: redis.Redis | None = None) -> None:
        """Advertise liveness (again); with ``db``, our database, the switch from ``joining`` back to
        ``alive`` is made at once: the members waiting for our first round after a state transfer must
        not find us still sitting out."""
        with self._switch:
            self._paused.clear()
            if db is not None:
                try:
                    db.pipeline(transaction=True).delete(self.keys.joining).set(
                        self.keys.alive, self.index, px=self._ttl_ms).execute()
                except redis.RedisError:
                    pass  # our database is down; the orchestrator notices on its own
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.index}", daemon=True)
            self._thread.start()

    def sit_out(self, db: redis.Redis) -> None:
        """Stop advertising liveness (state transfer): the others stop waiting for us at once; our
        ``joining`` key (kept by the heartbeat thread, so it expires if we die) tells them why."""
        with self._switch:
            self._paused.set()
            self._joins_at = -1
            try:
                db.pipeline(transaction=True).delete(self.keys.alive).set(
                    self.keys.joining, self._joins_at, px=self._ttl_ms).execute()
            except redis.RedisError:
                pass

    def joining_at(self, db: redis.Redis, first: int) -> None:
        """While sitting out: we ask to join at round ``first`` (before the request is written, so that
        the members reaching that round find it and wait for us)."""
        with self._switch:
            self._joins_at = first
            if self._paused.is_set():
                try:
                    db.set(self.keys.joining, first, px=self._ttl_ms)
                except redis.RedisError:
                    pass

    @property
    def _ttl_ms(self) -> int:
        """The heartbeat's (and ``joining``'s) time to live: 1.5 intervals."""
        return max(1, int(self.cfg.heartbeat_s * 1500))

    def _beat(self) -> None:
        hb = self.cfg.heartbeat_s
        client = self._own(socket_timeout=max(1.0, hb), connect_timeout=max(0.5, hb / 2))
        ttl_ms = self._ttl_ms
        K = self.keys
        while not self._stop.is_set():
            with self._switch:  # one of the two keys at a time, switched in one transaction
                live, gone = (K.joining, K.alive) if self._paused.is_set() else (K.alive, K.joining)
                try:
                    value = self._joins_at if self._paused.is_set() else self.index
                    client.pipeline(transaction=True).delete(gone).set(live, value, px=ttl_ms).execute()
                except redis.RedisError:
                    pass  # our database is down; the orchestrator notices on its own
            self._stop.wait(hb / 2)
        try:
            client.delete(K.alive, K.joining)
        except redis.RedisError:
            pass
        client.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for m in self.members.values():
            m.close()


def member_client(url: str, credentials: dict, timeout_s: float) -> redis.Redis:
    """A client of another member's database whose calls give up after ``timeout_s`` (connecting after
    at most 2 s), so an unreachable or hung member is noticed."""
    return make_client(url=url, socket_timeout=timeout_s, connect_timeout=min(2.0, timeout_s), **credentials)
