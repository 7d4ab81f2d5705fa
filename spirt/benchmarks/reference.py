"""The benchmark's reference point: how the released SPIRT code stored and averaged gradients.

Its functions stored each gradient as ``json.dumps`` of a Python list, and a Lua script decoded the
lists, averaged them and applied the update (``spirt_ref_update`` in ``spirt/lua/spirt.lua``). It is
kept only to put the other backends' update times in context; peers never use it.
"""

from __future__ import annotations

import json

import numpy as np

from ..backends import Backend, load_lua
from ..tensors import F32


class SpirtReferenceBackend(Backend):
    """JSON lists averaged in Lua, as in the released SPIRT code (benchmark reference only)."""

    name = "spirt-reference"
    raw = False
    blocking = True

    def prepare(self, client):
        load_lua(client)

    def encode(self, x) -> bytes:
        # what the released SPIRT functions stored: json.dumps of the gradient's Python list
        return json.dumps(np.asarray(x, dtype=F32).reshape(-1).tolist()).encode()

    def decode(self, data) -> np.ndarray:
        return np.asarray(json.loads(data), dtype=F32)

    def update(self, client, param, buf, grads, sgd):
        return int(
            client.fcall(
                "spirt_ref_update", 2 + len(grads), param, buf, *grads, sgd.lr, sgd.momentum, sgd.weight_decay
            )
        )


#: backends measured by the benchmark only
BENCH_ONLY: dict[str, type[Backend]] = {SpirtReferenceBackend.name: SpirtReferenceBackend}
#: the memory-bandwidth reference row: the same arithmetic on arrays in the benchmark's own memory
NUMPY_INPROCESS = "numpy-inprocess"


def bench_backend(name: str) -> Backend:
    """A peer backend by name, or one the benchmark alone measures (the SPIRT reference)."""
    from ..backends import get_backend

    cls = BENCH_ONLY.get(name)
    return cls() if cls is not None else get_backend(name)


def blocking(name: str) -> bool:
    """Whether the benchmark's backend ``name`` runs inside the server's one thread at interpreter
    speed (seconds per call at the larger sizes): it is measured on its own, with fewer rounds."""
    return name != NUMPY_INPROCESS and bench_backend(name).blocking
