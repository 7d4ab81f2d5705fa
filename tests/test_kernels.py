"""The tensor module's numeric kernels (spirt/native/kernels.c) on their own, without a server.

Two layers, both compiled here with the system C compiler ``cc``:

- ``tests/native/test_kernels.c``, a C program checking every kernel against scalar references over
  K = 1..160, lengths around the vector widths and block sizes, and byte offsets 0..3, built once with
  the module's compiler flags and once with AddressSanitizer + UndefinedBehaviorSanitizer (tensors sit
  in heap blocks of exactly their size, so any access outside a range stops the program);
- ctypes over a kernel-only shared library built with the module's flags (read from setup.py), checked
  against numpy references, over fixed shapes and hypothesis-generated arrays with NaN, infinities and
  subnormals.

Tolerances: AVG, AXPY and SGD (float32, fixed operation order), MEDIAN, and TRIMMEAN up to
K = TK_NET_MAX_K (kept values summed in ascending order) are compared bit for bit (NaN where NaN; -0
equals +0 for the rank statistics, whose tie order is unspecified). The lane-wise double sums of DIST
and NORM are reproduced exactly too. Only TRIMMEAN above TK_NET_MAX_K, which sums in selection order,
gets the usual error bound of a reordered sum.
"""

from __future__ import annotations

import ast
import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tensor_refs import avg_ref, axpy_ref, median_ref

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "spirt" / "native"
PROGRAM = Path(__file__).resolve().parent / "native" / "test_kernels.c"
F32, F64 = np.float32, np.float64
C = ctypes

CC = shutil.which("cc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc) on PATH to build the kernels")


def _header_constants() -> dict[str, int]:
    text = (NATIVE / "kernels.h").read_text()
    found = dict(re.findall(r"#define (TK_\w+) (\d+)", text))
    found.update(re.findall(r"\b(TK_\w+) = (\d+)", text))
    return {k: int(v) for k, v in found.items()}


TK = _header_constants()


