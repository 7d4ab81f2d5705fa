"""numpy references of the tensor module's element-wise operations, in float32 as the module computes
them (sources summed in order), for the tests of the commands and of the kernels."""

from __future__ import annotations

import numpy as np

F32 = np.float32


def avg_ref(xs):
    with np.errstate(all="ignore"):
        acc = xs[0].astype(F32)
        for x in xs[1:]:
            acc = acc + x
        return acc / F32(len(xs))


def axpy_ref(alphas, xs):
    with np.errstate(all="ignore"):
        acc = F32(alphas[0]) * xs[0]
        for a, x in zip(alphas[1:], xs[1:], strict=True):
            acc = acc + F32(a) * x
        return acc


def median_ref(xs):
    """Coordinate-wise median in double (the mean of the two middle values for even K), as float32."""
    with np.errstate(all="ignore"):
        return np.median(np.stack(xs).astype(np.float64), axis=0).astype(F32)
