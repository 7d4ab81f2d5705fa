"""Centered clipping (CC)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import as_matrix, as_vector, finite_rows, row_norms
from ._base import Aggregator, register
from ._registry import choice_param, float_param, int_param
from .median import coordinate_median


@register("centered_clipping", aliases=("cc", "centred_clipping"))
class CenteredClipping(Aggregator):
    r"""Centered clipping: move a centre v by the average of the inputs' differences to v, each clipped
    to norm at most tau, for L iterations.

    .. math::

        v_{l+1} = v_l + \frac{1}{n} \sum_{i=1}^{n} (x_i - v_l)
                  \min\left(1, \frac{\tau}{\lVert x_i - v_l \rVert}\right), \qquad l = 0, \dots, L - 1

    Parameters
    ----------
    f : int, default 0
        Number of Byzantine inputs tolerated; only used by :meth:`check`.
    tau : float, default 10.0
        Clipping radius (> 0).
    iterations : int, default 1
        Number L of clipping iterations (>= 1); the paper uses L = 1 when v is the previous aggregate.
    init : {"median", "zero"}, default "median"
        Centre :math:`v_0` when none is given: the coordinate-wise median of the inputs, or zero (ByzFL).
    stateful : bool, default False
        If True, the object remembers its last output and uses it as the next call's centre (the paper's
        choice: v = previous aggregate); ``reset()`` forgets it.

    Notes
    -----
    Choice of centre, in order: the ``center`` argument of ``__call__`` (e.g. the previous aggregate kept
    by the caller); else, when ``stateful``, the previous output of this object; else ``init``.

    (n, f) condition: n > 2f (the paper's analysis further assumes a small Byzantine fraction,
    f/n <= 0.1). Vectors with a non-finite entry contribute nothing (their clipped direction is undefined)
    but still count in the 1/n. With ``init="zero"``, ``stateful=False`` this is ByzFL's
    ``CenteredClipping(L=iterations, tau=tau)`` on its first call. No in-database form.

    References
    ----------
    S. P. Karimireddy, L. He, M. Jaggi. "Learning from History for Byzantine Robust Optimization."
    ICML 2021.

    Examples
    --------
    >>> import numpy as np
    >>> import defenses
    >>> x = np.array([[0.], [1.], [2.], [100.]])
    >>> defenses.get("centered_clipping", tau=1.0)(x)  # from the median 1.5: the outlier pulls by tau/n
    array([1.5])
    >>> defenses.get("centered_clipping", tau=1.0)(x, center=np.array([0.]))
    array([0.75])
    """

    reference = "Karimireddy, He, Jaggi, ICML 2021"
    requirement = "n > 2f"
    in_db = False

    def __init__(
        self, f: int = 0, tau: float = 10.0, iterations: int = 1, init: str = "median", stateful: bool = False
    ):
        super().__init__(f)
        self.tau = float_param(self.name, "tau", tau, minimum=0.0, strict_min=True)
        self.iterations = int_param(self.name, "iterations", iterations, minimum=1)
        self.init = choice_param(self.name, "init", init, ("median", "zero"))
        if not isinstance(stateful, bool):
            raise ValueError(f"{self.name}: parameter 'stateful' must be True or False (got {stateful!r})")
        self.stateful = stateful
        self._last: np.ndarray | None = None

    def conditions(self, n: int, f: int) -> list[tuple[bool, str]]:
        return [(n > 2 * f, "n > 2f")]

    def reset(self) -> None:
        """Forget the remembered centre (``stateful=True``)."""
        self._last = None

    def __call__(self, vectors: Any, center: Any = None) -> Any:
        """Aggregate (n, d) vectors; ``center`` (d,), optional, overrides the starting centre."""
        x, restore = as_matrix(vectors)
        self.check(x.shape[0])
        return restore(self.aggregate(x, center=center))

    def aggregate(self, x: np.ndarray, center: Any = None, **_: object) -> np.ndarray:
        n, d = x.shape
        if center is not None:
            v, _ = as_vector(center, "center")
            if v.shape[0] != d:
                raise ValueError(f"{self.name}: center has length {v.shape[0]}, expected d={d}")
            v = v.astype(np.float64)
        elif self.stateful and self._last is not None and self._last.shape[0] == d:
            v = self._last.copy()
        elif self.init == "zero":
            v = np.zeros(d)
        else:
            v = coordinate_median(x).astype(np.float64)
        ok = finite_rows(x)
        pts = x[ok].astype(np.float64, copy=False)  # converted once, not in every iteration's subtraction
        diff = np.empty_like(pts)
        for _ in range(self.iterations):
            np.subtract(pts, v, out=diff)
            norms = row_norms(diff)
            with np.errstate(divide="ignore"):
                scale = np.minimum(1.0, self.tau / norms)  # norm 0 -> inf -> 1
            v = v + (scale @ diff) / n
        if self.stateful:
            self._last = v.copy()
        return v.astype(x.dtype, copy=False)