def module_cflags() -> list[str]:
    """The module's compiler flags (TENSOR_CFLAGS in setup.py), so the kernels are tested as built."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TENSOR_CFLAGS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py defines no TENSOR_CFLAGS")


def compile_c(args: list[str], what: str) -> None:
    proc = subprocess.run([CC, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"compiling {what} failed:\n{proc.stderr[-4000:]}"


def sanitizers_available(tmp: Path) -> bool:
    src = tmp / "probe.c"
    src.write_text("int main(void) { return 0; }\n")
    proc = subprocess.run([CC, "-fsanitize=address,undefined", str(src), "-o", str(tmp / "probe")],
                          capture_output=True, timeout=120)
    return proc.returncode == 0


# --------------------------------------------------------------------------------------------------
# the C test program
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", ["module-flags", "sanitizers"])
def test_c_program(tmp_path, build):
    flags = [f for f in module_cflags() if not f.startswith("-fvisibility")]
    if build == "sanitizers":
        if not sanitizers_available(tmp_path):
            pytest.skip(f"{CC} cannot link AddressSanitizer/UndefinedBehaviorSanitizer programs")
        flags = [f for f in flags if not f.startswith("-O")] + [
            "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    exe = tmp_path / "test_kernels"
    compile_c([*flags, f"-I{NATIVE}", str(PROGRAM), str(NATIVE / "kernels.c"), "-o", str(exe), "-lm"],
              "tests/native/test_kernels.c")
    # Leak checking needs ptrace, which containers often forbid; the kernels allocate nothing anyway.
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1")
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)
    report = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"kernel checks failed ({build}):\n{report}"
    assert re.search(r"kernels: [1-9]\d* checks, 0 failures", proc.stdout), report


# --------------------------------------------------------------------------------------------------
# ctypes over a kernel-only library
# --------------------------------------------------------------------------------------------------


class SgdParams(C.Structure):
    _fields_ = [("lr", C.c_float), ("mu", C.c_float), ("one_minus_d", C.c_float), ("wd", C.c_float),
                ("use_wd", C.c_int), ("mode", C.c_int)]


class RankPlan(C.Structure):
    _fields_ = [("kind", C.c_int), ("K", C.c_size_t), ("trim", C.c_size_t), ("B", C.c_size_t),
                ("pairs", C.POINTER(C.c_uint32)), ("cnt", C.c_size_t)]


class RankScratch(C.Structure):
    _fields_ = [("rows", C.c_void_p), ("nanc", C.c_void_p), ("dsum", C.c_void_p)]


SIGNATURES = {
    "tk_avg": (None, [C.c_void_p, C.c_void_p, C.c_size_t, C.c_size_t, C.c_size_t]),
    "tk_axpy": (None, [C.c_void_p, C.c_void_p, C.c_void_p, C.c_size_t, C.c_size_t, C.c_size_t]),
    "tk_sgd": (None, [C.c_void_p, C.c_void_p, C.c_void_p, C.c_size_t, C.POINTER(SgdParams)]),
    "tk_avg_sgd": (None, [C.c_void_p, C.c_void_p, C.c_void_p, C.c_size_t, C.c_size_t, C.c_size_t,
                          C.POINTER(SgdParams)]),
    "tk_rank_pairs_size": (C.c_size_t, [C.c_size_t]),
    "tk_rank_init": (None, [C.POINTER(RankPlan), C.c_int, C.c_size_t, C.c_size_t, C.c_void_p]),
    "tk_rank": (None, [C.POINTER(RankPlan), C.c_void_p, C.c_void_p, C.c_size_t, C.c_size_t,
                       C.POINTER(RankScratch)]),
    "tk_dist_partials": (None, [C.c_void_p, C.c_void_p, C.c_size_t, C.c_size_t, C.c_size_t, C.c_void_p]),
    "tk_dist_add": (None, [C.c_void_p, C.c_void_p, C.c_size_t, C.c_size_t, C.c_size_t, C.c_void_p]),
    "tk_dist_add_partials": (None, [C.c_void_p, C.c_size_t, C.c_void_p]),
    "tk_dist_mirror": (None, [C.c_void_p, C.c_size_t]),
    "tk_sumsq": (C.c_double, [C.c_void_p, C.c_size_t]),
    "tk_sqrt": (C.c_double, [C.c_double]),
    "tk_nonfinite": (C.c_int, [C.c_void_p, C.c_size_t]),
}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels") / "libspirt_kernels.so"
    compile_c([*module_cflags(), "-fvisibility=default", "-fPIC", "-shared", str(NATIVE / "kernels.c"),
               "-o", str(out)], "spirt/native/kernels.c")
    so = C.CDLL(str(out))
    for name, (res, args) in SIGNATURES.items():
        fn = getattr(so, name)
        fn.restype, fn.argtypes = res, args
    return so


class Tensor:
    """float32 data at a chosen byte offset from a 64-byte aligned allocation, with guard bytes on both
    sides that a kernel must leave alone."""

    GUARD = 0xA5

    def __init__(self, values, off: int = 0):
        values = np.ascontiguousarray(values, dtype=F32)
        self.n, self.off = values.size, off
        self.raw = np.full(off + 4 * self.n + 16, self.GUARD, np.uint8)
        self.a = self.raw[off:off + 4 * self.n].view(F32)
        self.a[:] = values
        self.ptr = self.raw.ctypes.data + off

    def get(self) -> np.ndarray:
        assert (self.raw[:self.off] == self.GUARD).all(), "bytes before the tensor overwritten"
        assert (self.raw[self.off + 4 * self.n:] == self.GUARD).all(), "bytes after the tensor overwritten"
        return self.a.copy()


def ptrs(tensors) -> C.Array:
    return (C.c_void_p * len(tensors))(*[t.ptr for t in tensors])


def assert_same_bits(got, want, what=""):
    """float32 equal bit for bit, NaN where NaN (payloads are unspecified)."""
    got, want = np.asarray(got, F32), np.asarray(want, F32)
    nan_g, nan_w = np.isnan(got), np.isnan(want)
    bad = (nan_g != nan_w) | (~nan_g & ~nan_w & (got.view(np.uint32) != want.view(np.uint32)))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {got.size} differ, first at {i}: "
                             f"got {got[i]!r}, expected {want[i]!r}")


def assert_same_values(got, want, what=""):
    """Equal values (-0 == +0), NaN where NaN."""
    got, want = np.asarray(got, F32), np.asarray(want, F32)
    nan_g, nan_w = np.isnan(got), np.isnan(want)
    bad = (nan_g != nan_w) | (~nan_g & ~nan_w & (got != want))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {got.size} differ, first at {i}: "
                             f"got {got[i]!r}, expected {want[i]!r}")


# ---- calling the kernels ---------------------------------------------------------------------------


def k_avg(lib, xs, offs, in_place=None):
    srcs = [Tensor(x, o) for x, o in zip(xs, offs, strict=True)]
    dst = srcs[in_place] if in_place is not None else Tensor(np.zeros(xs[0].size), (offs[0] + 1) % 4)
    lib.tk_avg(dst.ptr, ptrs(srcs), len(srcs), 0, xs[0].size)
    return dst.get()


def k_axpy(lib, alphas, xs, offs, in_place=None):
    srcs = [Tensor(x, o) for x, o in zip(xs, offs, strict=True)]
    dst = srcs[in_place] if in_place is not None else Tensor(np.zeros(xs[0].size), (offs[0] + 3) % 4)
    al = np.asarray(alphas, F32)
    lib.tk_axpy(dst.ptr, al.ctypes.data, ptrs(srcs), len(srcs), 0, xs[0].size)
    return dst.get()


def k_rank(lib, kind, xs, trim, offs, pieces=1):
    K, n = len(xs), xs[0].size
    srcs = [Tensor(x, o) for x, o in zip(xs, offs, strict=True)]
    npairs = lib.tk_rank_pairs_size(K)
    pairs = np.zeros(max(npairs, 1), np.uint32)
    plan = RankPlan()
    lib.tk_rank_init(C.byref(plan), kind, K, trim, pairs.ctypes.data if npairs else None)
    rows, nanc, dsum = np.zeros(K * plan.B, F32), np.zeros(plan.B, np.int32), np.zeros(plan.B, F64)
    scratch = RankScratch(rows.ctypes.data, nanc.ctypes.data, dsum.ctypes.data)
    dst = Tensor(np.full(n, -7.0), (offs[0] + 2) % 4)
    cuts = np.linspace(0, n, pieces + 1).astype(int)
    for lo, hi in reversed(list(zip(cuts[:-1], cuts[1:], strict=True))):
        lib.tk_rank(C.byref(plan), dst.ptr, ptrs(srcs), int(lo), int(hi - lo), C.byref(scratch))
    return dst.get()


# ---- numpy references ------------------------------------------------------------------------------


def trimmean_ref(xs, trim):
    """Mean of the ranks trim..K-trim-1 (NaN sorted last), summed in double in ascending order; also the
    error bound of summing the same values in any other order."""
    X = np.stack(xs)
    K = len(xs)
    S = np.sort(X, axis=0).astype(F64)
    kept = S[trim:K - trim]
    with np.errstate(all="ignore"):
        acc = np.zeros(X.shape[1], F64)
        for row in kept:
            acc = acc + row
        mean = (acc / (K - 2 * trim)).astype(F32)
        bound = 2 * K * np.finfo(F64).eps * np.abs(kept).sum(axis=0) / (K - 2 * trim) + \
            2 * np.finfo(F32).eps * np.abs(mean.astype(F64))
    mean[np.isnan(X).sum(axis=0) > trim] = np.nan
    return mean, bound


def lanes_sum_of_squares(sq: np.ndarray) -> float:
    """The kernels' double reduction: 8 running lanes, lanes combined pairwise, then the tail in order."""
    m8 = sq.size // 8 * 8
    lanes = np.add.accumulate(sq[:m8].reshape(-1, 8), axis=0)[-1] if m8 else np.zeros(8)
    s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
    for v in sq[m8:]:
        s = s + v
    return float(s)


