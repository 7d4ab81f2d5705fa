"""Array-kind boundary shared by the defenses and the attacks.

Every rule is written once, in numpy. Callers may hand in numpy arrays, torch tensors or lists of 1-D
vectors; :func:`as_matrix` / :func:`as_vector` turn the input into a numpy array and return a
``restore`` function that converts a numpy result back to the caller's kind, dtype and device.

Conventions
-----------
* Floating numpy dtypes are kept (float16 is computed in float32 and cast back).
* torch tensors are detached and moved to host memory (CPU tensors are not copied); the result goes
  back to the input's device and dtype (bfloat16/float16 are computed in float32).
* Inputs are never modified.
* Non-floating inputs (integers, booleans) are promoted to float64 and the result stays float64.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import numpy as np

Restore = Callable[[np.ndarray], Any]


def is_tensor(x: Any) -> bool:
    """True if ``x`` is a torch tensor.

    torch is never imported here: a tensor can only exist once its caller has imported torch, and
    importing it with the rules would cost seconds wherever only their names and parameters are needed
    (the launcher validates a configuration by building its rule and attack).
    """
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _work_dtype(dtype: np.dtype) -> np.dtype:
    if dtype == np.float16:
        return np.dtype(np.float32)
    if np.issubdtype(dtype, np.floating):
        return dtype
    return np.dtype(np.float64)


def _to_numpy(x: Any) -> tuple[np.ndarray, Restore]:
    if is_tensor(x):
        torch = sys.modules["torch"]
        t = x.detach()
        if t.is_complex():
            raise TypeError("complex tensors are not supported")
        out_dtype = t.dtype if t.is_floating_point() else torch.float64
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        elif not t.is_floating_point():
            t = t.double()
        arr = t.cpu().numpy()
        device = x.device

        def restore_tensor(result: np.ndarray) -> Any:
            return torch.as_tensor(np.ascontiguousarray(result)).to(device=device, dtype=out_dtype)

        return arr, restore_tensor

    arr = np.asarray(x)
    if np.iscomplexobj(arr):
        raise TypeError("complex arrays are not supported")
    if arr.dtype == object:
        raise TypeError(f"cannot interpret input of type {type(x).__name__} as a numeric array")
    out_dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.dtype(np.float64)
    arr = arr.astype(_work_dtype(arr.dtype), copy=False)

    def restore_array(result: np.ndarray) -> np.ndarray:
        return np.asarray(result).astype(out_dtype, copy=False)

    return arr, restore_array


def _stack_if_list(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError("expected at least one vector, got an empty sequence")
        if is_tensor(x[0]):
            return sys.modules["torch"].stack([v.reshape(-1) for v in x])
    return x


def as_matrix(vectors: Any, what: str = "vectors") -> tuple[np.ndarray, Restore]:
    """Convert an (n, d) array/tensor (or a list of n vectors of length d) to numpy.

    Returns ``(matrix, restore)``; ``restore`` maps a numpy result (any shape) back to the input kind.
    """
    arr, restore = _to_numpy(_stack_if_list(vectors))
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (n, d) array, got shape {tuple(arr.shape)}")
    if arr.shape[0] < 1:
        raise ValueError(f"{what} must contain at least one vector (got n=0)")
    return arr, restore


def as_vector(vector: Any, what: str = "vector") -> tuple[np.ndarray, Restore]:
    """Convert a (d,) array/tensor to numpy; returns ``(vector, restore)``."""
    arr, restore = _to_numpy(vector)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D (d,) array, got shape {tuple(arr.shape)}")
    return arr, restore


def square_matrix(m: Any, what: str = "sq_dists") -> np.ndarray:
    """Convert an (n, n) matrix (numpy or torch; a flat row-major n*n vector is reshaped) to a float64
    numpy array and validate its shape."""
    arr, _ = _to_numpy(m)
    if arr.ndim == 1 and arr.size > 0 and math.isqrt(arr.size) ** 2 == arr.size:
        arr = arr.reshape(math.isqrt(arr.size), -1)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 1:
        raise ValueError(f"{what} must be a square (n, n) matrix with n >= 1, got shape {tuple(arr.shape)}")
    return arr.astype(np.float64, copy=True)


def row_norms(u: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row (float64), without overflow for huge finite entries.

    The fast path sums squares in float64; rows whose sum overflows are recomputed after scaling by
    their largest absolute entry, so a row of 1e300 has norm ~1e300 instead of ``inf``. Rows containing
    a non-finite entry get ``inf``.
    """
    u = np.asarray(u)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", u, u, dtype=np.float64))
    redo = ~np.isfinite(norms)
    if np.any(redo):
        rows = u[redo].astype(np.float64)
        scale = np.max(np.abs(rows), axis=1)
        fixed = np.full(rows.shape[0], np.inf)
        ok = np.isfinite(scale)
        if np.any(ok):
            scaled = rows[ok] / scale[ok, None]
            fixed[ok] = scale[ok] * np.sqrt(np.einsum("ij,ij->i", scaled, scaled))
        norms[redo] = fixed
    return norms


#: Up to this many rows, :func:`sort_columns` sorts with a comparator network; above, with ``np.sort``.
#: Measured on a (n, 206,922) float32 matrix: 4.9 ms against 17 ms at n = 10, even at n = 20, slower beyond.
NETWORK_MAX_ROWS = 16


