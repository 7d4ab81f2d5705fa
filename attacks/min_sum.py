"""Min-sum (Shejwalkar & Houmansadr)."""

from __future__ import annotations

import numpy as np

from defenses._arrays import pairwise_sq_dists

from ._base import register
from .min_max import MinMax, bisect_gamma, perturbation


def sum_sq_dists(honest: np.ndarray, v: np.ndarray) -> float:
    """Sum of the squared distances from ``v`` to the honest vectors."""
    diff = honest.astype(np.float64, copy=False) - v
    return float(np.einsum("ij,ij->", diff, diff))


def bound(honest: np.ndarray) -> float:
    r"""The min-sum bound :math:`\max_i \sum_j \lVert x_i - x_j \rVert^2`."""
    return float(pairwise_sq_dists(honest.astype(np.float64, copy=False)).sum(axis=1).max())


def max_gamma(honest: np.ndarray, p: np.ndarray) -> float:
    r"""Largest :math:`\gamma \ge 0` with :math:`\sum_i \lVert \mu + \gamma p - x_i \rVert^2 \le
    \max_i \sum_j \lVert x_i - x_j \rVert^2`, in closed form.

    The deviations from the mean sum to zero, so the left side is
    :math:`S + h \gamma^2 \lVert p \rVert^2` with :math:`S = \sum_i \lVert x_i - \mu \rVert^2`, and each
    row sum on the right is :math:`h \lVert x_i - \mu \rVert^2 + S`. The constraint is therefore
    :math:`\gamma \lVert p \rVert \le \max_i \lVert x_i - \mu \rVert`: v lies no farther from the mean
    than the farthest honest vector.
    """
    x = honest.astype(np.float64, copy=False)
    norm = float(np.linalg.norm(p))
    if norm == 0.0:
        return 0.0
    radius = float(np.sqrt(np.max(np.einsum("ij,ij->i", x - x.mean(axis=0), x - x.mean(axis=0)))))
    return radius / norm


@register("min_sum", aliases=("minsum",))
class MinSum(MinMax):
    r"""Min-sum: move the honest mean along a perturbation as far as possible while the sum of squared
    distances to the honest vectors stays within that of the most outlying honest vector.

    .. math::

        v = \mu + \gamma^* p, \qquad
        \gamma^* = \max\Bigl\{\gamma \ge 0 : \sum_i \lVert v - x_i \rVert^2
        \le \max_i \sum_j \lVert x_i - x_j \rVert^2\Bigr\}
        = \frac{\max_i \lVert x_i - \mu \rVert}{\lVert p \rVert}

    with :math:`\mu` the honest mean and p one of: -std (coordinate-wise, ddof=1), the inverse unit mean
    :math:`-\mu / \lVert \mu \rVert`, or :math:`-\mathrm{sign}(\mu)` (as in ``min_max``). The closed form
    is derived in :func:`attacks.min_sum.max_gamma`.

    Parameters
    ----------
    perturbation : {"std", "unit", "sign"}, default "std"
        The direction p.
    method : {"exact", "bisect"}, default "exact"
        ``"exact"`` uses the closed form; ``"bisect"`` reproduces the paper's search: grow gamma from
        ``gamma_init`` until infeasible, then bisect until the bracket is below ``tol``, keeping the
        feasible end.
    gamma_init : float, default 10.0
        First trial gamma of the bisection (the paper's initial value); > 0.
    tol : float, default 1e-5
        Bisection stopping width (the paper's threshold); > 0.

    Notes
    -----
    Omniscient: reads the honest vectors of the round. Not tuned to the defense: the constraint is the
    paper's stand-in for "not an outlier" under rules that score vectors by their summed distances (Krum,
    Bulyan). Compared with ``min_max``, which bounds the largest distance to an honest vector by the
    largest honest pairwise distance, min-sum bounds the sum, which here allows exactly the honest
    radius around the mean.

    References
    ----------
    V. Shejwalkar, A. Houmansadr. "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
    Defenses for Federated Learning." NDSS 2021.

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> honest = np.array([[0.], [1.], [5.]])  # mean 2; 5 is 3 away from it
    >>> attacks.get("min_sum", perturbation="unit")(honest=honest)  # sums of squares: 1+4+36 = 25+16
    array([-1.])
    >>> attacks.get("min_max", perturbation="unit")(honest=honest)  # for comparison
    array([0.])
    >>> attacks.get("min_sum", perturbation="unit", method="bisect", tol=1e-9)(honest=honest).round(6)
    array([-1.])
    """

    # parameters, their checks and ``omniscient``/``needs_honest``/``reference``: min_max's (MinMax)

    def direction(self, honest: np.ndarray) -> np.ndarray:
        """The perturbation p for these honest vectors (numpy)."""
        if self.perturbation == "std" and honest.shape[0] < 2:
            # checked here so that the message names this attack, not min_max
            raise ValueError(
                f"{self.name} with perturbation='std' needs at least 2 honest vectors (got {honest.shape[0]})"
            )
        return perturbation(honest, self.perturbation)

    def gamma(self, honest: np.ndarray) -> float:
        """gamma* for these honest vectors (numpy)."""
        return self._gamma(honest, self.direction(honest))

    def _gamma(self, honest: np.ndarray, p: np.ndarray) -> float:
        if self.method == "exact":
            return max_gamma(honest, p)
        if not np.any(p):
            return 0.0
        x = honest.astype(np.float64, copy=False)
        mu, limit = x.mean(axis=0), bound(x)
        return bisect_gamma(lambda g: sum_sq_dists(x, mu + g * p) <= limit, self.gamma_init, self.tol)

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        p = self.direction(honest)
        return honest.astype(np.float64).mean(axis=0) + self._gamma(honest, p) * p
