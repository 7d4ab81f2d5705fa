"""The in-database tensor module (spirt/native/tensor.c) against numpy/torch, on real Valkey and Redis servers.

Every test runs on both server flavors (the ``server``/``db`` fixtures). Tolerances are explicit:
AVG/AXPY/SGD(vs. a float32 numpy model)/MEDIAN are computed with exactly numpy's float32 operation order
and are compared bit for bit; TRIMMEAN sums in double (rtol 1e-6 when the order can differ); DIST and NORM
accumulate in double (rtol 1e-10); SGD against torch.optim.SGD uses rtol 1e-5 (torch may fuse multiply-adds).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis
from tensor_refs import avg_ref, axpy_ref, median_ref

from spirt.servers import start_server

F32 = np.float32


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def put(db, key, arr) -> None:
    db.set(key, np.ascontiguousarray(arr, dtype=F32).tobytes())


def get(db, key) -> np.ndarray:
    raw = db.get(key)
    assert raw is not None, f"key {key!r} missing"
    return np.frombuffer(raw, dtype=F32)


def snapshot(db) -> dict:
    """Content of every key (DUMP serializes by value, not by internal encoding)."""
    return {k: (db.type(k), db.dump(k)) for k in sorted(db.keys())}


def fails(db, *args) -> str:
    """Run a command that must fail; return its message; the server must still answer and be unchanged."""
    before = snapshot(db)
    with pytest.raises(redis.ResponseError) as ei:
        db.execute_command(*args)
    assert db.ping()
    assert snapshot(db) == before, f"failing command {args[0]} modified the database"
    return str(ei.value)


def same_bits(got: np.ndarray, ref: np.ndarray) -> None:
    """Equal values, NaN where NaN (IEEE: -0 == 0)."""
    assert got.shape == ref.shape
    nan_g, nan_r = np.isnan(got), np.isnan(ref)
    np.testing.assert_array_equal(nan_g, nan_r)
    np.testing.assert_array_equal(got[~nan_g], ref[~nan_r])


def trimmean_ref(xs, b):
    X = np.sort(np.stack(xs).astype(np.float64), axis=0)  # NaN sorts last, as in the module
    kept = X[b : len(xs) - b]
    with np.errstate(all="ignore"):
        s = kept[0].copy()
        for r in kept[1:]:
            s = s + r
        return (s / kept.shape[0]).astype(F32)


def dist_ref(xs):
    X = np.stack(xs).astype(np.float64)
    K = len(xs)
    D = np.zeros((K, K))
    with np.errstate(all="ignore"):
        for i in range(K):
            for j in range(i + 1, K):
                D[i, j] = D[j, i] = np.sum((X[i] - X[j]) ** 2)
    return D


def close(got, ref, rtol):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    m = ~np.isnan(ref)
    np.testing.assert_allclose(got[m], ref[m], rtol=rtol, atol=0)


def rand(rng, n, scale=1.0):
    return (rng.standard_normal(n) * scale).astype(F32)


SIZES = [1, 2, 3, 7, 31, 4095, 4096, 4097, 10_007]


# --------------------------------------------------------------------------------------------------
# loading and introspection
# --------------------------------------------------------------------------------------------------


def test_module_loaded(db):
    info = db.execute_command("TENSOR.INFO")
    assert info[0] == b"version" and info[2] == b"commands"
    names = {c.split()[0] for c in info[3]}
    assert names == {
        b"TENSOR.AVG", b"TENSOR.AXPY", b"TENSOR.SGD", b"TENSOR.AVGSGD", b"TENSOR.MEDIAN", b"TENSOR.TRIMMEAN",
        b"TENSOR.DIST", b"TENSOR.NORM", b"TENSOR.FINITE", b"TENSOR.DIGEST", b"TENSOR.INFO",
        b"TENSOR.INBOX", b"TENSOR.PUSH", b"TENSOR.DESK", b"TENSOR.HELLO",
    }  # fmt: skip
    mods = db.execute_command("MODULE", "LIST")
    assert any(b"spirt_tensor" in (m[1] if isinstance(m, list) else m[b"name"]) for m in mods)


def test_key_positions(db):
    def gk(*args):
        return [k.decode() if isinstance(k, bytes) else k for k in db.command_getkeys(*args)]

    assert gk("TENSOR.AVG", "d", "a", "b") == ["d", "a", "b"]
    assert gk("TENSOR.AXPY", "d", "1", "a", "2", "b") == ["d", "a", "b"]
    assert gk("TENSOR.SGD", "p", "g", "0.1", "WD", "0", "momentum", "0.9", "buf", "NESTEROV") == [
        "p",
        "g",
        "buf",
    ]
    assert gk("TENSOR.SGD", "p", "g", "0.1") == ["p", "g"]
    assert gk("TENSOR.AVGSGD", "p", "3", "a", "b", "c", "0.1", "WD", "0", "MOMENTUM", "0.9", "buf") == [
        "p", "a", "b", "c", "buf"]
    assert gk("TENSOR.AVGSGD", "p", "1", "a", "0.1") == ["p", "a"]
    assert gk("TENSOR.TRIMMEAN", "d", "1", "a", "b", "c") == ["d", "a", "b", "c"]
    assert gk("TENSOR.MEDIAN", "d", "a", "b") == ["d", "a", "b"]
    assert gk("TENSOR.DIST", "a", "b") == ["a", "b"]
    assert gk("TENSOR.NORM", "a") == ["a"]
    assert gk("TENSOR.DIGEST", "a") == ["a"]
    assert gk("TENSOR.PUSH", "{p}:in:1", "{p}:notify:1", "3", "v") == ["{p}:in:1", "{p}:notify:1"]
    assert gk("TENSOR.HELLO", "{p}:hello:1", "m") == ["{p}:hello:1"]


def test_command_flags(db):
    def flags(name):
        info = db.execute_command("COMMAND", "INFO", name)[name]  # parsed by redis-py
        return {f.decode() if isinstance(f, bytes) else f for f in info["flags"]}

    for w in ("tensor.avg", "tensor.axpy", "tensor.sgd", "tensor.avgsgd", "tensor.median", "tensor.trimmean"):
        assert {"write", "denyoom"} <= flags(w), w
    for r in ("tensor.dist", "tensor.norm", "tensor.finite", "tensor.digest"):
        assert "readonly" in flags(r), r


# --------------------------------------------------------------------------------------------------
# numerics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 8, 9, 4096, 200_003])
def test_digest_tells_tensors_apart(db, n):
    """40 hex digits; equal bytes give equal digests, one flipped bit, a shorter tensor or another
    position of the same values give another one; the tensor is left alone."""
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    put(db, "a", x)
    put(db, "b", x)
    d = db.execute_command("TENSOR.DIGEST", "a")
    assert len(d) == 40 and all(c in b"0123456789abcdef" for c in d)
    assert db.execute_command("TENSOR.DIGEST", "b") == d and np.array_equal(get(db, "a"), x)
    others = set()
    for i in {0, n // 2, n - 1}:
        y = x.copy()
        y.view(np.uint32)[i] ^= 1 << (i % 32)
        put(db, "c", y)
        others.add(db.execute_command("TENSOR.DIGEST", "c"))
    if n > 1:
        put(db, "c", x[:-1])
        others.add(db.execute_command("TENSOR.DIGEST", "c"))
        put(db, "c", np.roll(x, 1))
        if not np.array_equal(np.roll(x, 1), x):
            others.add(db.execute_command("TENSOR.DIGEST", "c"))
    assert d not in others and len(others) == len({*others})
    assert "does not exist" in fails(db, "TENSOR.DIGEST", "missing")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 16])
def test_avg_matches_numpy(db, n, K):
    rng = np.random.default_rng(n * 100 + K)
    xs = [rand(rng, n, scale=10.0 ** rng.integers(-3, 4)) for _ in range(K)]
    for i, x in enumerate(xs):
        put(db, f"s{i}", x)
    assert db.execute_command("TENSOR.AVG", "dst", *[f"s{i}" for i in range(K)]) == n
    got = get(db, "dst")
    # same float32 operation order as numpy's axis-0 reduction: bit-identical
    same_bits(got, avg_ref(xs))
    np.testing.assert_allclose(got, np.mean(np.stack(xs), axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("K", [1, 2, 3, 6])
def test_axpy_matches_numpy(db, n, K):
    rng = np.random.default_rng(7 * n + K)
    xs = [rand(rng, n) for _ in range(K)]
    alphas = [float(a) for a in rng.standard_normal(K)]
    args = []
    for i, (a, x) in enumerate(zip(alphas, xs, strict=False)):
        put(db, f"x{i}", x)
        args += [repr(a), f"x{i}"]
    assert db.execute_command("TENSOR.AXPY", "y", *args) == n
    same_bits(get(db, "y"), axpy_ref(alphas, xs))
    ref64 = sum(a * x.astype(np.float64) for a, x in zip(alphas, xs, strict=False))
    np.testing.assert_allclose(get(db, "y"), ref64, rtol=1e-5, atol=1e-5)


def test_axpy_in_place_update(db):
    rng = np.random.default_rng(1)
    y, x = rand(rng, 1001), rand(rng, 1001)
    put(db, "y", y)
    put(db, "x", x)
    db.execute_command("TENSOR.AXPY", "y", "1", "y", "-0.25", "x")  # y += -0.25 x
    same_bits(get(db, "y"), y + F32(-0.25) * x)
    db.execute_command("TENSOR.AXPY", "y", "2", "y", "3", "y")  # y = 5 y (same key twice)
    same_bits(get(db, "y"), F32(2) * (y + F32(-0.25) * x) + F32(3) * (y + F32(-0.25) * x))


@pytest.mark.parametrize("n", [1, 5, 4096, 4099, 20_001])
@pytest.mark.parametrize("K", list(range(1, 18)) + [31, 32, 33, 64, 127, 128, 129, 200])
def test_median_matches_numpy(db, n, K):
    rng = np.random.default_rng(K * 1000 + n)
    if K % 3 == 0:  # many ties
        xs = [rng.integers(-3, 4, n).astype(F32) for _ in range(K)]
    else:
        xs = [rand(rng, n) for _ in range(K)]
    for i, x in enumerate(xs):
        put(db, f"s{i}", x)
    assert db.execute_command("TENSOR.MEDIAN", "m", *[f"s{i}" for i in range(K)]) == n
    got = get(db, "m")
    same_bits(got, median_ref(xs))  # mean of the two middle values computed in double, then rounded
    np.testing.assert_allclose(got, np.median(np.stack(xs), axis=0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n", [1, 6, 4097, 9000])
@pytest.mark.parametrize(
    "K,b",
    [
        (1, 0),
        (2, 0),
        (3, 1),
        (5, 2),
        (8, 1),
        (8, 3),
        (16, 4),
        (17, 0),
        (50, 10),
        (128, 40),
        (129, 1),
        (300, 100),
    ],
)
def test_trimmean_matches_numpy(db, n, K, b):
    rng = np.random.default_rng(K * 77 + b + n)
    xs = [rand(rng, n) for _ in range(K)]
    for i, x in enumerate(xs):
        put(db, f"s{i}", x)
    assert db.execute_command("TENSOR.TRIMMEAN", "t", b, *[f"s{i}" for i in range(K)]) == n
    got = get(db, "t")
    ref = trimmean_ref(xs, b)
    if K <= 128:  # sorting network: kept values summed in sorted order, as the reference
        same_bits(got, ref)
    else:  # selection: same values, summed in another order (double)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_rank_statistics_nan_handling(db):
    # numpy conventions: median is NaN if any value is NaN; for the trimmed mean NaN sorts last.
    for K in (5, 6, 200):  # network and selection paths
        xs = [np.arange(8, dtype=F32) + i for i in range(K)]
        xs[0][1] = np.nan  # one NaN at coordinate 1
        xs[1][2] = np.nan
        xs[2][2] = np.nan  # two NaNs at coordinate 2
        xs[3][3] = np.inf
        xs[4][4] = -np.inf
        for i, x in enumerate(xs):
            put(db, f"s{i}", x)
        keys = [f"s{i}" for i in range(K)]
        db.execute_command("TENSOR.MEDIAN", "m", *keys)
        got = get(db, "m")
        same_bits(got, median_ref(xs))
        assert np.isnan(got[1]) and np.isnan(got[2]) and not np.isnan(got[0])
        for b in (0, 1, 2):
            db.execute_command("TENSOR.TRIMMEAN", "t", b, *keys)
            got = get(db, "t")
            close(got, trimmean_ref(xs, b), 1e-6)
            assert np.isnan(got[1]) == (b < 1) and np.isnan(got[2]) == (b < 2)


@pytest.mark.parametrize("n", [1, 3, 4096, 4097, 50_001])
@pytest.mark.parametrize("K", [1, 2, 3, 7, 16])
def test_dist_matches_numpy(db, n, K):
    rng = np.random.default_rng(K * 31 + n)
    xs = [rand(rng, n) for _ in range(K)]
    for i, x in enumerate(xs):
        put(db, f"s{i}", x)
    reply = db.execute_command("TENSOR.DIST", *[f"s{i}" for i in range(K)])
    D = np.array([float(v) for v in reply]).reshape(K, K)
    assert np.all(np.diag(D) == 0)
    assert np.array_equal(D, D.T)
    close(D, dist_ref(xs), 1e-10)


def test_dist_many_sources(db):
    rng = np.random.default_rng(5)
    K, n = 300, 9
    xs = [rand(rng, n) for _ in range(K)]
    for i, x in enumerate(xs):
        put(db, f"s{i}", x)
    D = np.array([float(v) for v in db.execute_command("TENSOR.DIST", *[f"s{i}" for i in range(K)])]).reshape(
        K, K
    )
    close(D, dist_ref(xs), 1e-10)


@pytest.mark.parametrize("n", [1, 2, 7, 4096, 100_003])
def test_norm_and_finite(db, n):
    rng = np.random.default_rng(n)
    x = rand(rng, n, 1e3)
    put(db, "x", x)
    close([float(db.execute_command("TENSOR.NORM", "x"))], [np.linalg.norm(x.astype(np.float64))], 1e-12)
    assert db.execute_command("TENSOR.FINITE", "x") == 1
    big = np.full(n, 3e38, F32)  # squares overflow float32, not double
    put(db, "big", big)
    close([float(db.execute_command("TENSOR.NORM", "big"))], [np.linalg.norm(big.astype(np.float64))], 1e-12)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[rng.integers(n)] = bad
        put(db, "y", y)
        assert db.execute_command("TENSOR.FINITE", "y") == 0
        norm = float(db.execute_command("TENSOR.NORM", "y"))
        assert np.isnan(norm) if np.isnan(bad) else norm == np.inf
    put(db, "z", np.zeros(n, F32))
    assert float(db.execute_command("TENSOR.NORM", "z")) == 0.0
    put(db, "sub", np.full(n, 1e-45, F32))  # subnormals are finite
    assert db.execute_command("TENSOR.FINITE", "sub") == 1


def test_non_finite_inputs_propagate(db):
    a = np.array([1, np.nan, np.inf, -np.inf, np.inf, 0], F32)
    b = np.array([1, 2, 3, 4, -np.inf, -0.0], F32)
    put(db, "a", a)
    put(db, "b", b)
    db.execute_command("TENSOR.AVG", "d", "a", "b")
    same_bits(get(db, "d"), avg_ref([a, b]))
    db.execute_command("TENSOR.AXPY", "d", "2", "a", "-1", "b")
    same_bits(get(db, "d"), axpy_ref([2, -1], [a, b]))


# --------------------------------------------------------------------------------------------------
# SGD against torch.optim.SGD
# --------------------------------------------------------------------------------------------------

SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.05, weight_decay=0.01),
    dict(lr=0.01, momentum=0.9),
    dict(lr=0.01, momentum=0.9, dampening=0.1),
    dict(lr=0.01, momentum=0.9, nesterov=True),
    dict(lr=0.02, momentum=0.5, nesterov=True, weight_decay=1e-3),
    dict(lr=0.03, momentum=0.7, dampening=0.5, weight_decay=0.1),
    dict(lr=0.0, momentum=0.9),
    dict(lr=0.1, momentum=0.0, weight_decay=0.5),
]


def sgd_args(cfg, buf, style):
    opts = []
    if "momentum" in cfg:
        opts.append(["MOMENTUM" if style else "momentum", repr(cfg["momentum"]), buf])
    if "dampening" in cfg:
        opts.append(["Dampening", repr(cfg["dampening"])])
    if cfg.get("nesterov"):
        opts.append(["nesterov"])
    if "weight_decay" in cfg:
        opts.append(["WD" if style else "wd", repr(cfg["weight_decay"])])
    if style:
        opts.reverse()
    return [repr(cfg["lr"])] + [a for o in opts for a in o]


@pytest.mark.parametrize("cfg", SGD_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("n", [1, 4097, 10_000])
def test_sgd_matches_torch(db, cfg, n):
    import torch  # a declared dependency of spirt: a missing torch is a failure, not a skip
    rng = np.random.default_rng(n)
    p0 = rand(rng, n)
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.SGD([param], **cfg)
    put(db, "p", p0)
    for step in range(4):
        g = rand(rng, n)
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        put(db, "g", g)
        assert db.execute_command("TENSOR.SGD", "p", "g", *sgd_args(cfg, "buf", step % 2)) == n
        np.testing.assert_allclose(get(db, "p"), param.detach().numpy(), rtol=1e-5, atol=1e-6)
        if cfg.get("momentum", 0) > 0:
            buf = opt.state[param]["momentum_buffer"].numpy()
            np.testing.assert_allclose(get(db, "buf"), buf, rtol=1e-5, atol=1e-6)
        else:
            assert not db.exists("buf")
    np.testing.assert_array_equal(get(db, "g"), g)  # the gradient is read-only


def test_sgd_param_is_grad(db):
    p = np.array([1.0, -2.0, 4.0], F32)
    put(db, "p", p)
    db.execute_command("TENSOR.SGD", "p", "p", "0.5", "WD", "0.5")  # g = p + 0.5 p; p -= 0.5 g
    g = p + F32(0.5) * p
    same_bits(get(db, "p"), p + F32(-0.5) * g)


# --------------------------------------------------------------------------------------------------
# AVGSGD: AVG into a temporary + SGD with it, in one command
# --------------------------------------------------------------------------------------------------


def avg_then_sgd(db, param, grads, *sgd):
    """The two-command form TENSOR.AVGSGD replaces (a temporary key, deleted after)."""
    db.execute_command("TENSOR.AVG", "tmp", *grads)
    n = db.execute_command("TENSOR.SGD", param, "tmp", *sgd)
    db.delete("tmp")
    return n


@pytest.mark.parametrize("cfg", SGD_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("K", [1, 3, 16])
def test_avgsgd_is_avg_then_sgd(db, cfg, K):
    """Bit for bit the state AVG into a temporary then SGD leaves, step after step (the first creates
    the momentum buffer), and no other key: no temporary, the gradients untouched."""
    rng = np.random.default_rng(K)
    n = 10_007
    p0 = rand(rng, n)
    put(db, "p", p0)
    put(db, "p2", p0)
    for step in range(3):
        grads = [rand(rng, n, scale=2.0 ** k) for k in range(K)]
        for k, g in enumerate(grads):
            put(db, f"g{k}", g)
        keys = [f"g{k}" for k in range(K)]
        args = sgd_args(cfg, "buf", step % 2)
        assert db.execute_command("TENSOR.AVGSGD", "p", K, *keys, *args) == n
        assert avg_then_sgd(db, "p2", keys, *sgd_args(cfg, "buf2", step % 2)) == n
        same_bits(get(db, "p"), get(db, "p2"))
        assert get(db, "p").tobytes() == get(db, "p2").tobytes()
        if cfg.get("momentum", 0) > 0:
            assert db.get("buf") == db.get("buf2")
        for k, g in enumerate(grads):
            assert get(db, f"g{k}").tobytes() == g.tobytes()
    assert {k.decode() for k in db.keys()} == {"p", "p2", *keys} | (
        {"buf", "buf2"} if cfg.get("momentum", 0) > 0 else set())


def test_avgsgd_param_among_grads(db):
    """A gradient key may be the parameters themselves: every block is read before it is written."""
    rng = np.random.default_rng(9)
    p, a = rand(rng, 9001), rand(rng, 9001)
    put(db, "p", p)
    put(db, "a", a)
    db.execute_command("TENSOR.AVGSGD", "p", 3, "a", "p", "a", "0.5", "MOMENTUM", "0.9", "buf", "WD", "0.1")
    want_p, want_b = sgd_ref(p, avg_ref([a, p, a]), None, 0.5, 0.9, 0.1)
    same_bits(get(db, "p"), want_p)
    same_bits(get(db, "buf"), want_b)


# --------------------------------------------------------------------------------------------------
# aliasing, repeated sources, encodings, transactions, scripts
# --------------------------------------------------------------------------------------------------


def test_destination_is_a_source(db):
    rng = np.random.default_rng(3)
    a, b, c, d = (rand(rng, 5003) for _ in range(4))
    for k, v in zip("abcd", (a, b, c, d), strict=False):
        put(db, k, v)
    db.execute_command("TENSOR.AVG", "a", "a", "b")
    same_bits(get(db, "a"), avg_ref([a, b]))
    a1 = get(db, "a").copy()
    db.execute_command("TENSOR.AVG", "b", "c", "b", "b")  # dst in the middle, twice
    same_bits(get(db, "b"), avg_ref([c, b, b]))
    db.execute_command("TENSOR.MEDIAN", "c", "a", "d", "c")
    same_bits(get(db, "c"), median_ref([a1, d, c]))
    c1 = get(db, "c").copy()
    b1 = get(db, "b").copy()
    db.execute_command("TENSOR.TRIMMEAN", "d", "1", "d", "c", "b", "d")
    close(get(db, "d"), trimmean_ref([d, c1, b1, d], 1), 1e-7)


def test_repeated_sources(db):
    rng = np.random.default_rng(4)
    a, b = rand(rng, 999), rand(rng, 999)
    put(db, "a", a)
    put(db, "b", b)
    db.execute_command("TENSOR.AVG", "d", "a", "a", "a", "b")
    same_bits(get(db, "d"), avg_ref([a, a, a, b]))
    db.execute_command("TENSOR.MEDIAN", "m", "a", "a", "b")
    same_bits(get(db, "m"), a)  # two copies of a: a is always the median
    D = np.array([float(v) for v in db.execute_command("TENSOR.DIST", "a", "a", "b")]).reshape(3, 3)
    assert D[0, 1] == 0 and D[0, 2] == D[1, 2] > 0


def test_small_encoded_values(db):
    # 4-byte strings that the server stores integer-encoded or embedded; mapping them must convert them
    # in place without leaving stale handles, also when the destination is the same key.
    for raw in (b"1234", b"9999", b"-123", b"\x00\x00\x80\x3f", b"12345678"):
        db.flushall()
        db.set("k", raw)
        db.set("j", raw)
        x = np.frombuffer(raw, F32)
        assert db.execute_command("TENSOR.AVG", "k", "k", "k", "j") == len(raw) // 4
        same_bits(get(db, "k"), avg_ref([x, x, x]))
        db.set("k", raw)
        db.execute_command("TENSOR.AXPY", "k", "2", "k", "1", "k")
        same_bits(get(db, "k"), axpy_ref([2, 1], [x, x]))
        db.set("k", raw)
        assert db.execute_command("TENSOR.FINITE", "k") == int(np.all(np.isfinite(x)))
        close([float(db.execute_command("TENSOR.NORM", "k"))], [np.linalg.norm(x.astype(np.float64))], 1e-12)
        db.execute_command("TENSOR.SGD", "k", "k", "0.5", "MOMENTUM", "0.9", "buf")
        same_bits(get(db, "k"), x + F32(-0.5) * x)
        assert db.get("j") == raw


def test_transaction_and_script(db):
    a = np.arange(6, dtype=F32)
    b = np.arange(6, dtype=F32) * 3
    pipe = db.pipeline(transaction=True)
    pipe.set("a", a.tobytes())
    pipe.set("b", b.tobytes())
    pipe.execute_command("TENSOR.AVG", "a", "a", "b")
    pipe.execute_command("TENSOR.AVG", "a", "a", "b")
    pipe.get("a")
    res = pipe.execute()
    same_bits(np.frombuffer(res[-1], F32), avg_ref([avg_ref([a, b]), b]))
    script = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('TENSOR.AVG', KEYS[1], KEYS[1], KEYS[2])"
    assert db.eval(script, 2, "c", "b", a.tobytes()) == 6
    same_bits(get(db, "c"), avg_ref([a, b]))


def test_large_fan_in(db):
    rng = np.random.default_rng(9)
    K, n = 4096, 37
    xs = [rand(rng, n) for _ in range(K)]
    pipe = db.pipeline(transaction=False)
    for i, x in enumerate(xs):
        pipe.set(f"w:{i}", x.tobytes())
    pipe.execute()
    keys = [f"w:{i}" for i in range(K)]
    assert db.execute_command("TENSOR.AVG", "avg", *keys) == n
    same_bits(get(db, "avg"), avg_ref(xs))
    assert db.execute_command("TENSOR.MEDIAN", "med", *keys) == n
    same_bits(get(db, "med"), median_ref(xs))
    assert db.execute_command("TENSOR.TRIMMEAN", "tm", 1000, *keys) == n
    close(get(db, "tm"), trimmean_ref(xs, 1000), 1e-6)
    args = [a for i in range(K) for a in (repr(1.0 / K), keys[i])]
    assert db.execute_command("TENSOR.AXPY", "ax", *args) == n
    same_bits(get(db, "ax"), axpy_ref([1.0 / K] * K, xs))


def test_adversarial_selection_input(db):
    # Many equal values and sorted/reversed columns exercise the selection path's pivots and fallback.
    K, n = 1001, 40
    base = np.arange(K, dtype=F32)
    xs = []
    for i in range(K):
        x = np.empty(n, F32)
        x[0::4] = base[i]  # sorted across sources
        x[1::4] = base[K - 1 - i]  # reversed
        x[2::4] = 7.0  # all equal
        x[3::4] = (i * 7919) % 13  # few distinct values
        xs.append(x)
    pipe = db.pipeline(transaction=False)
    for i, x in enumerate(xs):
        pipe.set(f"s{i}", x.tobytes())
    pipe.execute()
    keys = [f"s{i}" for i in range(K)]
    db.execute_command("TENSOR.MEDIAN", "m", *keys)
    same_bits(get(db, "m"), median_ref(xs))
    db.execute_command("TENSOR.TRIMMEAN", "t", 300, *keys)
    close(get(db, "t"), trimmean_ref(xs, 300), 1e-6)


# --------------------------------------------------------------------------------------------------
# validation: every rule has a precise error, the server survives, nothing is modified
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def seeded(db):
    put(db, "a", np.arange(3, dtype=F32))
    put(db, "b", np.arange(3, dtype=F32) + 1)
    put(db, "c4", np.arange(4, dtype=F32))
    db.set("odd", b"12345")
    db.set("empty", b"")
    db.rpush("list", b"x")
    db.hset("hash", b"f", b"v")
    db.sadd("set", b"m")
    db.set(b"we\r\nird'\x00", np.ones(3, F32).tobytes())
    return db


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["TENSOR.AVG"], "wrong number of arguments for 'TENSOR.AVG'"),
        (["TENSOR.AVG", "d"], "usage: TENSOR.AVG dst src"),
        (["TENSOR.AXPY", "d", "1"], "wrong number of arguments for 'TENSOR.AXPY'"),
        (["TENSOR.AXPY", "d", "1", "a", "2"], "wrong number of arguments for 'TENSOR.AXPY'"),
        (["TENSOR.SGD", "a", "b"], "wrong number of arguments for 'TENSOR.SGD'"),
        (["TENSOR.MEDIAN", "d"], "wrong number of arguments for 'TENSOR.MEDIAN'"),
        (["TENSOR.TRIMMEAN", "d", "0"], "wrong number of arguments for 'TENSOR.TRIMMEAN'"),
        (["TENSOR.DIST"], "wrong number of arguments for 'TENSOR.DIST'"),
        (["TENSOR.NORM"], "wrong number of arguments for 'TENSOR.NORM'"),
        (["TENSOR.NORM", "a", "b"], "wrong number of arguments for 'TENSOR.NORM'"),
        (["TENSOR.FINITE"], "wrong number of arguments for 'TENSOR.FINITE'"),
        (["TENSOR.INFO", "x"], "wrong number of arguments for 'TENSOR.INFO'"),
        # missing sources
        (["TENSOR.AVG", "d", "a", "nokey"], "TENSOR.AVG: source key 'nokey' does not exist"),
        (["TENSOR.MEDIAN", "d", "nokey"], "TENSOR.MEDIAN: source key 'nokey' does not exist"),
        (["TENSOR.TRIMMEAN", "d", "0", "nokey"], "TENSOR.TRIMMEAN: source key 'nokey' does not exist"),
        (["TENSOR.AXPY", "d", "1", "nokey"], "TENSOR.AXPY: source key 'nokey' does not exist"),
        (["TENSOR.DIST", "a", "nokey"], "TENSOR.DIST: source key 'nokey' does not exist"),
        (["TENSOR.NORM", "nokey"], "TENSOR.NORM: source key 'nokey' does not exist"),
        (["TENSOR.FINITE", "nokey"], "TENSOR.FINITE: source key 'nokey' does not exist"),
        (["TENSOR.SGD", "nokey", "a", "0.1"], "TENSOR.SGD: param key 'nokey' does not exist"),
        (["TENSOR.SGD", "a", "nokey", "0.1"], "TENSOR.SGD: grad key 'nokey' does not exist"),
        # wrong types
        (["TENSOR.AVG", "d", "a", "list"], "WRONGTYPE TENSOR.AVG: source key 'list' holds a list"),
        (["TENSOR.AVG", "hash", "a"], "WRONGTYPE TENSOR.AVG: destination key 'hash' holds a hash"),
        (["TENSOR.MEDIAN", "set", "a"], "WRONGTYPE TENSOR.MEDIAN: destination key 'set' holds a set"),
        (["TENSOR.DIST", "a", "hash"], "WRONGTYPE TENSOR.DIST: source key 'hash' holds a hash"),
        (["TENSOR.NORM", "list"], "WRONGTYPE TENSOR.NORM: source key 'list' holds a list"),
        (["TENSOR.SGD", "list", "a", "0.1"], "WRONGTYPE TENSOR.SGD: param key 'list' holds a list"),
        (
            ["TENSOR.SGD", "a", "b", "0.1", "MOMENTUM", "0.9", "hash"],
            "WRONGTYPE TENSOR.SGD: momentum buffer key 'hash'",
        ),
        # lengths
        (["TENSOR.AVG", "d", "odd"], "TENSOR.AVG: source 'odd' has 5 bytes, not a non-zero multiple of 4"),
        (
            ["TENSOR.AVG", "d", "a", "empty"],
            "TENSOR.AVG: source 'empty' has 0 bytes, not a non-zero multiple of 4",
        ),
        (
            ["TENSOR.AVG", "d", "a", "c4"],
            "TENSOR.AVG: source 'c4' has 16 bytes, expected 12 (all sources must have equal length; first source 'a')",
        ),
        (["TENSOR.AXPY", "d", "1", "c4", "1", "a"], "source 'a' has 12 bytes, expected 16"),
        (["TENSOR.DIST", "a", "b", "c4"], "source 'c4' has 16 bytes, expected 12"),
        (["TENSOR.FINITE", "odd"], "source 'odd' has 5 bytes"),
        (
            ["TENSOR.SGD", "a", "c4", "0.1"],
            "TENSOR.SGD: grad 'c4' has 16 bytes, expected 12 (must match param 'a')",
        ),
        (
            ["TENSOR.SGD", "a", "b", "0.1", "MOMENTUM", "0.9", "c4"],
            "momentum buffer 'c4' has 16 bytes, expected 12",
        ),
        # numbers
        (["TENSOR.AXPY", "d", "abc", "a"], "TENSOR.AXPY: alpha1 'abc' is not a valid number"),
        (["TENSOR.AXPY", "d", "1", "a", "nan", "b"], "TENSOR.AXPY: alpha2 'nan' is not finite"),
        (["TENSOR.AXPY", "d", "-inf", "a"], "alpha1 '-inf' is not finite"),
        (["TENSOR.AXPY", "d", "1e39", "a"], "alpha1 '1e39' is outside the float32 range"),
        (["TENSOR.AXPY", "d", "1e999", "a"], "alpha1 '1e999' is not finite"),
        (["TENSOR.AXPY", "d", " 1", "a"], "alpha1 ' 1' is not a valid number"),
        (["TENSOR.AXPY", "d", "1x", "a"], "alpha1 '1x' is not a valid number"),
        (["TENSOR.AXPY", "d", "", "a"], "alpha1 '' is not a valid number"),
        (["TENSOR.SGD", "a", "b", "-0.1"], "TENSOR.SGD: learning rate '-0.1' must be >= 0"),
        (["TENSOR.SGD", "a", "b", "inf"], "learning rate 'inf' is not finite"),
        (["TENSOR.SGD", "a", "b", "x"], "learning rate 'x' is not a valid number"),
        (["TENSOR.SGD", "a", "b", "0.1", "MOMENTUM", "-0.5", "buf"], "momentum '-0.5' must be >= 0"),
        (["TENSOR.SGD", "a", "b", "0.1", "MOMENTUM", "nan", "buf"], "momentum 'nan' is not finite"),
        (["TENSOR.SGD", "a", "b", "0.1", "WD", "-1"], "weight decay '-1' must be >= 0"),
        (["TENSOR.SGD", "a", "b", "0.1", "DAMPENING", "inf"], "dampening 'inf' is not finite"),
        (["TENSOR.SGD", "a", "b", "0.1", "NESTEROV"], "NESTEROV requires MOMENTUM mu > 0 and zero DAMPENING"),
        (
            ["TENSOR.SGD", "a", "b", "0.1", "MOMENTUM", "0", "buf", "NESTEROV"],
            "NESTEROV requires MOMENTUM mu > 0",
        ),
        (
            ["TENSOR.SGD", "a", "b", "0.1", "MOMENTUM", "0.9", "buf", "NESTEROV", "DAMPENING", "0.1"],
            "zero DAMPENING",
        ),
        (["TENSOR.SGD", "a", "b", "0.1", "MOMENTUM", "0.9"], "MOMENTUM needs two arguments: mu buf"),
        (["TENSOR.SGD", "a", "b", "0.1", "WD"], "WD needs a value"),
        (["TENSOR.SGD", "a", "b", "0.1", "DAMPENING"], "DAMPENING needs a value"),
        (["TENSOR.SGD", "a", "b", "0.1", "LR", "1"], "TENSOR.SGD: unknown option 'LR'"),
        (["TENSOR.SGD", "a", "b", "0.1", "WD", "0", "wd", "0"], "option WD given more than once"),
        (["TENSOR.SGD", "a", "b", "0.1", "NESTEROV", "NESTEROV"], "option NESTEROV given more than once"),
        (
            ["TENSOR.SGD", "a", "b", "0.1", "MOMENTUM", "0.9", "a"],
            "momentum buffer key 'a' must differ from the param and grad keys",
        ),
        (["TENSOR.SGD", "a", "b", "0.1", "MOMENTUM", "0.9", "b"], "must differ from the param and grad keys"),
        (["TENSOR.AVGSGD", "a", "1", "b"], "wrong number of arguments for 'TENSOR.AVGSGD'"),
        (["TENSOR.AVGSGD", "a", "2", "b", "0.1"], "numgrads '2' must be an integer in 1..65536 followed by"),
        (["TENSOR.AVGSGD", "a", "0", "b", "0.1"], "numgrads '0' must be an integer"),
        (["TENSOR.AVGSGD", "a", "x", "b", "0.1"], "numgrads 'x' must be an integer"),
        (["TENSOR.AVGSGD", "a", "-1", "b", "0.1"], "numgrads '-1' must be an integer"),
        (["TENSOR.AVGSGD", "nokey", "1", "a", "0.1"], "TENSOR.AVGSGD: param key 'nokey' does not exist"),
        (["TENSOR.AVGSGD", "a", "2", "b", "nokey", "0.1"], "TENSOR.AVGSGD: grad key 'nokey' does not exist"),
        (["TENSOR.AVGSGD", "a", "2", "b", "list", "0.1"], "WRONGTYPE TENSOR.AVGSGD: grad key 'list' holds a list"),
        (
            ["TENSOR.AVGSGD", "a", "2", "b", "c4", "0.1"],
            "TENSOR.AVGSGD: grad 'c4' has 16 bytes, expected 12 (must match param 'a')",
        ),
        (["TENSOR.AVGSGD", "a", "1", "b", "-0.1"], "TENSOR.AVGSGD: learning rate '-0.1' must be >= 0"),
        (["TENSOR.AVGSGD", "a", "1", "b", "0.1", "LR", "1"], "TENSOR.AVGSGD: unknown option 'LR'"),
        (["TENSOR.AVGSGD", "a", "1", "b", "0.1", "NESTEROV"], "NESTEROV requires MOMENTUM mu > 0"),
        (
            ["TENSOR.AVGSGD", "a", "2", "b", "c", "0.1", "MOMENTUM", "0.9", "c"],
            "momentum buffer key 'c' must differ from the param and grad keys",
        ),
        (
            ["TENSOR.AVGSGD", "a", "1", "b", "0.1", "MOMENTUM", "0.9", "c4"],
            "momentum buffer 'c4' has 16 bytes, expected 12",
        ),
        (["TENSOR.TRIMMEAN", "d", "-1", "a", "b", "c4"], "trim count b '-1' is not a non-negative integer"),
        (["TENSOR.TRIMMEAN", "d", "1.5", "a", "b", "c4"], "trim count b '1.5' is not a non-negative integer"),
        (["TENSOR.TRIMMEAN", "d", "1", "a", "b"], "trim count b=1 needs more than 2b=2 sources, got 2"),
        (["TENSOR.TRIMMEAN", "d", "99999999999999999999", "a"], "is not a non-negative integer"),
        # key names are shown escaped, on one line
        (
            ["TENSOR.AVG", "d", "a", b"no\r\nsuch'\x00key"],
            "source key 'no\\x0d\\x0asuch\\x27\\x00key' does not exist",
        ),
        (["TENSOR.AVG", "d", b"we\r\nird'\x00", "c4"], "first source 'we\\x0d\\x0aird\\x27\\x00'"),
    ],
)
def test_errors(seeded, args, fragment):
    msg = fails(seeded, *args)
    assert fragment in msg, msg
    assert "\n" not in msg and "\r" not in msg


def test_error_prefixes(seeded):
    # redis-py strips the error code; read the raw replies with a plain socket to check the prefix
    import socket

    host, port = (
        seeded.connection_pool.connection_kwargs["host"],
        seeded.connection_pool.connection_kwargs["port"],
    )
    with socket.create_connection((host, port), timeout=10) as s:
        for cmd, prefix in [
            ([b"TENSOR.AVG", b"d", b"nokey"], b"-ERR TENSOR.AVG: "),
            ([b"TENSOR.AVG", b"d", b"list"], b"-WRONGTYPE TENSOR.AVG: "),
            ([b"TENSOR.AVG"], b"-ERR wrong number of arguments"),
            ([b"TENSOR.SGD", b"a", b"b", b"-1"], b"-ERR TENSOR.SGD: "),
        ]:
            s.sendall(b"*%d\r\n" % len(cmd) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in cmd))
            line = b""
            while not line.endswith(b"\r\n"):
                line += s.recv(4096)
            assert line.startswith(prefix), line


def test_limits(db):
    put(db, "a", np.ones(3, F32))
    msg = fails(db, "TENSOR.AVG", "d", *(["a"] * 65537))
    assert "TENSOR.AVG: too many sources (65537 > 65536)" in msg
    msg = fails(db, "TENSOR.DIST", *(["a"] * 4097))
    assert "TENSOR.DIST: too many sources (4097 > 4096)" in msg
    put(db, "big", np.ones(8193, F32))
    msg = fails(db, "TENSOR.DIST", *(["big"] * 4096))
    assert "too much work" in msg
    # the largest accepted fan-in of DIST
    assert len(db.execute_command("TENSOR.DIST", *(["a"] * 200))) == 200 * 200


def test_failed_command_creates_nothing_and_does_not_replicate_garbage(db):
    put(db, "a", np.ones(3, F32))
    fails(db, "TENSOR.AVG", "newdst", "a", "missing")
    assert not db.exists("newdst")
    fails(db, "TENSOR.SGD", "a", "a", "0.1", "MOMENTUM", "0.9", "newbuf", "NESTEROV", "DAMPENING", "0.5")
    assert not db.exists("newbuf")
    fails(db, "TENSOR.AVGSGD", "a", "2", "a", "missing", "0.1", "MOMENTUM", "0.9", "newbuf")
    assert not db.exists("newbuf")


def test_watch_sees_module_writes(db, server):
    put(db, "a", np.ones(3, F32))
    other = server.client()
    with db.pipeline() as pipe:
        pipe.watch("d")
        other.execute_command("TENSOR.AVG", "d", "a")
        pipe.multi()
        pipe.set("d", b"x")
        with pytest.raises(redis.WatchError):
            pipe.execute()
    other.close()


# --------------------------------------------------------------------------------------------------
# replication and cluster
# --------------------------------------------------------------------------------------------------


def _wait_for(pred, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_replication(db, server):
    db.config_set("repl-diskless-sync-delay", 0)  # start the full sync at once
    with start_server(server.binary, extra_args=["--replicaof", "127.0.0.1", str(server.port)]) as rep:
        rc = rep.client()
        _wait_for(lambda: rc.info("replication").get("master_link_status") == "up", what="replica link")
        rng = np.random.default_rng(11)
        xs = [rand(rng, 4099) for _ in range(5)]
        for i, x in enumerate(xs):
            put(db, f"s{i}", x)
        keys = [f"s{i}" for i in range(5)]
        db.execute_command("TENSOR.AVG", "avg", *keys)
        db.execute_command("TENSOR.AVG", "s0", "s0", "s1")
        db.execute_command("TENSOR.AXPY", "ax", "0.5", "s2", "-2", "s3")
        db.execute_command("TENSOR.MEDIAN", "med", *keys)
        db.execute_command("TENSOR.TRIMMEAN", "tm", 1, *keys)
        for _ in range(3):
            db.execute_command(
                "TENSOR.SGD", "s4", "s3", "0.1", "MOMENTUM", "0.9", "buf", "NESTEROV", "WD", "0.01"
            )
            db.execute_command("TENSOR.AVGSGD", "s1", 3, "s2", "s3", "s4", "0.1", "MOMENTUM", "0.9", "buf1")
        with pytest.raises(redis.ResponseError):
            db.execute_command("TENSOR.AVG", "never", "s0", "missing")
        assert db.execute_command("WAIT", 1, 10_000) >= 1
        keys_p = sorted(db.keys())
        assert sorted(rc.keys()) == keys_p
        assert b"never" not in keys_p
        for k in keys_p:
            assert rc.get(k) == db.get(k), k
        # replicas refuse the write commands from clients, but serve the read-only ones
        with pytest.raises(redis.ResponseError, match="(?i)read only|readonly"):
            rc.execute_command("TENSOR.AVG", "x", "s0")
        assert float(rc.execute_command("TENSOR.NORM", "avg")) == float(
            db.execute_command("TENSOR.NORM", "avg")
        )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cluster_slots(server):
    # an explicit cluster bus port: the default (port + 10000) fails for ephemeral ports above 55535
    args = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-port",
        str(_free_port()),
    ]
    with start_server(server.binary, extra_args=args) as node:
        c = node.client()
        c.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)

        def ok():
            info = c.execute_command("CLUSTER", "INFO")
            return (
                b"cluster_state:ok" in info if isinstance(info, bytes) else info.get("cluster_state") == "ok"
            )

        _wait_for(ok, what="cluster_state:ok")
        x = np.arange(5, dtype=F32)
        for k in ("{r1}:a", "{r1}:b", "{r1}:c", "{r2}:a"):
            c.set(k, x.tobytes())
        same = [
            ("TENSOR.AVG", "{r1}:d", "{r1}:a", "{r1}:b"),
            ("TENSOR.AXPY", "{r1}:d", "1", "{r1}:a", "2", "{r1}:b"),
            ("TENSOR.SGD", "{r1}:a", "{r1}:b", "0.1", "MOMENTUM", "0.9", "{r1}:buf"),
            ("TENSOR.AVGSGD", "{r1}:a", "2", "{r1}:b", "{r1}:c", "0.1", "MOMENTUM", "0.9", "{r1}:buf"),
            ("TENSOR.MEDIAN", "{r1}:d", "{r1}:a", "{r1}:b", "{r1}:c"),
            ("TENSOR.TRIMMEAN", "{r1}:d", "1", "{r1}:a", "{r1}:b", "{r1}:c"),
            ("TENSOR.DIST", "{r1}:a", "{r1}:b"),
            ("TENSOR.NORM", "{r1}:a"),
            ("TENSOR.FINITE", "{r1}:a"),
        ]
        for cmd in same:
            c.execute_command(*cmd)
        crossed = [
            ("TENSOR.AVG", "{r1}:d", "{r1}:a", "{r2}:a"),
            ("TENSOR.AVG", "{r2}:d", "{r1}:a"),
            ("TENSOR.AXPY", "{r1}:d", "1", "{r1}:a", "2", "{r2}:a"),
            ("TENSOR.SGD", "{r1}:a", "{r2}:a", "0.1"),
            ("TENSOR.SGD", "{r1}:a", "{r1}:b", "0.1", "MOMENTUM", "0.9", "{r2}:buf"),
            ("TENSOR.AVGSGD", "{r1}:a", "2", "{r1}:b", "{r2}:a", "0.1"),
            ("TENSOR.AVGSGD", "{r2}:a", "1", "{r1}:b", "0.1"),
            ("TENSOR.AVGSGD", "{r1}:a", "1", "{r1}:b", "0.1", "MOMENTUM", "0.9", "{r2}:buf"),
            ("TENSOR.MEDIAN", "{r1}:d", "{r1}:a", "{r2}:a"),
            ("TENSOR.TRIMMEAN", "{r1}:d", "0", "{r1}:a", "{r2}:a"),
            ("TENSOR.TRIMMEAN", "{r2}:d", "0", "{r1}:a"),
            ("TENSOR.DIST", "{r1}:a", "{r2}:a"),
        ]
        for cmd in crossed:
            with pytest.raises(redis.ResponseError, match="same slot"):
                c.execute_command(*cmd)
        assert c.ping()


# --------------------------------------------------------------------------------------------------
# resources, notifications, expiry
# --------------------------------------------------------------------------------------------------


def test_no_memory_growth_on_success_and_error_paths(db):
    """Module allocations and key handles go through the server's allocator: a leak on any path shows
    up in used_memory after a few thousand calls."""
    put(db, "a", np.arange(1000, dtype=F32))
    put(db, "b", np.arange(1000, dtype=F32) + 1)
    db.set("odd", b"12345")
    db.rpush("list", b"x")
    calls = [
        ("TENSOR.AVG", "d", "a", "b"),
        ("TENSOR.AXPY", "d", "0.5", "a", "2", "b"),
        ("TENSOR.SGD", "a", "b", "0.001", "MOMENTUM", "0.9", "buf", "WD", "0.1"),
        ("TENSOR.AVGSGD", "a", "2", "b", "a", "0.001", "MOMENTUM", "0.9", "buf", "WD", "0.1"),
        ("TENSOR.MEDIAN", "d", "a", "b", "a"),
        ("TENSOR.TRIMMEAN", "d", "1", "a", "b", "a"),
        ("TENSOR.DIST", "a", "b", "a"),
        ("TENSOR.NORM", "a"),
        ("TENSOR.FINITE", "a"),
        ("TENSOR.INFO",),
        ("TENSOR.AVG", "d", "a", "b", "missing"),
        ("TENSOR.AVG", "d", "a", "odd"),
        ("TENSOR.AVG", "list", "a"),
        ("TENSOR.AXPY", "d", "1", "a", "x", "b"),
        ("TENSOR.AXPY", "d", "1", "a", "1", "list"),
        ("TENSOR.SGD", "a", "b", "0.1", "MOMENTUM", "0.9", "list"),
        ("TENSOR.SGD", "a", "b", "0.1", "NESTEROV"),
        ("TENSOR.AVGSGD", "a", "2", "b", "missing", "0.1", "MOMENTUM", "0.9", "buf"),
        ("TENSOR.AVGSGD", "a", "2", "b", "odd", "0.1"),
        ("TENSOR.AVGSGD", "a", "9", "b", "0.1"),
        ("TENSOR.MEDIAN", "d", "a", "b", "missing"),
        ("TENSOR.TRIMMEAN", "d", "5", "a", "b"),
        ("TENSOR.TRIMMEAN", "d", "0", "a", "b", "odd"),
        ("TENSOR.DIST", "a", "b", "missing"),
        ("TENSOR.DIST", *(["a"] * 4097)),
        ("TENSOR.NORM", "list"),
        ("TENSOR.FINITE", "missing"),
    ]

    def run(rounds):
        for _ in range(rounds):
            pipe = db.pipeline(transaction=False)
            for c in calls:
                pipe.execute_command(*c)
            pipe.execute(raise_on_error=False)

    def used():
        # without client buffers and the replication backlog (it fills up with the replicated writes
        # if a replica was ever attached to this server). The server's cron refreshes mem_clients_normal
        # ten times a second while used_memory is live: read both after the cron has run, or a client
        # buffer counted in one and not yet in the other looks like +-24 KB in a window.
        time.sleep(0.3)
        m = db.info("memory")
        return (
            m["used_memory"]
            - m.get("mem_replication_backlog", 0)
            - m.get("mem_clients_normal", 0)
            - m.get("mem_clients_slaves", 0)
        )

    run(100)  # warm up: destination and buffer keys, client buffers and server tables reach their sizes
    growth = []
    m0 = used()
    for _ in range(5):
        run(100)
        m1 = used()
        growth.append(m1 - m0)
        m0 = m1
    # A leak grows in every window (one leaked 16-byte block per call of one kind: > 1.6 KB per window);
    # the server's own one-off reallocations (client buffers, cron) show up in one window or two.
    assert sorted(growth)[1] < 1024, f"used_memory grew in every window of {100 * len(calls)} calls: {growth}"
    assert db.ping()


def test_keyspace_notifications(db, server):
    db.config_set("notify-keyspace-events", "KA")
    sub = server.client().pubsub()
    try:
        sub.psubscribe("__keyspace@0__:*")
        assert sub.get_message(timeout=5)["type"] == "psubscribe"
        put(db, "a", np.ones(4, F32))
        assert sub.get_message(timeout=5)["data"] == b"set"
        db.execute_command("TENSOR.AVG", "d", "a", "a")
        msg = sub.get_message(timeout=5)
        assert msg["channel"] == b"__keyspace@0__:d" and msg["data"] == b"tensor.avg"
        db.execute_command("TENSOR.SGD", "a", "d", "0.1", "MOMENTUM", "0.9", "buf")
        got = {(sub.get_message(timeout=5) or {}).get("channel") for _ in range(2)}
        assert got == {b"__keyspace@0__:a", b"__keyspace@0__:buf"}
        db.execute_command("TENSOR.AVGSGD", "a", 2, "d", "a", "0.1", "MOMENTUM", "0.9", "buf")
        got = {(m := sub.get_message(timeout=5) or {}).get("channel"): m.get("data") for _ in range(2)}
        assert got == {b"__keyspace@0__:a": b"tensor.avgsgd", b"__keyspace@0__:buf": b"tensor.avgsgd"}
    finally:
        sub.close()
        db.config_set("notify-keyspace-events", "")


def test_keys_with_expiry(db):
    x = np.arange(6, dtype=F32)
    put(db, "a", x)
    db.pexpire("a", 100_000)
    db.set("d", b"old", px=200_000)
    db.execute_command("TENSOR.AVG", "d", "a", "a")
    same_bits(get(db, "d"), x)
    assert 0 < db.pttl("d") <= 200_000  # a destination keeps its expiry, like an in-place update
    assert 0 < db.pttl("a") <= 100_000
    db.execute_command("TENSOR.AVG", "a", "a", "d")  # an expiring destination that is also a source
    same_bits(get(db, "a"), x)
    assert 0 < db.pttl("a") <= 100_000
    db.set("gone", x.tobytes(), px=1)
    time.sleep(0.05)
    assert "source key 'gone' does not exist" in fails(db, "TENSOR.AVG", "d", "gone")


# --------------------------------------------------------------------------------------------------
# worker threads: THREADS / PARALLEL-THRESHOLD load arguments
# --------------------------------------------------------------------------------------------------

DEFAULT_PARALLEL_THRESHOLD = 1 << 20  # floats read by one command


def start_with_module_args(binary, *module_args, **kwargs):
    """A server of the same binary with the tensor module loaded with ``module_args``."""
    from spirt.servers import module_path

    return start_server(
        binary, module=False, extra_args=["--loadmodule", str(module_path()), *module_args], **kwargs
    )


@pytest.fixture(scope="module")
def threaded(server):
    """Binary-safe clients of servers of ``server``'s flavor: ``serial`` (THREADS 1, the reference),
    ``t3`` (THREADS 3, default threshold: more threads than this machine may have cores) and ``t5``
    (THREADS 5 PARALLEL-THRESHOLD 1: every command split into many small ranges)."""
    configs = {
        "serial": ["THREADS", "1"],
        "t3": ["THREADS", "3"],
        "t5": ["threads", "5", "Parallel-Threshold", "1"],  # keywords are case-insensitive
    }
    servers = {}
    try:
        for name, args in configs.items():
            servers[name] = start_with_module_args(server.binary, *args)
        yield {name: s.client(decode_responses=False) for name, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()


def info_threads(client):
    info = client.execute_command("TENSOR.INFO")
    assert info[0] == b"version" and info[2] == b"commands" and len(info[3]) == 15  # unchanged prefix
    assert info[4] == b"threads" and info[6] == b"parallel-threshold" and len(info) == 8
    return int(info[5]), int(info[7])


def test_info_reports_threads(db, threaded):
    import os

    cpus = min(len(os.sched_getaffinity(0)), os.cpu_count() or 1)
    assert info_threads(db) == (min(cpus, 4), DEFAULT_PARALLEL_THRESHOLD)  # defaults
    assert info_threads(threaded["serial"]) == (1, DEFAULT_PARALLEL_THRESHOLD)
    assert info_threads(threaded["t3"]) == (3, DEFAULT_PARALLEL_THRESHOLD)
    assert info_threads(threaded["t5"]) == (5, 1)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["THREAD", "2"], "unknown load argument 'THREAD'"),
        (["2"], "unknown load argument '2'"),
        (["THREADS"], "load argument THREADS needs a value"),
        (["THREADS", "0"], "THREADS '0' is not an integer in 1..64"),
        (["THREADS", "65"], "THREADS '65' is not an integer in 1..64"),
        (["THREADS", "-1"], "THREADS '-1' is not an integer"),
        (["THREADS", "2x"], "THREADS '2x' is not an integer"),
        (["THREADS", "2", "threads", "3"], "load argument THREADS given more than once"),
        (["PARALLEL-THRESHOLD", "0"], "PARALLEL-THRESHOLD '0' is not a positive integer"),
        (["PARALLEL-THRESHOLD", "1e6"], "PARALLEL-THRESHOLD '1e6' is not a positive integer"),
        (["THREADS", "2", "PARALLEL-THRESHOLD"], "load argument PARALLEL-THRESHOLD needs a value"),
    ],
)
def test_bad_load_arguments_refuse_to_start(server, args, fragment):
    from spirt.servers import ServerError

    with pytest.raises(ServerError) as ei:
        start_with_module_args(server.binary, *args, startup_timeout=10.0)
    assert fragment in str(ei.value), str(ei.value)[-600:]


def sgd_ref(p, g, buf, lr, mu, wd, nesterov=False):
    """One TENSOR.SGD step in float32, the module's (torch's) operation order; returns (p, buf)."""
    lr, mu, wd = F32(lr), F32(mu), F32(wd)
    with np.errstate(all="ignore"):
        gi = g + wd * p if wd != 0 else g.copy()
        b = gi.copy() if buf is None else buf * mu + F32(1.0) * gi
        step = gi + mu * b if nesterov else b
        return p + (-lr) * step, b


def run_everywhere(clients, data, *cmd):
    """Load ``data`` into every server, run ``cmd`` on each; every reply and key must be the same."""
    replies, states = {}, {}
    for name, c in clients.items():
        c.flushall()
        pipe = c.pipeline(transaction=False)
        for k, v in data.items():
            pipe.set(k, np.ascontiguousarray(v, dtype=F32).tobytes())
        pipe.execute()
        replies[name] = c.execute_command(*cmd)
        states[name] = {k.decode(): c.get(k) for k in sorted(c.keys())}
    ref = "serial"
    for name in clients:
        assert repr(replies[name]) == repr(replies[ref]), f"{cmd[0]}: reply of {name} != THREADS 1"
        assert states[name].keys() == states[ref].keys()
        for k in states[ref]:
            assert states[name][k] == states[ref][k], f"{cmd[0]}: key {k!r} of {name} differs from THREADS 1"
    return replies[ref], {k: np.frombuffer(v, F32) for k, v in states[ref].items()}


def test_threads_bit_identical_large(db, threaded):
    """Tensors above the default threshold, sizes that split unevenly: every thread count gives the
    THREADS 1 bytes, and those match numpy."""
    clients = {"serial": threaded["serial"], "default": db, "t3": threaded["t3"], "t5": threaded["t5"]}
    rng = np.random.default_rng(2024)
    n = 1_000_003  # not a multiple of the block size nor of any thread count
    xs = [rand(rng, n, scale=10.0 ** rng.integers(-3, 4)) for _ in range(5)]
    xs[1][[0, 77_777, n - 1]] = [np.nan, np.inf, -np.inf]  # propagate identically
    data = {f"s{i}": x for i, x in enumerate(xs)}
    keys = list(data)

    r, out = run_everywhere(clients, data, "TENSOR.AVG", "d", *keys)
    assert r == n
    same_bits(out["d"], avg_ref(xs))
    _, out = run_everywhere(clients, data, "TENSOR.AVG", "s2", "s0", "s2", "s4")  # dst is a source
    same_bits(out["s2"], avg_ref([xs[0], xs[2], xs[4]]))
    alphas = [0.5, -1.25, 3.0]
    _, out = run_everywhere(clients, data, "TENSOR.AXPY", "s0", *[a for i in range(3) for a in (repr(alphas[i]), keys[i])])
    same_bits(out["s0"], axpy_ref(alphas, xs[:3]))
    _, out = run_everywhere(clients, data, "TENSOR.MEDIAN", "m", *keys)
    same_bits(out["m"], median_ref(xs))
    _, out = run_everywhere(clients, data, "TENSOR.MEDIAN", "m", *keys[:4])
    same_bits(out["m"], median_ref(xs[:4]))
    _, out = run_everywhere(clients, data, "TENSOR.TRIMMEAN", "t", 1, *keys)
    same_bits(out["t"], trimmean_ref(xs, 1))
    r, _ = run_everywhere(clients, data, "TENSOR.NORM", "s0")
    close([float(r)], [np.linalg.norm(xs[0].astype(np.float64))], 1e-10)
    for k, want in (("s0", 1), ("s1", 0)):
        r, _ = run_everywhere(clients, data, "TENSOR.FINITE", k)
        assert r == want
    late = {"a": xs[0].copy()}
    late["a"][n - 2] = np.nan  # only the last block is bad
    r, _ = run_everywhere(clients, late, "TENSOR.FINITE", "a")
    assert r == 0
    r, _ = run_everywhere(clients, {k: data[k] for k in ("s0", "s2", "s3")}, "TENSOR.DIST", "s0", "s2", "s3")
    close([float(v) for v in r], dist_ref([xs[0], xs[2], xs[3]]).ravel(), 1e-10)

    # SGD: momentum + weight decay (first step creates the buffer, then updates it), then Nesterov
    p, g = xs[3], xs[4]
    sgd = {"p": p, "g": g}
    _, out = run_everywhere(clients, sgd, "TENSOR.SGD", "p", "g", "0.01", "MOMENTUM", "0.9", "buf", "WD", "5e-4")
    p1, b1 = sgd_ref(p, g, None, 0.01, 0.9, 5e-4)
    same_bits(out["p"], p1)
    same_bits(out["buf"], b1)
    sgd = {"p": p1, "g": g, "buf": b1}
    _, out = run_everywhere(clients, sgd, "TENSOR.SGD", "p", "g", "0.01", "MOMENTUM", "0.9", "buf", "WD", "5e-4")
    p2, b2 = sgd_ref(p1, g, b1, 0.01, 0.9, 5e-4)
    same_bits(out["p"], p2)
    same_bits(out["buf"], b2)
    _, out = run_everywhere(clients, sgd, "TENSOR.SGD", "p", "g", "0.02", "MOMENTUM", "0.5", "buf", "NESTEROV")
    p3, b3 = sgd_ref(p1, g, b1, 0.02, 0.5, 0.0, nesterov=True)
    same_bits(out["p"], p3)
    same_bits(out["buf"], b3)
    _, out = run_everywhere(clients, {"p": p}, "TENSOR.SGD", "p", "p", "0.5", "WD", "0.25")  # grad is param
    same_bits(out["p"], sgd_ref(p, p, None, 0.5, 0.0, 0.25)[0])

    # AVGSGD: the average of five, then a step with momentum (the buffer exists), the param a grad
    fused = {**data, "buf": xs[2]}
    _, out = run_everywhere(clients, fused, "TENSOR.AVGSGD", "s3", 5, *keys, "0.01", "MOMENTUM", "0.9", "buf",
                            "WD", "5e-4")
    p4, b4 = sgd_ref(xs[3], avg_ref(xs), xs[2], 0.01, 0.9, 5e-4)
    same_bits(out["s3"], p4)
    same_bits(out["buf"], b4)


def test_threads_bit_identical_large_k(threaded):
    """The rank statistics' selection path (K > 128) and DIST with many pairs, above the threshold."""
    clients = {"serial": threaded["serial"], "t3": threaded["t3"], "t5": threaded["t5"]}
    rng = np.random.default_rng(77)
    K, n = 131, 9_001  # 1.18M floats read
    xs = [rand(rng, n) if i % 3 else rng.integers(-2, 3, n).astype(F32) for i in range(K)]
    data = {f"w{i}": x for i, x in enumerate(xs)}
    keys = list(data)
    _, out = run_everywhere(clients, data, "TENSOR.MEDIAN", "m", *keys)
    same_bits(out["m"], median_ref(xs))
    _, out = run_everywhere(clients, data, "TENSOR.TRIMMEAN", "t", 40, *keys)
    close(out["t"], trimmean_ref(xs, 40), 1e-6)
    _, out = run_everywhere(clients, data, "TENSOR.MEDIAN", "m", *keys[:64])  # network, 576K floats read
    same_bits(out["m"], median_ref(xs[:64]))
    r, _ = run_everywhere(clients, data, "TENSOR.DIST", *keys[:40])
    close([float(v) for v in r], dist_ref(xs[:40]).ravel(), 1e-10)