def sgd_ref(p, g, b, lr, mu, damp, wd, use_wd, momentum, first, nesterov):
    """torch.optim.SGD's step in float32."""
    f = F32
    with np.errstate(all="ignore"):
        g = g.astype(F32)
        if use_wd:
            g = g + f(wd) * p
        if momentum:
            b = g.copy() if first else f(mu) * b + f(1.0 - damp) * g
            g = g + f(mu) * b if nesterov else b
        return p - f(lr) * g, b


# ---- data ------------------------------------------------------------------------------------------

LENGTHS = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 4095, 4096, 4097, 9000]
SPECIALS = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, 3.4e38, -3.4e38], F32)


def make(rng, n, special=0.0, scale=4.0):
    x = (rng.standard_normal(n) * scale).astype(F32)
    if special:
        hit = rng.random(n) < special
        x[hit] = rng.choice(SPECIALS, int(hit.sum()))
    return x


# ---- AVG, AXPY -------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", range(1, 18))
def test_avg_and_axpy_match_numpy(lib, K):
    rng = np.random.default_rng(K)
    for n in LENGTHS:
        for special in (0.0, 0.05):
            xs = [make(rng, n, special) for _ in range(K)]
            offs = [(k + n) % 4 for k in range(K)]
            alphas = rng.choice(np.array([1.0, -0.5, 0.0, 3.25, -1e-3, 2e5, 0.1], F32), K)
            what = f"K={K} n={n} special={special}"
            assert_same_bits(k_avg(lib, xs, offs), avg_ref(xs), f"avg {what}")
            assert_same_bits(k_axpy(lib, alphas, xs, offs), axpy_ref(alphas, xs), f"axpy {what}")
            # the module's in-place forms: dst is a source
            assert_same_bits(k_avg(lib, xs, offs, in_place=K - 1), avg_ref(xs), f"avg in place {what}")
            assert_same_bits(k_axpy(lib, alphas, xs, offs, in_place=0), axpy_ref(alphas, xs), f"axpy in place {what}")


