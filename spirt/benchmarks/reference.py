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


def bench_backend(name: str) -> Backend:
    """A peer backend by name, or the SPIRT reference (``spirt-reference``)."""
    from ..backends import get_backend

    return SpirtReferenceBackend() if name == SpirtReferenceBackend.name else get_backend(name)
