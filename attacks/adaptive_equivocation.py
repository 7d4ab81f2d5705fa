"""Adaptive equivocation: a strength tuned to each recipient."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from defenses._arrays import as_vector
from defenses._registry import choice_param, int_param

from ._adaptive import Adaptive, Search, interval, scale_interval, search_strength
from ._base import ModelAttack, honest_input, register


def _views(owner: str, views: Any) -> dict[int, tuple[int, ...]] | None:
    """Validate ``views``: recipient -> the rows of ``honest`` it holds (sorted, distinct, at least one).
    Keys may be strings of digits, as in a TOML table."""
    if views is None:
        return None
    bad = ValueError(
        f"{owner}: parameter 'views' must map recipient peer indices to non-empty lists of honest row "
        f"indices (got {views!r})"
    )
    if not isinstance(views, Mapping):
        raise bad
    out = {}
    for key, rows in views.items():
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise bad
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
            raise bad
        q = key
        rows = [int_param(owner, f"views[{q}]", r, minimum=0) for r in rows]
        if not rows or len(set(rows)) != len(rows):
            raise bad
        out[q] = tuple(sorted(rows))
    return out


@register("adaptive_equivocation")
class AdaptiveEquivocation(Adaptive, ModelAttack):
    r"""Adaptive equivocation: tell each recipient the ALIE or IPM vector tuned to do the most damage there.

    .. math::

        v_q = a + s_q^*\, b, \qquad
        s_q^* = \arg\max_{s \in I}
        \lVert \mathrm{rule}(H_q, \underbrace{a + s b, \dots, a + s b}_{f}) - \bar{H}_q \rVert_2

    for each recipient q, with :math:`H_q` the honest vectors q holds and :math:`\bar{H}_q` their mean,
    and the direction from all the honest vectors (mean :math:`\mu`, coordinate-wise std
    :math:`\sigma`): ALIE :math:`a = \mu, b = -\sigma, I = [z_{min}, z_{max}]`; IPM
    :math:`a = 0, b = -\mu, I = [\varepsilon_{min}, \varepsilon_{max}]` (searched on a log scale). Each
    :math:`s_q^*` is found by the budgeted line search of :func:`attacks._adaptive.line_search`. Since
    the direction does not depend on q, recipients given the same strength get the same vector.

    Parameters
    ----------
    f : int or None, default None
        Number of Byzantine peers; each recipient receives f copies of its vector. In a run:
        ``attack.byzantine``. None: the defense's own f (at least 1).
    defense : aggregator object or str, default "mean"
        The rule the recipients run. In a run: the configured one, passed by the Byzantine peer.
    base : {"alie", "ipm"}, default "alie"
        The family of vectors searched.
    evaluations : int, default 20
        Budget of defense evaluations per distinct set of held vectors (>= 2).
    z_min, z_max : float, default -5.0, 5.0
        The interval of z with ``base="alie"`` (see ``optimal_alie`` for why).
    eps_min, eps_max : float, default 0.01, 20.0
        The interval of epsilon with ``base="ipm"``, searched on a log scale (see ``optimal_ipm``).
    views : dict or None, default None
        Which honest vectors each recipient holds: ``{recipient: [rows of honest]}``; a recipient not
        listed holds them all. None: every recipient holds every honest vector, as in this harness, where
        every honest peer pushes its vector to every peer (a recipient's own vector among them).
    ddof : int, default 1
        Delta degrees of freedom of sigma (``base="alie"``).

    Notes
    -----
    Omniscient: reads the honest vectors of the round. Recipients holding the same vectors share one
    search, and recipients whose strengths are equal receive the same vector object, so it is encoded
    and signed once; ``last_searches`` maps each recipient of the last ``outgoing`` call to its search
    (``last_search`` is the one for the recipients holding every honest vector). In this harness every
    recipient holds every honest vector, so with ``views=None`` all of them are in the same situation and
    receive one vector, the one ``optimal_alie`` / ``optimal_ipm`` would send: equivocation pays off
    where recipients hold different vectors (a sparse topology, late or screened vectors). Called as a
    plain model attack, it returns the vector for a recipient holding every honest vector. The f
    Byzantine peers are assumed to send each recipient the same vector.

    References
    ----------
    L. He, S. P. Karimireddy, M. Jaggi. "Byzantine-Robust Decentralized Learning via ClippedGossip."
    arXiv:2202.01545, 2022 (per-victim attack vectors: the dissensus attack).

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> honest = np.array([[0.], [1.], [2.], [6.]])
    >>> attack = attacks.get("adaptive_equivocation", defense="trimmed_mean", f=1, views={1: [0, 1, 2]})
    >>> out = attack.outgoing([0, 1, 2], honest=honest)
    >>> out[0].round(4), out[1].round(4), out[2] is out[0]  # 0 and 2 hold the same: one vector object
    (array([-0.38]), array([15.3998]), True)
    >>> attack.last_searches[0]  # as optimal_alie: the trimmed mean keeps 0, 1, 2
    Search(strength=1.0, damage=1.25, evaluations=20)
    >>> attack.last_searches[1]  # holding 0, 1, 2: below or above them, the trimmed mean moves by 0.5
    Search(strength=-5.0, damage=0.5, evaluations=20)
    """

    omniscient = True
    needs_honest = True
    reference = "He, Karimireddy, Jaggi, 2022"
    last_searches: dict[int, Search]

    def __init__(self, f: int | None = None, defense: Any = "mean", base: str = "alie", evaluations: int = 20,
                 z_min: float = -5.0, z_max: float = 5.0, eps_min: float = 0.01, eps_max: float = 20.0,
                 views: Any = None, ddof: int = 1):
        self._adaptive_params(defense, f, evaluations)
        self.base = choice_param(self.name, "base", base, ("alie", "ipm"))
        self.z_min, self.z_max = interval(self.name, "z_min", z_min, "z_max", z_max)
        self.eps_min, self.eps_max = scale_interval(self.name, eps_min, eps_max)
        self.views = _views(self.name, views)
        self.ddof = int_param(self.name, "ddof", ddof, minimum=0, maximum=1)
        self.last_searches = {}

    def family(self, honest: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, bool]:
        """``(a, b, lo, hi, log)``: the vectors a + s b searched, s in [lo, hi] (on a log scale if ``log``)."""
        mu = honest.mean(axis=0)
        if self.base == "ipm":
            return np.zeros_like(mu), -mu, self.eps_min, self.eps_max, True
        if honest.shape[0] <= self.ddof:
            raise ValueError(f"{self.name} needs more than ddof={self.ddof} honest vectors (got h={honest.shape[0]})")
        return mu, -honest.std(axis=0, ddof=self.ddof), self.z_min, self.z_max, False

    def _search(self, honest: np.ndarray, family: tuple, q: int | None) -> Search:
        rows = None if q is None or self.views is None else self.views.get(q)
        held = honest
        if rows is not None:
            if rows[-1] >= honest.shape[0]:
                raise ValueError(f"{self.name}: views[{q}] names row {rows[-1]} but there are "
                                 f"{honest.shape[0]} honest vectors")
            held = honest[list(rows)]
        a, b, lo, hi, log = family
        try:
            return search_strength(self.defense, held, a, b, self.copies, lo, hi, self.evaluations, log)
        except ValueError as exc:
            if q is None:
                raise
            raise ValueError(f"{self.name}: recipient {q} holds {held.shape[0]} honest vectors: {exc}") from None

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        x = honest.astype(np.float64)
        family = self.family(x)
        self.last_search = self._search(x, family, None)
        return family[0] + self.last_search.strength * family[1]

    def outgoing(self, recipients: Iterable[int], honest: Any = None, own: Any = None) -> dict[int, Any]:
        """The vector tuned to each recipient: ``{peer index: (d,) vector}`` (see the class docstring)."""
        peers = [int(q) for q in recipients]
        if not peers:
            return {}
        x, restore = honest_input(self.name, honest)
        if own is not None:  # the output follows `own` when given, as the attack's __call__ does
            v, restore = as_vector(own, "own")
            if v.shape[0] != x.shape[1]:
                raise ValueError(
                    f"{self.name}: honest vectors have length {x.shape[1]} but own has length {v.shape[0]}"
                )
        family = self.family(x)
        searches: dict[tuple[int, ...] | None, Search] = {}
        vectors: dict[float, Any] = {}
        self.last_searches = {}
        out = {}
        for q in peers:
            key = None if self.views is None else self.views.get(q)
            if key not in searches:  # recipients holding the same vectors share a search
                searches[key] = self._search(x, family, q)
            s = searches[key]
            self.last_searches[q] = s
            if s.strength not in vectors:  # equal strengths share one vector object
                vectors[s.strength] = restore(family[0] + s.strength * family[1])
            out[q] = vectors[s.strength]
        self.last_search = searches.get(None)
        return out
