"""Attacks on the peer-to-peer protocol: what a Byzantine peer does besides choosing its vector.

A server-based attacker publishes one vector, the same for everyone, in time. A Byzantine peer of a
peer-to-peer group controls more: which peers it sends to and what each receives, when it sends, the
round mark and state it advertises, the state it hands to a joining peer, the evidence it publishes
about the others, and which of its earlier messages it sends again. A :class:`ProtocolAttack` says
what it does with each of these through the hooks below; every hook's default is what an honest peer
does, so an attack overrides only the ones it uses. The Byzantine peer (:mod:`spirt.byzantine`)
carries them out against the databases; an attack never touches a database itself.

==================  ========================================================  =======================
hook                what the Byzantine peer does with it                        honest default
==================  ========================================================  =======================
``outgoing``        a vector per recipient; a recipient left out gets none      ``own`` to everyone
``delay_s``         holds its push this long after the honest vectors arrived   0
``mark``            the round it advertises having published (``ready``)        the round itself
``replay``          sends the messages of an earlier round again, verbatim      None
``served_state``    the parameters and momentum it hands to joining peers       its own
``victim``          the honest peer it tries to get excluded (framing)          None
==================  ========================================================  =======================

Adding a protocol attack: a module in this package with a class derived from :class:`ProtocolAttack`,
registered with ``@register("name")``, overriding the hooks it needs, documented like the other attacks
(summary, what it does, parameters, reference, a doctest example of its hooks).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np

from ._base import ModelAttack


class ProtocolAttack(ModelAttack):
    """Base of the attacks on the protocol (kind ``"protocol"``): every hook does what an honest peer does.

    As a model attack it publishes ``own``, the Byzantine peer's honestly computed average, unless a
    subclass forges something else.
    """

    kind: ClassVar[str] = "protocol"
    #: whether the Byzantine peer must learn the rounds' honest vectors before it sends (``outgoing``
    #: gets them as ``honest``); set by the attacks that read them
    omniscient: ClassVar[bool] = False

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        return (own if own is not None else honest.mean(axis=0)).copy()

    def delay_s(self, deadline_s: float) -> float:
        """Seconds to hold the push of a round once the vector is chosen (the honest peers wait up to
        ``deadline_s`` for it, counted from their own push)."""
        return 0.0

    def mark(self, r: int, rounds: int) -> int:
        """The round the Byzantine peer says it has published, after publishing round ``r`` of
        ``rounds``."""
        return r

    def replay(self, r: int) -> int | None:
        """The earlier round whose messages (vectors and, when updates are signed, envelopes) to send again
        in round ``r`` instead of new ones; None: send new ones."""
        return None

    def served_state(self, params: np.ndarray, momentum: np.ndarray | None
                     ) -> tuple[np.ndarray, np.ndarray | None]:
        """The state handed to a peer joining the training, from the Byzantine peer's own."""
        return params, momentum

    #: the honest peer a framing attack tries to get excluded; None: no framing
    victim: int | None = None

    def outgoing(self, recipients: Iterable[int], honest: Any = None, own: Any = None,
                 rows: list[int] | None = None) -> dict[int, Any]:
        """``{recipient: vector}`` as :meth:`Attack.outgoing`; ``rows``: the peer index of each row of
        ``honest`` (the Byzantine peer passes it), for the attacks that tailor a recipient's vector to
        that recipient's own."""
        return super().outgoing(recipients, honest=honest, own=own)
