"""Byzantine attacks: registry, formulas against direct computations, min-max's constraint, ALIE's z,
label flipping, array kinds and agreement with ByzFL.

Every test here carries the ``byzantine`` marker (``pytest -k byzantine`` selects them).
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attacks
import defenses
from attacks.alie import alie_z
from attacks.min_max import max_gamma, perturbation

torch.set_num_threads(1)
pytestmark = pytest.mark.byzantine

PROPS = settings(max_examples=40, deadline=None, database=None, derandomize=True)

# every registered attack gets the generic tests below: a new attack needs no edit here
MODEL_ATTACKS = attacks.names(kind="model")
DATA_ATTACKS = attacks.names(kind="data")
PROTOCOL_ATTACKS = attacks.names(kind="protocol")  # their own tests: tests/test_protocol_attacks.py
OMNISCIENT = attacks.names(omniscient=True)


def make(name: str, **params):
    if name == "alie" and "z" not in params and "f" not in params:
        params["f"] = 2
    return attacks.get(name, **params)


def honest_set(seed: int = 0, h: int = 8, d: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=d) + rng.normal(size=(h, d)) * rng.uniform(0.2, 3, size=d)


# ------------------------------------------------------------------------------------------ registry


def test_byzantine_attack_registry():
    # discovery: every module of the package registers its attack, and only the shipped ones are found
    modules = {p.stem for p in Path(attacks.__file__).parent.glob("[!_]*.py")}
    assert {type(make(n)).__module__.rsplit(".", 1)[1] for n in attacks.names()} == modules
    assert {"alie", "gaussian", "ipm", "mimic", "min_max", "scaling", "sign_flip"} <= set(MODEL_ATTACKS)
    assert {"label_flip"} <= set(DATA_ATTACKS)
    assert {"alie", "ipm", "mimic", "min_max"} <= set(OMNISCIENT)
    assert {"gaussian", "scaling", "sign_flip"} <= set(attacks.names(kind="model", omniscient=False))
    assert attacks.names() == sorted(MODEL_ATTACKS + DATA_ATTACKS + PROTOCOL_ATTACKS)
    for name in attacks.names():
        meta = attacks.info(name)
        assert meta.name == name and meta.kind in ("data", "model", "protocol") and isinstance(meta.omniscient, bool)
        assert meta.summary and meta.reference
        assert meta.as_dict()["omniscient"] == meta.omniscient
        obj = make(name)
        assert obj.name == name and obj.kind == meta.kind and obj.omniscient == meta.omniscient
        assert "References" in type(obj).__doc__
    assert attacks.info("sign_flipping").name == "sign_flip"
    assert attacks.get("inner_product_manipulation").name == "ipm"


def test_byzantine_attack_unknown_name_and_bad_parameters():
    with pytest.raises(ValueError, match="unknown attack 'nope'; allowed: adaptive_equivocation, alie, dissensus, equivocation"):
        attacks.get("nope")
    with pytest.raises(ValueError, match="kind"):
        attacks.names(kind="other")
    cases = [
        ("sign_flip", {"scale": 2.0}, "scale"),
        ("scaling", {"factor": -1.0}, "factor"),
        ("gaussian", {"sigma": -1.0}, "sigma"),
        ("gaussian", {"seed": 1.5}, "seed"),
        ("ipm", {"epsilon": 0.0}, "epsilon"),
        ("alie", {"f": -1}, "f"),
        ("alie", {"f": 1, "ddof": 2}, "ddof"),
        ("mimic", {"index": -1}, "index"),
        ("min_max", {"perturbation": "abs"}, "perturbation"),
        ("min_max", {"method": "grid"}, "method"),
        ("min_max", {"tol": 0.0}, "tol"),
        ("label_flip", {"num_classes": 1}, "num_classes"),
    ]
    for name, params, param in cases:
        with pytest.raises(ValueError, match=rf"{name}: parameter '{param}' must be"):
            attacks.get(name, **params)
    with pytest.raises(ValueError, match="exactly one of parameter 'z'"):
        attacks.get("alie")
    with pytest.raises(ValueError, match="exactly one of parameter 'z'"):
        attacks.get("alie", z=1.0, f=2)
    with pytest.raises(ValueError, match=r"ipm: unknown parameter\(s\) 'tau'"):
        attacks.get("ipm", tau=2.0)


def test_byzantine_attack_inputs_required():
    honest, own = honest_set(), np.ones(6)
    for name in OMNISCIENT:
        with pytest.raises(ValueError, match="omniscient"):
            make(name)(own=own)
    for name in ("sign_flip", "scaling", "label_flip"):
        with pytest.raises(ValueError, match="own"):
            make(name)(honest)
    with pytest.raises(ValueError, match="length"):
        make("ipm")(honest, np.ones(5))
    with pytest.raises(ValueError, match="give"):
        make("gaussian")()


# ------------------------------------------------------------------------------------------- formulas


def test_byzantine_sign_flip_and_scaling():
    own = np.array([1.0, -2.0, 0.5])
    np.testing.assert_array_equal(attacks.get("sign_flip")(own=own), -10 * own)  # SPIRT's -10x
    np.testing.assert_array_equal(attacks.get("sign_flip", scale=-1)(honest_set(d=3), own), -own)
    np.testing.assert_array_equal(attacks.get("scaling")(own=own), 10 * own)
    np.testing.assert_array_equal(attacks.get("scaling", factor=3.5)(own=own), 3.5 * own)


def test_byzantine_gaussian_noise():
    own = np.zeros(200_000, dtype=np.float32)
    a, b = attacks.get("gaussian", seed=3), attacks.get("gaussian", seed=3)
    va, vb = a(own=own), b(own=own)
    assert va.dtype == np.float32 and va.shape == own.shape
    np.testing.assert_array_equal(va, vb)  # reproducible given the seed
    assert not np.array_equal(a(own=own), va)  # fresh noise each call
    a.reset()
    np.testing.assert_array_equal(a(own=own), va)
    assert abs(va.mean()) < 4 * 100 / math.sqrt(own.size)
    assert abs(va.std() / 100 - 1) < 0.01  # SPIRT's sigma = 100
    shifted = attacks.get("gaussian", sigma=2.0, mu=5.0, seed=1)(own=own)
    assert abs(shifted.mean() - 5) < 0.05 and abs(shifted.std() - 2) < 0.05
    assert attacks.get("gaussian")(honest_set(d=7)).shape == (7,)  # d read from honest without own
    assert not np.array_equal(
        attacks.get("gaussian", seed=1)(own=own), attacks.get("gaussian", seed=2)(own=own)
    )


def test_byzantine_ipm():
    honest = honest_set(1)
    np.testing.assert_allclose(attacks.get("ipm")(honest), -0.1 * honest.mean(0))
    np.testing.assert_allclose(attacks.get("ipm", epsilon=10)(honest), -10 * honest.mean(0))


@pytest.mark.parametrize("n, f", [(10, 1), (10, 4), (25, 5), (50, 12), (50, 24), (7, 3), (100, 20)])
def test_byzantine_alie_z_formula(n, f):
    s = math.floor(n / 2 + 1) - f
    assert alie_z(n, f) == pytest.approx(NormalDist().inv_cdf((n - s) / n), rel=1e-12)


def test_byzantine_alie_z_values_and_errors():
    assert alie_z(50, 24) == pytest.approx(1.7507, abs=1e-4)  # s = 2: Phi^-1(0.96)
    assert alie_z(10, 4) == pytest.approx(NormalDist().inv_cdf(0.8))  # s = 2
    with pytest.raises(ValueError, match=r"alie requires 0 < s < n with s = floor\(n/2 \+ 1\) - f = 0"):
        alie_z(10, 6)
    with pytest.raises(ValueError, match="alie requires"):
        attacks.get("alie", f=6, n=10)


def test_byzantine_alie_formula():
    honest = honest_set(2, h=8)
    mu, sd = honest.mean(0), honest.std(0, ddof=1)
    got = attacks.get("alie", f=2)(honest)  # n = h + f = 10
    np.testing.assert_allclose(got, mu - alie_z(10, 2) * sd)
    np.testing.assert_allclose(attacks.get("alie", f=2, n=20)(honest), mu - alie_z(20, 2) * sd)
    np.testing.assert_allclose(attacks.get("alie", z=1.5)(honest), mu - 1.5 * sd)
    np.testing.assert_allclose(attacks.get("alie", z=1.5, ddof=0)(honest), mu - 1.5 * honest.std(0))
    assert attacks.get("alie", f=2).z_for(8) == alie_z(10, 2)
    with pytest.raises(ValueError, match="more than ddof=1 honest vectors"):
        attacks.get("alie", z=1.0)(honest[:1])


def test_byzantine_mimic():
    honest = honest_set(3)
    np.testing.assert_array_equal(attacks.get("mimic", index=4)(honest), honest[4])
    with pytest.raises(ValueError, match="index"):
        attacks.get("mimic", index=8)(honest)
    # heuristic: the vector stretching the main direction of spread the most
    rng = np.random.default_rng(0)
    spread = np.zeros((6, 4))
    spread[:, 0] = [0.1, -0.2, 0.3, 2.5, -0.4, 0.2]
    spread += rng.normal(size=(6, 4)) * 0.01
    mimic = attacks.get("mimic")
    np.testing.assert_array_equal(mimic(spread), spread[3])
    swapped = spread[[3, 1, 2, 0, 4, 5]]
    np.testing.assert_array_equal(mimic(swapped), swapped[3])  # remembered index 3, not the new best 0
    np.testing.assert_array_equal(attacks.get("mimic", remember=False)(swapped), swapped[0])
    np.testing.assert_array_equal(attacks.get("mimic")(np.ones((3, 2))), np.ones(2))  # all equal -> index 0


def test_byzantine_label_flip():
    lf = attacks.get("label_flip")
    x = np.random.default_rng(0).normal(size=(4, 1, 28, 28)).astype(np.float32)
    y = np.array([0, 3, 9, 5])
    x2, y2 = lf.poison(x, y)
    assert x2 is x
    np.testing.assert_array_equal(y2, [9, 6, 0, 4])  # SPIRT: 9 - y
    yt = torch.tensor([0, 3, 9, 5])
    xt2, yt2 = lf.poison(torch.from_numpy(x), yt)
    assert yt2.dtype == torch.int64 and yt2.tolist() == [9, 6, 0, 4]
    assert lf.poison(x, lf.poison(x, y)[1])[1].tolist() == y.tolist()  # an involution
    assert attacks.get("label_flip", num_classes=100).poison(None, 7)[1] == 92
    own = np.arange(3.0)
    np.testing.assert_array_equal(lf(own=own), own)  # publishes its (poisoned-data) gradient unchanged


# -------------------------------------------------------------------------------------------- min-max


def _max_dist_to_honest(v: np.ndarray, honest: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(honest - v, axis=1)))


def _max_pairwise(honest: np.ndarray) -> float:
    return float(np.sqrt(defenses.pairwise_sq_dists(honest).max()))


@PROPS
@given(
    seed=st.integers(0, 2**32 - 1),
    h=st.integers(2, 10),
    d=st.integers(1, 8),
    kind=st.sampled_from(["std", "unit", "sign"]),
)
def test_byzantine_min_max_satisfies_constraint_and_is_maximal(seed, h, d, kind):
    honest = honest_set(seed, h, d)
    attack = attacks.get("min_max", perturbation=kind)
    v = attack(honest)
    dmax = _max_pairwise(honest)
    assert _max_dist_to_honest(v, honest) <= dmax * (1 + 1e-9) + 1e-12
    p = perturbation(honest, kind)
    gamma = attack.gamma(honest)
    np.testing.assert_allclose(v, honest.mean(0) + gamma * p, rtol=1e-12, atol=1e-12)
    if np.any(p):  # maximal: a slightly larger gamma breaks the constraint
        assert gamma > 0
        beyond = honest.mean(0) + gamma * (1 + 1e-6) * p
        assert _max_dist_to_honest(beyond, honest) > dmax
        bisect = attacks.get("min_max", perturbation=kind, method="bisect", tol=1e-9).gamma(honest)
        assert bisect <= gamma * (1 + 1e-9) and bisect == pytest.approx(gamma, abs=1e-8)


def test_byzantine_min_max_directions_and_degenerate_cases():
    honest = honest_set(4)
    mu = honest.mean(0)
    np.testing.assert_allclose(perturbation(honest, "std"), -honest.std(0, ddof=1))
    np.testing.assert_allclose(perturbation(honest, "unit"), -mu / np.linalg.norm(mu))
    np.testing.assert_allclose(perturbation(honest, "sign"), -np.sign(mu))
    same = np.ones((4, 3))
    np.testing.assert_array_equal(attacks.get("min_max")(same), np.ones(3))  # no spread: the mean
    assert max_gamma(same, np.ones(3)) == 0.0
    with pytest.raises(ValueError, match="at least 2 honest vectors"):
        attacks.get("min_max")(honest[:1])


# ------------------------------------------------------------------------------------- kinds / dtypes


@pytest.mark.parametrize("name", MODEL_ATTACKS + DATA_ATTACKS)
def test_byzantine_attack_numpy_and_torch_kinds(name):
    honest, own = honest_set(5, h=7, d=5), np.linspace(-1, 1, 5)
    out = make(name)(honest, own)
    assert isinstance(out, np.ndarray) and out.shape == (5,) and out.dtype == np.float64
    out_t = make(name)(torch.from_numpy(honest), torch.from_numpy(own))
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float64
    np.testing.assert_allclose(out_t.numpy(), out, rtol=1e-12)
    # the output follows `own` when given, else `honest`
    mixed = make(name)(honest, torch.from_numpy(own).float())
    assert isinstance(mixed, torch.Tensor) and mixed.dtype == torch.float32
    if make(name).omniscient:
        only = make(name)(torch.from_numpy(honest.astype(np.float32)))
        assert isinstance(only, torch.Tensor) and only.dtype == torch.float32
        np.testing.assert_allclose(only.numpy(), out, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- per-recipient vectors


@pytest.mark.parametrize("name", MODEL_ATTACKS + DATA_ATTACKS)
def test_byzantine_attack_outgoing_default_sends_everyone_the_same_vector(name):
    honest, own = honest_set(7, h=6, d=4), np.linspace(-1, 1, 4)
    expected = make(name)(honest, own)
    out = make(name).outgoing([0, 3, 5], honest=honest, own=own)
    assert sorted(out) == [0, 3, 5]
    for vec in out.values():
        np.testing.assert_array_equal(vec, expected)
    assert len({id(v) for v in out.values()}) == 1, "computed once, the same vector for every recipient"
    out_t = make(name).outgoing(range(2), honest=torch.from_numpy(honest), own=torch.from_numpy(own))
    assert all(isinstance(v, torch.Tensor) for v in out_t.values())
    np.testing.assert_allclose(out_t[1].numpy(), expected, rtol=1e-12)
    assert make(name).outgoing([], honest=honest, own=own) == {}


def test_byzantine_attack_outgoing_draws_once_per_round():
    # a random attack must not draw a fresh vector per recipient: every peer sees the same noise
    gauss, again = make("gaussian", seed=3), make("gaussian", seed=3)
    out = gauss.outgoing([0, 1, 2], own=np.zeros(5))
    np.testing.assert_array_equal(out[0], again(own=np.zeros(5)))
    np.testing.assert_array_equal(out[2], out[0])
    assert not np.array_equal(gauss.outgoing([0], own=np.zeros(5))[0], out[0]), "the next round draws anew"


class _Equivocation(attacks.ModelAttack):
    """Tell each recipient q a different vector, (q + 1) * own (not registered)."""

    needs_own = True

    def forge(self, honest, own):
        return own.copy()

    def outgoing(self, recipients, honest=None, own=None):
        v = self(honest=honest, own=own)
        return {q: v * (q + 1) for q in recipients}


def test_byzantine_attack_outgoing_can_send_per_recipient_vectors():
    own = np.array([1.0, -2.0])
    out = _Equivocation().outgoing([0, 2], own=own)
    np.testing.assert_array_equal(out[0], [1.0, -2.0])
    np.testing.assert_array_equal(out[2], [3.0, -6.0])
    assert isinstance(_Equivocation(), attacks.Attack) and _Equivocation().kind == "model"
    out_t = _Equivocation().outgoing([1], own=torch.tensor([1.0, -2.0]))
    assert isinstance(out_t[1], torch.Tensor) and out_t[1].tolist() == [2.0, -4.0]


# ------------------------------------------------------------------------------- agreement with ByzFL

byzfl = pytest.importorskip("byzfl")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_byzantine_attacks_agree_with_byzfl(kind):
    honest = honest_set(6, h=9, d=11)
    conv = (lambda a: torch.from_numpy(a)) if kind == "torch" else (lambda a: a)
    back = (lambda t: t.double().numpy()) if kind == "torch" else (lambda a: np.asarray(a))
    tol = {"rtol": 1e-5, "atol": 1e-6} if kind == "torch" else {"rtol": 1e-12, "atol": 1e-12}
    hv = conv(honest)
    # sign flip: ByzFL flips the honest mean with scale -1; ours flips `own` (here: that mean)
    np.testing.assert_allclose(
        back(attacks.get("sign_flip", scale=-1)(hv, conv(honest.mean(0)))),
        back(byzfl.SignFlipping()(hv)),
        **tol,
    )
    # IPM: ByzFL's tau is our epsilon
    for eps in (0.1, 2.0):
        np.testing.assert_allclose(
            back(attacks.get("ipm", epsilon=eps)(hv)),
            back(byzfl.InnerProductManipulation(tau=eps)(hv)),
            **tol,
        )
    # ALIE: ByzFL publishes mean + tau * std (ddof=1), i.e. z = -tau
    for tau in (1.5, -0.7):
        np.testing.assert_allclose(
            back(attacks.get("alie", z=-tau)(hv)), back(byzfl.ALittleIsEnough(tau=tau)(hv)), **tol
        )
    # mimic: ByzFL's epsilon is our index
    np.testing.assert_allclose(
        back(attacks.get("mimic", index=3)(hv)), back(byzfl.Mimic(epsilon=3)(hv)), **tol
    )
