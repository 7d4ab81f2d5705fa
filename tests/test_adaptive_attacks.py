"""Adaptive attacks (tuned against the configured defense) and min-sum: the search beats the fixed
strengths and respects its budget, min-sum's constraint is tight, adaptive equivocation tunes a vector per
recipient, and a Byzantine peer hands its attack the rule the peers run. Numpy only, no servers.

Every test here carries the ``byzantine`` marker (``pytest -k byzantine`` selects them).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import attacks
import defenses
from attacks._adaptive import damage, line_search
from attacks.min_max import perturbation
from attacks.min_sum import bound, sum_sq_dists
from spirt.byzantine import Byzantine
from spirt.config import ConfigError, load_config
from spirt.tensors import as_f32_bytes, from_f32_bytes

pytestmark = pytest.mark.byzantine

F, N = 3, 10  # 3 Byzantine peers among 10: 7 honest vectors
SEEDS = (0, 1, 2)
RULES = {
    "trimmed_mean": lambda: defenses.get("trimmed_mean", f=F),
    "median": lambda: defenses.get("median", f=F),
}
ADAPTIVE = ("optimal_alie", "optimal_ipm", "adaptive_equivocation")


def honest_set(seed: int, h: int = N - F, d: int = 50) -> np.ndarray:
    """Gaussian honest vectors around a nonzero mean, with a different spread per coordinate."""
    rng = np.random.default_rng(seed)
    return rng.normal(loc=0.5, size=d) + rng.normal(size=(h, d)) * rng.uniform(0.5, 2.0, size=d)


class Counting(defenses.Aggregator):
    """Wraps a rule and records the number of vectors of each aggregation; its copies share the record,
    so the evaluations the search makes on copies count too."""

    def __init__(self, inner: defenses.Aggregator, calls: list[int] | None = None):
        self.inner = inner
        self.f = inner.f
        self.calls = [] if calls is None else calls

    def check(self, n, f=None):
        self.inner.check(n, f)

    def aggregate(self, x, **kwargs):
        self.calls.append(x.shape[0])
        return self.inner.aggregate(x, **kwargs)

    def __deepcopy__(self, memo):
        return Counting(copy.deepcopy(self.inner, memo), self.calls)


# ------------------------------------------------------------------------------- beating fixed strengths


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_optimal_alie_does_at_least_the_damage_of_fixed_shifts(rule_name, seed):
    honest, rule = honest_set(seed), RULES[rule_name]()
    attack = attacks.get("optimal_alie", defense=rule, f=F)
    got = damage(rule, honest, attack(honest), F)
    assert got == pytest.approx(attack.last_search.damage, rel=1e-12)  # the damage it reports is real
    baruch = damage(rule, honest, attacks.get("alie", f=F, n=N)(honest), F)  # z = Phi^-1(0.7) = 0.52
    byzfl = damage(rule, honest, attacks.get("alie", z=-1.5)(honest), F)  # ByzFL's tau = 1.5
    assert got > baruch
    assert got >= byzfl * (1 - 1e-9)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_optimal_ipm_does_at_least_the_damage_of_fixed_scales(rule_name, seed):
    honest, rule = honest_set(seed), RULES[rule_name]()
    attack = attacks.get("optimal_ipm", defense=rule, f=F)
    got = damage(rule, honest, attack(honest), F)
    assert got == pytest.approx(attack.last_search.damage, rel=1e-12)
    xie = damage(rule, honest, attacks.get("ipm")(honest), F)  # epsilon = 0.1
    byzfl = damage(rule, honest, attacks.get("ipm", epsilon=2.0)(honest), F)
    assert got > xie
    assert got >= byzfl * (1 - 1e-9)


@pytest.mark.parametrize("name, pre, f", [
    ("trimmed_mean", None, 3), ("median", None, 3), ("krum", None, 2), ("multi_krum", None, 2),
    ("trimmed_mean", ["nnm"], 3), ("centered_clipping", None, 3),
])
def test_search_comes_close_to_a_dense_scan(name, pre, f):
    # 20 evaluations against 400: within 10% of the best damage, also where the damaging range is narrow
    # (IPM against selection rules: only a small epsilon survives Krum or NNM)
    honest = honest_set(1)
    rule = defenses.get(name, f=f, pre=pre)
    mu, sd = honest.mean(0), honest.std(0, ddof=1)
    alie = attacks.get("optimal_alie", defense=rule, f=f)
    alie(honest)
    dense = max(damage(rule, honest, mu - z * sd, f) for z in np.linspace(-5, 5, 400))
    assert alie.last_search.damage >= 0.9 * dense
    ipm = attacks.get("optimal_ipm", defense=rule, f=f)
    ipm(honest)
    dense = max(damage(rule, honest, -e * mu, f) for e in np.geomspace(0.01, 20, 400))
    assert ipm.last_search.damage >= 0.9 * dense


def test_against_the_plain_mean_the_search_goes_to_an_end():
    honest = honest_set(0)
    alie = attacks.get("optimal_alie", defense="mean", f=F)
    np.testing.assert_allclose(alie(honest), honest.mean(0) + 5 * honest.std(0, ddof=1))  # z_min, first
    ipm = attacks.get("optimal_ipm", defense="mean", f=F, eps_max=7.5)
    np.testing.assert_allclose(ipm(honest), -7.5 * honest.mean(0))
    assert ipm.last_search.strength == 7.5


# ------------------------------------------------------------------------------------------- the budget


@pytest.mark.parametrize("budget", [2, 3, 4, 7, 20, 41])
def test_the_search_never_exceeds_its_budget(budget):
    honest = honest_set(2)
    for name in ("optimal_alie", "optimal_ipm"):
        for inner in (defenses.get("trimmed_mean", f=F), defenses.get("krum", f=2, pre=["nnm"])):
            rule = Counting(inner)
            attack = attacks.get(name, defense=rule, f=F if inner.f == F else 2, evaluations=budget)
            attack(honest)
            assert 1 <= len(rule.calls) == attack.last_search.evaluations <= budget, (name, inner)
            assert set(rule.calls) == {honest.shape[0] + attack.f}
    # a flat objective (every strength the same): the budget holds and the first grid point is kept
    calls = []
    flat = line_search(lambda s: calls.append(s) or 1.0, -2.0, 3.0, budget)
    assert len(calls) == flat.evaluations <= budget and flat.strength == -2.0
    # a log-scale search stays inside its interval
    calls.clear()
    s = line_search(lambda e: calls.append(e) or -abs(math.log(e / 0.37)), 0.01, 20.0, budget, log=True)
    assert len(calls) == s.evaluations <= budget and all(0.01 <= e <= 20.0 for e in calls)


def test_equivocation_budget_is_per_distinct_view():
    honest = honest_set(0)
    rule = Counting(defenses.get("trimmed_mean", f=F))
    views = {3: [0, 1, 2, 3, 4], 5: [2, 3, 4, 5, 6], 6: [0, 1, 2, 3, 4]}
    attack = attacks.get("adaptive_equivocation", defense=rule, f=F, evaluations=9, views=views)
    attack.outgoing(range(7), honest=honest)
    # three distinct views (everything, rows 0-4 for recipients 3 and 6, rows 2-6): three searches
    searched = [attack.last_searches[q] for q in (0, 3, 5)]
    assert attack.last_searches[6] is attack.last_searches[3]
    assert len(rule.calls) == sum(s.evaluations for s in searched) <= 3 * 9


def test_the_search_is_deterministic_and_leaves_the_rule_as_it_was():
    honest = honest_set(1)
    rule = defenses.get("median", f=1, pre=[("bucketing", {"s": 2, "seed": 5})])
    attack = attacks.get("optimal_alie", defense=rule, f=1)
    first = attack(honest)
    search = attack.last_search
    np.testing.assert_array_equal(attack(honest), first)
    assert attack.last_search == search
    # the rule's permutation stream did not advance: its next draw is a fresh rule's first
    x = np.random.default_rng(0).normal(size=(8, 3))
    fresh = defenses.get("median", f=1, pre=[("bucketing", {"s": 2, "seed": 5})])
    np.testing.assert_array_equal(rule(x), fresh(x))


# ----------------------------------------------------------------------------------------------- min-sum


def test_min_sum_constraint_is_tight():
    for seed in range(12):
        h, d = 2 + seed % 7, 1 + seed % 5
        honest = honest_set(seed, h, d)
        limit = bound(honest)
        for kind in ("std", "unit", "sign"):
            attack = attacks.get("min_sum", perturbation=kind)
            v = attack(honest)
            p = perturbation(honest, kind)
            gamma = attack.gamma(honest)
            assert gamma > 0
            np.testing.assert_allclose(v, honest.mean(0) + gamma * p, rtol=1e-12, atol=1e-12)
            assert sum_sq_dists(honest, v) <= limit * (1 + 1e-9)
            assert sum_sq_dists(honest, honest.mean(0) + gamma * (1 + 1e-6) * p) > limit, (seed, kind)
            bisect = attacks.get("min_sum", perturbation=kind, method="bisect", tol=1e-10).gamma(honest)
            assert bisect <= gamma * (1 + 1e-9) and bisect == pytest.approx(gamma, abs=1e-8)


def test_min_sum_by_hand():
    # mean (2, 2); distances to it sqrt(8), sqrt(8), 4; the sums of squared distances of each honest
    # vector to the others are 56, 56 and 80: v must be within 4 of the mean (48 + 32 = 80)
    honest = np.array([[0.0, 0.0], [4.0, 0.0], [2.0, 6.0]])
    assert bound(honest) == 80.0
    corner = 2 - 2 * math.sqrt(2)  # gamma * (-1, -1) / sqrt(2) with gamma = 4
    np.testing.assert_allclose(attacks.get("min_sum", perturbation="sign")(honest), [corner, corner])
    np.testing.assert_allclose(attacks.get("min_sum", perturbation="unit")(honest), [corner, corner])
    # std (2, 2 sqrt 3) has norm 4: gamma = 1
    np.testing.assert_allclose(attacks.get("min_sum")(honest), [0.0, 2 - 2 * math.sqrt(3)], atol=1e-12)
    assert sum_sq_dists(honest, attacks.get("min_sum")(honest)) == pytest.approx(80.0)
    # one dimension: mean 2, the farthest honest value 3 away; min-max stops earlier
    line = np.array([[0.0], [1.0], [5.0]])
    np.testing.assert_allclose(attacks.get("min_sum", perturbation="unit")(line), [-1.0])
    np.testing.assert_allclose(attacks.get("min_max", perturbation="unit")(line), [0.0])


def test_min_sum_degenerate_cases_and_errors():
    np.testing.assert_array_equal(attacks.get("min_sum")(np.ones((4, 3))), np.ones(3))  # no spread
    with pytest.raises(ValueError, match="min_sum with perturbation='std' needs at least 2 honest"):
        attacks.get("min_sum")(np.ones((1, 3)))
    with pytest.raises(ValueError, match="min_sum: parameter 'method' must be"):
        attacks.get("min_sum", method="grid")
    assert not getattr(attacks.registry.cls("min_sum"), "needs_defense", False)


# ---------------------------------------------------------------------------------- adaptive equivocation

VIEWS = {3: [0, 1, 2, 3, 4], 5: [2, 3, 4, 5, 6]}  # the others hold every honest vector
TUNED = {  # rules under which the best strength depends on the vectors held
    "ipm": lambda: defenses.get("trimmed_mean", f=F, pre=["nnm"]),
    "alie": lambda: defenses.get("geometric_median", f=F),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("base", ["alie", "ipm"])
def test_equivocation_tunes_each_recipient(base, seed):
    honest, rule = honest_set(seed), TUNED[base]()
    attack = attacks.get("adaptive_equivocation", defense=rule, f=F, base=base, views=VIEWS)
    out = attack.outgoing(range(N - F), honest=honest)
    same = [out[q] for q in (0, 1, 2, 4, 6)]
    assert all(v is same[0] for v in same), "recipients in the same situation share one vector object"
    assert out[3] is not out[0] or out[5] is not out[0], "recipients holding other vectors are told another"
    for q in (3, 5):
        assert (out[q] is out[0]) == np.array_equal(out[q], out[0])
    strengths = {q: s.strength for q, s in attack.last_searches.items()}
    assert len({id(v) for v in out.values()}) == len(set(strengths.values()))
    fixed = (attacks.get("alie", f=F, n=N) if base == "alie" else attacks.get("ipm"))(honest)
    for q, v in out.items():
        held = honest[VIEWS.get(q, list(range(N - F)))]
        assert damage(rule, held, v, F) >= damage(rule, held, fixed, F) * (1 - 1e-9), q
        assert damage(rule, held, v, F) == pytest.approx(attack.last_searches[q].damage, rel=1e-12)
    # everyone holding everything: the vector optimal_alie / optimal_ipm sends
    single = attacks.get(f"optimal_{base}", defense=rule, f=F)
    np.testing.assert_allclose(out[0], single(honest), rtol=1e-12)


def test_equivocation_ipm_views_each_get_their_own_vector():
    # against NNM + trimmed mean only a small epsilon survives, and how small depends on what is held
    honest, rule = honest_set(0), TUNED["ipm"]()
    out = attacks.get("adaptive_equivocation", defense=rule, f=F, base="ipm", views=VIEWS).outgoing(
        [0, 3, 5], honest=honest)
    assert len({id(v) for v in out.values()}) == 3
    assert not np.array_equal(out[3], out[5]) and not np.array_equal(out[3], out[0])


def test_equivocation_without_views_sends_one_vector_and_equal_strengths_share_it():
    honest, rule = honest_set(0), defenses.get("median", f=F)
    attack = attacks.get("adaptive_equivocation", defense=rule, f=F)
    out = attack.outgoing([0, 4, 9], honest=honest, own=honest[0])
    assert len({id(v) for v in out.values()}) == 1
    np.testing.assert_allclose(out[9], attack(honest))
    # different views whose searches land on the same strength (IPM against the trimmed mean: the end of
    # the interval, beyond every honest value) still share the object
    plateau = attacks.get("adaptive_equivocation", defense="trimmed_mean", f=F, base="ipm", views=VIEWS)
    out = plateau.outgoing(range(N - F), honest=honest)
    assert len({s.strength for s in plateau.last_searches.values()}) == 1
    assert all(v is out[0] for v in out.values())
    assert plateau.outgoing([], honest=honest) == {}


def test_equivocation_views_are_checked():
    ok = attacks.get("adaptive_equivocation", views={"3": [4, 0, 1, 2]})  # TOML tables have string keys
    assert ok.views == {3: (0, 1, 2, 4)}
    for bad in ({"x": [0]}, {1: []}, {1: [0, 0]}, {1: "01"}, [1, 2], {-1: [0]}, {1: [-1]}):
        with pytest.raises(ValueError, match="adaptive_equivocation: parameter 'views"):
            attacks.get("adaptive_equivocation", views=bad)
    with pytest.raises(ValueError, match=r"views\[1\] names row 7 but there are 7 honest vectors"):
        attacks.get("adaptive_equivocation", views={1: [7]}).outgoing([1], honest=honest_set(0))
    with pytest.raises(ValueError, match="recipient 1 holds 3 honest vectors: trimmed_mean requires n > 2f"):
        attacks.get("adaptive_equivocation", defense="trimmed_mean", f=F, views={1: [0, 1, 2]}).outgoing(
            [1], honest=honest_set(0))
    with pytest.raises(ValueError, match="omniscient"):
        attacks.get("adaptive_equivocation").outgoing([1], own=np.ones(3))


# ------------------------------------------------------------------------------------------- parameters


def test_adaptive_attack_parameters():
    alie = attacks.get("optimal_alie", defense="trimmed_mean", f=F)
    assert isinstance(alie.defense, defenses.registry.cls("trimmed_mean")) and alie.defense.f == F
    assert attacks.get("optimal_alie").copies == 1  # the mean tolerates f = 0: one copy
    assert attacks.get("optimal_ipm", defense=defenses.get("median", f=2)).copies == 2  # the rule's f
    rule = defenses.get("krum", f=2, pre=["nnm"])
    assert attacks.get("adaptive_equivocation", defense=rule).defense is rule
    cases = [
        ("optimal_alie", {"defense": "nnm"}, "must name an aggregator"),
        ("optimal_alie", {"defense": 42}, "must be an aggregator object or a registered aggregator name"),
        ("optimal_ipm", {"defense": "nope"}, "unknown defense 'nope'"),
        ("optimal_alie", {"f": 0}, "parameter 'f' must be an integer >= 1"),
        ("optimal_ipm", {"evaluations": 1}, "parameter 'evaluations' must be an integer >= 2"),
        ("optimal_alie", {"z_min": 1.0, "z_max": 1.0}, "parameter 'z_min' must be below 'z_max'"),
        ("optimal_ipm", {"eps_min": 0.0}, "parameter 'eps_min' must be a finite real number > 0"),
        ("optimal_ipm", {"eps_min": 5.0, "eps_max": 2.0}, "parameter 'eps_min' must be below 'eps_max'"),
        ("adaptive_equivocation", {"base": "min_max"}, "parameter 'base' must be one of 'alie', 'ipm'"),
        ("adaptive_equivocation", {"ddof": 2}, "parameter 'ddof' must be"),
    ]
    for name, params, needle in cases:
        with pytest.raises(ValueError, match=needle):
            attacks.get(name, **params)
    with pytest.raises(ValueError, match=r"krum requires n > 2f \+ 2 \(got n=8, f=3\)"):  # 5 + 3 vectors
        attacks.get("optimal_alie", defense="krum", f=F)(honest_set(0, h=5))
    for name in ADAPTIVE:
        assert attacks.registry.cls(name).needs_defense and attacks.info(name).omniscient
        assert attacks.info(name).params["defense"] == "mean" and attacks.info(name).params["f"] is None


# ------------------------------------------------------------------------------------- defense injection


def _config(**over):
    base = {"peers.count": N, "attack.name": "optimal_alie", "attack.byzantine": F,
            "aggregation.defense": "trimmed_mean", "aggregation.params": {"f": F}}
    return load_config(None, {**base, **over})


def test_byzantine_peer_hands_its_attack_the_configured_rule():
    attack = Byzantine(_config(), N - 1).attack
    assert isinstance(attack.defense, defenses.registry.cls("trimmed_mean")) and attack.defense.f == F
    assert attack.f == F  # attack.byzantine, as the attack takes f and attack.params has none
    x = honest_set(0, h=N)
    np.testing.assert_array_equal(attack.defense(x), defenses.get("trimmed_mean", f=F)(x))
    # with pre-aggregators: the whole pipeline, f included
    piped = Byzantine(_config(**{"aggregation.pre": ["nnm"]}), N - 1).attack.defense
    assert isinstance(piped, defenses.Pipeline) and piped.f == F
    assert [type(p) for p in piped.pre] == [defenses.registry.cls("nnm")] and piped.pre[0].f == F
    assert isinstance(piped.aggregator, defenses.registry.cls("trimmed_mean"))
    np.testing.assert_array_equal(piped(x), defenses.get("trimmed_mean", f=F, pre=["nnm"])(x))
    # f set in attack.params wins; attacks that do not need a defense get none
    assert Byzantine(_config(**{"attack.params": {"f": 2}}), N - 1).attack.f == 2
    alie = Byzantine(_config(**{"attack.name": "alie", "attack.params": {"f": F}}), N - 1).attack
    assert not hasattr(alie, "defense")
    assert not hasattr(Byzantine(_config(**{"attack.name": "min_sum"}), N - 1).attack, "defense")


def test_byzantine_peer_sends_the_tuned_vector_encoded_once():
    honest = honest_set(1).astype(np.float32)
    raw = [as_f32_bytes(v).tobytes() for v in honest]
    peer = Byzantine(_config(**{"attack.name": "adaptive_equivocation"}), N - 1)
    out = peer.outgoing(raw[0], list(range(N)), lambda: dict(enumerate(raw)))
    assert len({id(b) for b in out.values()}) == 1  # every recipient in the same situation
    expected = attacks.get("optimal_alie", defense="trimmed_mean", f=F)(honest.astype(np.float64))
    np.testing.assert_allclose(from_f32_bytes(out[0]), expected, rtol=1e-5, atol=1e-5)


def test_config_refuses_a_second_defense_for_an_adaptive_attack():
    with pytest.raises(ConfigError, match="attack.params: optimal_ipm is tuned against the rule the peers run"):
        load_config(None, {"attack.name": "optimal_ipm", "attack.params": {"defense": "median"}})
    for name in ADAPTIVE:  # with the registry's defaults, as spirt checks every registered attack
        assert load_config(None, {"attack.name": name}).attack.name == name


@pytest.mark.parametrize("name", ADAPTIVE)
def test_colluding_byzantine_peers_of_one_process_search_once(name, monkeypatch):
    """Three colluders as threads of one process, the same honest vectors: one search (one budget of
    rule evaluations) serves all three, and they send the same vectors; other honest vectors, another
    search."""
    from concurrent.futures import ThreadPoolExecutor

    import spirt.byzantine as byzantine
    from spirt.shared import Shared

    monkeypatch.setattr(byzantine, "_FORGED", Shared(keep=16))
    cfg = _config(**{"attack.name": name})
    peers = {i: Byzantine(cfg, i) for i in range(N - F, N)}
    calls: list[int] = []
    for p in peers.values():
        p.attack.defense = Counting(p.attack.defense, calls)
    budget = peers[N - 1].attack.evaluations

    def send(seed: int) -> list[dict[int, bytes]]:
        raw = {q: as_f32_bytes(v).tobytes() for q, v in enumerate(honest_set(seed).astype(np.float32))}
        with ThreadPoolExecutor(F) as pool:  # each sends to every peer but itself, as a peer does
            return list(pool.map(lambda i: peers[i].outgoing(raw[0], [q for q in range(N) if q != i], lambda: raw),
                                 peers))

    first = send(11)
    assert len(calls) == budget
    assert [sorted(out) for out in first] == [[q for q in range(N) if q != i] for i in peers]
    assert len({v for out in first for v in out.values()}) == 1  # the one vector of this situation
    again = send(12)
    assert len(calls) == 2 * budget and again[0][0] != first[0][0]
