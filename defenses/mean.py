"""Arithmetic mean (the non-robust baseline, SPIRT's original aggregation)."""

from __future__ import annotations

import numpy as np

from ._base import Aggregator, InDBPlan, register


@register("mean", aliases=("average",))
class Mean(Aggregator):
    r"""Arithmetic mean of the n vectors (no Byzantine robustness).

    .. math:: \mathrm{Mean}(x_1, \dots, x_n) = \frac{1}{n} \sum_{i=1}^{n} x_i

    Parameters
    ----------
    f : int, default 0
        Accepted for a uniform interface; the mean tolerates no Byzantine input (a single vector moves it
        arbitrarily far), so ``f`` is not constrained and not used.

    Notes
    -----
    (n, f) condition: n >= 1. In-database form: the ``"mean"`` reduction over all rows. Non-finite inputs
    propagate to the output (this is the unprotected baseline).

    References
    ----------
    Baseline federated averaging (McMahan et al., AISTATS 2017).

    Examples
    --------
    >>> import numpy as np
    >>> import defenses
    >>> defenses.get("mean")(np.array([[1., 2.], [3., 4.], [5., 0.]]))
    array([3., 2.])
    """

    reference = "McMahan et al., AISTATS 2017 (federated averaging baseline)"
    requirement = "n >= 1 (no Byzantine tolerance)"
    in_db = True

    def __init__(self, f: int = 0):
        super().__init__(f)

    def aggregate(self, x: np.ndarray, **_: object) -> np.ndarray:
        return x.mean(axis=0)

    def in_db_plan(self) -> InDBPlan:
        return InDBPlan("mean")
