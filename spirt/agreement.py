"""Agreement on the group's state: attested rounds, quorum, and which side resynchronises.

Every completed round leaves, in the update's own transaction, a digest of the parameters after it
(``digest:r``, computed inside the database: ``TENSOR.DIGEST`` with the tensor module, else SHA-1 in
Lua) and ``state`` = ``r|digest``. Peers that aggregated the
same vectors in the same order hold bit-identical parameters, so equal digests mean equal models.

Before each round (and once more after the last: :meth:`Agreement.close`) every peer probes all the members it knows, removed ones included (liveness, round
mark, the digest of the last round, the latest state; one pipeline each, bounded by the heartbeat
interval) and decides, from what it read alone, one of three verdicts (:func:`decide`):

- **resync** (state transfer, :mod:`spirt.transfer`):
  - *lagging*: a strict majority of the other current members (or of all the others), and at least
    f + 1 of them, already published a later round, or finished the training (``done``) while we are
    before one of its rounds;
  - *diverged*: the digest of the last round that the most reachable peers hold (at least f + 1 of
    them; ties go to the group with the lowest peer index) is not ours, and it stays ahead even if
    every peer still finishing that round ends with ours (after the last round, only those that finish
    within the closing wait);
  - *rejoin*: we lost our quorum, a majority of the group is reachable again, and another state wins
    the same comparison over the peers' latest states (e.g. the other half after a 2|2 split healed).
- **wait**: we and the current members we reach are not a strict majority of the group (every member
  we know, removed ones included, and us). We train no round (no peer trains alone in a minority), keep
  our heartbeat, serve joins, and probe again. The same holds within a round: when the vectors that
  reached our barrier (ours included) are no strict majority of the group, the round's update is not
  applied (:class:`NoQuorum`) and we wait.
- **train** otherwise. When the last round's models differ and none is held by f + 1 peers (an
  equivocation without signed updates to prove it), nothing can be trusted over our own: we train on,
  and log a ``split`` event.

f is the number of Byzantine members the group tolerates (the defense's ``f``), less the members proven
to have equivocated (banned: they are Byzantine, so the others hold at most the rest). f members that agree
among themselves are never f + 1, so they can neither win a comparison nor make an honest peer lag; a
digest they copy from an honest group only lets that honest state win. Every value read here is
parsed by :mod:`spirt.wire`; a bad one is the sender's fault (dropped, said once) and counts as no
answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from .exchange import ROUND_KEY_TTL_MS
from .guard import Guard
from .keys import Keys
from .membership import Membership
from .servers import pipelines_at_once
from .wire import BadValue, parse_digest, parse_mark, parse_member_set, parse_state

#: digest of the parameters after round ARGV[1] (the backend's expression), stored as digest:r (with a
#: time to live) and as the latest state; inside the database, so the parameters never leave it
DIGEST_LUA = """
local h = {digest}
redis.call('SET', KEYS[2], h, 'PX', ARGV[2])
redis.call('SET', KEYS[3], ARGV[1] .. '|' .. h)
return h
"""


def queue_digest(pipe, keys: Keys, r: int, backend, digest: str | None = None) -> None:
    """Queue the digest of our parameters as the state after round r on a transaction (after the update
    command, or after installing a state): ``digest`` where the update computed it on the client (see
    :meth:`Backend.queue_update`), else computed inside the database."""
    if digest is not None:
        pipe.set(keys.digest(r), digest, px=ROUND_KEY_TTL_MS)
        pipe.set(keys.state, f"{r}|{digest}")
        return
    pipe.eval(DIGEST_LUA.format(digest=backend.digest_lua), 3, keys.params, keys.digest(r), keys.state, r,
              ROUND_KEY_TTL_MS)


#: bytes of one signed envelope in a heard record (spirt.security.signing.ENVELOPE_BYTES, which needs
#: the cryptography package; the layout is fixed)
ENVELOPE_BYTES = 112


class NoQuorum(RuntimeError):
    """Too few vectors reached the barrier for a round's update: we are in a minority."""


