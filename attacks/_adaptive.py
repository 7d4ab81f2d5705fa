r"""Adaptive attacks: the defense they are tuned against, and the budgeted line search they share.

An adaptive attack chooses its strength s by the damage its vector does under the aggregation rule the
honest peers actually run. With H the (h, d) honest vectors, :math:`\bar{x}` their mean, v(s) the
candidate vector and f the number of Byzantine peers (each sending v(s)), the damage is

.. math:: D(s) = \lVert \mathrm{rule}(x_1, \dots, x_h, \underbrace{v(s), \dots, v(s)}_{f}) - \bar{x} \rVert_2

(``rule`` with its pre-aggregators, the honest vectors first as the peers order their inputs by peer
index and the Byzantine peers are the last ones). The attacks here use families v(s) = a + s b, linear in
s, and maximise D over a bounded interval with :func:`line_search`: a coarse grid, then golden-section
refinement around the best grid point, within a fixed budget of evaluations of the rule (each one
aggregation of h + f vectors). The outcome of an attack's last search is its ``last_search``
(:class:`Search`: strength, damage, evaluations used).

How an attack gets its defense
------------------------------
An attack class that sets ``needs_defense = True`` takes the keyword parameters ``defense`` and ``f``.
In a run, :class:`spirt.byzantine.Byzantine` builds the rule exactly as the peers do
(``aggregation.defense`` with ``aggregation.params`` and ``aggregation.pre``) and passes the object as
``defense``, and passes ``f = attack.byzantine`` unless ``attack.params`` sets ``f``. Used on its own,
the attack takes ``defense`` directly: a rule object (any :class:`defenses.Aggregator`, a
:class:`defenses.Pipeline` included) or a registered aggregator name, built with ``defenses.get(name,
f=f)``.

A new adaptive attack derives from :class:`Adaptive` (which sets ``needs_defense``) and
:class:`attacks.ModelAttack`, takes ``f=None, defense="mean", evaluations=20`` among its parameters and
calls ``self._adaptive_params(defense, f, evaluations)`` in ``__init__``.

The search never changes the rule it is given: every evaluation runs on a copy of the rule's state at the
start of the search, so a stateful rule (bucketing's permutation stream, a remembering centred
clipping) meets every candidate in the same state and the search is deterministic.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from defenses import Aggregator
from defenses import get as get_defense
from defenses import registry as defense_registry
from defenses._registry import accepted_params, float_param, int_param

#: where the next golden-section point goes in the larger part of the bracket: 2 - golden ratio
GOLDEN = (3.0 - math.sqrt(5.0)) / 2.0
#: a candidate replaces the best only if it is better by this relative margin, so that ties (e.g. the two
#: signs of ALIE against the plain mean) go to the first candidate evaluated whatever the rounding, and
#: float32 and float64 inputs choose the same strength
TIE = 1e-9


class Search(NamedTuple):
    """Outcome of a line search: the chosen ``strength``, its ``damage`` and the ``evaluations`` used."""

    strength: float
    damage: float
    evaluations: int


def resolve_defense(owner: str, defense: Any, f: int | None) -> Aggregator:
    """The rule object for a ``defense`` parameter: an aggregator object as given, or a registered
    aggregator name built with ``f`` (when given and the rule takes it)."""
    if isinstance(defense, Aggregator):
        return defense
    if isinstance(defense, str):
        cls = defense_registry.cls(defense)
        if cls.kind != "aggregator":
            raise ValueError(f"{owner}: parameter 'defense' must name an aggregator (got {defense!r}, a {cls.kind})")
        params = {"f": f} if f is not None and "f" in accepted_params(cls) else {}
        return get_defense(defense, **params)
    raise ValueError(
        f"{owner}: parameter 'defense' must be an aggregator object or a registered aggregator name "
        f"(got {defense!r})"
    )


def copies_for(rule: Aggregator, f: int | None) -> int:
    """Number of Byzantine vectors the recipient receives: ``f``, or else the rule's own f (at least 1)."""
    if f is not None:
        return f
    return max(int(getattr(rule, "f", 0) or 0), 1)


