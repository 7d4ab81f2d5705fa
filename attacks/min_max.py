"""Min-max (Shejwalkar & Houmansadr)."""

from __future__ import annotations

import numpy as np

from defenses._arrays import pairwise_sq_dists
from defenses._registry import choice_param, float_param

from ._base import ModelAttack, register


def perturbation(honest: np.ndarray, kind: str) -> np.ndarray:
    """Perturbation direction p: ``"std"`` -> -std (ddof=1), ``"unit"`` -> -mean/||mean||,
    ``"sign"`` -> -sign(mean)."""
    x = honest.astype(np.float64, copy=False)
    mu = x.mean(axis=0)
    if kind == "std":
        if x.shape[0] < 2:
            raise ValueError(
                f"min_max with perturbation='std' needs at least 2 honest vectors (got {x.shape[0]})"
            )
        return -x.std(axis=0, ddof=1)
    if kind == "unit":
        norm = np.linalg.norm(mu)
        return -mu / norm if norm > 0 else np.zeros_like(mu)
    return -np.sign(mu)


def max_gamma(honest: np.ndarray, p: np.ndarray) -> float:
    r"""Largest :math:`\gamma \ge 0` with :math:`\max_i \lVert \mu + \gamma p - x_i \rVert \le D`
    (D = the largest pairwise honest distance), in closed form.

    With :math:`c_i = \mu - x_i`, each constraint is the quadratic
    :math:`|p|^2 \gamma^2 + 2 (c_i \cdot p) \gamma + |c_i|^2 - D^2 \le 0`; since
    :math:`|c_i| \le D`, gamma = 0 is feasible and the answer is the smallest of the larger roots.
    """
    x = honest.astype(np.float64, copy=False)
    a = float(p @ p)
    if a == 0.0:
        return 0.0
    dmax2 = float(pairwise_sq_dists(x).max())
    c = x.mean(axis=0) - x
    b = c @ p
    e = np.maximum(dmax2 - np.einsum("ij,ij->i", c, c), 0.0)
    root = np.sqrt(b * b + a * e)
    with np.errstate(divide="ignore", invalid="ignore"):
        # numerically stable larger root of a g^2 + 2 b g - e = 0
        gam = np.where(b > 0, e / (b + root), (root - b) / a)
    gam = np.where(np.isfinite(gam), gam, 0.0)
    return float(max(gam.min(), 0.0))


def bisect_gamma(feasible, gamma_init: float, tol: float) -> float:
    """The paper's search for the largest feasible gamma: grow it from ``gamma_init`` until infeasible,
    then bisect until the bracket is below ``tol``, keeping the feasible end (gamma = 0 is feasible, and
    the feasible gammas form an interval)."""
    lo, hi = 0.0, gamma_init
    for _ in range(200):  # expand until infeasible (the feasible set is bounded when p != 0)
        if not feasible(hi):
            break
        lo, hi = hi, 2 * hi
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if feasible(mid):
            lo = mid
        else:
            hi = mid
    return lo


def feasible(honest: np.ndarray, p: np.ndarray, gamma: float, dmax: float) -> bool:
    x = honest.astype(np.float64, copy=False)
    v = x.mean(axis=0) + gamma * p
    return float(np.sqrt(np.max(np.einsum("ij,ij->i", x - v, x - v)))) <= dmax


@register("min_max", aliases=("minmax",))
class MinMax(ModelAttack):
    r"""Min-max: move the honest mean along a perturbation as far as possible while staying no farther
    from any honest vector than the honest vectors are from each other.

    .. math::

        v = \mu + \gamma^* p, \qquad
        \gamma^* = \max\{\gamma \ge 0 : \max_i \lVert v - x_i \rVert \le \max_{i,j} \lVert x_i - x_j \rVert\}

    with :math:`\mu` the honest mean and p one of: -std (coordinate-wise, ddof=1), the inverse unit mean
    :math:`-\mu / \lVert \mu \rVert`, or :math:`-\mathrm{sign}(\mu)`.

    Parameters
    ----------
    perturbation : {"std", "unit", "sign"}, default "std"
        The direction p.
    method : {"exact", "bisect"}, default "exact"
        ``"exact"`` solves for gamma* in closed form (each constraint is a quadratic in gamma);
        ``"bisect"`` reproduces the paper's search: grow gamma from ``gamma_init`` until infeasible, then
        bisect until the bracket is below ``tol``, keeping the feasible end.
    gamma_init : float, default 10.0
        First trial gamma of the bisection (the paper's initial value); > 0.
    tol : float, default 1e-5
        Bisection stopping width (the paper's threshold); > 0.

    Notes
    -----
    Omniscient: reads the honest vectors of the round. gamma = 0 (the mean) is always feasible, and the
    feasible gammas form an interval, so both methods find the same gamma* (up to ``tol``).

    References
    ----------
    V. Shejwalkar, A. Houmansadr. "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
    Defenses for Federated Learning." NDSS 2021.

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> honest = np.array([[1., 0.], [3., 0.]])  # mean (2, 0), honest distance 2
    >>> attacks.get("min_max", perturbation="unit")(honest=honest)
    array([1., 0.])
    >>> attacks.get("min_max", perturbation="unit", method="bisect", tol=1e-9)(honest=honest).round(6)
    array([1., 0.])
    """

    omniscient = True
    needs_honest = True
    reference = "Shejwalkar, Houmansadr, NDSS 2021"

    def __init__(
        self, perturbation: str = "std", method: str = "exact", gamma_init: float = 10.0, tol: float = 1e-5
    ):
        self.perturbation = choice_param(self.name, "perturbation", perturbation, ("std", "unit", "sign"))
        self.method = choice_param(self.name, "method", method, ("exact", "bisect"))
        self.gamma_init = float_param(self.name, "gamma_init", gamma_init, minimum=0.0, strict_min=True)
        self.tol = float_param(self.name, "tol", tol, minimum=0.0, strict_min=True)

    def gamma(self, honest: np.ndarray) -> float:
        """gamma* for these honest vectors (numpy)."""
        p = perturbation(honest, self.perturbation)
        if self.method == "exact":
            return max_gamma(honest, p)
        if not np.any(p):
            return 0.0
        dmax = float(np.sqrt(pairwise_sq_dists(honest).max()))
        return bisect_gamma(lambda g: feasible(honest, p, g, dmax), self.gamma_init, self.tol)

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        p = perturbation(honest, self.perturbation)
        return honest.astype(np.float64).mean(axis=0) + self.gamma(honest) * p
