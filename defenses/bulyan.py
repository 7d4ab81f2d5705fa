"""Bulyan: iterated Krum selection followed by a coordinate-wise trimmed average around the median."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import pairwise_sq_dists, sort_columns, square_matrix
from ._base import Aggregator, Selection, register
from .krum import krum_order, krum_scores, neighbour_count, validate_neighbours
from .median import middle


def closest_to_median_mean(s: np.ndarray, beta: int) -> np.ndarray:
    """Per coordinate, the mean of the ``beta`` values of ``s`` (rows) closest to their median.

    The beta values nearest to the median form a contiguous window of the sorted column, so the window
    is found among the ``rows - beta + 1`` candidates by its largest distance to the median; this keeps
    memory at O(rows * d) instead of an index array per coordinate. NaN ranks above +inf.
    """
    rows, d = s.shape
    srt = sort_columns(s)
    med = middle(srt)
    best_start = np.zeros(d, dtype=np.intp)
    best_spread = np.full(d, np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(rows - beta + 1):
            spread = np.maximum(med - srt[start], srt[start + beta - 1] - med)
            spread[np.isnan(spread)] = np.inf
            better = spread < best_spread
            best_start[better] = start
            best_spread[better] = spread[better]
        cols = np.arange(d)
        total = np.zeros(d, dtype=np.result_type(s.dtype, np.float64))
        for offset in range(beta):
            total += srt[best_start + offset, cols]
    return (total / beta).astype(s.dtype, copy=False)


@register("bulyan")
class Bulyan(Aggregator):
    r"""Bulyan: select theta = n - 2f vectors by repeatedly applying Krum to the remaining vectors, then,
    per coordinate, average the beta = theta - 2f selected values closest to their median.

    .. math::

        S = \{\mathrm{Krum}\ \text{applied } \theta \text{ times, removing each winner}\}, \qquad
        [\mathrm{Bulyan}(x)]_j = \frac{1}{\beta} \sum_{i \in B_j} x_{ij}

    where :math:`B_j` are the beta indices of S whose j-th coordinate is closest to
    :math:`\mathrm{median}_{i \in S} x_{ij}`.

    Parameters
    ----------
    f : int, default 0
        Number of Byzantine inputs tolerated.
    neighbours : {"n-f-2", "n-f-1"} or int, default "n-f-2"
        Neighbour convention of the inner Krum, applied to the size n' of the remaining set at each step
        (k = n' - f - 2 by default), clamped to [1, n' - 1]. The clamp matters in the last steps, where
        n' falls to 2f + 1 and n' - f - 2 to f - 1: a score over 0 neighbours would be 0 for every vector and
        the pick would depend on the input order.

    Notes
    -----
    (n, f) condition: n >= 4f + 3. Selection ties are broken as in Krum; per coordinate, ties go to the
    lower window. :meth:`select` takes the (n, n) squared-distance matrix, so distances may be computed
    elsewhere; the coordinate-wise step has no in-database form and runs on the client.

    References
    ----------
    E. M. El Mhamdi, R. Guerraoui, S. Rouault. "The Hidden Vulnerability of Distributed Learning in
    Byzantium." ICML 2018.

    Examples
    --------
    >>> import numpy as np
    >>> import defenses
    >>> defenses.get("bulyan", f=1)(np.array([[0.], [1.], [2.], [3.], [4.], [5.], [1000.]]))
    array([3.])
    """

    reference = "El Mhamdi, Guerraoui, Rouault, ICML 2018"
    requirement = "n >= 4f + 3"
    in_db = False

    def __init__(self, f: int = 0, neighbours: str | int = "n-f-2"):
        super().__init__(f)
        self.neighbours = validate_neighbours(self.name, neighbours)

    def conditions(self, n: int, f: int) -> list[tuple[bool, str]]:
        return [(n >= 4 * f + 3, "n >= 4f + 3")]

    def select(self, sq_dists: Any) -> Selection:
        """Iterated Krum selection of theta = n - 2f rows from an (n, n) squared-distance matrix.

        Returns
        -------
        Selection
            ``indices``: the theta rows in the order they were picked; ``scores``: the (n,) Krum scores
            of the first round (on all n vectors).
        """
        d = square_matrix(sq_dists)
        n = d.shape[0]
        self.check(n)
        remaining = list(range(n))
        chosen: list[int] = []
        first_scores = None
        for _ in range(n - 2 * self.f):
            sub = d[np.ix_(remaining, remaining)]
            size = len(remaining)
            k = neighbour_count(self.neighbours, size, self.f)
            scores = krum_scores(sub, max(k, min(1, size - 1)))
            if first_scores is None:
                first_scores = scores
            chosen.append(remaining.pop(int(krum_order(sub, scores)[0])))
        return Selection(np.array(chosen, dtype=np.intp), first_scores)

    def aggregate(self, x: np.ndarray, **_: object) -> np.ndarray:
        chosen = np.sort(self.select(pairwise_sq_dists(x)).indices)
        theta = len(chosen)
        return closest_to_median_mean(x[chosen], theta - 2 * self.f)
