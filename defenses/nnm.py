"""Nearest neighbour mixing (NNM) pre-aggregation."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import mean_of_rows, pairwise_sq_dists, square_matrix
from ._base import PreAggregator, register


@register("nnm")
class NNM(PreAggregator):
    r"""Nearest neighbour mixing: replace every vector by the average of its n - f nearest neighbours,
    itself included.

    .. math:: y_i = \frac{1}{n - f} \sum_{j \in N_{n-f}(i)} x_j, \qquad i = 1, \dots, n

    where :math:`N_{n-f}(i)` holds i and the n - f - 1 vectors closest to :math:`x_i` (ties to the lowest
    index). Output: (n, d).

    Parameters
    ----------
    f : int, default 0
        Number of Byzantine inputs tolerated.

    Notes
    -----
    (n, f) condition: n > 2f (Allouah et al. assume f < n/2). Compose with an aggregator, e.g.
    ``defenses.get("krum", f=2, pre=["nnm"])``. :meth:`select` takes the (n, n) squared-distance matrix.

    References
    ----------
    Y. Allouah, S. Farhadkhani, R. Guerraoui, N. Gupta, R. Pinot, J. Stephan. "Fixing by Mixing: A Recipe
    for Optimal Byzantine ML under Heterogeneity." AISTATS 2023.

    Examples
    --------
    >>> import numpy as np
    >>> import defenses
    >>> defenses.get("nnm", f=1)(np.array([[0.], [1.], [3.], [10.]]))
    array([[1.33333333],
           [1.33333333],
           [1.33333333],
           [4.66666667]])
    >>> defenses.get("median", f=1, pre=["nnm"])(np.array([[0.], [1.], [3.], [10.]]))
    array([1.33333333])
    """

    reference = "Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, AISTATS 2023"
    requirement = "n > 2f"
    in_db = False

    def __init__(self, f: int = 0):
        super().__init__(f)

    def conditions(self, n: int, f: int) -> list[tuple[bool, str]]:
        return [(n > 2 * f, "n > 2f")]

    def select(self, sq_dists: Any) -> np.ndarray:
        """(n, n - f) neighbour indices of every row, itself first, from an (n, n) squared-distance matrix."""
        d = square_matrix(sq_dists)
        n = d.shape[0]
        self.check(n)
        d[np.isnan(d)] = np.inf
        np.fill_diagonal(d, -np.inf)  # each vector is its own first neighbour, even among duplicates
        return np.argsort(d, axis=1, kind="stable")[:, : n - self.f]

    def preaggregate(self, x: np.ndarray) -> np.ndarray:
        neighbours = self.select(pairwise_sq_dists(x))
        out = np.empty_like(x)
        for i, rows in enumerate(neighbours):
            # x[rows].mean(axis=0) without copying the n - f rows first (a third of NNM's time)
            out[i] = mean_of_rows([x[k] for k in np.sort(rows)])
        return out
