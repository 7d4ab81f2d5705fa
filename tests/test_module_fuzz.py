"""Property-based fuzzing of the tensor module on real Valkey and Redis servers.

Each example builds a random database (tensors of random content incl. NaN/inf/subnormals and random
bit patterns, byte strings of any length incl. empty, integer-encoded strings, lists, hashes, sets,
missing keys), runs one TENSOR.* command with random arguments (random arity, numbers like 'nan', 'inf',
'-0', '1e39', hex, garbage, option words in random case and order) through a raw RESP connection, and
checks it against a reference model written here in Python/numpy:

- the server answers PING afterwards;
- the command succeeds exactly when the model says the input is valid; errors start with "ERR " or
  "WRONGTYPE " and are one line;
- on success the reply and every key equal the model's (float32 results bit for bit, NaN where NaN;
  double results to rtol 1e-10); on failure no key changed.

About 2700 examples per server flavor (well under a minute each).
"""

from __future__ import annotations

import math
import re
import socket

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

F32 = np.float32
FLT_MAX = float(np.finfo(F32).max)

KEYS = [b"k0", b"k1", b"k2", b"k3", b"{t}k4", b"w\r\n'\x00"]
NS = [1, 1, 2, 3, 4, 5, 8, 13, 64, 1000, 4097]
WRITERS = {"TENSOR.AVG", "TENSOR.AXPY", "TENSOR.SGD", "TENSOR.AVGSGD", "TENSOR.MEDIAN", "TENSOR.TRIMMEAN"}
COMMANDS = sorted(WRITERS | {"TENSOR.DIST", "TENSOR.NORM", "TENSOR.FINITE", "TENSOR.DIGEST", "TENSOR.INFO"})

COMMON = dict(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# --------------------------------------------------------------------------------------------------
# a minimal RESP2 client, to see the exact error prefix (redis-py strips "ERR ")
# --------------------------------------------------------------------------------------------------


class RespError(Exception):
    pass


class Raw:
    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=60)
        self.f = self.sock.makefile("rb")

    def close(self):
        self.f.close()
        self.sock.close()

    def call(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _read(self):
        line = self.f.readline()
        assert line.endswith(b"\r\n"), line
        t, rest = line[:1], line[1:-2]
        if t == b"+":
            return rest
        if t == b"-":
            return RespError(rest)
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)
            return data[:-2]
        if t == b"*":
            return [self._read() for _ in range(int(rest))]
        raise AssertionError(f"unexpected reply {line!r}")


# --------------------------------------------------------------------------------------------------
# reference model
# --------------------------------------------------------------------------------------------------

INVALID, NONFINITE, RANGE = "invalid", "nonfinite", "range"
_DEC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_HEX = re.compile(r"[+-]?0[xX]([0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)([pP][+-]?\d+)?")
_SPECIAL = re.compile(r"[+-]?(inf|infinity|nan|nan\([0-9A-Za-z_]*\))", re.IGNORECASE)


def parse_real(tok: bytes):
    """The module's number syntax (C strtod, whole string, no blanks) -> float or an error class."""
    if len(tok) == 0 or len(tok) >= 128 or b"\x00" in tok:
        return INVALID
    try:
        s = tok.decode("ascii")
    except UnicodeDecodeError:
        return INVALID
    if s[0] not in "+-.0123456789iInN":
        return INVALID
    if _SPECIAL.fullmatch(s):
        return NONFINITE
    if _HEX.fullmatch(s):
        try:
            v = float.fromhex(s)
        except OverflowError:
            return NONFINITE
    elif _DEC.fullmatch(s):
        v = float(s)
    else:
        return INVALID
    if math.isinf(v):
        return NONFINITE
    if abs(v) > FLT_MAX:
        return RANGE
    return v


def parse_count(tok: bytes):
    if not (1 <= len(tok) <= 18) or not all(48 <= c <= 57 for c in tok):
        return None
    return int(tok)


class Invalid(Exception):
    pass


def need(cond):
    if not cond:
        raise Invalid


def tensor(state, key, expect=None):
    v = state.get(key)
    need(v is not None and v[0] == "string")
    raw = v[1]
    need(len(raw) > 0 and len(raw) % 4 == 0)
    need(expect is None or len(raw) == expect)
    return np.frombuffer(raw, F32)