def test_avg_sub_ranges(lib):
    """Coordinates outside [off, off + n) are untouched, and any split gives the same bits."""
    rng = np.random.default_rng(7)
    xs = [make(rng, 10_000) for _ in range(9)]
    want = avg_ref(xs)
    srcs = [Tensor(x, k % 4) for k, x in enumerate(xs)]
    dst = Tensor(np.full(10_000, -7.0), 1)
    done = np.zeros(10_000, bool)
    for lo, hi in [(4097, 9999), (1, 4097), (9999, 10_000), (0, 1)]:
        lib.tk_avg(dst.ptr, ptrs(srcs), 9, lo, hi - lo)
        done[lo:hi] = True
        assert (dst.a[~done] == -7.0).all(), f"[{lo}, {hi}) wrote outside its range"
        assert_same_bits(dst.a[lo:hi], want[lo:hi], f"avg of [{lo}, {hi})")
    assert_same_bits(dst.get(), want, "avg in pieces")


# ---- SGD -------------------------------------------------------------------------------------------

SGD_MODES = {  # mode: (momentum, first step, nesterov)
    "PLAIN": (False, False, False),
    "MOMENTUM_FIRST": (True, True, False),
    "MOMENTUM": (True, False, False),
    "NESTEROV_FIRST": (True, True, True),
    "NESTEROV": (True, False, True),
}


@pytest.mark.parametrize(
    "mode,damp",
    # Nesterov with dampening is refused by torch and by TENSOR.SGD
    [(mode, damp) for mode in SGD_MODES for damp in (0.0, 0.3) if not (SGD_MODES[mode][2] and damp)],
)
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_sgd_matches_numpy(lib, mode, wd, damp):
    momentum, first, nesterov = SGD_MODES[mode]
    rng = np.random.default_rng([list(SGD_MODES).index(mode), int(wd * 100), int(damp * 10)])
    lr, mu = 0.05, 0.9
    params = SgdParams(F32(lr), F32(mu), F32(1.0 - damp), F32(wd), int(wd != 0), TK[f"TK_SGD_{mode}"])
    for n in LENGTHS:
        for grad_is_param in (False, True):
            special = 0.02 if n % 2 else 0.0
            p0, g0, b0 = make(rng, n, special), make(rng, n, special), make(rng, n, special)
            if grad_is_param:
                g0 = p0
            p, b = Tensor(p0, n % 4), Tensor(b0, (n + 2) % 4)
            g = p if grad_is_param else Tensor(g0, (n + 1) % 4)
            lib.tk_sgd(p.ptr, g.ptr, b.ptr if momentum else None, n, C.byref(params))
            want_p, want_b = sgd_ref(p0, g0, b0, lr, mu, damp, wd, wd != 0, momentum, first, nesterov)
            what = f"{mode} wd={wd} damp={damp} n={n} grad_is_param={grad_is_param}"
            assert_same_bits(p.get(), want_p, f"param {what}")
            assert_same_bits(b.get(), want_b if momentum else b0, f"buffer {what}")


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_several_steps(lib, nesterov):
    """A first step (buffer missing: the module passes *_FIRST) followed by steps with the buffer."""
    rng = np.random.default_rng(11)
    n, lr, mu, wd = 5003, 0.1, 0.8, 1e-3
    p0 = make(rng, n)
    p, b = Tensor(p0, 3), Tensor(np.zeros(n), 1)
    want_p, want_b = p0, None
    for step in range(4):
        g0 = make(rng, n)
        g = Tensor(g0, 2)
        first = step == 0
        mode = ("NESTEROV" if nesterov else "MOMENTUM") + ("_FIRST" if first else "")
        params = SgdParams(F32(lr), F32(mu), F32(1.0), F32(wd), 1, TK[f"TK_SGD_{mode}"])
        lib.tk_sgd(p.ptr, g.ptr, b.ptr, n, C.byref(params))
        want_p, want_b = sgd_ref(want_p, g0, want_b, lr, mu, 0.0, wd, True, True, first, nesterov)
        assert_same_bits(p.get(), want_p, f"param after step {step}")
        assert_same_bits(b.get(), want_b, f"buffer after step {step}")


