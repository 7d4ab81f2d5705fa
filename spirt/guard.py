"""What the round asks of security, as one small interface; the default does nothing.

A peer holds one :class:`Guard`. Unsecured runs get this base class, whose methods are no-ops, so the
round has no ``if secured`` branches. With ``[security] enabled = true`` the peer holds a
:class:`spirt.security.context.PeerSecurity` instead, which fills every method in: database users and
their credentials, challenge-response admission, signed updates and checks of received vectors.

A guard is built from the peer's database, its key schema and its index; per call it receives only
what it needs (the members' URLs and clients, the vector width). It never sees the peer itself.

The calls, in the order a round makes them:

=======================  =======================================================================
``own_credentials``      how the orchestrator logs in to its own database
``check_users``          at start and when our database came back from its files: only our users
``open_inbox``           before each round: the rounds and sizes our inbox takes
``function_credentials`` how each gradient function logs in (passed with its task)
``member_credentials``   how it logs in to another member's database
``admit``                before the first round: be admitted by every member, admit them
``sign_outgoing``        PUBLISH: one envelope per recipient, pushed beside the vector
``during_barrier``       BARRIER, while waiting: admissions, checks of the vectors already here
``screen``               AGGREGATE: drop received vectors that fail the checks; point the others
                         at a copy their sender cannot write
``round_keys``           UPDATE: extra keys of the round to delete with the others
``serve``                CLEANUP and while joining: admit newcomers, get admitted by them
``may_join``             a join request names peer q: honour it?
=======================  =======================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Guard:
    """No security: every member is trusted, every vector accepted as it arrives."""

    #: whether received vectors are screened (and rejections counted in the metrics)
    active = False

    def own_credentials(self) -> dict:
        return {}

    def function_credentials(self, k: int) -> dict:
        """How gradient function k logs in (each has its own user, limited to its own slot)."""
        return {}

    def member_credentials(self, q: int, url: str) -> dict:
        return {}

    def admit(self, members: Mapping[int, Any], wait_for: set[int] | None = None) -> None:
        """Until every member lets us in and (for ``wait_for``) we let them in."""

    def serve(self, members: Mapping[int, Any]) -> None:
        """One non-blocking pass of admissions."""

    def may_join(self, q: int) -> bool:
        return True

    #: other peers push into our inbox only through TENSOR.PUSH (and so into theirs, we do too)
    inbox_guarded = False

    def open_inbox(self, r: int, width: int) -> None:
        """Before round r: which rounds (and vector sizes: ``width`` bytes, 0 for a parameter vector's) our
        inbox takes from now on."""

    def check_users(self, events, r: int) -> None:
        """Our database's users are ours and as we defined them, none other (after its start, and when it
        came back from its files); a user removed is an event (``events``, at round ``r``)."""

    def limit_value_size(self, width: int) -> None:
        """Cap the size of any single value remote clients may send (``width``: a parameter vector)."""

    def sign_outgoing(self, r: int, outgoing: Mapping[int, bytes]) -> dict[int, bytes] | None:
        """Envelopes to push beside each recipient's vector; None: nothing to push."""
        return None

    def during_barrier(self, members: Mapping[int, Any], r: int, arrived: list[int], width: int) -> None:
        """Work done while the barrier waits for the slower peers."""

    def screen(self, r: int, inputs: dict[int, str], width: int) -> list[tuple[int, str, str]]:
        """Check the received vectors in ``inputs`` (peer -> key; ours is left alone), in place: a vector
        that fails is dropped, one that passes may be pointed at a checked copy. Returns
        (peer, reason, detail) for each rejected vector."""
        return []

    def round_keys(self, r: int, members: Mapping[int, Any]) -> list[str]:
        return []

    #: whether snapshots (and updates) carry signatures
    signs = False

    def sign_snapshot(self, r: int, params: bytes, momentum: bytes | None) -> bytes | None:
        """Our signature over the state we hand to joiners after round r; None: unsigned."""
        return None

    def snapshot_signed(self, source: int, r: int, params: bytes, momentum: bytes | None, sig: object) -> bool:
        """Whether a snapshot ``source`` handed over is signed by it (always, without signatures)."""
        return True

    def heard(self, r: int) -> bytes | None:
        """What we publish of the vectors we accepted in round r, for the others to compare (the
        senders' signed envelopes); None: nothing (without signatures a report proves nothing)."""
        return None

    def equivocation(self, sender: int, r: int, reports: Mapping[int, bytes]) -> str | None:
        """A proof that ``sender`` showed different vectors to different peers in round r, from the
        ``heard`` records of the peers (reporter -> record), or None. Only a proof that the sender's own
        signatures make counts: a reporter cannot frame an honest sender."""
        return None

    def close(self) -> None:
        pass
