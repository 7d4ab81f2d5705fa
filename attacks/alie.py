"""A little is enough (ALIE)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from defenses._registry import float_param, int_param

from ._base import ModelAttack, register


def alie_z(n: int, f: int) -> float:
    r"""Baruch et al.'s z for n peers of which f are Byzantine.

    .. math:: s = \lfloor n/2 + 1 \rfloor - f, \qquad z = \Phi^{-1}\!\left(\frac{n - s}{n}\right)

    s is the number of honest peers the attackers need on their side for a majority; z is the largest
    shift (in standard deviations) that still leaves s honest values farther from the mean. Requires
    0 < s < n, i.e. f < floor(n/2 + 1) and f > floor(n/2 + 1) - n.
    """
    n = int_param("alie", "n", n, minimum=1)
    f = int_param("alie", "f", f, minimum=0)
    s = math.floor(n / 2 + 1) - f
    if not 0 < s < n:
        raise ValueError(f"alie requires 0 < s < n with s = floor(n/2 + 1) - f = {s} (got n={n}, f={f})")
    return NormalDist().inv_cdf((n - s) / n)


@register("alie", aliases=("a_little_is_enough",))
class ALIE(ModelAttack):
    r"""A little is enough: shift the honest mean by z standard deviations, coordinate-wise.

    .. math:: v_j = \mu_j - z\, \sigma_j

    with :math:`\mu_j`, :math:`\sigma_j` the mean and standard deviation of coordinate j over the honest
    vectors, and z either fixed or derived from (n, f) by :func:`alie_z`.

    Parameters
    ----------
    f : int or None, default None
        Number of Byzantine peers; used to derive z when ``z`` is None.
    n : int or None, default None
        Total number of peers; None means h + f at call time (h = number of honest vectors given).
    z : float or None, default None
        Fixed shift. ByzFL's ``ALittleIsEnough(tau)`` publishes mean + tau * std, i.e. z = -tau here.
    ddof : int, default 1
        Delta degrees of freedom of the standard deviation (1 = sample std, as Baruch et al.'s code and
        ByzFL; 0 = population std).

    Notes
    -----
    Omniscient: reads the honest vectors of the round (Baruch et al.'s attackers estimate the same moments
    from their own gradients). Exactly one of ``z`` and ``f`` must be given. Needs h > ddof.

    References
    ----------
    M. Baruch, G. Baruch, Y. Goldberg. "A Little Is Enough: Circumventing Defenses For Distributed
    Learning." NeurIPS 2019.

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> honest = np.array([[0.], [1.], [2.]])
    >>> attacks.get("alie", z=1.0)(honest=honest)  # mean 1, sample std 1
    array([0.])
    >>> attacks.get("alie", f=1)(honest=honest)  # n = h + f = 4 peers: z = 0
    array([1.])
    """

    omniscient = True
    needs_honest = True
    reference = "Baruch, Baruch, Goldberg, NeurIPS 2019"

    def __init__(self, f: int | None = None, n: int | None = None, z: float | None = None, ddof: int = 1):
        if (z is None) == (f is None):
            raise ValueError(
                "alie: give exactly one of parameter 'z' (a fixed shift) and parameter 'f' "
                f"(number of Byzantine peers, an integer >= 0) (got z={z!r}, f={f!r})"
            )
        self.f = None if f is None else int_param(self.name, "f", f, minimum=0)
        self.n = None if n is None else int_param(self.name, "n", n, minimum=1)
        self.z = None if z is None else float_param(self.name, "z", z)
        self.ddof = int_param(self.name, "ddof", ddof, minimum=0, maximum=1)
        if self.f is not None and self.n is not None:
            alie_z(self.n, self.f)  # validate early

    def z_for(self, h: int) -> float:
        """The z used when h honest vectors are given."""
        if self.z is not None:
            return self.z
        return alie_z(self.n if self.n is not None else h + self.f, self.f)

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        h = honest.shape[0]
        if h <= self.ddof:
            raise ValueError(f"alie needs more than ddof={self.ddof} honest vectors (got h={h})")
        z = self.z_for(h)
        return honest.mean(axis=0) - z * honest.std(axis=0, ddof=self.ddof)
