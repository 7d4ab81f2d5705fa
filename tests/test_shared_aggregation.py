"""Peers as threads of one process share a client-side aggregate only where each would have computed it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import defenses
from defenses import Aggregator
from spirt import aggregate
from spirt.aggregate import Rule, aggregate_on_client, shared_result
from spirt.backends import ModuleBackend
from spirt.config import load_config
from spirt.tensors import from_f32_bytes

pytestmark = pytest.mark.byzantine

#: every computation of :class:`Counted`, outside the rule (a counter inside would be state)
CALLS: list[int] = []


class Counted(Aggregator):
    """The coordinate-wise mean, counting its computations; slow enough for callers to overlap."""

    name = "counted"

    def aggregate(self, x: np.ndarray, **kwargs: object) -> np.ndarray:
        CALLS.append(1)
        threading.Event().wait(0.05)
        return x.mean(axis=0)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    CALLS.clear()
    monkeypatch.setattr(aggregate, "_AGGREGATED", aggregate.Shared(keep=16))


def _raw(rng, n=6, d=5000) -> list[bytes]:
    return [v.tobytes() for v in rng.normal(size=(n, d)).astype(np.float32)]


def _parse(raw):
    return np.stack([from_f32_bytes(b) for b in raw])


def test_equal_inputs_are_aggregated_once_for_every_peer():
    raw = _raw(np.random.default_rng(0))
    results, threads = [], []
    for _ in range(8):  # each peer its own bytes objects and its own rule object, as the peers have
        mine = [bytes(bytearray(b)) for b in raw]
        threads.append(threading.Thread(target=lambda m=mine: results.append(shared_result(Counted(), m, _parse(m)))))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(CALLS) == 1 and len(results) == 8
    want = np.asarray(Counted()(_parse(raw)), dtype=np.float32)
    assert all(np.array_equal(r, want) for r in results)
    assert not results[0].flags.writeable


def test_inputs_that_differ_outside_the_sampled_bytes_get_their_own_result():
    """The key samples the bytes; a vector changed where the sample does not look (as a Byzantine peer
    could send to one victim) finds the key but not the result: the bytes are compared whole."""
    raw = _raw(np.random.default_rng(1))
    other = list(raw)
    changed = bytearray(other[2])
    changed[aggregate.SAMPLE_STRIDE // 2] ^= 0x40
    other[2] = bytes(changed)
    first = shared_result(Counted(), raw, _parse(raw))
    second = shared_result(Counted(), other, _parse(other))
    assert len(CALLS) == 2
    assert np.array_equal(second, np.asarray(Counted()(_parse(other)), dtype=np.float32))
    assert not np.array_equal(first, second)


def test_a_rule_whose_state_advances_is_never_shared():
    """Bucketing draws a permutation per call: two peers with the same seed and inputs each draw their
    own, so each keeps the stream it would have had alone."""
    rng = np.random.default_rng(2)
    rounds = [_raw(rng, n=8) for _ in range(3)]
    alone = defenses.get("bucketing", pre=None, s=2, seed=5)
    want = [np.asarray(alone(_parse(r)), dtype=np.float32) for r in rounds]
    peers = [defenses.get("bucketing", s=2, seed=5) for _ in range(2)]
    for r, w in zip(rounds, want, strict=True):
        for p in peers:
            assert np.array_equal(shared_result(p, r, _parse(r)), w)


def test_a_failure_is_raised_by_the_peer_whose_inputs_caused_it():
    raw = _raw(np.random.default_rng(3), n=3)
    krum = defenses.get("krum", f=2)  # needs n > 2f + 2
    with pytest.raises(ValueError, match="krum requires"):
        shared_result(krum, raw, _parse(raw))


def test_peers_share_on_the_client_only_as_threads_of_one_process(db):
    rng = np.random.default_rng(4)
    raw = _raw(rng)
    keys = [f"{{r}}:in:{i}" for i in range(len(raw))]
    db.mset(dict(zip(keys, raw, strict=True)))
    for out in ("{r}:a", "{r}:b"):
        aggregate_on_client(db, Counted(), keys, out, shared=True)
    assert len(CALLS) == 1 and db.get("{r}:a") == db.get("{r}:b")
    aggregate_on_client(db, Counted(), keys, "{r}:c")
    assert len(CALLS) == 2 and db.get("{r}:c") == db.get("{r}:a")
    for mode, shared in (("thread", True), ("process", False)):
        cfg = load_config(None, {"peers.mode": mode, "aggregation.defense": "geometric_median"})
        assert Rule(cfg, ModuleBackend()).path().shared is shared
