"""Inner product manipulation (IPM)."""

from __future__ import annotations

import numpy as np

from defenses._registry import float_param

from ._base import ModelAttack, register


@register("ipm", aliases=("inner_product_manipulation",))
class IPM(ModelAttack):
    r"""Inner product manipulation: publish the honest mean scaled by :math:`-\varepsilon`.

    .. math:: v = -\varepsilon \cdot \frac{1}{h} \sum_{i=1}^{h} x_i

    Parameters
    ----------
    epsilon : float, default 0.1
        Positive scale. Xie et al. use a small epsilon (0.1) against Krum-type rules, whose selection it
        slips through, and a large one (e.g. 10 or 100) against the mean and median; ByzFL's default
        ``tau`` is 2.0. Conventions in the literature span 0.1 to 10; pass the one you need.

    Notes
    -----
    Omniscient: reads the honest vectors of the round.

    References
    ----------
    C. Xie, O. Koyejo, I. Gupta. "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
    Manipulation." UAI 2020.

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> attacks.get("ipm", epsilon=0.5)(honest=np.array([[1., 2.], [3., 4.]]))
    array([-1. , -1.5])
    """

    omniscient = True
    needs_honest = True
    reference = "Xie, Koyejo, Gupta, UAI 2020"

    def __init__(self, epsilon: float = 0.1):
        self.epsilon = float_param(self.name, "epsilon", epsilon, minimum=0.0, strict_min=True)

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        return honest.mean(axis=0) * (-self.epsilon)