def test_sgd_weight_decay_flag_is_separate_from_its_value(lib):
    """A weight decay that rounds to 0 in float32 still adds 0*param: NaN for an infinite param."""
    p = Tensor(np.array([np.inf, 1.0, -np.inf], F32), 1)
    g = Tensor(np.array([1.0, 1.0, 1.0], F32), 2)
    lib.tk_sgd(p.ptr, g.ptr, None, 3, C.byref(SgdParams(F32(0.1), 0, 1, 0, 1, TK["TK_SGD_PLAIN"])))
    assert np.isnan(p.get()[[0, 2]]).all() and p.get()[1] == F32(1.0) - F32(0.1) * F32(1.0)


# ---- AVG + SGD in one pass -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(SGD_MODES))
@pytest.mark.parametrize("K", [1, 2, 3, 4, 8, 9, 16, 17])
def test_fused_avg_sgd_is_avg_then_sgd(lib, mode, K):
    """tk_avg_sgd gives the bits of tk_avg into a temporary followed by tk_sgd with it, for every update
    mode, special values included, with the parameters among the sources or not, in two sub-ranges."""
    momentum, first, nesterov = SGD_MODES[mode]
    rng = np.random.default_rng([K, list(SGD_MODES).index(mode)])
    lr, mu, wd = 0.05, 0.9, 1e-2
    params = SgdParams(F32(lr), F32(mu), F32(1.0), F32(wd), 1, TK[f"TK_SGD_{mode}"])
    for n in LENGTHS:
        for param_is_source in (False, True):
            special = 0.02 if n % 2 else 0.0
            p0, b0 = make(rng, n, special), make(rng, n, special)
            xs = [make(rng, n, special) for _ in range(K)]
            own = K // 2 if param_is_source else None
            if own is not None:
                xs[own] = p0
            # the reference: the two kernels the module ran before, through a temporary
            tmp = Tensor(np.zeros(n), 0)
            ref_p, ref_b = Tensor(p0, 0), Tensor(b0, 0)
            ref_srcs = [ref_p if k == own else Tensor(x, 0) for k, x in enumerate(xs)]
            lib.tk_avg(tmp.ptr, ptrs(ref_srcs), K, 0, n)
            lib.tk_sgd(ref_p.ptr, tmp.ptr, ref_b.ptr if momentum else None, n, C.byref(params))
            p, b = Tensor(p0, n % 4), Tensor(b0, (n + 2) % 4)
            srcs = [p if k == own else Tensor(x, (k + 1) % 4) for k, x in enumerate(xs)]
            cut = n // 3  # [cut, n) first, then [0, cut): any split gives the same bits
            lib.tk_avg_sgd(p.ptr, b.ptr if momentum else None, ptrs(srcs), K, cut, n - cut, C.byref(params))
            lib.tk_avg_sgd(p.ptr, b.ptr if momentum else None, ptrs(srcs), K, 0, cut, C.byref(params))
            what = f"{mode} K={K} n={n} param_is_source={param_is_source}"
            assert_same_bits(p.get(), ref_p.get(), f"param {what}")
            assert_same_bits(b.get(), ref_b.get() if momentum else b0, f"buffer {what}")
            for k, x in enumerate(xs):
                if k != own:
                    assert_same_bits(srcs[k].get(), x, f"source {k} unchanged, {what}")


