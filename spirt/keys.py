"""The key schema: every key name spirt reads or writes in a database, in one place.

Nothing else in the package formats a key. All keys of peer p carry its hash tag ``{p<p>}``, so they
live in one Redis Cluster slot and the tensor module's multi-key commands work under a cluster.

=====================  ==================================================================================
key (in p's database)  what it holds, who writes it
=====================  ==================================================================================
``params``             the model's parameters, raw float32 (p; read by p's functions)
``momentum``           SGD momentum state beside them (p)
``peer_momentum``      p's momentum of its own averages (``optim.peer_momentum``); never handed over
``version``            bumped whenever ``params`` change; warm functions skip re-reading a known version
``completed``          last round whose update is applied, written in the update's transaction
``ready``              last round p announced (its average is on its way to the others)
``alive``              heartbeat, with a time to live
``joining``            in place of ``alive`` while p sits out for a state transfer (with a time to live)
``done``               set when p finished training
``up``                 set when p's orchestrator is ready to start (launcher handshake)
``metrics``            list of per-round metric rows (JSON)
``events``             list of membership and fault events (JSON)
``grad:r:k``           gradient of function k in round r (p's functions)
``avg:r``              p's average of its K gradients in round r
``agg:r``              the aggregate p applies in round r
``aggset:r``           the peers p aggregated in round r (comma-separated)
``digest:r``           SHA-1 of p's parameters after round r, written with the update (compared by peers)
``state``              ``r|digest`` of p's last completed round, written with the update
``heard:r``            the signed envelopes of the vectors p accepted in round r (equivocation proofs)
``in:q:r``             peer q's round-r vector, pushed by q (remote-writable by q only)
``in:q:r:sig``         its signed envelope (security on), pushed by q
``vin:q:r``            the copy of q's vector p checked and aggregates (q cannot write it)
``notify:q``           q's wake-up list: the rounds q published (remote-writable by q only)
``join:q``             q's request to join, ``url|first round`` (remote-writable by q only)
``snap:r:what``        state p hands to peers joining at round r (params, momentum, meta; sig: signed updates)
``hello:q``            q's pre-admission area: a short list of q's requests and signed responses
                       (written by the ``hello`` user through TENSOR.HELLO, taken by p)
``challenge:q``        p's challenge to q (read by the ``hello`` user)
=====================  ==================================================================================

:data:`START_KEY` (no hash tag) is the launcher's start signal; :data:`RELEASE_KEY` tells a peer started
with ``spirt peer`` that its metrics were collected, so it may stop its database.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The launcher sets it once every peer is up: in peer 0's database, or in every database of a
#: secured run (a secured peer reads only its own database).
START_KEY = "spirt:start"
#: ``spirt collect --release`` sets it in each peer's database once it read the peer's metrics: a peer of
#: ``spirt peer`` then stops its database and exits
RELEASE_KEY = "spirt:release"

SIG_SUFFIX = ":sig"


def scratch(of: str) -> str:
    """A temporary key beside ``of``, in its hash slot (e.g. an average on the way to an update)."""
    return f"{of}:tmp"


@dataclass(frozen=True)
class Keys:
    """Key names of one peer, in its own database. ``prefix`` only changes the hash tag: benchmarks
    use their own (``Keys(0, prefix="bench-module-")``) so that they never touch a peer's keys."""

    peer: int
    prefix: str = "p"

    @property
    def tag(self) -> str:
        return f"{{{self.prefix}{self.peer}}}"

    def _k(self, *parts) -> str:
        return ":".join([self.tag, *map(str, parts)])

    # -- the model and its bookkeeping ------------------------------------------------------------
    @property
    def params(self) -> str:
        return self._k("params")

    @property
    def momentum(self) -> str:
        return self._k("momentum")

    @property
    def peer_momentum(self) -> str:
        """This peer's own momentum of its averages (optim.peer_momentum); never handed to joiners."""
        return self._k("peer_momentum")

    @property
    def version(self) -> str:
        """Incremented whenever the parameters change (functions use it to skip re-reading them)."""
        return self._k("version")

    @property
    def completed(self) -> str:
        """Last round whose update is applied (written atomically with the update)."""
        return self._k("completed")

    @property
    def ready(self) -> str:
        return self._k("ready")

    @property
    def alive(self) -> str:
        """Heartbeat: present while the orchestrator lives (it refreshes the expiry)."""
        return self._k("alive")

    @property
    def joining(self) -> str:
        """Present, instead of ``alive``, while the orchestrator sits out for a state transfer: the
        others exclude it from their rounds but do not remove it (it comes back with their state). Its
        value is the round it asked to join at (-1 before it asked): in that round the others wait for
        it until their deadline, as it is taking the state they made for it."""
        return self._k("joining")

    @property
    def done(self) -> str:
        return self._k("done")

    @property
    def up(self) -> str:
        """Set when the orchestrator is ready to start (torch imported, workers warm)."""
        return self._k("up")

    @property
    def metrics(self) -> str:
        return self._k("metrics")

    @property
    def events(self) -> str:
        """Membership events seen by this peer (JSON lines), for reports."""
        return self._k("events")

    # -- one round --------------------------------------------------------------------------------
    def grad(self, r: int, k: int) -> str:
        return self._k("grad", r, k)

    def avg(self, r: int) -> str:
        return self._k("avg", r)

    def agg(self, r: int) -> str:
        return self._k("agg", r)

    def aggset(self, r: int) -> str:
        """The peers whose round-r vectors arrived in time (comma-separated), written with the update."""
        return self._k("aggset", r)

    def digest(self, r: int) -> str:
        """SHA-1 of the parameters after round r (hex), written in the update's transaction."""
        return self._k("digest", r)

    @property
    def state(self) -> str:
        """``r|digest``: the last completed round and the digest of the parameters after it."""
        return self._k("state")

    def heard(self, r: int) -> str:
        """The senders' signed envelopes of the vectors accepted in round r, concatenated (security on):
        what the peers compare to catch a sender that showed them different vectors."""
        return self._k("heard", r)

    def incoming(self, q: int, r: int) -> str:
        """Peer q's round-r vector in our inbox (q pushes it)."""
        return f"{self.inbox(q)}:{r}"

    def inbox(self, q: int) -> str:
        """Peer q's part of our inbox: its vectors are ``<this>:<round>`` (TENSOR.PUSH derives them)."""
        return self._k("in", q)

    def envelope(self, q: int, r: int) -> str:
        """The signed envelope of peer q's round-r vector (q pushes it beside the vector)."""
        return self.incoming(q, r) + SIG_SUFFIX

    def verified(self, q: int, r: int) -> str:
        """Our checked copy of q's round-r vector: q cannot write it, so what was checked is what is
        aggregated."""
        return self._k("vin", q, r)

    def verified_envelope(self, q: int, r: int) -> str:
        return self.verified(q, r) + SIG_SUFFIX

    def notify(self, q: int) -> str:
        """List where peer q announces its published rounds (one per sender, so none can write in
        another's name); the barrier blocks on all of them at once."""
        return self._k("notify", q)

    # -- joining ----------------------------------------------------------------------------------
    def join(self, q: int) -> str:
        """Peer q's request to join, addressed to this peer: "url|first round"."""
        return self._k("join", q)

    def snapshot(self, r: int, what: str) -> str:
        """State handed to peers joining at round r: params, momentum, meta."""
        return self._k("snap", r, what)

    # -- admission (security) ---------------------------------------------------------------------
    def hello(self, q: int) -> str:
        """Peer q's pre-admission area (a list of messages to this peer's admission desk)."""
        return self._k("hello", q)

    def challenge(self, q: int) -> str:
        return self._k("challenge", q)

    # -- patterns (SCAN and ACL key patterns) -----------------------------------------------------
    @property
    def join_pattern(self) -> str:
        return self._k("join", "*")

    @property
    def notify_pattern(self) -> str:
        return self._k("notify", "*")

    @property
    def hello_pattern(self) -> str:
        return self._k("hello", "*")

    @property
    def challenge_pattern(self) -> str:
        return self._k("challenge", "*")

    @property
    def aggset_pattern(self) -> str:
        return self._k("aggset", "*")

    @property
    def digest_pattern(self) -> str:
        return self._k("digest", "*")

    @property
    def heard_pattern(self) -> str:
        return self._k("heard", "*")

    @property
    def snapshot_pattern(self) -> str:
        return self._k("snap", "*")

    @property
    def grad_pattern(self) -> str:
        return self._k("grad", "*")

    def grad_slot_pattern(self, k: int) -> str:
        """Gradient function k's slot in every round (its user may write only these keys)."""
        return self._k("grad", "*", k)

    def inbox_pattern(self, q: int) -> str:
        """Everything peer q may push into our inbox (its vectors and their envelopes)."""
        return self._k("in", q, "*")

    def suffix_after(self, pattern: str, key: bytes | str) -> str:
        """What a key found with ``pattern`` (ending in ``*``) has in place of the ``*``."""
        name = key.decode(errors="replace") if isinstance(key, bytes) else key
        return name[len(pattern) - 1:]
