"""Multi-Krum: average of the m best-scored vectors under Krum's score."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import pairwise_sq_dists, square_matrix
from ._base import Aggregator, InDBPlan, Selection, register
from ._registry import int_param
from .krum import krum_order, krum_scores, neighbour_conditions, neighbour_count, validate_neighbours


@register("multi_krum", aliases=("multikrum", "mkrum"))
class MultiKrum(Aggregator):
    r"""Multi-Krum: average the m vectors with the smallest Krum scores.

    .. math::

        s(i) = \sum_{j \in N_k(i)} \lVert x_i - x_j \rVert^2, \qquad
        \mathrm{MultiKrum}_m(x_1, \dots, x_n) = \frac{1}{m} \sum_{i \in S_m} x_i

    where :math:`S_m` holds the m indices of smallest score (one-shot ranking, as in the paper and ByzFL;
    ties broken as in Krum) and :math:`N_k(i)` are the k nearest other vectors.

    Parameters
    ----------
    f : int, default 0
        Number of Byzantine inputs tolerated.
    m : int or None, default None
        Number of vectors averaged; None means n - f (ByzFL's choice; the largest m that can exclude all
        Byzantine vectors). m = 1 is Krum.
    neighbours : {"n-f-2", "n-f-1"} or int, default "n-f-2"
        Neighbour count k of the score; see :class:`defenses.krum.Krum`.

    Notes
    -----
    (n, f) condition: that of Krum for the chosen neighbour convention (n > 2f + 2 for ``"n-f-2"``,
    n > 2f for ``"n-f-1"``), plus 1 <= m <= n. In-database form: ``InDBPlan("mean", select=True)``;
    :meth:`select` takes the (n, n) squared-distance matrix.

    References
    ----------
    P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer. "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent." NeurIPS 2017.

    Examples
    --------
    >>> import numpy as np
    >>> import defenses
    >>> defenses.get("multi_krum", f=1)(np.array([[1.], [2.], [3.], [4.], [100.]]))
    array([2.5])
    """

    reference = "Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017"
    requirement = "n > 2f + 2 (neighbours='n-f-2'); n > 2f (neighbours='n-f-1'); 1 <= m <= n"
    in_db = True

    def __init__(self, f: int = 0, m: int | None = None, neighbours: str | int = "n-f-2"):
        super().__init__(f)
        self.m = None if m is None else int_param(self.name, "m", m, minimum=1)
        self.neighbours = validate_neighbours(self.name, neighbours)

    def selection_size(self, n: int, f: int | None = None) -> int:
        """The m used for n inputs."""
        f = self.f if f is None else f
        return n - f if self.m is None else self.m

    def conditions(self, n: int, f: int) -> list[tuple[bool, str]]:
        m = self.selection_size(n, f)
        return neighbour_conditions(self.neighbours, n, f) + [(1 <= m <= n, f"1 <= m <= n (m={m})")]

    def select(self, sq_dists: Any) -> Selection:
        """Choose the m best-scored rows from an (n, n) squared-distance matrix (numpy or torch).

        Returns
        -------
        Selection
            ``indices``: the m chosen rows, best first; ``scores``: the (n,) Krum scores.
        """
        d = square_matrix(sq_dists)
        n = d.shape[0]
        self.check(n)
        scores = krum_scores(d, neighbour_count(self.neighbours, n, self.f))
        order = krum_order(d, scores)
        return Selection(order[: self.selection_size(n)], scores)

    def aggregate(self, x: np.ndarray, **_: object) -> np.ndarray:
        chosen = np.sort(self.select(pairwise_sq_dists(x)).indices)
        return x[chosen].mean(axis=0)

    def in_db_plan(self) -> InDBPlan:
        return InDBPlan("mean", select=True)
