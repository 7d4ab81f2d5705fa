"""Own-side screening: a peer checks its own gradient functions' output like a received vector.

A gradient function is a separate process with write access to its gradient slot, so what it wrote
may be anything: a gradient of the wrong size, or with NaN or infinite values. Such a gradient counts
as a failed function (a ``function_failed`` event, never averaged, never an orchestrator crash). When
no gradient is finite, no function is to blame: the peer's own parameters diverged, which is said once
(``diverged``) and the round goes on, so that the run reports the collapse instead of ending.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import redis

from .events import EventLog
from .keys import Keys


class FunctionCounts(Protocol):
    """The round's function outcome (:class:`spirt.peer.RoundMetrics`), corrected by the screen."""

    functions_ok: int
    functions_failed: int


def finite(raw: bytes | None) -> bool:
    """Whether a float32 vector read from a database is there and has no NaN or infinity."""
    return raw is not None and bool(np.isfinite(np.frombuffer(raw, dtype="<f4")).all())


class GradientScreen:
    """Peer ``index``'s screen of the gradients its ``functions`` gradient functions wrote."""

    def __init__(self, index: int, db: redis.Redis, functions: int, events: EventLog):
        self.index, self.db, self.functions, self.events = index, db, functions, events
        self.keys = Keys(index)
        self._diverged = False  # said once: our own average stopped being finite

    def sizes(self, r: int, grad_keys: list[str], m: FunctionCounts) -> list[str]:
        """The gradients of the parameters' byte size; the others are failed functions."""
        pipe = self.db.pipeline(transaction=False)
        pipe.strlen(self.keys.params)
        for key in grad_keys:
            pipe.strlen(key)
        width, *sizes = pipe.execute()
        bad = {key: n for key, n in zip(grad_keys, sizes, strict=True) if n != width}
        return self.drop(r, grad_keys, {k: f"gradient of {n} bytes, the parameters have {width}"
                                        for k, n in bad.items()}, m)

    def finite(self, r: int, grad_keys: list[str], m: FunctionCounts) -> list[str]:
        """The gradients without a NaN or an infinity; the others are failed functions. When none is
        finite, or all are and only their average overflows, our parameters diverged: an event, once,
        and all of them are kept."""
        bad = {k: "NaN or infinite values" for k, g in zip(grad_keys, self.db.mget(grad_keys), strict=True)
               if not finite(g)}
        if bad and len(bad) < len(grad_keys):
            return self.drop(r, grad_keys, bad, m)
        if not self._diverged:
            self._diverged = True
            self.events(r, "diverged", self.index, "our average has NaN or infinite values "
                        f"({len(grad_keys) - len(bad)} of {len(grad_keys)} gradients finite): our parameters diverged")
        return grad_keys

    def drop(self, r: int, grad_keys: list[str], why: dict[str, str], m: FunctionCounts) -> list[str]:
        """``grad_keys`` without the ones in ``why`` (key -> reason), each a failed function."""
        if not why:
            return grad_keys
        m.functions_ok -= len(why)
        m.functions_failed += len(why)
        function = {self.keys.grad(r, i): i for i in range(self.functions)}
        for key, reason in why.items():
            self.events(r, "function_failed", self.index, f"function {function[key]}: {reason}; dropped")
        kept = [k for k in grad_keys if k not in why]
        if not kept:
            raise RuntimeError(f"peer {self.index} round {r}: no usable gradient: {'; '.join(why.values())}")
        return kept