def sources(state, keys):
    first = tensor(state, keys[0])
    xs = [first] + [tensor(state, k, 4 * first.size) for k in keys[1:]]
    return xs


def dst_ok(state, key):
    v = state.get(key)
    need(v is None or v[0] == "string")


def real(tok):
    v = parse_real(tok)
    need(isinstance(v, float))
    return v


def model(cmd: str, args: list[bytes], state: dict):
    """-> (reply, {key: new bytes}) or raises Invalid."""
    with np.errstate(all="ignore"):
        return _model(cmd, args, state)


def _model(cmd, args, state):
    if cmd in ("TENSOR.AVG", "TENSOR.MEDIAN"):
        need(len(args) >= 2)
        dst_ok(state, args[0])
        xs = sources(state, args[1:])
        if cmd == "TENSOR.AVG":
            out = average(xs)
        else:
            out = np.median(np.stack(xs).astype(np.float64), axis=0).astype(F32)
        return xs[0].size, {args[0]: out.astype(F32).tobytes()}
    if cmd == "TENSOR.AXPY":
        need(len(args) >= 3 and (len(args) - 1) % 2 == 0)
        alphas = [real(a) for a in args[1::2]]
        dst_ok(state, args[0])
        xs = sources(state, args[2::2])
        acc = F32(alphas[0]) * xs[0]
        for a, x in zip(alphas[1:], xs[1:], strict=False):
            acc = acc + F32(a) * x
        return xs[0].size, {args[0]: acc.astype(F32).tobytes()}
    if cmd == "TENSOR.TRIMMEAN":
        need(len(args) >= 3)
        b = parse_count(args[1])
        need(b is not None)
        K = len(args) - 2
        need(2 * b < K)
        dst_ok(state, args[0])
        xs = sources(state, args[2:])
        X = np.sort(np.stack(xs).astype(np.float64), axis=0)[b : K - b]
        s = X[0].copy()
        for r in X[1:]:
            s = s + r
        return xs[0].size, {args[0]: (s / X.shape[0]).astype(F32).tobytes()}
    if cmd == "TENSOR.SGD":
        need(len(args) >= 3)
        return _model_update(args[0], [args[1]], args[2:], state, fused=False)
    if cmd == "TENSOR.AVGSGD":
        need(len(args) >= 4)
        K = parse_count(args[1])
        need(K is not None and 1 <= K <= 65536 and K <= len(args) - 3)
        return _model_update(args[0], args[2 : 2 + K], args[2 + K :], state, fused=True)
    if cmd == "TENSOR.DIST":
        need(len(args) >= 1)
        xs = sources(state, args)
        X = np.stack(xs).astype(np.float64)
        K = len(xs)
        D = np.zeros((K, K))
        for i in range(K):
            for j in range(i + 1, K):
                D[i, j] = D[j, i] = np.sum((X[i] - X[j]) ** 2)
        return D.ravel(), {}
    if cmd == "TENSOR.NORM":
        need(len(args) == 1)
        x = tensor(state, args[0]).astype(np.float64)
        return np.array([math.sqrt(np.sum(x * x))]), {}
    if cmd == "TENSOR.FINITE":
        need(len(args) == 1)
        return int(np.all(np.isfinite(tensor(state, args[0])))), {}
    if cmd == "TENSOR.DIGEST":  # its value is checked in test_module.py; here: when it must fail
        need(len(args) == 1)
        tensor(state, args[0])
        return "digest", {}
    if cmd == "TENSOR.INFO":
        need(len(args) == 0)
        return "info", {}
    raise AssertionError(cmd)


def average(xs):
    acc = xs[0].copy()
    for x in xs[1:]:
        acc = acc + x
    return acc / F32(len(xs))


