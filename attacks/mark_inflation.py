"""Round-mark inflation: the Byzantine peer says it is rounds ahead of everyone."""

from __future__ import annotations

from defenses._registry import int_param

from ._base import register
from ._protocol import ProtocolAttack


@register("mark_inflation")
class MarkInflation(ProtocolAttack):
    r"""Round-mark inflation: after each push, advertise a round far ahead, and a state of that round.

    .. math:: \text{mark}(r) = \min(r + a,\; R - 1)

    with R the training's number of rounds: the largest mark that still parses as a round of the
    training. The vector sent is the Byzantine peer's honest average. A peer that believed marks would
    think it lags and resynchronise every round, and a joiner would start from a round nobody reached;
    the agreement needs f + 1 peers ahead (and a majority) before it calls a peer lagging.

    Parameters
    ----------
    ahead : int, default 10
        How many rounds ahead (a >= 1).

    References
    ----------
    M. Castro, B. Liskov. "Practical Byzantine Fault Tolerance." OSDI 1999 (sequence numbers a faulty
    replica chooses are bounded by watermarks and need 2f + 1 matching messages).

    Examples
    --------
    >>> import attacks
    >>> inflation = attacks.get("mark_inflation", ahead=10)
    >>> inflation.mark(3, rounds=100), inflation.mark(95, rounds=100)
    (13, 99)
    """

    needs_own = True
    reference = "Castro, Liskov, OSDI 1999"

    def __init__(self, ahead: int = 10):
        self.ahead = int_param(self.name, "ahead", ahead, minimum=1)

    def mark(self, r: int, rounds: int) -> int:
        return max(r, min(r + self.ahead, rounds - 1))
