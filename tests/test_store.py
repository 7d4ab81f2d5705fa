"""Tensor store and the aggregation backends against a real server and torch's SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spirt.backends import BACKENDS, SGDConfig
from spirt.benchmarks.reference import bench_backend as get_backend
from spirt.tensors import FlatParams, TensorFormatError, TensorStore, as_f32_bytes, from_f32_bytes


def test_roundtrip_numpy_and_torch(db):
    store = TensorStore(db)
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    t = torch.randn(2, 3, 5)
    store.put_many({"a": a, "t": t})
    got_a, got_t = store.get_many(["a", "t"])
    assert got_a.dtype == np.float32 and got_a.shape == (3, 4)
    np.testing.assert_array_equal(got_a, a.astype(np.float32))
    assert store.get("t", torch=True).shape == (2, 3, 5)
    np.testing.assert_array_equal(got_t, t.numpy())
    assert db.get("a") == a.astype("<f4").tobytes()  # raw little-endian float32, no header


def test_no_copy_for_float32_and_clear_errors(db):
    x = np.ones(5, dtype=np.float32)
    mv = as_f32_bytes(x)
    assert np.shares_memory(np.frombuffer(mv, dtype=np.float32), x)
    with pytest.raises(TensorFormatError, match="multiple of 4"):
        from_f32_bytes(b"abc", key="k")
    with pytest.raises(TensorFormatError, match="key missing"):
        TensorStore(db).get("missing")
    db.set("bad", b"\x00" * 8)
    db.set("bad:shape", "3")
    with pytest.raises(TensorFormatError, match="shape"):
        TensorStore(db).get("bad")


def test_flat_params_are_views_and_grads_land_in_place():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    flat = FlatParams(model)
    assert flat.numel == sum(p.numel() for p in model.parameters())
    new = np.arange(flat.numel, dtype=np.float32)
    flat.load_bytes(new.tobytes())
    np.testing.assert_array_equal(model[0].weight.detach().numpy().reshape(-1), new[:12])
    model(torch.randn(7, 4)).sum().backward()
    assert flat.grads.abs().sum() > 0
    ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.equal(ref, flat.grads)
    with pytest.raises(TensorFormatError, match="the model has"):
        flat.load_bytes(np.zeros(3, dtype=np.float32).tobytes())


ALL_BACKENDS = sorted([*BACKENDS, "spirt-reference", "module-unfused"])  # the peers' and the benchmark's


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_backends_match_torch_sgd(db, name):
    rng = np.random.default_rng(1)
    n, k, steps = 1001, 3, 3
    sgd = SGDConfig(lr=0.1, momentum=0.9, weight_decay=1e-3)
    backend = get_backend(name)
    backend.prepare(db)
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [[rng.standard_normal(n).astype(np.float32) for _ in range(k)] for _ in range(steps)]
    db.set("{x}p", backend.encode(p0))
    pt = torch.tensor(p0, requires_grad=True)
    opt = torch.optim.SGD([pt], lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay)
    for step in grads:
        keys = []
        for i, g in enumerate(step):
            db.set(f"{{x}}g{i}", backend.encode(g))
            keys.append(f"{{x}}g{i}")
        assert backend.update(db, "{x}p", "{x}m", keys, sgd) == n
        pt.grad = torch.tensor(np.mean(step, axis=0))
        opt.step()
    np.testing.assert_allclose(backend.decode(db.get("{x}p")), pt.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_module_update_in_one_pass_is_the_two_pass_update_bit_for_bit(db):
    """TENSOR.AVGSGD leaves the bytes TENSOR.AVG into a temporary + TENSOR.SGD left, and no temporary."""
    rng = np.random.default_rng(3)
    n, k = 50_003, 5
    sgd = SGDConfig(lr=0.05, momentum=0.9, weight_decay=5e-4)
    fused, unfused = get_backend("module"), get_backend("module-unfused")
    p0 = rng.standard_normal(n).astype(np.float32).tobytes()
    db.set("{a}p", p0)
    db.set("{b}p", p0)
    for _ in range(3):  # the first step creates the momentum buffer
        for i in range(k):
            g = rng.standard_normal(n).astype(np.float32).tobytes()
            db.set(f"{{a}}g{i}", g)
            db.set(f"{{b}}g{i}", g)
        assert fused.update(db, "{a}p", "{a}m", [f"{{a}}g{i}" for i in range(k)], sgd) == n
        assert unfused.update(db, "{b}p", "{b}m", [f"{{b}}g{i}" for i in range(k)], sgd) == n
        assert db.get("{a}p") == db.get("{b}p") and db.get("{a}m") == db.get("{b}m")
        assert db.get("{a}p") != p0
    assert sorted(k.decode() for k in db.keys("{a}*")) == sorted(["{a}p", "{a}m", *[f"{{a}}g{i}" for i in range(k)]])


TRAINING_BACKENDS = ALL_BACKENDS  # the JSON reference too: the base form uses its encoding


@pytest.mark.parametrize("name", TRAINING_BACKENDS)
def test_peer_momentum_is_torch_dampened_momentum(db, name):
    """vec <- beta*state + (1-beta)*vec, state <- vec; the first step passes vec through, as torch's
    momentum buffer with dampening = momentum does."""
    rng = np.random.default_rng(2)
    n, beta = 777, 0.9
    backend = get_backend(name)
    backend.prepare(db)
    db.delete("{x}pm")
    buf = None
    for _ in range(4):
        v = rng.standard_normal(n).astype(np.float32)
        db.set("{x}v", backend.encode(v))
        backend.peer_momentum(db, "{x}pm", "{x}v", beta)
        t = torch.tensor(v)
        buf = t.clone() if buf is None else buf.mul(beta).add(t, alpha=1 - beta)
        np.testing.assert_allclose(backend.decode(db.get("{x}v")), buf.numpy(), rtol=1e-5, atol=1e-6)
        assert db.get("{x}pm") == db.get("{x}v")


@pytest.mark.parametrize("name", TRAINING_BACKENDS)
def test_peer_momentum_refuses_mismatched_state(db, name):
    backend = get_backend(name)
    backend.prepare(db)
    db.set("{x}pm", backend.encode(np.ones(5, np.float32)))
    db.set("{x}v", backend.encode(np.ones(6, np.float32)))
    with pytest.raises(Exception, match="(?i)length|floats"):
        backend.peer_momentum(db, "{x}pm", "{x}v", 0.5)
    assert backend.decode(db.get("{x}v")).size == 6, "the vector was changed by a refused step"


def test_unknown_backend_lists_allowed():
    from spirt.backends import get_backend as peer_backend

    with pytest.raises(ValueError, match="allowed: client, lua, module"):
        peer_backend("gpu")
