"""Framing: the Byzantine peer tries to get an honest peer excluded."""

from __future__ import annotations

import numpy as np

from defenses._registry import float_param, int_param

from ._base import register
from ._protocol import ProtocolAttack


@register("framing")
class Framing(ProtocolAttack):
    r"""Framing: make an honest victim look Byzantine, by impersonation and by forged evidence.

    Every round the Byzantine peer

    1. *impersonates* the victim: it writes :math:`s\, x_v` (the victim's vector of the round, scaled) into
       the victim's slot of every other peer's inbox, as a plain write and through the inbox command;
       a peer that aggregates it takes the victim for an attacker, one that rejects it excludes the
       victim for the round;
    2. *forges evidence*: it adds to its record of the vectors it accepted (``heard``, compared by the
       peers to catch equivocation when updates are signed) a copy of the victim's envelope over a
       different digest, so that the victim seems to have signed two vectors for one round.

    It sends its own honest average. Database ACLs refuse the writes in another member's name; a
    proof of equivocation counts only with both envelopes signed by the accused.

    Parameters
    ----------
    victim : int, default 0
        The honest peer framed.
    scale : float, default -10.0
        The factor s of the vector written in the victim's name.

    References
    ----------
    A. Haeberlen, P. Kouznetsov, P. Druschel. "PeerReview: Practical Accountability for Distributed
    Systems." SOSP 2007 (evidence must be verifiable, so that a faulty node cannot accuse a correct one).

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> framing = attacks.get("framing", victim=2, scale=-10.0)
    >>> framing.victim, framing.impersonation(np.array([0.5, -1.0]))
    (2, array([-5., 10.]))
    """

    needs_own = True
    reference = "Haeberlen, Kouznetsov, Druschel, SOSP 2007"

    def __init__(self, victim: int = 0, scale: float = -10.0):
        self.victim = int_param(self.name, "victim", victim, minimum=0)
        self.scale = float_param(self.name, "scale", scale)

    def impersonation(self, victim_vector: np.ndarray) -> np.ndarray:
        """What is written in the victim's name, from its vector of the round."""
        return (self.scale * victim_vector).astype(victim_vector.dtype)
