"""Tensor store: numpy arrays and torch tensors as raw little-endian float32 Redis strings.

Values are the bytes of the array itself (no header), so the database module can work on them
directly. Shapes are kept beside the value (``<key>:shape``) by :class:`TensorStore` for callers that
need them, or live in the caller's schema (a model's :class:`FlatParams`).

Copies are avoided where the libraries allow it: writes hand redis-py a memoryview of the array;
reads wrap the received bytes with ``np.frombuffer`` (read-only) and copy only when asked for a
writable array or when loading into a model's flat parameter buffer.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import redis

F32 = np.dtype("<f4")

__all__ = [
    "F32",
    "TensorFormatError",
    "as_f32_bytes",
    "from_f32_bytes",
    "TensorStore",
    "FlatParams",
]


class TensorFormatError(ValueError):
    """A stored value is not a valid float32 tensor (wrong length, missing, wrong shape)."""


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if "torch" in sys.modules:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().to("cpu").numpy()
    return np.asarray(x)


def as_f32_bytes(x) -> memoryview:
    """Raw little-endian float32 bytes of ``x`` (numpy array, torch tensor or sequence).

    No copy when ``x`` is already a C-contiguous little-endian float32 array or CPU tensor.
    """
    arr = _to_numpy(x)
    if arr.dtype != F32 or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=F32)
    if arr.size == 0:
        raise TensorFormatError("empty tensors cannot be stored (a tensor needs at least one float)")
    return memoryview(arr.reshape(-1)).cast("B")


def from_f32_bytes(
    data: bytes | bytearray | memoryview | None,
    shape: Sequence[int] | None = None,
    *,
    writable: bool = False,
    key: str | bytes | None = None,
) -> np.ndarray:
    """Interpret raw bytes as float32. Read-only view unless ``writable`` (then one copy)."""
    name = f" at {key!r}" if key is not None else ""
    if data is None:
        raise TensorFormatError(f"no tensor{name} (key missing)")
    if len(data) == 0 or len(data) % 4:
        raise TensorFormatError(f"value{name} has {len(data)} bytes; a float32 tensor needs a non-zero multiple of 4")
    arr = np.frombuffer(data, dtype=F32)
    if writable:
        arr = arr.copy()
    if shape is not None:
        expected = int(np.prod(shape)) if len(shape) else 1
        if expected != arr.size:
            raise TensorFormatError(f"value{name} has {arr.size} floats, shape {tuple(shape)} needs {expected}")
        arr = arr.reshape(shape)
    return arr


def _shape_key(key: str) -> str:
    return f"{key}:shape"


class TensorStore:
    """Put and get tensors in one database. Multi-key calls are pipelined (one round trip)."""

    def __init__(self, client: redis.Redis):
        self.client = client

    def put(self, key: str, x, *, shape: bool = True, ttl: float | None = None) -> None:
        self.put_many({key: x}, shape=shape, ttl=ttl)

    def put_many(self, items: dict[str, object], *, shape: bool = True, ttl: float | None = None) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, x in items.items():
            arr = _to_numpy(x)
            pipe.set(key, as_f32_bytes(arr), px=int(ttl * 1000) if ttl else None)
            if shape:
                pipe.set(_shape_key(key), ",".join(map(str, arr.shape)), px=int(ttl * 1000) if ttl else None)
        pipe.execute()

    def get(self, key: str, *, writable: bool = False, torch: bool = False):
        return self.get_many([key], writable=writable, torch=torch)[0]

    def get_many(self, keys: Iterable[str], *, writable: bool = False, torch: bool = False) -> list:
        keys = list(keys)
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
            pipe.get(_shape_key(key))
        raw = pipe.execute()
        out = []
        for i, key in enumerate(keys):
            data, shape_raw = raw[2 * i], raw[2 * i + 1]
            shape = None
            if shape_raw is not None:
                text = shape_raw.decode() if isinstance(shape_raw, bytes) else str(shape_raw)
                try:
                    shape = tuple(int(s) for s in text.split(",") if s != "")
                except ValueError as exc:
                    raise TensorFormatError(f"shape metadata of {key!r} is not a list of integers: {text!r}") from exc
            arr = from_f32_bytes(data, shape, writable=writable or torch, key=key)
            if torch:
                import torch as _torch

                arr = _torch.from_numpy(arr)
            out.append(arr)
        return out

    def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        return self.client.delete(*keys, *(_shape_key(k) for k in keys))


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


class FlatParams:
    """One flat float32 buffer holding all of a model's parameters, and one for their gradients.

    After :meth:`attach`, every ``param.data`` is a view into :attr:`params` and every ``param.grad`` a
    view into :attr:`grads`, so the model's whole state goes to or comes from the database as a single
    string with no gather/scatter copies (autograd accumulates into the existing ``.grad`` in place).
    """

    def __init__(self, model):
        import torch

        self.entries: list[_Entry] = []
        offset = 0
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            n = p.numel()
            self.entries.append(_Entry(name, tuple(p.shape), offset, n))
            offset += n
        if offset == 0:
            raise ValueError("model has no trainable parameters")
        self.numel = offset
        self.params = torch.zeros(offset, dtype=torch.float32)
        self.grads = torch.zeros(offset, dtype=torch.float32)
        self._model = model
        self.attach(model)

    @property
    def nbytes(self) -> int:
        return self.numel * 4

    def attach(self, model) -> None:
        import torch

        named = dict(model.named_parameters())
        with torch.no_grad():
            for e in self.entries:
                p = named[e.name]
                view = self.params[e.offset : e.offset + e.numel].view(e.shape)
                view.copy_(p.data.to(torch.float32))
                p.data = view
                p.grad = self.grads[e.offset : e.offset + e.numel].view(e.shape)

    def zero_grad(self) -> None:
        self.grads.zero_()

    def load_bytes(self, data: bytes | memoryview | None, *, key: str | None = None) -> None:
        """Copy a stored parameter vector into the model (one copy, into the existing buffer)."""
        src = from_f32_bytes(data, key=key)
        if src.size != self.numel:
            raise TensorFormatError(
                f"parameter vector{' at ' + repr(key) if key else ''} has {src.size} floats, the model has {self.numel}"
            )
        self.params.numpy()[:] = src

    def params_bytes(self) -> memoryview:
        return as_f32_bytes(self.params)

    def grads_bytes(self) -> memoryview:
        return as_f32_bytes(self.grads)

    def unflatten(self, vector) -> dict[str, np.ndarray]:
        """Split a flat vector into named, shaped arrays (views, no copies)."""
        v = _to_numpy(vector).reshape(-1)
        if v.size != self.numel:
            raise TensorFormatError(f"vector has {v.size} floats, the model has {self.numel}")
        return {e.name: v[e.offset : e.offset + e.numel].reshape(e.shape) for e in self.entries}
