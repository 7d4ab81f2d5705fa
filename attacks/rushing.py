"""Rushing: the Byzantine peer sends last, after reading every honest vector of the round."""

from __future__ import annotations

import numpy as np

from defenses._registry import float_param

from ._base import register
from ._protocol import ProtocolAttack


@register("rushing")
class Rushing(ProtocolAttack):
    r"""Rushing: wait for every honest vector, then send an ALIE vector late, close to the deadline.

    .. math:: v = \mu - z\,\sigma, \qquad \text{sent } \lambda\, T \text{ after the round's push}

    with :math:`\mu`, :math:`\sigma` the coordinate-wise mean and std of the round's honest vectors, T
    the barrier's deadline and :math:`\lambda` the lateness. The attacker chooses its vector knowing
    everyone else's, and the honest peers wait for it: each round takes about :math:`\lambda T`. Near
    :math:`\lambda = 1` some peers may close their barrier before it arrives and others after, so they
    aggregate different vectors.

    Parameters
    ----------
    z : float, default 1.0
        ALIE's shift, in standard deviations.
    lateness : float, default 0.5
        The delay of the push as a share of the barrier deadline (0: as soon as the honest vectors are in).

    References
    ----------
    R. Canetti. "Security and Composition of Multiparty Cryptographic Protocols." Journal of Cryptology,
    2000 (the rushing adversary). M. Baruch, G. Baruch, Y. Goldberg. NeurIPS 2019 (ALIE).

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> rushing = attacks.get("rushing", z=1.0, lateness=0.5)
    >>> rushing(honest=np.array([[0.], [2.], [4.]])), rushing.delay_s(deadline_s=10.0)
    (array([0.]), 5.0)
    """

    omniscient = True
    needs_honest = True
    reference = "Canetti, 2000"

    def __init__(self, z: float = 1.0, lateness: float = 0.5):
        self.z = float_param(self.name, "z", z)
        self.lateness = float_param(self.name, "lateness", lateness, minimum=0.0, maximum=2.0)

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        sigma = honest.std(axis=0, ddof=1) if honest.shape[0] > 1 else np.zeros(honest.shape[1])
        return honest.mean(axis=0) - self.z * sigma

    def delay_s(self, deadline_s: float) -> float:
        return self.lateness * deadline_s