def quorate(arrived: int, group: int) -> bool:
    """Whether ``arrived`` peers (us included) are a strict majority of a ``group`` of peers."""
    return 2 * arrived > group


@dataclass(frozen=True)
class Probe:
    """What member q's database said before our round r (``answered`` False: it did not)."""

    answered: bool = False
    alive: bool = False
    done: bool = False
    mark: int | None = None  # the last round it published
    digest: str | None = None  # of its parameters after round r - 1
    state: tuple[int, str] | None = None  # its last completed round and its digest
    aggregated: str | None = None  # the peers it aggregated in round r - 1 (to explain a divergence)
    #: its records of the vectors it accepted in rounds r - 1 and r - 2 (parsed by the guard)
    heard: tuple[bytes | None, bytes | None] = (None, None)

    @property
    def reachable(self) -> bool:
        """Counts towards a quorum: it answered and runs (or finished the training)."""
        return self.answered and (self.alive or self.done)


@dataclass(frozen=True)
class Verdict:
    kind: str  # "train", "resync" or "wait"
    why: str = ""

    @property
    def train(self) -> bool:
        return self.kind == "train"


TRAIN = Verdict("train")


def winner(holders: dict[object, list[int]], need: int, rank=None) -> object | None:
    """The value the most peers hold, among those that at least ``need`` hold; ties go to ``rank`` (higher
    first, when given), then to the value whose lowest holder index is lowest. None if none qualifies."""
    eligible = [(v, sorted(qs)) for v, qs in holders.items() if len(qs) >= need]
    if not eligible:
        return None
    return min(eligible, key=lambda e: (-len(e[1]), -(rank(e[0]) if rank else 0), e[1][0]))[0]


def _group(values: dict[int, object]) -> dict[object, list[int]]:
    out: dict[object, list[int]] = {}
    for q, v in sorted(values.items()):
        out.setdefault(v, []).append(q)
    return out


def decide(me: int, r: int, probes: dict[int, Probe], removed: set[int], f: int, *,
           my_digest: str | None, my_state: tuple[int, str] | None, check_state: bool = True,
           rounds: int | None = None, settled: bool = False) -> Verdict:
    """The verdict of peer ``me`` before round r from one probe of each member (see the module's text).
    ``removed``: the members we removed; ``my_digest``: ours after round r - 1; ``check_state``: False
    for a peer that does not mind diverging (a simulated attacker); ``rounds``: the training's rounds;
    ``settled``: the peers still finishing round r - 1 had their time (the closing comparison, after its
    wait), so they no longer hold a divergence undecided."""
    others = set(probes)
    current = others - removed
    n_group = len(others) + 1
    need = f + 1
    answered = {q: p for q, p in probes.items() if p.answered}
    # a member that finished the training is past every round of it: before the last round its mark is
    # no later than ours, and waiting for its vectors (it sends none any more) would wait for ever
    finished = rounds is not None and r < rounds
    ahead_all = [q for q, p in answered.items()
                 if (p.mark is not None and p.mark >= r + 1) or (finished and p.done)]
    ahead = [q for q in ahead_all if q in current]
    if len(ahead) >= need and (2 * len(ahead) > len(current) or 2 * len(ahead_all) > len(others)):
        who = ahead if 2 * len(ahead) > len(current) else ahead_all
        return Verdict("resync", f"lagging: peers {sorted(who)} of {sorted(current)} published a round after {r} "
                                 "or finished the training")
    reach = {q for q, p in answered.items() if p.reachable}
    with_us = 1 + len(reach & current)
    if not quorate(with_us, n_group):
        if quorate(1 + len(reach), n_group) and check_state:
            states = {q: answered[q].state for q in reach if answered[q].state is not None}
            if my_state is not None:
                states[me] = my_state
            best = winner(_group(states), need, rank=lambda s: s[0])
            if best is not None and best != my_state:
                holders = _group(states)[best]
                return Verdict("resync", f"rejoin: peers {holders} hold the state of round {best[0]}, "
                                         f"the most of the {1 + len(reach)} reachable members")
        return Verdict("wait", f"no quorum: {with_us} of {n_group} members with us "
                               f"(reachable: {sorted(reach | {me})})")
    if check_state and my_digest is not None:
        # removed members count too: after a partition healed, the side that removed the other compares
        # states with it, and the side with fewer holders resynchronises
        digests = {q: answered[q].digest for q in reach if answered[q].digest is not None}
        digests[me] = my_digest
        groups = _group(digests)
        best = winner(groups, need)
        # peers still finishing round r - 1 (they published it, its digest is not there yet) may side
        # with us: we resynchronise only if the other state wins whatever they end with, so that the
        # first peers to finish a round never decide alone
        pending = 0 if settled else sum(answered[q].digest is None and answered[q].mark == r - 1 for q in reach)
        if best is not None and best != my_digest and (
                not pending or len(groups[best]) > len(groups[my_digest]) + pending):
            sets = {answered[q].aggregated for q in groups[best] if q != me} - {None}
            how = f"; they aggregated peers {' or '.join(sorted(sets))}" if sets else ""
            return Verdict("resync", f"diverged: round {r - 1} ended with digest {best[:12]} at peers "
                                     f"{groups[best]}, {my_digest[:12]} here (peers {groups[my_digest]}){how}")
        if best is None and len(groups) > 1 and not pending:
            # the models parted and no state has f + 1 holders: none can be trusted over ours, so we
            # train on, and say so (equivocation nobody can prove, without signed updates)
            held = "; ".join(f"{d[:12]} at peers {qs}" for d, qs in sorted(groups.items(), key=lambda g: g[1]))
            return Verdict("train", f"split: round {r - 1} ended with {len(groups)} different models "
                                    f"({held}), none held by f + 1 = {need} peers")
    return TRAIN


