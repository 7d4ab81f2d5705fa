"""Coordinate-wise trimmed mean (CWTM)."""

from __future__ import annotations

import numpy as np

from ._arrays import mean_of_rows, sorted_rows
from ._base import Aggregator, InDBPlan, register


def coordinate_trimmed_mean(x: np.ndarray, trim: int) -> np.ndarray:
    """Mean of each coordinate after dropping its ``trim`` smallest and ``trim`` largest values.

    NaN entries rank above +inf, so they are among the first dropped from the top.
    """
    n = x.shape[0]
    if trim == 0:
        return x.mean(axis=0)
    # np.mean over the kept rows, without stacking them into one array first
    return mean_of_rows(sorted_rows(x, range(trim, n - trim)))


@register("trimmed_mean", aliases=("cwtm", "trmean"))
class TrimmedMean(Aggregator):
    r"""Coordinate-wise trimmed mean (CWTM): per coordinate, drop the f smallest and f largest values and
    average the remaining n - 2f.

    .. math:: [\mathrm{CWTM}_f(x_1, \dots, x_n)]_j = \frac{1}{n - 2f} \sum_{k = f + 1}^{n - f} x_{(k) j}

    where :math:`x_{(1) j} \le \dots \le x_{(n) j}` are the sorted values of coordinate j.

    Parameters
    ----------
    f : int, default 0
        Number of values trimmed from each side (= number of Byzantine inputs tolerated).

    Notes
    -----
    (n, f) condition: n > 2f. Then each output coordinate lies within the range of the honest values.
    In-database form: the ``"trimmed_mean"`` reduction with ``trim = f``.

    References
    ----------
    D. Yin, Y. Chen, K. Ramchandran, P. Bartlett. "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates." ICML 2018.

    Examples
    --------
    >>> import numpy as np
    >>> import defenses
    >>> defenses.get("trimmed_mean", f=1)(np.array([[1.], [2.], [3.], [100.]]))
    array([2.5])
    """

    reference = "Yin, Chen, Ramchandran, Bartlett, ICML 2018"
    requirement = "n > 2f"
    in_db = True

    def __init__(self, f: int = 0):
        super().__init__(f)

    def conditions(self, n: int, f: int) -> list[tuple[bool, str]]:
        return [(n > 2 * f, "n > 2f")]

    def aggregate(self, x: np.ndarray, **_: object) -> np.ndarray:
        return coordinate_trimmed_mean(x, self.f)

    def in_db_plan(self) -> InDBPlan:
        return InDBPlan("trimmed_mean", {"trim": self.f})
