"""Coordinate-wise median (CWMed)."""

from __future__ import annotations

import numpy as np

from ._arrays import NETWORK_MAX_ROWS, sorted_rows
from ._base import Aggregator, InDBPlan, register


def coordinate_median(x: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of the rows of ``x``; NaN entries count as larger than every number.

    For even n the two middle values are averaged (numpy's convention).
    """
    n = x.shape[0]
    mid = n // 2
    kth = [mid - 1, mid] if n % 2 == 0 else [mid]
    # NaN is sorted after +inf by both; a few rows sort faster than numpy selects along axis 0 (and
    # only the middle rows are computed)
    if n <= NETWORK_MAX_ROWS:
        rows = sorted_rows(x, range(kth[0], mid + 1))
        return rows[0].copy() if n % 2 else rows[0] * 0.5 + rows[1] * 0.5  # as middle() does
    return middle(np.partition(x, kth, axis=0))


def middle(part: np.ndarray) -> np.ndarray:
    """The coordinate-wise median of rows whose middle rows are in sorted position (sorted or
    partitioned columns, as :func:`coordinate_median` makes them)."""
    n = part.shape[0]
    mid = n // 2
    if n % 2:
        return part[mid].copy()
    return part[mid - 1] * 0.5 + part[mid] * 0.5  # no overflow for huge finite values


@register("median", aliases=("cwmed", "coordinate_median"))
class Median(Aggregator):
    r"""Coordinate-wise median (CWMed): the median of each coordinate over the n vectors.

    .. math:: [\mathrm{CWMed}(x_1, \dots, x_n)]_j = \mathrm{median}(x_{1j}, \dots, x_{nj})

    For even n, the mean of the two middle values.

    Parameters
    ----------
    f : int, default 0
        Number of Byzantine inputs tolerated; only used by :meth:`check`.

    Notes
    -----
    (n, f) condition: n > 2f. Then, in every coordinate, the output lies within the range of the honest
    values. NaN entries are ranked above +inf, so up to f NaN/inf values per coordinate are harmless.
    In-database form: the ``"median"`` reduction.

    References
    ----------
    D. Yin, Y. Chen, K. Ramchandran, P. Bartlett. "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates." ICML 2018.

    Examples
    --------
    >>> import numpy as np
    >>> import defenses
    >>> defenses.get("median", f=1)(np.array([[1.], [2.], [10.]]))
    array([2.])
    >>> defenses.get("median", f=1)(np.array([[1.], [2.]]))
    Traceback (most recent call last):
    ...
    ValueError: median requires n > 2f (got n=2, f=1)
    """

    reference = "Yin, Chen, Ramchandran, Bartlett, ICML 2018"
    requirement = "n > 2f"
    in_db = True

    def __init__(self, f: int = 0):
        super().__init__(f)

    def conditions(self, n: int, f: int) -> list[tuple[bool, str]]:
        return [(n > 2 * f, "n > 2f")]

    def aggregate(self, x: np.ndarray, **_: object) -> np.ndarray:
        return coordinate_median(x)

    def in_db_plan(self) -> InDBPlan:
        return InDBPlan("median")
