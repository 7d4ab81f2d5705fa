"""What a Byzantine peer does differently from an honest one.

The last ``attack.byzantine`` peers of a run are Byzantine. A data attack poisons the minibatches of
their gradient functions (the functions receive the attack with their tasks); a model attack forges what
they send: the attack maps each recipient to the vector it gets (``attack.outgoing``), from the peer's
own honestly computed average and, for an omniscient attack, the honest peers' vectors of the round,
which the honest peers pushed into the Byzantine peer's inbox too. An attack on the protocol
(:class:`attacks.ProtocolAttack`) also decides whom it sends to and when, the round mark it advertises,
the state it serves joiners, whom it frames and which earlier messages it replays; :meth:`Byzantine.publish`
carries that out with the peer's own means (its database, its clients of the others', its guard), and
what the others' databases refuse is counted in :attr:`Byzantine.refused`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import redis

from .config import Config
from .keys import Keys
from .shared import Shared
from .tensors import as_f32_bytes, from_f32_bytes

if TYPE_CHECKING:
    from .peer import Peer

#: rounds of sent messages a replaying attacker keeps
KEEP_SENT = 64

#: the forgeries of the colluding Byzantine peers of this process (see :meth:`Byzantine.outgoing`)
_FORGED = Shared(keep=16)


def is_byzantine(cfg: Config, index: int) -> bool:
    """Whether peer ``index`` of the run is one of its (last) Byzantine peers."""
    b = cfg.attack.byzantine
    return b > 0 and cfg.peers.count - b <= index < cfg.peers.count


def configured_defense(cfg: Config):
    """The aggregation rule as every peer builds it (a fresh object: the attack may keep its own state)."""
    import defenses

    return defenses.get(cfg.aggregation.defense, pre=cfg.aggregation.pre or None, **cfg.aggregation.params)


class Byzantine:
    """The attack of a Byzantine peer ``index``.

    An attack whose class sets ``needs_defense = True`` (the adaptive ones, see :mod:`attacks._adaptive`)
    is tuned against the rule the honest peers run: it receives ``defense=``, that rule built exactly as
    the peers build it (``aggregation.defense`` with ``aggregation.params`` and ``aggregation.pre``, ``f``
    included), and ``f = attack.byzantine`` when it takes ``f`` and ``attack.params`` does not set it.
    """

    def __init__(self, cfg: Config, index: int):
        import attacks

        name = cfg.attack.name
        params = dict(cfg.attack.params)
        info = attacks.info(name)
        if "seed" in info.params and "seed" not in params:
            params["seed"] = cfg.run.seed * 1000 + index  # each Byzantine peer its own noise
        if getattr(attacks.registry.cls(name), "needs_defense", False):
            params["defense"] = configured_defense(cfg)
            if "f" in info.params and "f" not in params:
                params["f"] = cfg.attack.byzantine
        self.attack = attacks.get(name, **params)
        self.omniscient = info.omniscient
        #: An adaptive attack is a pure function of the honest vectors and the recipients (its searches
        #: run on copies of the rule). The colluders compute the same vectors from the same inputs, so
        #: in one process the first computes them and the others take them: the same vectors, a third of
        #: the cost with three colluders (its searches were most of an adaptive run's time).
        from attacks._adaptive import Adaptive

        self.shared, self.n_peers = None, cfg.peers.count
        if isinstance(self.attack, Adaptive):
            own_params = {k: v for k, v in params.items() if k != "defense"}
            a = cfg.aggregation
            self.shared = json.dumps([name, own_params, a.defense, a.params, a.pre], sort_keys=True, default=repr)
        #: the honest peers: the first ones
        self.honest = range(cfg.peers.count - cfg.attack.byzantine)
        #: (name, params) handed to the gradient functions, for an attack on the data
        self.data_attack = (name, dict(cfg.attack.params)) if isinstance(self.attack, attacks.DataAttack) else None
        #: whether the published vectors are forged (an attack on the model)
        self.forges = isinstance(self.attack, attacks.ModelAttack)
        #: an attack on the protocol (its hooks are called); else only the vectors are forged
        self.protocol = self.attack if isinstance(self.attack, attacks.ProtocolAttack) else None
        #: round -> (vectors, envelopes) sent, kept for an attack that replays them
        self.sent: dict[int, tuple[dict[int, bytes], dict[int, bytes] | None]] = {}
        #: writes the other peers' databases refused (framing), by kind
        self.refused: dict[str, int] = {}
        self.rounds = cfg.run.rounds
        #: whether the attack replays earlier messages (then the sent ones are kept)
        self.replays = self.protocol is not None and self.protocol.replay(self.rounds + KEEP_SENT) is not None

    def outgoing(self, own_raw: bytes, recipients: list[int],
                 read_honest: Callable[[], dict[int, bytes]]) -> dict[int, bytes]:
        """What to send each recipient instead of our honest average ``own_raw`` (a recipient left out
        gets nothing). ``read_honest`` returns the honest peers' vectors of the round by peer (waiting
        for them), read only by omniscient attacks."""
        if not self.forges:
            return {q: own_raw for q in recipients}
        own = from_f32_bytes(own_raw)
        honest, rows = None, None
        if self.omniscient:
            got = read_honest()
            rows = sorted(got)
            honest = np.stack([from_f32_bytes(got[q]) for q in rows]) if got else own[None, :]
        if self.protocol is not None:
            forged = self.protocol.outgoing(recipients, honest=honest, own=own, rows=rows)
        elif self.shared is not None and honest is not None:
            # for every peer of the run: each colluder leaves itself out of its recipients
            key = (self.shared, tuple(rows or ()), own.dtype.str, honest.shape,
                   hashlib.blake2b(np.ascontiguousarray(honest), digest_size=16).digest())
            forged = _FORGED.get(key, lambda: self.attack.outgoing(range(self.n_peers), honest=honest, own=own))
        else:
            forged = self.attack.outgoing(recipients, honest=honest, own=own)
        encoded: dict[int, bytes] = {}  # each distinct vector encoded (and later signed) once
        out = {}
        for q in [q for q in recipients if q in forged]:
            vec = forged[q]
            if id(vec) not in encoded:
                encoded[id(vec)] = as_f32_bytes(np.asarray(vec, dtype=np.float32)).tobytes()
            out[q] = encoded[id(vec)]
        return out

    # -- attacks on the protocol ---------------------------------------------------------------------
    def publish(self, peer: Peer, r: int, own: bytes) -> None:
        """PUBLISH as the attack says: the round's vectors (or an earlier round's messages, replayed),
        held back as long as it says, then the round mark it advertises, then any framing."""
        started = time.monotonic()
        a = self.protocol
        recipients = list(peer.members)
        old = a.replay(r) if a is not None else None
        if old is not None and old in self.sent:
            outgoing, envelopes = self.sent[old]
            outgoing = {q: v for q, v in outgoing.items() if q in peer.members}
        else:
            outgoing = self.outgoing(own, recipients, lambda: honest_vectors(peer, r, self.honest))
            if a is not None and (hold := a.delay_s(peer.cfg.barrier.timeout_s)) > 0:
                time.sleep(max(0.0, started + hold - time.monotonic()))
            envelopes = peer.guard.sign_outgoing(r, outgoing)
        framing = a is not None and a.victim is not None and a.victim in peer.members and a.victim in self.honest
        if framing and peer.guard.signs and r >= 1:
            # before our vector leaves: the peers need it to finish round r, so they compare records of
            # round r - 1 (at their check before round r + 1) only after the forgery is in place
            self._forge_evidence(peer, r - 1, a.victim)
        peer.exchange.push(r, outgoing, envelopes)
        if a is None:
            return
        if self.replays:
            self.sent[r] = (outgoing, envelopes)
            for rr in [rr for rr in self.sent if rr < r - KEEP_SENT]:
                del self.sent[rr]
        if (mark := a.mark(r, self.rounds)) != r:
            self._advertise(peer, mark)
        if framing:
            self._impersonate(peer, r, a.victim)

    def _advertise(self, peer: Peer, mark: int) -> None:
        """Say we published round ``mark``, and completed the round before it with our current digest."""
        K = peer.keys
        state = peer.db.get(K.state)
        digest = state.partition(b"|")[2] if state else b""
        pipe = peer.db.pipeline(transaction=False)
        pipe.set(K.ready, mark)
        if digest:
            pipe.set(K.state, b"%d|%s" % (mark - 1, digest))
        pipe.execute()

    def _refused(self, peer: Peer, r: int, q: int, kind: str, why: str) -> None:
        """A write of the attack's that peer q's database refused: counted, and said once per kind."""
        self.refused[kind] = self.refused.get(kind, 0) + 1
        if self.refused[kind] == 1:
            peer.events(r, "attack_refused", q, f"{kind}: {why}")

    def _impersonate(self, peer: Peer, r: int, victim: int) -> None:
        """Write the attack's vector, made from the victim's own vector of round r, in the victim's slot
        of the others' inboxes."""
        ready, _ = peer.exchange.barrier(r, [victim], peer.width)
        got = peer.exchange.read(r, ready, peer.width).get(victim)
        if got is not None:
            forged = as_f32_bytes(self.protocol.impersonation(from_f32_bytes(got))).tobytes()
            for q, m in peer.membership.members.items():
                if q == victim or m.removed:
                    continue
                K = Keys(q)
                for kind, cmd in (("write", ("SET", K.incoming(victim, r), forged)),
                                  ("push", ("TENSOR.PUSH", K.inbox(victim), K.notify(victim), r, forged))):
                    try:
                        m.client.execute_command(*cmd)
                    except redis.ResponseError as exc:  # NOPERM, or no such command without the module
                        self._refused(peer, r, q, f"impersonate ({kind})", str(exc)[:200])
                    except redis.RedisError:
                        pass  # unreachable: nothing to frame there this round

    def _forge_evidence(self, peer: Peer, r: int, victim: int) -> None:
        """Add to our record of round r's accepted envelopes a copy of the victim's over another digest."""
        from .security.signing import Envelope, split_heard

        K = peer.keys
        record = peer.db.get(K.heard(r))
        if not record:
            return
        theirs = [e for e in split_heard(record) if e.sender == victim and e.round == r]
        if not theirs:
            return
        e = theirs[0]
        fake = Envelope(e.sender, e.round, bytes(b ^ 0xFF for b in e.digest), e.signature)
        peer.db.set(K.heard(r), record + fake.encode(), keepttl=True)

    def served_state(self, params: bytes, momentum: bytes | None) -> tuple[bytes, bytes | None]:
        """The state we hand to joiners (what the attack makes of ours)."""
        if self.protocol is None:
            return params, momentum
        p, m = self.protocol.served_state(from_f32_bytes(params),
                                          None if momentum is None else from_f32_bytes(momentum))
        return (as_f32_bytes(np.asarray(p, dtype=np.float32)).tobytes(),
                None if m is None else as_f32_bytes(np.asarray(m, dtype=np.float32)).tobytes())


def honest_vectors(peer: Peer, r: int, honest: range) -> dict[int, bytes]:
    """An omniscient attacker's read: the honest peers' round-r vectors, pushed to us too, by peer."""
    members = [q for q in peer.members if q in honest and not peer.members[q].removed]
    ready, _ = peer.exchange.barrier(r, members, peer.width)
    return peer.exchange.read(r, ready, peer.width)
