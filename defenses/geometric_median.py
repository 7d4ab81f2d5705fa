"""Geometric median by the smoothed Weiszfeld algorithm (RFA)."""

from __future__ import annotations

import numpy as np

from ._arrays import finite_rows, row_norms
from ._base import Aggregator, register
from ._registry import choice_param, float_param, int_param
from .median import coordinate_median


@register("geometric_median", aliases=("geomed", "rfa"))
class GeometricMedian(Aggregator):
    r"""Geometric median, approximated by the smoothed Weiszfeld algorithm.

    The geometric median minimises :math:`g(z) = \sum_i \lVert z - x_i \rVert`. Starting from
    :math:`z_0`, each Weiszfeld step is

    .. math::

        \beta_i = \frac{1}{\max(\nu, \lVert z_t - x_i \rVert)}, \qquad
        z_{t+1} = \frac{\sum_i \beta_i x_i}{\sum_i \beta_i}

    where the smoothing :math:`\nu` (``eps``) avoids division by zero near an input. Iteration stops after
    ``max_iter`` steps or once :math:`\lVert z_{t+1} - z_t \rVert \le \mathrm{tol} \cdot
    \mathrm{median}_i \lVert z_t - x_i \rVert`.

    Parameters
    ----------
    f : int, default 0
        Number of Byzantine inputs tolerated; only used by :meth:`check`.
    eps : float, default 1e-6
        Smoothing nu > 0.
    max_iter : int, default 100
        Maximum number of Weiszfeld steps (>= 1).
    tol : float, default 1e-6
        Relative tolerance on the step length (>= 0); 0 runs exactly ``max_iter`` steps.
    init : {"median", "mean", "zero"}, default "median"
        Starting point: the coordinate-wise median, the mean (RFA's choice), or zero (ByzFL's choice). If
        the mean overflows, the coordinate-wise median is used instead.

    Notes
    -----
    Two departures from RFA, both for inputs with huge Byzantine vectors: RFA stops on the relative change
    of the objective, which a single huge input dominates (it would stop after one step, far from the
    minimum), so we stop on the step length relative to the median distance; and we start at the
    coordinate-wise median, inside the honest range, rather than at the mean, from which Weiszfeld only
    halves its distance per step when one input is huge.

    (n, f) condition: n > 2f (the geometric median's breakdown point is 1/2). Vectors with a non-finite
    entry are dropped (their Weiszfeld weight tends to 0). With ``init="zero"``, ``tol=0`` and
    ``max_iter=T`` this is ByzFL's ``GeometricMedian(nu=eps, T=T)``. No in-database form.

    References
    ----------
    K. Pillutla, S. M. Kakade, Z. Harchaoui. "Robust Aggregation for Federated Learning." IEEE Transactions
    on Signal Processing, 2022.

    Examples
    --------
    >>> import numpy as np
    >>> import defenses
    >>> x = np.array([[0., 0.], [2., 0.], [0., 2.], [2., 2.], [100., 100.]])
    >>> np.round(defenses.get("geometric_median", f=1)(x), 4)
    array([2., 2.])
    """

    reference = "Pillutla, Kakade, Harchaoui, IEEE Trans. Signal Processing 2022"
    requirement = "n > 2f"
    in_db = False

    def __init__(
        self, f: int = 0, eps: float = 1e-6, max_iter: int = 100, tol: float = 1e-6, init: str = "median"
    ):
        super().__init__(f)
        self.eps = float_param(self.name, "eps", eps, minimum=0.0, strict_min=True)
        self.max_iter = int_param(self.name, "max_iter", max_iter, minimum=1)
        self.tol = float_param(self.name, "tol", tol, minimum=0.0)
        self.init = choice_param(self.name, "init", init, ("median", "mean", "zero"))

    def conditions(self, n: int, f: int) -> list[tuple[bool, str]]:
        return [(n > 2 * f, "n > 2f")]

    def _start(self, x: np.ndarray) -> np.ndarray:
        if self.init == "zero":
            return np.zeros(x.shape[1], dtype=np.float64)
        if self.init == "mean":
            with np.errstate(over="ignore", invalid="ignore"):
                z = x.mean(axis=0, dtype=np.float64)
            if np.all(np.isfinite(z)):
                return z
        return coordinate_median(x).astype(np.float64)

    def aggregate(self, x: np.ndarray, **_: object) -> np.ndarray:
        pts = x[finite_rows(x)]
        if pts.shape[0] == 0:
            return np.full(x.shape[1], np.nan, dtype=x.dtype)
        z = self._start(pts)
        # the steps compute in float64: convert the inputs once, not in every subtraction and product
        # (numpy converted them there anyway, so the values are the same)
        p64 = pts.astype(np.float64, copy=False)
        diff = np.empty_like(p64)
        for _ in range(self.max_iter):
            dist = row_norms(np.subtract(p64, z, out=diff))
            beta = 1.0 / np.maximum(dist, self.eps)
            beta /= beta.sum()
            z_next = beta @ p64
            if not np.all(np.isfinite(z_next)):
                break
            step = float(row_norms((z_next - z)[None, :])[0])
            z = z_next
            if step <= self.tol * float(np.median(dist)):
                break
        return z.astype(x.dtype, copy=False)
