"""Krum, and the distance-based scoring shared by Multi-Krum and Bulyan."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import pairwise_sq_dists, square_matrix
from ._base import Aggregator, InDBPlan, Selection, is_int, register
from ._registry import int_param

NEIGHBOUR_CONVENTIONS = ("n-f-2", "n-f-1")


def validate_neighbours(owner: str, neighbours: Any) -> str | int:
    """``"n-f-2"`` (Blanchard et al.), ``"n-f-1"`` (ByzFL) or a fixed positive integer."""
    if is_int(neighbours):
        return int_param(owner, "neighbours", neighbours, minimum=1)
    if isinstance(neighbours, str) and neighbours in NEIGHBOUR_CONVENTIONS:
        return neighbours
    raise ValueError(
        f"{owner}: parameter 'neighbours' must be 'n-f-2', 'n-f-1' or an integer >= 1 (got {neighbours!r})"
    )


def neighbour_count(neighbours: str | int, n: int, f: int) -> int:
    """Number of nearest neighbours whose squared distances make up a Krum score."""
    if neighbours == "n-f-2":
        return n - f - 2
    if neighbours == "n-f-1":
        return n - f - 1
    return int(neighbours)


def neighbour_conditions(neighbours: str | int, n: int, f: int) -> list[tuple[bool, str]]:
    """(n, f) conditions attached to each neighbour convention.

    * ``"n-f-2"``: n > 2f + 2, the condition of Blanchard et al.'s guarantee.
    * ``"n-f-1"``: n > 2f, ByzFL's condition.
    * integer k: n > 2f and k <= n - 1.
    """
    if neighbours == "n-f-2":
        return [(n > 2 * f + 2, "n > 2f + 2")]
    if neighbours == "n-f-1":
        return [(n > 2 * f, "n > 2f")]
    return [(n > 2 * f, "n > 2f"), (n - 1 >= int(neighbours), f"n - 1 >= neighbours = {neighbours}")]


def krum_scores(sq_dists: np.ndarray, k: int) -> np.ndarray:
    """Krum score of every row: the sum of its k smallest squared distances to the *other* rows.

    ``k`` is clamped to [0, n - 1]. NaN distances count as ``inf``.
    """
    d = np.array(sq_dists, dtype=np.float64, copy=True)
    n = d.shape[0]
    k = max(0, min(k, n - 1))
    d[np.isnan(d)] = np.inf
    np.fill_diagonal(d, np.inf)  # a vector is not its own neighbour
    if k == 0:
        return np.zeros(n)
    nearest = np.sort(d, axis=1)[:, :k]
    with np.errstate(invalid="ignore", over="ignore"):
        return nearest.sum(axis=1)


def krum_order(sq_dists: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Row indices from best to worst score.

    Ties in the score are broken by the sum of squared distances to all other rows, then by the lowest
    index. The first key matters for k = 1, where the two mutually nearest vectors always tie: breaking
    that tie by index alone would make the output depend on the order of the inputs.
    """
    d = np.array(sq_dists, dtype=np.float64, copy=True)
    d[np.isnan(d)] = np.inf
    np.fill_diagonal(d, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        totals = d.sum(axis=1)
    return np.lexsort((np.arange(len(scores)), totals, scores))


@register("krum")
class Krum(Aggregator):
    r"""Krum: output the input vector with the smallest sum of squared distances to its k nearest
    neighbours.

    .. math::

        s(i) = \sum_{j \in N_k(i)} \lVert x_i - x_j \rVert^2, \qquad
        \mathrm{Krum}(x_1, \dots, x_n) = x_{i^*}, \quad i^* = \arg\min_i s(i)

    where :math:`N_k(i)` are the k vectors closest to :math:`x_i` (excluding itself). Ties in s (with
    k = 1 the two mutually nearest vectors always tie) go to the smaller sum of squared distances to all
    vectors, then to the lowest index, so the output does not depend on the input order.

    Parameters
    ----------
    f : int, default 0
        Number of Byzantine inputs tolerated.
    neighbours : {"n-f-2", "n-f-1"} or int, default "n-f-2"
        The neighbour count k. ``"n-f-2"`` is the original paper's (and Flower's); ``"n-f-1"`` is ByzFL's
        (which averages instead of summing the distances, an equivalent score); an integer fixes k.

    Notes
    -----
    (n, f) condition: n > 2f + 2 for ``"n-f-2"`` (Blanchard et al.); n > 2f for ``"n-f-1"`` (ByzFL);
    n > 2f and k <= n - 1 for an integer k.

    The rule is split so that distances can be computed elsewhere (e.g. inside the database):
    :meth:`select` takes the (n, n) squared-distance matrix and returns the chosen index and the scores.
    In-database form: ``InDBPlan("mean", select=True)`` -- distance matrix in the database, selection on
    the client, then the database reduces the selected row.

    References
    ----------
    P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer. "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent." NeurIPS 2017.

    Examples
    --------
    >>> import numpy as np
    >>> import defenses
    >>> x = np.array([[1.], [2.], [3.], [4.], [100.]])
    >>> defenses.get("krum", f=1)(x)
    array([3.])
    >>> defenses.get("krum", f=1).select(defenses.pairwise_sq_dists(x)).indices
    array([2])
    """

    reference = "Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017"
    requirement = "n > 2f + 2 (neighbours='n-f-2'); n > 2f (neighbours='n-f-1')"
    in_db = True

    def __init__(self, f: int = 0, neighbours: str | int = "n-f-2"):
        super().__init__(f)
        self.neighbours = validate_neighbours(self.name, neighbours)

    def conditions(self, n: int, f: int) -> list[tuple[bool, str]]:
        return neighbour_conditions(self.neighbours, n, f)

    def scores(self, sq_dists: Any) -> np.ndarray:
        """Krum scores (n,) from an (n, n) squared-distance matrix (numpy or torch)."""
        d = square_matrix(sq_dists)
        self.check(d.shape[0])
        return krum_scores(d, neighbour_count(self.neighbours, d.shape[0], self.f))

    def select(self, sq_dists: Any) -> Selection:
        """Choose the Krum vector from an (n, n) squared-distance matrix.

        Returns
        -------
        Selection
            ``indices``: a length-1 int array with the chosen row; ``scores``: the (n,) Krum scores.
        """
        d = square_matrix(sq_dists)
        scores = self.scores(d)
        return Selection(krum_order(d, scores)[:1], scores)

    def aggregate(self, x: np.ndarray, **_: object) -> np.ndarray:
        chosen = self.select(pairwise_sq_dists(x)).indices
        return x[chosen[0]].copy()

    def in_db_plan(self) -> InDBPlan:
        return InDBPlan("mean", select=True)
