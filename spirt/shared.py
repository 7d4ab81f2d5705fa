"""Results that the threads of one process compute once.

Peers can run as threads of one process (``peers.mode = "thread"``, as the benchmarks run them). Where
several of them would compute the same deterministic result from the same inputs (the accuracy of
bit-identical models, the colluding Byzantine peers' forgery of a round), the first one computes it and
the others take it: the outcome is the same, the cost is paid once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any


class Shared:
    """The results of the ``keep`` most recent keys.

    :meth:`get` computes a key's result the first time; a caller that comes while it is being computed
    waits for it, a later one takes it. A failure is not kept: the next caller tries for itself.

    Examples
    --------
    >>> from spirt.shared import Shared
    >>> calls = []
    >>> memo = Shared(keep=2)
    >>> memo.get("a", lambda: calls.append("a") or 1), memo.get("a", lambda: calls.append("a") or 2)
    (1, 1)
    >>> calls
    ['a']
    """

    def __init__(self, keep: int):
        self.keep = keep
        self._results: OrderedDict[Hashable, Future] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            known = self._results.get(key)
            if known is None:
                mine = self._results[key] = Future()
                while len(self._results) > self.keep:
                    self._results.popitem(last=False)
        if known is not None:
            return known.result()
        try:
            result = compute()
        except BaseException as exc:
            with self._lock:
                if self._results.get(key) is mine:
                    del self._results[key]
            mine.set_exception(exc)  # the callers waiting meanwhile get the failure, later ones retry
            raise
        mine.set_result(result)
        return result
