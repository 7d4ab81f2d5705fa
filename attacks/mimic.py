"""Mimic: copy an honest peer's vector."""

from __future__ import annotations

import numpy as np

from defenses._registry import int_param

from ._base import ModelAttack, register


def most_heterogeneous(honest: np.ndarray) -> int:
    """Index of the honest vector with the largest projection (in absolute value) on the top principal
    direction of the centred honest vectors; 0 if they are all equal.

    Computed from the (h, h) Gram matrix of the centred vectors: if u is its top eigenvector, the
    projections on the top principal direction are proportional to u, so the index is argmax |u_i|.
    """
    x = honest.astype(np.float64, copy=False)
    centred = x - x.mean(axis=0)
    gram = centred @ centred.T
    if not np.any(gram):
        return 0
    _, vecs = np.linalg.eigh(gram)
    return int(np.argmax(np.abs(vecs[:, -1])))


@register("mimic")
class Mimic(ModelAttack):
    r"""Mimic: publish a copy of one honest peer's vector, over-representing that peer.

    .. math:: v = x_{i^*}

    Parameters
    ----------
    index : int or None, default None
        Index i* of the honest vector to copy. None picks the peer that most inflates heterogeneity: the
        one with the largest absolute projection on the top principal direction of the centred honest
        vectors (Karimireddy et al.'s heuristic).
    remember : bool, default True
        With ``index=None``: choose i* once, on the first call, and keep it while it is a valid index (the
        paper fixes i* after a warm-up); False re-chooses every call.

    Notes
    -----
    Omniscient: reads the honest vectors of the round. ByzFL's ``Mimic(epsilon=i)`` is ``index=i``.

    References
    ----------
    S. P. Karimireddy, L. He, M. Jaggi. "Byzantine-Robust Learning on Heterogeneous Datasets via
    Bucketing." ICLR 2022.

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> honest = np.array([[0., 0.], [1., 0.], [10., 0.]])
    >>> attacks.get("mimic", index=1)(honest=honest)
    array([1., 0.])
    >>> attacks.get("mimic")(honest=honest)  # the peer farthest along the top principal direction
    array([10.,  0.])
    """

    omniscient = True
    needs_honest = True
    reference = "Karimireddy, He, Jaggi, ICLR 2022"

    def __init__(self, index: int | None = None, remember: bool = True):
        self.index = None if index is None else int_param(self.name, "index", index, minimum=0)
        if not isinstance(remember, bool):
            raise ValueError(f"mimic: parameter 'remember' must be True or False (got {remember!r})")
        self.remember = remember
        self._chosen: int | None = None

    def choose(self, honest: np.ndarray) -> int:
        """The index copied for these honest vectors."""
        h = honest.shape[0]
        if self.index is not None:
            if self.index >= h:
                raise ValueError(f"mimic: parameter 'index' must be < h={h} (got {self.index})")
            return self.index
        if self.remember and self._chosen is not None and self._chosen < h:
            return self._chosen
        self._chosen = most_heterogeneous(honest)
        return self._chosen

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        return honest[self.choose(honest)].copy()