def line_search(objective: Callable[[float], float], lo: float, hi: float, evaluations: int,
                log: bool = False) -> Search:
    r"""Maximise ``objective`` over [lo, hi] with at most ``evaluations`` calls.

    A grid of g = evaluations // 2 + 1 evenly spaced points first, both ends included, then
    golden-section refinement (:func:`refine`) of the brackets formed by the neighbours of the two best
    peaks of the grid, sharing the remaining evaluations. The grid guards against the several local
    maxima a damage curve may have (e.g. a cliff on each side, where a rule starts to discard the
    Byzantine vectors); the refinement sharpens the best ones. With ``log`` (needs lo > 0) the points are evenly spaced in log s: for a scale, whose damaging
    range may be a narrow one near 0 (IPM against selection rules) or the whole top of the interval.
    Returns the best point evaluated (ties to the first one) and the number of evaluations made. A
    non-finite value counts as -inf.

    Examples
    --------
    >>> from attacks._adaptive import line_search
    >>> s = line_search(lambda x: -(x - 0.3) ** 2, -1.0, 1.0, evaluations=20)
    >>> round(s.strength, 2), s.evaluations  # the grid step is 0.2; refinement gets within 0.005
    (0.3, 20)
    """
    evaluations = int_param("line_search", "evaluations", evaluations, minimum=2)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi and (lo > 0 or not log)):
        raise ValueError(f"line_search: need finite lo < hi, and lo > 0 with log (got lo={lo}, hi={hi})")
    ends = {math.log(lo): lo, math.log(hi): hi} if log else {}

    def to_s(t: float) -> float:  # the ends as given, not as exp(log(.)) rounds them
        return ends.get(t, math.exp(t)) if log else float(t)

    if log:
        lo, hi = math.log(lo), math.log(hi)
    used = 0

    def value(t: float) -> float:
        nonlocal used
        used += 1
        y = float(objective(to_s(t)))
        return y if math.isfinite(y) else -math.inf

    def better(y: float, than: float) -> bool:
        return y > than + TIE * max(abs(y), abs(than), 1e-300) if math.isfinite(than) else y > than

    g = evaluations // 2 + 1
    step = (hi - lo) / (g - 1)
    grid = [lo + (hi - lo) * k / (g - 1) for k in range(g - 1)] + [hi]
    values = [value(t) for t in grid]
    # the grid's peaks: points the values rose to and do not rise after (on a plateau, its first point),
    # best first, ties to the first. A damage curve often has a peak on each side (just before the rule
    # starts discarding a vector above, or below, the honest ones), so the two best peaks are refined,
    # the best one with the larger half of the remaining evaluations
    rest = [k for k in range(g)
            if (k == 0 or better(values[k], values[k - 1])) and (k == g - 1 or not better(values[k + 1], values[k]))]
    peaks = []
    while rest and len(peaks) < 2:
        top = rest[0]
        for k in rest[1:]:
            if better(values[k], values[top]):  # a later peak must be clearly better to rank first
                top = k
        peaks.append(top)
        rest.remove(top)
    x, fx = grid[peaks[0]], values[peaks[0]]
    left = evaluations - g
    shares = (left - left // 2, left // 2) if len(peaks) == 2 else (left,)
    for k, share in zip(peaks, shares, strict=True):
        u, fu = refine(value, better, grid[k], values[k], max(lo, grid[k] - step), min(hi, grid[k] + step), share)
        if better(fu, fx):
            x, fx = u, fu
    return Search(to_s(x), float(fx), used)


def refine(value: Callable[[float], float], better: Callable[[float, float], bool], x: float, fx: float,
           a: float, b: float, evaluations: int) -> tuple[float, float]:
    """Golden-section refinement of the best point x (value fx) of the bracket [a, b], with at most
    ``evaluations`` new evaluations; returns the best point seen and its value."""
    for _ in range(evaluations):
        if b - a <= 4 * np.finfo(float).eps * max(abs(a), abs(b), 1.0):
            break
        # probe the larger side of the best point; keep the best point inside the bracket
        u = x - GOLDEN * (x - a) if x - a >= b - x else x + GOLDEN * (b - x)
        fu = value(u)
        if better(fu, fx):
            a, b = (a, x) if u < x else (x, b)
            x, fx = u, fu
        elif u < x:
            a = u
        else:
            b = u
    return x, fx


def damage(rule: Aggregator, honest: np.ndarray, vector: np.ndarray, f: int) -> float:
    r"""The damage :math:`\lVert \mathrm{rule}(H, f \times v) - \bar{x} \rVert_2` of one candidate
    ``vector`` sent by f Byzantine peers (evaluated on a copy of the rule, which is left as it was)."""
    x = np.concatenate([honest, np.broadcast_to(vector, (f, honest.shape[1]))]).astype(np.float64)
    rule.check(x.shape[0])
    out = copy.deepcopy(rule).aggregate(x)
    return float(np.linalg.norm(out - x[: honest.shape[0]].mean(axis=0)))


def search_strength(rule: Aggregator, honest: np.ndarray, a: np.ndarray, b: np.ndarray, f: int,
                    lo: float, hi: float, evaluations: int, log: bool = False) -> Search:
    """The strength s in [lo, hi] whose vector ``a + s * b``, sent by the f Byzantine peers, does the most
    damage under ``rule`` given the honest vectors; see :func:`line_search`."""
    x = np.empty((honest.shape[0] + f, honest.shape[1]), dtype=np.float64)
    x[: honest.shape[0]] = honest
    target = x[: honest.shape[0]].mean(axis=0)
    rule.check(x.shape[0])
    state = copy.deepcopy(rule)

    def objective(s: float) -> float:
        x[honest.shape[0]:] = a + s * b  # the rules never modify their input: x is reused
        return float(np.linalg.norm(copy.deepcopy(state).aggregate(x) - target))

    return line_search(objective, lo, hi, evaluations, log=log)


def interval(owner: str, lo_name: str, lo: Any, hi_name: str, hi: Any) -> tuple[float, float]:
    """Validate a search interval given as two float parameters."""
    lo, hi = float_param(owner, lo_name, lo), float_param(owner, hi_name, hi)
    if not lo < hi:
        raise ValueError(f"{owner}: parameter {lo_name!r} must be below {hi_name!r} (got {lo} and {hi})")
    return lo, hi


def scale_interval(owner: str, eps_min: Any, eps_max: Any) -> tuple[float, float]:
    """Validate IPM's interval [eps_min, eps_max], searched on a log scale: 0 < eps_min < eps_max."""
    eps_min = float_param(owner, "eps_min", eps_min, minimum=0.0, strict_min=True)
    return interval(owner, "eps_min", eps_min, "eps_max", eps_max)


class Adaptive:
    """Mixin of the attacks tuned against a defense: validates ``defense``, ``f`` and ``evaluations``
    and keeps the outcome of the last search in ``last_search`` (None before the first call)."""

    needs_defense = True
    last_search: Search | None = None

    def _adaptive_params(self, defense: Any, f: int | None, evaluations: int) -> None:
        name = type(self).name
        self.f = None if f is None else int_param(name, "f", f, minimum=1)
        self.evaluations = int_param(name, "evaluations", evaluations, minimum=2)
        self.defense = resolve_defense(name, defense, self.f)
        self.last_search = None

    @property
    def copies(self) -> int:
        """How many Byzantine vectors each recipient receives (all f Byzantine peers send the same)."""
        return copies_for(self.defense, self.f)