def _model_update(pk, gkeys, args, state, fused):
    """TENSOR.SGD (one gradient) or TENSOR.AVGSGD (the average of gkeys); args: lr, then the options."""
    lr = real(args[0])
    mu = damp = wd = 0.0
    nesterov = False
    buf = None
    seen = set()
    i = 1
    while i < len(args):
        word = args[i].upper()
        need(word in (b"MOMENTUM", b"DAMPENING", b"WD", b"NESTEROV") and word not in seen)
        seen.add(word)
        if word == b"MOMENTUM":
            need(i + 2 < len(args))
            mu = real(args[i + 1])
            need(mu >= 0)
            buf = args[i + 2]
            i += 3
        elif word == b"DAMPENING":
            need(i + 1 < len(args))
            damp = real(args[i + 1])
            i += 2
        elif word == b"WD":
            need(i + 1 < len(args))
            wd = real(args[i + 1])
            need(wd >= 0)
            i += 2
        else:
            nesterov = True
            i += 1
    need(not nesterov or (mu > 0 and damp == 0))
    need(lr >= 0)
    need(buf is None or (buf != pk and buf not in gkeys))
    p = tensor(state, pk)
    gs = [tensor(state, k, 4 * p.size) for k in gkeys]
    g = average(gs) if fused else gs[0]
    use_mom = mu > 0
    b = None
    if use_mom and buf in state:
        b = tensor(state, buf, 4 * p.size)
    p = p.copy()
    g = g.copy()
    if wd != 0:
        g = g + F32(wd) * p
    writes = {}
    if use_mom:
        nb = g.copy() if b is None else b * F32(mu) + F32(1.0 - damp) * g
        writes[buf] = nb.astype(F32).tobytes()
        step = g + F32(mu) * nb if nesterov else nb
    else:
        step = g
    writes[pk] = (p + F32(-lr) * step).astype(F32).tobytes()
    return p.size, writes


# --------------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------------

SPECIALS = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 3e38, -3e38, 1e-45, 1e-40], F32)