@pytest.mark.parametrize("n", [1, 2, 4095, 4097, 65_537, 262_147])
def test_threads_many_small_ranges(threaded, n):
    """PARALLEL-THRESHOLD 1 with 5 threads: every command is split, down to single blocks; the bytes
    must still be those of THREADS 1."""
    clients = {"serial": threaded["serial"], "t5": threaded["t5"]}
    rng = np.random.default_rng(n)
    for K in (1, 2, 3, 8, 17):
        xs = [rand(rng, n, scale=10.0 ** rng.integers(-30, 30)) for _ in range(K)]
        if n > 100:
            xs[0][n // 2] = np.nan
        data = {f"s{i}": x for i, x in enumerate(xs)}
        keys = list(data)
        cmds = [
            ("TENSOR.AVG", "d", *keys),
            ("TENSOR.AVG", "s0", *keys),
            ("TENSOR.AXPY", "d", *[a for i, k in enumerate(keys) for a in (repr(0.5 + i), k)]),
            ("TENSOR.MEDIAN", "d", *keys),
            ("TENSOR.TRIMMEAN", "d", (K - 1) // 2, *keys),
            ("TENSOR.SGD", keys[-1], "s0", "0.1", "MOMENTUM", "0.9", "b", "DAMPENING", "0.1", "WD", "0.01"),
            ("TENSOR.SGD", "s0", "s0", "0.1"),
            ("TENSOR.NORM", keys[-1]),
            ("TENSOR.FINITE", "s0"),
            ("TENSOR.FINITE", keys[-1]),
            ("TENSOR.DIST", *keys),
        ]
        for cmd in cmds:
            run_everywhere(clients, data, *cmd)
        with_buf = dict(data, b=xs[-1])  # SGD with an existing momentum buffer
        run_everywhere(clients, with_buf, "TENSOR.SGD", "s0", keys[-1], "0.1", "MOMENTUM", "0.9", "b", "NESTEROV")
