"""Omission: the Byzantine peer sends its vector to some peers only."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from defenses._registry import float_param

from ._base import register
from ._protocol import ProtocolAttack


@register("omission")
class Omission(ProtocolAttack):
    r"""Omission: send the round's vector to a share of the peers only, the same ones every round.

    .. math:: \text{receivers} = \text{the first } \lceil \rho\, m \rceil \text{ of the } m
              \text{ recipients in peer order}

    The vector is the Byzantine peer's honest average: the harm is in who does not get it. The peers that
    get it aggregate one vector more than the others, so the group's models part, and the others wait for
    it until their barrier's deadline every round.

    Parameters
    ----------
    share : float, default 0.5
        The share rho of the recipients that receive the vector (0: nobody, 1: everyone).

    References
    ----------
    V. Hadzilacos, S. Toueg. "Fault-Tolerant Broadcasts and Related Problems." In Distributed Systems,
    2nd ed., 1993 (send-omission failures).

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> attacks.get("omission", share=0.5).outgoing([3, 0, 1], own=np.array([1.0]))
    {0: array([1.]), 1: array([1.])}
    """

    needs_own = True
    reference = "Hadzilacos, Toueg, 1993"

    def __init__(self, share: float = 0.5):
        self.share = float_param(self.name, "share", share, minimum=0.0, maximum=1.0)

    def receivers(self, recipients: Iterable[int]) -> list[int]:
        peers = sorted(int(q) for q in recipients)
        return peers[:math.ceil(self.share * len(peers))]

    def outgoing(self, recipients: Iterable[int], honest: Any = None, own: Any = None,
                 rows: list[int] | None = None) -> dict[int, Any]:
        return super().outgoing(self.receivers(recipients), honest=honest, own=own)
