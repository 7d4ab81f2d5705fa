"""Every defense with an in-database form gives the same vector as its client-side form."""

from __future__ import annotations

import numpy as np
import pytest

import defenses
from spirt.aggregate import aggregate_in_db, aggregate_on_client, in_db_possible
from spirt.tensors import from_f32_bytes

pytestmark = pytest.mark.byzantine

CASES = [
    ("mean", {}),
    ("median", {}),
    ("trimmed_mean", {"f": 2}),
    ("krum", {"f": 2}),
    ("multi_krum", {"f": 2}),
    ("multi_krum", {"f": 1, "m": 3}),
]


def _stack(rng, n, d, byz):
    honest = rng.normal(0.0, 1.0, (n - byz, d)).astype(np.float32)
    attackers = rng.normal(50.0, 30.0, (byz, d)).astype(np.float32)  # far away: the robust rules must drop them
    return np.concatenate([honest, attackers])


@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
@pytest.mark.parametrize("n", [7, 8, 11])
def test_byzantine_in_db_form_equals_client_form(db, name, params, n):
    rng = np.random.default_rng(n)
    d = 1537  # odd: not a multiple of any block size
    X = _stack(rng, n, d, params.get("f", 0))
    rule = defenses.get(name, **params)
    assert in_db_possible(rule)
    keys = [f"{{r}}:in:{i}" for i in range(n)]
    pipe = db.pipeline(transaction=False)
    for k, v in zip(keys, X, strict=True):
        pipe.set(k, v.tobytes())
    pipe.execute()
    chosen = aggregate_in_db(db, rule, keys, "{r}:agg:db")
    got = from_f32_bytes(db.get("{r}:agg:db"))
    want = aggregate_on_client(db, rule, keys, "{r}:agg:client")
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(got, np.asarray(rule(X), dtype=np.float32), rtol=2e-6, atol=2e-6)
    if name in ("krum", "multi_krum"):
        assert all(i < n - params["f"] for i in chosen), "an attacker was selected"


def test_byzantine_in_db_refuses_violating_configuration(db):
    keys = [f"{{r}}:in:{i}" for i in range(5)]
    for k in keys:
        db.set(k, np.zeros(4, np.float32).tobytes())
    with pytest.raises(ValueError, match="krum requires n > 2f \\+ 2"):
        aggregate_in_db(db, defenses.get("krum", f=2), keys, "{r}:agg")
    assert db.get("{r}:agg") is None


def test_rules_without_database_form_say_so():
    for name in ("geometric_median", "centered_clipping", "bulyan"):
        assert not in_db_possible(defenses.get(name, f=1))
