"""The benchmark's reference points: how the released SPIRT code stored and averaged gradients, and the
module's update before it was one pass.

The released SPIRT functions stored each gradient as ``json.dumps`` of a Python list, and a Lua script
decoded the lists, averaged them and applied the update (``spirt_ref_update`` in
``spirt/lua/spirt.lua``). ``module-unfused`` is the module's earlier update path: TENSOR.AVG into a
temporary key, TENSOR.SGD with it, DEL of the temporary (one round trip), which TENSOR.AVGSGD replaced.
Both are kept only to put the other backends' update times in context; peers never use them.
"""

from __future__ import annotations

import json

import numpy as np

from ..backends import Backend, ModuleBackend, load_lua
from ..keys import scratch
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


class ModuleUnfusedBackend(ModuleBackend):
    """The module's update in two passes through a temporary key (benchmark reference only): the
    average is written out, read back by the step, then deleted."""

    name = "module-unfused"

    def update(self, client, param, buf, grads, sgd):
        tmp = scratch(param)
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("TENSOR.AVG", tmp, *grads)
        pipe.execute_command(*self.sgd_args(param, tmp, buf, sgd))
        pipe.delete(tmp)
        n, _, _ = pipe.execute()
        return int(n)


#: backends measured by the benchmark only
BENCH_ONLY: dict[str, type[Backend]] = {b.name: b for b in (SpirtReferenceBackend, ModuleUnfusedBackend)}
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