@cache
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """The comparators (a, b), a < b, of Batcher's odd-even merge sort for ``n`` inputs, in order.

    The network for the next power of two, without the comparators that touch a padding input: padding
    is +inf, above every input, so those comparators would never exchange anything.
    """
    size = 1 << max(n - 1, 0).bit_length()
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return tuple(pairs)


@cache
def needed_comparators(n: int, wanted: tuple[int, ...]) -> tuple[tuple[int, int, bool, bool], ...]:
    """The comparators of :func:`sorting_network` that the sorted positions ``wanted`` depend on, in order,
    as (a, b, min needed, max needed).

    Found backwards from the outputs: a comparator whose two outputs nothing later reads is dropped, and
    of one whose min (or max) alone is read later, only that half is computed. What remains computes the
    wanted positions with the very same operations on the very same values as the whole network. For
    the median of 10 rows it keeps 29 of the 32 comparators, 8 of them halved.
    """
    need = set(wanted)
    kept = []
    for a, b in reversed(sorting_network(n)):
        lo, hi = a in need, b in need
        if lo or hi:
            kept.append((a, b, lo, hi))
            need |= {a, b}
    return tuple(reversed(kept))


def sort_columns(x: np.ndarray, wanted: range | None = None) -> np.ndarray:
    """``np.sort(x, axis=0)``: every column of an (n, d) array in ascending order, NaN last; a new array.
    With ``wanted`` (a range of sorted positions), only those rows of it, e.g. ``range(n // 2, n // 2 + 1)``
    for the median of an odd n.

    The peers' rules sort a few rows of many coordinates. ``np.sort`` along axis 0 sorts each strided
    column on its own; a comparator network instead runs elementwise min/max over whole rows, contiguous
    and vectorized, 3.5 times as fast at n = 10, and the positions not wanted are not computed
    (:func:`needed_comparators`). min/max do not order NaN, so an array holding one takes ``np.sort``.
    The two may order -0.0 and +0.0 differently (they are equal); every other value sits in the same
    place.
    """
    wanted = range(x.shape[0]) if wanted is None else wanted
    if not _network_sorts(x):
        return np.sort(x, axis=0)[wanted.start : wanted.stop]
    return np.stack(_network_rows(x, wanted))


def sorted_rows(x: np.ndarray, wanted: range) -> list[np.ndarray]:
    """The rows ``wanted`` of :func:`sort_columns` as separate arrays of this call's own (the caller may
    overwrite them), without stacking them into one: a rule that only sums or picks them saves a copy
    of them all."""
    if not _network_sorts(x):
        srt = np.sort(x, axis=0)
        return [srt[k] for k in wanted]
    return _network_rows(x, wanted)


def mean_of_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """``np.stack(rows).mean(axis=0)`` bit for bit, without the copy of every row that stacking makes.

    numpy reduces an (m, d) float array along axis 0 by adding its rows in order to a +0.0 and dividing
    by m; its pairwise summation applies along a contiguous axis only, which a single column (d = 1) is,
    so that case, and any non-float one, takes numpy's own expression.
    """
    first = rows[0]
    if first.ndim != 1 or first.shape[0] < 2 or first.dtype.kind != "f":
        return np.stack(rows).mean(axis=0)
    total = np.zeros_like(first)
    for row in rows:
        total += row
    total /= len(rows)
    return total


def _network_sorts(x: np.ndarray) -> bool:
    return 0 < x.shape[0] <= NETWORK_MAX_ROWS and x.ndim == 2 and x.dtype.kind == "f" and not np.isnan(x).any()


def _network_rows(x: np.ndarray, wanted: range) -> list[np.ndarray]:
    rows = list(np.array(x, copy=True))  # views of one copy; the network swaps which buffer holds a row
    spare = np.empty_like(x[0])
    for a, b, lo, hi in needed_comparators(x.shape[0], tuple(wanted)):
        if lo and hi:
            np.minimum(rows[a], rows[b], out=spare)
            np.maximum(rows[a], rows[b], out=rows[b])
            rows[a], spare = spare, rows[a]
        elif lo:  # nothing reads the max: the min goes where row a was
            np.minimum(rows[a], rows[b], out=rows[a])
        else:
            np.maximum(rows[a], rows[b], out=rows[b])
    return [rows[k] for k in wanted]


def finite_rows(x: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows whose entries are all finite."""
    return np.all(np.isfinite(x), axis=1)


def pairwise_sq_dists(vectors: Any, chunk: int = 1 << 16) -> np.ndarray:
    """Pairwise squared Euclidean distances of the rows of an (n, d) array/tensor.

    Computed directly from differences (never via the Gram-matrix identity, which loses precision for
    close vectors of large norm), accumulated in float64 over column chunks so memory stays O(n * chunk).
    Non-finite distances (from non-finite or overflowing inputs) are reported as ``inf``. The result is a
    symmetric float64 numpy matrix with a zero diagonal.
    """
    x, _ = as_matrix(vectors)
    n, d = x.shape
    out = np.zeros((n, n), dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, max(d, 1), chunk):
            block = x[:, start : start + chunk].astype(np.float64, copy=False)
            for i in range(n - 1):
                diff = block[i + 1 :] - block[i]
                out[i, i + 1 :] += np.einsum("ij,ij->i", diff, diff)
    out[~np.isfinite(out)] = np.inf
    out = np.triu(out, 1)
    out = out + out.T
    np.fill_diagonal(out, 0.0)
    return out