def test_fused_avg_sgd_writes_only_its_range(lib):
    rng = np.random.default_rng(5)
    n, K = 9000, 5
    srcs = [Tensor(make(rng, n), k % 4) for k in range(K)]
    p, b = Tensor(np.full(n, 3.0), 1), Tensor(np.full(n, -2.0), 2)
    params = SgdParams(F32(0.1), F32(0.9), F32(1.0), F32(0.0), 0, TK["TK_SGD_MOMENTUM"])
    lib.tk_avg_sgd(p.ptr, b.ptr, ptrs(srcs), K, 4097, 300, C.byref(params))
    inside = np.zeros(n, bool)
    inside[4097:4397] = True
    assert (p.get()[~inside] == 3.0).all() and (b.get()[~inside] == -2.0).all()
    assert (p.get()[inside] != 3.0).all() and (b.get()[inside] != -2.0).all()


# ---- MEDIAN, TRIMMEAN ------------------------------------------------------------------------------

RANK_LENGTHS = [1, 2, 3, 15, 16, 17, 33, 100, 1025, 3000]


def check_rank(lib, xs, trim, offs, what):
    K = len(xs)
    pieces = 3 if xs[0].size > 2 else 1
    assert_same_values(k_rank(lib, TK["TK_MEDIAN"], xs, 0, offs), median_ref(xs), f"median {what}")
    got = k_rank(lib, TK["TK_TRIMMEAN"], xs, trim, offs, pieces)
    want, bound = trimmean_ref(xs, trim)
    if K <= TK["TK_NET_MAX_K"]:
        assert_same_values(got, want, f"trimmean b={trim} {what}")
    else:
        both_nan = np.isnan(got) & np.isnan(want)
        finite = np.isfinite(want)
        assert (np.isnan(got) == np.isnan(want)).all(), f"trimmean b={trim} {what}: NaN positions"
        assert (got[~finite & ~both_nan] == want[~finite & ~both_nan]).all(), f"trimmean b={trim} {what}: inf"
        err = np.abs(got[finite].astype(F64) - want[finite].astype(F64))
        assert (err <= bound[finite]).all(), f"trimmean b={trim} {what}: max error {err.max()}"


