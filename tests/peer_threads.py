"""Peers of one test run side by side as threads of the test process."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable


def in_threads(fn: Callable, items: Iterable, timeout_s: float = 300) -> list[BaseException]:
    """Run ``fn(item)`` for every item in its own thread and wait for all; the exceptions they raised
    (a test asserts there are none, or the ones it expects)."""
    errors: list[BaseException] = []

    def body(item):
        try:
            fn(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    return errors


def train(peer, errors: list[BaseException], join: bool = False) -> threading.Thread:
    """Start ``peer`` training in a thread of its own (a newcomer, with ``join``: it asks the running
    peers to admit it and takes their state first); what it raises goes to ``errors``."""

    def body():
        try:
            if join:
                peer.init_eval_state()
                peer.join()
            peer.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    t = threading.Thread(target=body)
    t.start()
    return t
