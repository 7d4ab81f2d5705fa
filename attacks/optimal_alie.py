"""ALIE with its shift tuned against the configured defense."""

from __future__ import annotations

from typing import Any

import numpy as np

from defenses._registry import int_param

from ._adaptive import Adaptive, interval, search_strength
from ._base import ModelAttack, register


@register("optimal_alie", aliases=("opt_alie",))
class OptimalALIE(Adaptive, ModelAttack):
    r"""Optimal ALIE: the ALIE shift z that does the most damage under the configured defense.

    .. math::

        v(z) = \mu - z\, \sigma, \qquad
        z^* = \arg\max_{z \in [z_{min}, z_{max}]}
        \lVert \mathrm{rule}(x_1, \dots, x_h, \underbrace{v(z), \dots, v(z)}_{f}) - \mu \rVert_2

    with :math:`\mu`, :math:`\sigma` the coordinate-wise mean and standard deviation of the honest vectors
    and ``rule`` the defense with its pre-aggregators. z* is found by the budgeted line search of
    :func:`attacks._adaptive.line_search` (a grid, then golden-section refinement).

    Parameters
    ----------
    f : int or None, default None
        Number of Byzantine peers, each sending v(z). In a run: ``attack.byzantine``. None: the defense's
        own f (at least 1).
    defense : aggregator object or str, default "mean"
        The rule the honest peers run. In a run: the configured one (``aggregation.defense``,
        ``.params`` and ``.pre``), passed by the Byzantine peer. A name is built with ``f``.
    evaluations : int, default 20
        Budget of defense evaluations per call (>= 2); ``last_search`` reports the chosen z, its damage and
        the evaluations used. ByzFL's optimal ALIE also spends 20.
    z_min, z_max : float, default -5.0, 5.0
        The search interval. Both signs: the damage of a shift below the mean and of one above it differ
        whenever the honest values are skewed, and ByzFL's convention (mean + tau std) is the negative
        side of Baruch et al.'s (mean - z std). Up to 5 in magnitude: by Samuelson's inequality no value
        of h honest vectors lies farther than :math:`(h - 1)/\sqrt{h}` sample standard deviations from
        their mean, less than 5 for h <= 26, so at |z| = 5 the vector is already outside the honest range
        in every coordinate, where order-based rules (median, trimmed mean) give nothing more for a larger
        shift. Against the plain mean the damage grows without bound and the search stops at an end.
    ddof : int, default 1
        Delta degrees of freedom of the standard deviation, as in ``alie``.

    Notes
    -----
    Omniscient: reads the honest vectors of the round. Cost: ``evaluations`` aggregations of h + f
    vectors per call. The f Byzantine peers run the same attack on the same honest vectors, so every
    recipient receives f copies of v(z*). Ties go to the first candidate evaluated (grid from z_min up).

    References
    ----------
    M. Baruch, G. Baruch, Y. Goldberg. "A Little Is Enough: Circumventing Defenses For Distributed
    Learning." NeurIPS 2019. The optimised variant: Y. Allouah, S. Farhadkhani, R. Guerraoui, N. Gupta,
    R. Pinot, J. Stephan. "Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity."
    AISTATS 2023 (ByzFL's ``Optimal_ALittleIsEnough``).

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> honest = np.array([[0.], [1.], [2.], [6.]])  # mean 2.25, sample std 2.63
    >>> attack = attacks.get("optimal_alie", defense="trimmed_mean", f=1)
    >>> attack(honest=honest).round(4)  # below every honest value: trimmed, and so is 6
    array([-0.38])
    >>> attack.last_search  # the trimmed mean keeps 0, 1, 2: 1.25 below the honest mean
    Search(strength=1.0, damage=1.25, evaluations=20)
    >>> attacks.get("optimal_alie", defense="mean", f=1)(honest=honest).round(4)  # the mean: z_min
    array([15.3998])
    """

    omniscient = True
    needs_honest = True
    reference = "Baruch, Baruch, Goldberg, NeurIPS 2019; Allouah et al., AISTATS 2023"

    def __init__(self, f: int | None = None, defense: Any = "mean", evaluations: int = 20,
                 z_min: float = -5.0, z_max: float = 5.0, ddof: int = 1):
        self._adaptive_params(defense, f, evaluations)
        self.z_min, self.z_max = interval(self.name, "z_min", z_min, "z_max", z_max)
        self.ddof = int_param(self.name, "ddof", ddof, minimum=0, maximum=1)

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        x = honest.astype(np.float64)
        if x.shape[0] <= self.ddof:
            raise ValueError(f"{self.name} needs more than ddof={self.ddof} honest vectors (got h={x.shape[0]})")
        mu, sd = x.mean(axis=0), x.std(axis=0, ddof=self.ddof)
        self.last_search = search_strength(self.defense, x, mu, -sd, self.copies, self.z_min, self.z_max,
                                           self.evaluations)
        return mu - self.last_search.strength * sd
