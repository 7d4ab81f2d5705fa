"""Bucketing pre-aggregation."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import as_matrix
from ._base import PreAggregator, ceil_div, register
from ._registry import int_param, seed_param


@register("bucketing")
class Bucketing(PreAggregator):
    r"""Bucketing: shuffle the n vectors at random, split them into consecutive buckets of s, and output
    the average of each bucket.

    .. math:: y_b = \frac{1}{|B_b|} \sum_{i \in B_b} x_{\pi(i)}, \qquad b = 1, \dots, \lceil n/s \rceil

    where :math:`\pi` is a uniformly random permutation; the last bucket holds the n mod s leftover vectors
    when s does not divide n (as in ByzFL). Output: (ceil(n / s), d).

    Parameters
    ----------
    f : int, default 0
        Number of Byzantine inputs; at most f buckets contain one, so the downstream aggregator is checked
        with (ceil(n / s), f).
    s : int, default 2
        Bucket size (>= 1); s = 1 only shuffles.
    seed : int or None, default 0
        Seed of the object's own ``numpy.random.Generator``; every call draws a fresh permutation from it,
        so a sequence of calls is reproducible given the seed. None draws OS entropy.

    Notes
    -----
    (n, f) condition: n >= 1 (the robustness requirement falls on the downstream aggregator, which sees
    ceil(n / s) vectors of which up to f are contaminated; Karimireddy et al. take s with
    s * f / n small). The output depends on the permutation, so the rule is not permutation invariant for
    a fixed seed; :meth:`apply` with an explicit permutation is deterministic. No in-database form.

    References
    ----------
    S. P. Karimireddy, L. He, M. Jaggi. "Byzantine-Robust Learning on Heterogeneous Datasets via
    Bucketing." ICLR 2022.

    Examples
    --------
    >>> import numpy as np
    >>> import defenses
    >>> defenses.get("bucketing", s=2).apply(np.array([[0.], [1.], [2.], [3.], [4.]]), [0, 1, 2, 3, 4])
    array([[0.5],
           [2.5],
           [4. ]])
    >>> defenses.get("bucketing", s=2, seed=3)(np.zeros((5, 2))).shape
    (3, 2)
    """

    reference = "Karimireddy, He, Jaggi, ICLR 2022"
    requirement = "n >= 1"
    in_db = False

    def __init__(self, f: int = 0, s: int = 2, seed: int | None = 0):
        super().__init__(f)
        self.s = int_param(self.name, "s", s, minimum=1)
        self.seed = seed_param(self.name, seed)
        self.reset()

    def reset(self) -> None:
        """Restart the permutation stream from ``seed``."""
        self._rng = np.random.default_rng(self.seed)

    def output_size(self, n: int) -> int:
        return ceil_div(n, self.s)

    def apply(self, vectors: Any, permutation: Any) -> Any:
        """Deterministic bucketing of (n, d) vectors under a given permutation of range(n)."""
        x, restore = as_matrix(vectors)
        perm = np.asarray(permutation)
        if perm.shape != (x.shape[0],) or not np.array_equal(np.sort(perm), np.arange(x.shape[0])):
            raise ValueError(f"{self.name}: permutation must be a permutation of range({x.shape[0]})")
        self.check(x.shape[0])
        return restore(self._buckets(x, perm))

    def _buckets(self, x: np.ndarray, perm: np.ndarray) -> np.ndarray:
        shuffled = x[perm]
        n = x.shape[0]
        return np.stack([shuffled[i : i + self.s].mean(axis=0) for i in range(0, n, self.s)])

    def preaggregate(self, x: np.ndarray) -> np.ndarray:
        return self._buckets(x, self._rng.permutation(x.shape[0]))