def make_tensor(style: str, seed: int, n: int) -> bytes:
    rng = np.random.default_rng(seed)
    if style == "normal":
        x = rng.standard_normal(n).astype(F32)
    elif style == "wide":
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)).astype(F32)
    elif style == "bits":
        return rng.integers(0, 2**32, n, dtype=np.uint32).tobytes()
    elif style == "ints":
        x = rng.integers(-2, 3, n).astype(F32)
    else:  # specials sprinkled over normal values
        x = rng.standard_normal(n).astype(F32)
        idx = rng.integers(0, n, max(1, n // 3))
        x[idx] = SPECIALS[rng.integers(0, len(SPECIALS), idx.size)]
    return x.tobytes()


@st.composite
def db_states(draw):
    n = draw(st.sampled_from(NS))
    state = {}
    for key in KEYS:
        kind = draw(
            st.sampled_from(
                [
                    "missing",
                    "tensor",
                    "tensor",
                    "tensor",
                    "tensor",
                    "other",
                    "bytes",
                    "int",
                    "list",
                    "hash",
                    "set",
                ]
            )
        )
        if kind == "tensor" or kind == "other":
            style = draw(st.sampled_from(["normal", "wide", "bits", "ints", "specials"]))
            m = n if kind == "tensor" else draw(st.sampled_from([1, 2, 3, 7]))
            state[key] = ("string", make_tensor(style, draw(st.integers(0, 2**32 - 1)), m))
        elif kind == "bytes":
            state[key] = ("string", draw(st.binary(max_size=24)))
        elif kind == "int":
            state[key] = (
                "string",
                draw(st.sampled_from([b"1234", b"-100", b"0", b"12345678", b"99999999", b"7777"])),
            )
        elif kind != "missing":
            state[key] = (kind,)
    return state


NUM_VOCAB = [
    b"0", b"1", b"-1", b"0.5", b"-0", b"+2", b"2.5e-3", b"1e-45", b"1e-50", b"3.4e38", b"0x10", b"0x1p-2",
    b"nan", b"-nan", b"inf", b"-inf", b"Infinity", b"1e400", b"1e39", b"-3.5e38",
    b"abc", b"", b" 1", b"1 ", b"--1", b"1,5", b"0x", b"1e", b".", b"1" * 400, b"k0", b"\xff",
]  # fmt: skip
KEY_TOKENS = st.sampled_from(KEYS + [b"missing"])
NUMBERS = st.one_of(
    st.sampled_from(NUM_VOCAB),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(lambda f: repr(f).encode()),
    st.floats(-4, 4).map(lambda f: f"{f:.4g}".encode()),
)
_NONNEG_OK = st.floats(0, 2).map(lambda f: repr(f).encode())
NONNEG = st.one_of(_NONNEG_OK, _NONNEG_OK, _NONNEG_OK, NUMBERS)
WORDS = st.sampled_from(
    [
        b"MOMENTUM",
        b"momentum",
        b"DAMPENING",
        b"Dampening",
        b"NESTEROV",
        b"nesterov",
        b"WD",
        b"wd",
        b"LR",
        b"x",
    ]
)
TOKENS = st.one_of(
    KEY_TOKENS, NUMBERS, WORDS, st.binary(max_size=6), st.integers(0, 9).map(lambda i: str(i).encode())
)


def case(cmd):
    return st.sampled_from([cmd, cmd.lower(), cmd.title()])


@st.composite
def structured_calls(draw, state):
    """A call following the command's grammar; keys mostly name valid tensors of the common length."""
    lengths = {}
    for k, v in state.items():
        if v[0] == "string" and v[1] and len(v[1]) % 4 == 0:
            lengths.setdefault(len(v[1]), []).append(k)
    good = max(lengths.values(), key=len) if lengths else []

    def key():
        if good and draw(st.integers(0, 9)) < 8:
            return draw(st.sampled_from(good))
        return draw(KEY_TOKENS)

    def keys(lo, hi):
        return [key() for _ in range(draw(st.integers(lo, hi)))]

    cmd = draw(st.sampled_from(COMMANDS))
    if cmd in ("TENSOR.AVG", "TENSOR.MEDIAN"):
        args = [key()] + keys(1, 7)
    elif cmd == "TENSOR.AXPY":
        args = [key()]
        for _ in range(draw(st.integers(1, 5))):
            args += [draw(NUMBERS), key()]
    elif cmd == "TENSOR.TRIMMEAN":
        srcs = keys(1, 8)
        b = draw(
            st.one_of(
                st.integers(0, (len(srcs) - 1) // 2).map(lambda i: str(i).encode()),
                st.integers(0, 5).map(lambda i: str(i).encode()),
                st.sampled_from([b"-1", b"1.5", b"x", b"", b"99999999999999999999"]),
            )
        )
        args = [key(), b] + srcs
    elif cmd in ("TENSOR.SGD", "TENSOR.AVGSGD"):
        opts = []
        if draw(st.booleans()):
            opts.append([draw(WORDS.filter(lambda w: w.upper() == b"MOMENTUM")), draw(NONNEG), key()])
        if draw(st.integers(0, 3)) == 0:
            opts.append([b"DAMPENING", draw(NUMBERS)])
        if draw(st.integers(0, 3)) == 0:
            opts.append([b"nesterov"])
        if draw(st.booleans()):
            opts.append([b"wd", draw(NONNEG)])
        opts = draw(st.permutations(opts)) if opts else []
        args = [key(), key(), draw(NONNEG)] + [t for o in opts for t in o]
        if cmd == "TENSOR.AVGSGD":
            grads = keys(1, 5)
            count = draw(st.one_of(st.just(str(len(grads)).encode()), st.sampled_from([b"0", b"9", b"-1", b"x", b""])))
            args = [args[0], count, *grads, *args[2:]]
    elif cmd == "TENSOR.DIST":
        args = keys(1, 7)
    elif cmd in ("TENSOR.NORM", "TENSOR.FINITE", "TENSOR.DIGEST"):
        args = [key()]
    else:
        args = []
    # occasional damage: drop or add a trailing argument
    damage = draw(st.integers(0, 9))
    if damage == 0 and args:
        args = args[:-1]
    elif damage == 1:
        args = args + [draw(TOKENS)]
    return draw(case(cmd)), args


@st.composite
def structured_scenarios(draw):
    state = draw(db_states())
    return state, draw(structured_calls(state))


@st.composite
def random_scenarios(draw):
    state = draw(db_states())
    return state, (draw(case(draw(st.sampled_from(COMMANDS)))), draw(st.lists(TOKENS, max_size=9)))


# --------------------------------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------------------------------


def load(db, state):
    pipe = db.pipeline(transaction=False)
    pipe.flushall()
    for key, v in state.items():
        if v[0] == "string":
            pipe.set(key, v[1])
        elif v[0] == "list":
            pipe.rpush(key, b"x", b"y")
        elif v[0] == "hash":
            pipe.hset(key, b"f", b"v")
        else:
            pipe.sadd(key, b"m")
    pipe.execute()


def contents(db, keys):
    pipe = db.pipeline(transaction=False)
    for k in keys:
        pipe.type(k)
        pipe.get(k)
    out = {}
    res = pipe.execute(raise_on_error=False)
    for i, k in enumerate(keys):
        t, v = res[2 * i], res[2 * i + 1]
        t = t.decode() if isinstance(t, bytes) else t
        if t == "none":
            continue
        out[k] = ("string", v) if t == "string" else (t,)
    return out


def same_f32(got: bytes, ref: bytes):
    g, r = np.frombuffer(got, F32), np.frombuffer(ref, F32)
    assert g.shape == r.shape
    np.testing.assert_array_equal(np.isnan(g), np.isnan(r))
    np.testing.assert_array_equal(g[~np.isnan(g)], r[~np.isnan(r)])


def run_case(server_db, raw, cmd, args, state):
    load(server_db, state)
    try:
        expected = model(cmd.upper(), args, state)
    except Invalid:
        expected = None
    reply = raw.call(cmd, *args)
    assert server_db.ping()
    after = contents(server_db, sorted(set(KEYS) | set(server_db.keys())))
    if isinstance(reply, RespError):
        msg = reply.args[0]
        assert msg.startswith(b"ERR ") or msg.startswith(b"WRONGTYPE "), msg
        assert b"\n" not in msg and b"\r" not in msg
        assert expected is None, f"{cmd} {args!r} failed but the model accepts it: {msg!r}"
        assert after == state, f"failing {cmd} modified the database"
        return "error"
    assert expected is not None, f"{cmd} {args!r} succeeded ({reply!r}) but the model rejects it"
    ref_reply, writes = expected
    up = cmd.upper()
    if up in WRITERS or up == "TENSOR.FINITE":
        assert reply == ref_reply
    elif up == "TENSOR.INFO":
        assert reply[0] == b"version" and len(reply[3]) == 15
    elif up == "TENSOR.DIGEST":
        assert isinstance(reply, bytes) and len(reply) == 40
    else:
        got = np.array([float(v) for v in (reply if isinstance(reply, list) else [reply])])
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref_reply))
        m = ~np.isnan(ref_reply)
        np.testing.assert_allclose(got[m], ref_reply[m], rtol=1e-10, atol=0)
    expect_state = dict(state)
    for k, v in writes.items():
        expect_state[k] = ("string", v)
    assert set(after) == set(expect_state)
    for k, v in expect_state.items():
        if k in writes:
            assert after[k][0] == "string"
            same_f32(after[k][1], v[1])
        else:
            assert after[k] == v, f"{cmd} changed key {k!r} it does not write"
    return "ok"


@pytest.fixture(scope="module")
def clients(server):
    db = server.client(decode_responses=False)
    raw = Raw(server.host, server.port)
    stats = {"ok": 0, "error": 0}
    try:
        yield db, raw, stats
    finally:
        raw.close()
        db.close()


@settings(max_examples=2000, **COMMON)
@given(scenario=structured_scenarios())
def test_fuzz_structured(clients, scenario):
    db, raw, stats = clients
    state, (cmd, args) = scenario
    stats[run_case(db, raw, cmd, args, state)] += 1


@settings(max_examples=700, **COMMON)
@given(scenario=random_scenarios())
def test_fuzz_random_tokens(clients, scenario):
    db, raw, stats = clients
    state, (cmd, args) = scenario
    stats[run_case(db, raw, cmd, args, state)] += 1


def test_fuzz_exercised_both_outcomes(clients):
    """The fuzzing must hit the success path often, or its numeric checks mean little. Uses the counts of
    the two tests above (same server); when they did not run in this session, runs its own batch."""
    db, raw, stats = clients
    if stats["ok"] + stats["error"] == 0:

        @settings(max_examples=400, **COMMON)
        @given(scenario=structured_scenarios())
        def batch(scenario):
            state, (cmd, args) = scenario
            stats[run_case(db, raw, cmd, args, state)] += 1

        batch()
    total = stats["ok"] + stats["error"]
    assert stats["ok"] >= total // 6 and stats["error"] >= total // 6, stats
