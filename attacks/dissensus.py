"""The dissensus attack: each recipient is pulled away from the others."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from defenses._registry import float_param

from ._base import honest_input, register
from ._protocol import ProtocolAttack


@register("dissensus")
class Dissensus(ProtocolAttack):
    r"""Dissensus: tell each honest recipient its own vector, pushed away from the other honest vectors.

    .. math:: v_q = x_q + \varepsilon\, (x_q - \bar{x}_{-q})

    with :math:`x_q` the vector recipient q published this round and :math:`\bar{x}_{-q}` the mean of the
    other honest vectors. A recipient's aggregate moves towards its own vector and away from the group's,
    so the honest models drift apart instead of agreeing. A recipient whose vector the attacker does
    not hold (another Byzantine peer) receives the honest mean.

    Parameters
    ----------
    eps : float, default 1.0
        How far past its own vector each recipient is pushed, in units of its distance to the others' mean.

    Notes
    -----
    Omniscient, and it needs to know whose vector each honest row is (the Byzantine peer passes
    ``rows``); without it every recipient gets the honest mean. Caught like any equivocation when updates
    are signed.

    References
    ----------
    L. He, S. P. Karimireddy, M. Jaggi. "Byzantine-Robust Decentralized Learning via ClippedGossip."
    arXiv:2202.01545, 2022 (the dissensus attack).

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> honest = np.array([[0.], [2.], [4.]])
    >>> out = attacks.get("dissensus", eps=1.0).outgoing([0, 1, 2, 3], honest=honest, rows=[0, 1, 2])
    >>> [float(out[q][0]) for q in (0, 1, 2, 3)]
    [-3.0, 2.0, 7.0, 2.0]
    """

    omniscient = True
    needs_honest = True
    reference = "He, Karimireddy, Jaggi, 2022"

    def __init__(self, eps: float = 1.0):
        self.eps = float_param(self.name, "eps", eps, minimum=0.0)

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        return honest.mean(axis=0)

    def outgoing(self, recipients: Iterable[int], honest: Any = None, own: Any = None,
                 rows: list[int] | None = None) -> dict[int, Any]:
        peers = [int(q) for q in recipients]
        if not peers:
            return {}
        x, restore = honest_input(self.name, honest)
        total, h = x.sum(axis=0), x.shape[0]
        where = {} if rows is None or len(rows) != h else {int(p): i for i, p in enumerate(rows)}
        mean = restore(total / h)
        out = {}
        for q in peers:
            i = where.get(q)
            if i is None or h < 2:
                out[q] = mean
                continue
            others = (total - x[i]) / (h - 1)
            out[q] = restore(x[i] + self.eps * (x[i] - others))
        return out