@pytest.mark.parametrize("K", range(1, 18))
def test_median_and_trimmean_match_numpy(lib, K):
    rng = np.random.default_rng(100 + K)
    for n in RANK_LENGTHS:
        for special in (0.0, 0.1, 0.4):
            xs = [make(rng, n, special) for _ in range(K)]
            offs = [(k * 3 + n) % 4 for k in range(K)]
            for trim in range((K + 1) // 2):  # every b with 2b < K
                check_rank(lib, xs, trim, offs, f"K={K} n={n} special={special}")


@pytest.mark.parametrize("K", [31, 32, 33, 64, 127, 128, 129, 200])
def test_rank_statistics_large_k(lib, K):
    """Up to TK_NET_MAX_K a pruned sorting network, above it selection per coordinate."""
    rng = np.random.default_rng(K)
    for n, special in [(1, 0.0), (37, 0.1), (300, 0.0), (300, 0.45)]:
        xs = [make(rng, n, special) for _ in range(K)]
        offs = [k % 4 for k in range(K)]
        for trim in sorted({0, 1, K // 5, (K - 1) // 2}):
            check_rank(lib, xs, trim, offs, f"K={K} n={n} special={special}")


def test_rank_ties_and_signed_zeros(lib):
    rng = np.random.default_rng(5)
    for K in (2, 3, 4, 8, 9, 16, 130):
        xs = [rng.choice(np.array([-1.0, -0.0, 0.0, 1.0, 2.5], F32), 500) for _ in range(K)]
        for trim in sorted({0, (K - 1) // 2}):
            check_rank(lib, xs, trim, [1] * K, f"ties K={K}")


def test_rank_nan_counts_against_trim(lib):
    """A coordinate is NaN once it has more NaNs than trim (median: any NaN)."""
    K = 7
    xs = [np.arange(8, dtype=F32) + k for k in range(K)]
    for c in range(8):  # coordinate c gets c NaNs
        for k in range(c):
            xs[k][c] = np.nan
    for trim in range(4):
        got = k_rank(lib, TK["TK_TRIMMEAN"], xs, trim, [0] * K)
        assert (np.isnan(got) == (np.arange(8) > trim)).all(), (trim, got)
    assert (np.isnan(k_rank(lib, TK["TK_MEDIAN"], xs, 0, [2] * K)) == (np.arange(8) > 0)).all()


# ---- DIST, NORM, FINITE ----------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2, 3, 5, 8, 17])
def test_dist_matches_numpy(lib, K):
    rng = np.random.default_rng(K)
    for m in [1, 7, 8, 9, 16, 100, 4097]:
        xs = [make(rng, m, 0.02 if m == 100 else 0.0) for _ in range(K)]
        srcs = [Tensor(x, (k + m) % 4) for k, x in enumerate(xs)]
        npair = K * (K - 1) // 2
        rows, part = np.zeros(K * m, F64), np.zeros(max(npair, 1), F64)
        lib.tk_dist_partials(part.ctypes.data, ptrs(srcs), K, 0, m, rows.ctypes.data)
        X = np.stack(xs).astype(F64)
        pairs = [(i, j) for i in range(K) for j in range(i + 1, K)]
        with np.errstate(all="ignore"):
            want = [lanes_sum_of_squares((X[i] - X[j]) ** 2) for i, j in pairs]
            plain = [float(((X[i] - X[j]) ** 2).sum()) for i, j in pairs]
        np.testing.assert_array_equal(part[:npair], want, err_msg=f"K={K} m={m}")
        np.testing.assert_allclose(part[:npair], plain, rtol=1e-12, err_msg=f"K={K} m={m}")

        D_add = np.arange(K * K, dtype=F64) * 0.5
        D_part = D_add.copy()
        lib.tk_dist_add(D_add.ctypes.data, ptrs(srcs), K, 0, m, rows.ctypes.data)
        lib.tk_dist_add_partials(D_part.ctypes.data, K, part.ctypes.data)
        np.testing.assert_array_equal(D_add, D_part)
        upper = np.triu_indices(K, 1)
        np.testing.assert_array_equal(D_add.reshape(K, K)[upper], np.arange(K * K).reshape(K, K)[upper] * 0.5
                                      + np.array(want))
        lib.tk_dist_mirror(D_add.ctypes.data, K)
        D = D_add.reshape(K, K)
        np.testing.assert_array_equal(D[upper], D.T[upper])


def test_dist_offset_selects_coordinates(lib):
    rng = np.random.default_rng(3)
    xs = [make(rng, 50) for _ in range(3)]
    srcs = [Tensor(x, 1 + k) for k, x in enumerate(xs)]
    part, rows = np.zeros(3), np.zeros(3 * 20)
    lib.tk_dist_partials(part.ctypes.data, ptrs(srcs), 3, 17, 20, rows.ctypes.data)
    X = np.stack(xs).astype(F64)[:, 17:37]
    np.testing.assert_array_equal(part, [lanes_sum_of_squares((X[i] - X[j]) ** 2) for i, j in [(0, 1), (0, 2),
                                                                                                 (1, 2)]])


@pytest.mark.parametrize("off", [0, 1, 2, 3])
def test_sumsq_sqrt_and_nonfinite(lib, off):
    rng = np.random.default_rng(off)
    for n in LENGTHS:
        x = make(rng, n, scale=1e3)
        t = Tensor(x, off)
        x64 = x.astype(F64)
        assert lib.tk_sumsq(t.ptr, n) == lanes_sum_of_squares(x64 * x64), n
        np.testing.assert_allclose(lib.tk_sqrt(lib.tk_sumsq(t.ptr, n)), np.linalg.norm(x64), rtol=1e-12)
        assert lib.tk_nonfinite(t.ptr, n) == 0
        for bad in (np.nan, np.inf, -np.inf, -np.nan):
            for pos in sorted({0, n // 2, n - 1}):
                t.a[pos] = bad
                assert lib.tk_nonfinite(t.ptr, n) == 1, (n, bad, pos)
                t.a[pos] = x[pos]
        t.a[:] = np.resize(np.array([3.4028235e38, -3.4028235e38, 1e-45, -0.0], F32), n)
        assert lib.tk_nonfinite(t.ptr, n) == 0
        t.get()
    for v in [0.0, 4.0, 2.0, 1e-310, 1e300, np.inf]:
        assert lib.tk_sqrt(v) == np.sqrt(v)
    assert np.isnan(lib.tk_sqrt(np.nan))


# ---- hypothesis ------------------------------------------------------------------------------------

FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
HYP = dict(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def stacks(draw, max_k=20, max_n=40):
    K = draw(st.integers(1, max_k))
    n = draw(st.integers(1, max_n))
    X = draw(hnp.arrays(F32, (K, n), elements=FLOATS))
    offs = draw(st.lists(st.integers(0, 3), min_size=K, max_size=K))
    return list(X), offs


@settings(**HYP)
@given(stacks(), st.data())
def test_hypothesis_avg_axpy(lib, stack, data):
    xs, offs = stack
    alphas = data.draw(hnp.arrays(F32, len(xs), elements=st.floats(width=32, min_value=-1e6, max_value=1e6)))
    assert_same_bits(k_avg(lib, xs, offs), avg_ref(xs), "avg")
    assert_same_bits(k_axpy(lib, alphas, xs, offs), axpy_ref(alphas, xs), "axpy")


@settings(**HYP)
@given(stacks(), st.data())
def test_hypothesis_rank(lib, stack, data):
    xs, offs = stack
    trim = data.draw(st.integers(0, (len(xs) - 1) // 2))
    check_rank(lib, xs, trim, offs, f"K={len(xs)} n={xs[0].size}")


@settings(**HYP)
@given(st.integers(1, 40), st.sampled_from(list(SGD_MODES)), st.booleans(), st.data())
def test_hypothesis_sgd(lib, n, mode, use_wd, data):
    momentum, first, nesterov = SGD_MODES[mode]
    arr = hnp.arrays(F32, n, elements=FLOATS)
    p0, g0, b0 = data.draw(arr), data.draw(arr), data.draw(arr)
    hyper = st.floats(0, 10, width=32)
    lr, mu, wd = data.draw(hyper), data.draw(hyper), data.draw(hyper)
    damp = 0.0 if nesterov else data.draw(st.floats(0, 1, width=32))
    p, g, b = Tensor(p0, 1), Tensor(g0, 2), Tensor(b0, 3)
    params = SgdParams(lr, mu, F32(1.0 - damp), wd, int(use_wd), TK[f"TK_SGD_{mode}"])
    lib.tk_sgd(p.ptr, g.ptr, b.ptr if momentum else None, n, C.byref(params))
    want_p, want_b = sgd_ref(p0, g0, b0, lr, mu, damp, wd, use_wd, momentum, first, nesterov)
    assert_same_bits(p.get(), want_p, "param")
    assert_same_bits(b.get(), want_b if momentum else b0, "buffer")


@settings(**HYP)
@given(stacks(max_k=12), st.sampled_from(list(SGD_MODES)), st.booleans(), st.data())
def test_hypothesis_fused_avg_sgd(lib, stack, mode, use_wd, data):
    xs, offs = stack
    n = xs[0].size
    momentum, first, nesterov = SGD_MODES[mode]
    arr = hnp.arrays(F32, n, elements=FLOATS)
    p0, b0 = data.draw(arr), data.draw(arr)
    hyper = st.floats(0, 10, width=32)
    lr, mu, wd = data.draw(hyper), data.draw(hyper), data.draw(hyper)
    damp = 0.0 if nesterov else data.draw(st.floats(0, 1, width=32))
    params = SgdParams(lr, mu, F32(1.0 - damp), wd, int(use_wd), TK[f"TK_SGD_{mode}"])
    p, b = Tensor(p0, 1), Tensor(b0, 3)
    srcs = [Tensor(x, o) for x, o in zip(xs, offs, strict=True)]
    lib.tk_avg_sgd(p.ptr, b.ptr if momentum else None, ptrs(srcs), len(xs), 0, n, C.byref(params))
    want_p, want_b = sgd_ref(p0, avg_ref(xs), b0, lr, mu, damp, wd, use_wd, momentum, first, nesterov)
    assert_same_bits(p.get(), want_p, "param")
    assert_same_bits(b.get(), want_b if momentum else b0, "buffer")
