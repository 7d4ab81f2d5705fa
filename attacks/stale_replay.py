"""Stale replay: the Byzantine peer sends an earlier round's messages again."""

from __future__ import annotations

from defenses._registry import int_param

from ._base import register
from ._protocol import ProtocolAttack


@register("stale_replay")
class StaleReplay(ProtocolAttack):
    r"""Stale replay: in round r, send again, byte for byte, what was sent in round r - lag.

    .. math:: m_q(r) = m_q(r - \ell) \quad (r \ge \ell), \qquad m_q(r) = \text{own}(r) \quad (r < \ell)

    for every recipient q, where a message is the vector and, when updates are signed, its envelope (its
    signature covers the round it was made for). The replayed vector is a genuine gradient, from a model
    ``lag`` rounds old: it passes every check of content, so only the binding of a message to its round
    tells it from a fresh one.

    Parameters
    ----------
    lag : int, default 5
        How many rounds old the replayed messages are (>= 1).

    References
    ----------
    P. Syverson. "A Taxonomy of Replay Attacks." IEEE Computer Security Foundations Workshop, 1994.

    Examples
    --------
    >>> import attacks
    >>> replay = attacks.get("stale_replay", lag=5)
    >>> replay.replay(4), replay.replay(12)
    (None, 7)
    """

    needs_own = True
    reference = "Syverson, CSFW 1994"

    def __init__(self, lag: int = 5):
        self.lag = int_param(self.name, "lag", lag, minimum=1)

    def replay(self, r: int) -> int | None:
        return r - self.lag if r >= self.lag else None
