"""IPM with its scale tuned against the configured defense."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._adaptive import Adaptive, scale_interval, search_strength
from ._base import ModelAttack, register


@register("optimal_ipm", aliases=("opt_ipm",))
class OptimalIPM(Adaptive, ModelAttack):
    r"""Optimal IPM: the IPM scale epsilon that does the most damage under the configured defense.

    .. math::

        v(\varepsilon) = -\varepsilon\, \mu, \qquad
        \varepsilon^* = \arg\max_{\varepsilon \in [\varepsilon_{min}, \varepsilon_{max}]}
        \lVert \mathrm{rule}(x_1, \dots, x_h, \underbrace{v(\varepsilon), \dots, v(\varepsilon)}_{f})
        - \mu \rVert_2

    with :math:`\mu` the honest mean and ``rule`` the defense with its pre-aggregators; epsilon* is found
    by the budgeted line search of :func:`attacks._adaptive.line_search` (a grid, then golden-section
    refinement), on a log scale.

    Parameters
    ----------
    f : int or None, default None
        Number of Byzantine peers, each sending v(epsilon). In a run: ``attack.byzantine``. None: the
        defense's own f (at least 1).
    defense : aggregator object or str, default "mean"
        The rule the honest peers run. In a run: the configured one (``aggregation.defense``,
        ``.params`` and ``.pre``), passed by the Byzantine peer. A name is built with ``f``.
    evaluations : int, default 20
        Budget of defense evaluations per call (>= 2); ``last_search`` reports the chosen epsilon, its damage
        and the evaluations used.
    eps_min, eps_max : float, default 0.01, 20.0
        The search interval (0 < eps_min < eps_max), searched evenly in log epsilon: epsilon is a scale,
        and the damaging range may be a narrow one near 0 (against Krum or NNM only a vector close to the
        honest ones is kept: Xie et al. use 0.1 there) or the whole top of the interval (against the median
        Xie et al. use 10; ByzFL's default is 2). Beyond 20, order-based rules have long trimmed the vector
        away in every coordinate where the mean is not tiny, and only the plain mean rewards a larger
        scale (the search then stops at eps_max). With 20 evaluations the grid has 11 points, about a
        factor 2 apart.

    Notes
    -----
    Omniscient: reads the honest vectors of the round. Cost: ``evaluations`` aggregations of h + f
    vectors per call. The f Byzantine peers run the same attack on the same honest vectors, so every
    recipient receives f copies of the vector. Ties go to the first candidate evaluated (grid from
    eps_min up).

    References
    ----------
    C. Xie, O. Koyejo, I. Gupta. "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
    Manipulation." UAI 2020. The optimised variant: Y. Allouah, S. Farhadkhani, R. Guerraoui, N. Gupta,
    R. Pinot, J. Stephan. "Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity."
    AISTATS 2023 (ByzFL's ``Optimal_InnerProductManipulation``).

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> import defenses
    >>> honest = np.array([[1.], [2.], [3.], [4.]])  # mean 2.5
    >>> attack = attacks.get("optimal_ipm", defense=defenses.get("trimmed_mean", f=1, pre=["nnm"]), f=1)
    >>> attack(honest=honest).round(3)  # from -2 down, NNM no longer mixes v into honest neighbourhoods
    array([-1.998])
    >>> round(attack.last_search.strength, 3), round(attack.last_search.damage, 3)  # ipm's 0.1: 0.354
    (0.799, 0.5)
    >>> attacks.get("optimal_ipm", defense="mean", f=1)(honest=honest)  # the plain mean: eps_max
    array([-50.])
    """

    omniscient = True
    needs_honest = True
    reference = "Xie, Koyejo, Gupta, UAI 2020; Allouah et al., AISTATS 2023"

    def __init__(self, f: int | None = None, defense: Any = "mean", evaluations: int = 20,
                 eps_min: float = 0.01, eps_max: float = 20.0):
        self._adaptive_params(defense, f, evaluations)
        self.eps_min, self.eps_max = scale_interval(self.name, eps_min, eps_max)

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        x = honest.astype(np.float64)
        mu = x.mean(axis=0)
        self.last_search = search_strength(self.defense, x, np.zeros_like(mu), -mu, self.copies, self.eps_min,
                                           self.eps_max, self.evaluations, log=True)
        return -self.last_search.strength * mu