class Agreement:
    """Peer ``index``'s side of the agreement: probing the members and deciding before each round."""

    def __init__(self, index: int, db: redis.Redis, membership: Membership, f: int, rounds: int,
                 bad_value: Callable[[int, int, BadValue], None], guard: Guard | None = None, *,
                 check_state: bool = True, events: Callable[..., None] | None = None, max_group: int = 0):
        self.index, self.db, self.membership = index, db, membership
        self.max_group = max_group  # the group's indices are below this (Config.max_group), or known to us
        self.events = events
        self.guard = guard or Guard()
        self.f, self.rounds, self.bad_value = f, rounds, bad_value
        self.check_state = check_state
        self.keys = Keys(index)

    def probe(self, r: int) -> dict[int, Probe]:
        """One probe of every member (removed ones too), all at once, each bounded by the heartbeat."""
        # heard records only matter with signatures; read bounded (one envelope per member, and one byte
        # more to tell an oversized record), since the sender chooses their size
        limit = ENVELOPE_BYTES * (len(self.membership.members) + 1)
        rounds = (r - 1, r - 2) if self.guard.signs else ()
        jobs = {q: (m.probe, [("EXISTS", Keys(q).alive), ("EXISTS", Keys(q).done), ("GET", Keys(q).ready),
                              ("GET", Keys(q).digest(r - 1)), ("GET", Keys(q).state),
                              ("GET", Keys(q).aggset(r - 1)),
                              *[("GETRANGE", Keys(q).heard(rr), 0, limit) for rr in rounds]])
                for q, m in self.membership.members.items() if not m.banned}
        # a member may have aggregated a peer that joined while we were away (we learn of it when we
        # resync): not that member's fault, unless the index cannot be the group's
        group = set(range(self.max_group)) | set(self.membership) | {self.index}
        out = {}
        for q, reply in pipelines_at_once(jobs).items():
            if isinstance(reply, redis.RedisError) or any(isinstance(x, redis.RedisError) for x in reply):
                out[q] = Probe()
                continue
            self.membership[q].stalled = False  # it answered: push to it again
            alive, done, raw_mark, raw_digest, raw_state, raw_set, *heard = reply  # heard: [] unsigned
            out[q] = Probe(True, bool(alive), bool(done),
                           self._parsed(r, q, parse_mark, raw_mark, self.rounds),
                           self._parsed(r, q, parse_digest, raw_digest),
                           self._parsed(r, q, parse_state, raw_state, self.rounds),
                           self._parsed(r, q, parse_member_set, raw_set, group),
                           tuple(h if isinstance(h, bytes) and 0 < len(h) <= limit else None
                                 for h in [*heard, None, None][:2]))
        return out

    def _parsed(self, r: int, q: int, parse, raw, *args):
        """A value member q wrote, parsed; None when absent or when it does not parse (the sender's fault:
        said once, and the member counts as live but without that value)."""
        if raw is None:
            return None
        try:
            return parse(raw, *args)
        except BadValue as exc:
            self.bad_value(r, q, exc)
            return None

    def catch_equivocation(self, r: int, probes: dict[int, Probe]) -> None:
        """Compare what every peer accepted from each sender in rounds r - 1 and r - 2 (their ``heard``
        records and ours: a peer slower to finish a round is compared a round later); a sender proven to
        have signed two different vectors for one round is excluded for good."""
        if not self.guard.signs:  # without signatures a record proves nothing (and none is published)
            return
        for back, rr in enumerate((r - 1, r - 2)):
            if rr < 0:
                continue
            reports = {q: p.heard[back] for q, p in probes.items() if p.heard[back] is not None}
            mine = self.db.get(self.keys.heard(rr))
            if mine is not None:
                reports[self.index] = mine
            if len(reports) < 2:
                continue
            for q, m in self.membership.members.items():
                if not m.banned and (proof := self.guard.equivocation(q, rr, reports)) is not None:
                    self.membership.ban(r, q, proof)

    def mine(self, r: int) -> tuple[str | None, tuple[int, str] | None]:
        """Our digest after round r - 1 and our latest state, from our own database."""
        raw_digest, raw_state = self.db.mget(self.keys.digest(r - 1), self.keys.state)
        digest = raw_digest.decode() if raw_digest is not None else None
        state = None
        if raw_state is not None:
            c, _, d = raw_state.decode().partition("|")
            state = (int(c), d)
        return digest, state

    def check(self, r: int, settled: bool = False) -> Verdict:
        """The verdict before round r (with no state of ours yet, at the start, only lagging and the
        quorum are checked); ``settled`` as in :func:`decide`."""
        probes = self.probe(r)
        self.catch_equivocation(r, probes)
        probes = {q: p for q, p in probes.items() if not self.membership[q].banned}
        digest, state = self.mine(r)
        removed = {q for q, m in self.membership.members.items() if m.removed}
        # a member proven to equivocate (banned) is one of the f Byzantine members the group tolerates:
        # among the others there are at most f - banned, so fewer holders make a state trustworthy (after
        # a split the equivocator caused, the honest peers can then agree again)
        proven = sum(m.banned for m in self.membership.members.values())
        verdict = decide(self.index, r, probes, removed, max(0, self.f - proven), my_digest=digest, my_state=state,
                         check_state=self.check_state, rounds=self.rounds, settled=settled)
        if verdict.train and verdict.why and self.events is not None:
            self.events(r, "split", self.index, verdict.why)
        return verdict

    def close(self, rounds: int, wait_s: float) -> Verdict:
        """The comparison after the last round (``rounds``), as before every other round: models that
        parted in the last round would otherwise end the training apart. We first wait, at most
        ``wait_s``, for the reachable members still finishing that round (their mark says they published
        it, their digest is not there yet), so that the first peers to finish do not decide alone."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(
                p.reachable and p.digest is None and p.mark == rounds - 1 and not self.membership[q].banned
                for q, p in self.probe(rounds).items()):
            time.sleep(self.membership.cfg.heartbeat_s / 4)  # each probe is a round trip to every member
        return self.check(rounds, settled=True)
