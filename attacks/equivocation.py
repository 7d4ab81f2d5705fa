"""Equivocation: two camps of honest peers, each told a different vector."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from defenses._registry import choice_param, float_param

from ._base import honest_input, register
from ._protocol import ProtocolAttack


@register("equivocation")
class Equivocation(ProtocolAttack):
    r"""Equivocation: split the recipients into two camps and push each camp's aggregate the other way.

    .. math::

        v_q = \mu + c_q\, s\, d, \qquad c_q = \begin{cases} +1 & q \text{ at an even position} \\
        -1 & q \text{ at an odd position} \end{cases}

    over the recipients in peer order, with :math:`\mu` the honest mean and, per ``base``: ALIE
    :math:`d = \sigma` (coordinate-wise std of the honest vectors), :math:`s = z`; IPM :math:`d = -\mu`,
    :math:`s = 1 + \varepsilon`, so one camp receives IPM's :math:`-\varepsilon\mu` and the other
    :math:`(2 + \varepsilon)\mu`. Each vector on its own is the plausible one of ALIE or IPM; together they
    make the honest peers aggregate different inputs, so their models part (the group's state diverges)
    unless the equivocation is caught.

    Parameters
    ----------
    base : {"alie", "ipm"}, default "alie"
        The family of the per-camp vectors.
    z : float, default 1.5
        ALIE's shift in standard deviations (ByzFL's default strength).
    eps : float, default 0.5
        IPM's epsilon.

    Notes
    -----
    Omniscient. In this harness every peer pushes its vector to every peer; with signed updates the peers
    compare the envelopes they accepted, and two envelopes of one sender for one round over different
    vectors exclude it for good (BTARD's idea, with signatures instead of hashes).

    References
    ----------
    L. Lamport, R. Shostak, M. Pease. "The Byzantine Generals Problem." ACM TOPLAS, 1982 (a traitor
    tells different generals different things). E. Gorbunov et al. "Secure Distributed Training at
    Scale." ICML 2022 (BTARD: broadcast hashes to catch equivocation).

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> honest = np.array([[0., 2.], [2., 2.], [4., 2.]])
    >>> out = attacks.get("equivocation", z=1.0).outgoing([0, 1, 2], honest=honest)
    >>> out[0], out[1], out[2] is out[0]
    (array([4., 2.]), array([0., 2.]), True)
    """

    omniscient = True
    needs_honest = True
    reference = "Lamport, Shostak, Pease, 1982; Gorbunov et al., ICML 2022"

    def __init__(self, base: str = "alie", z: float = 1.5, eps: float = 0.5):
        self.base = choice_param(self.name, "base", base, ("alie", "ipm"))
        self.z = float_param(self.name, "z", z, minimum=0.0)
        self.eps = float_param(self.name, "eps", eps, minimum=0.0)

    def camps(self, honest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The vectors of the even and the odd camp."""
        mu = honest.mean(axis=0)
        if self.base == "ipm":
            d, s = -mu, 1.0 + self.eps
        else:
            d = honest.std(axis=0, ddof=1) if honest.shape[0] > 1 else np.zeros_like(mu)
            s = self.z
        return mu + s * d, mu - s * d

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        return self.camps(honest)[0]

    def outgoing(self, recipients: Iterable[int], honest: Any = None, own: Any = None,
                 rows: list[int] | None = None) -> dict[int, Any]:
        peers = sorted(int(q) for q in recipients)
        if not peers:
            return {}
        x, restore = honest_input(self.name, honest)
        even, odd = (restore(v) for v in self.camps(x))
        return {q: even if i % 2 == 0 else odd for i, q in enumerate(peers)}
