"""Honest disagreement, per round: how far apart the honest peers' models are, and what their average is
worth.

An :class:`Observer` (a thread of the launcher or of the fault harness) watches every honest peer's
``state`` (``round|digest``, written with each update): one small read per peer and poll while they
agree. When a peer reports a digest for a round that differs from one already seen, the observer
reads the parameters of every peer still at that round (with the state, in one transaction, so they
are exactly that round's). Once every watched peer has passed a round, the round is closed:

- ``honest_states``: the number of distinct models among the honest peers that completed it;
- ``honest_distance``: the largest L2 distance between two of them (0 when they agree; NaN when fewer
  than two of the disagreeing peers were still at that round to be read);
- ``honest_average``: the average of their parameters, kept only when they disagree, so that its test
  accuracy (``honest_average_accuracy``) is evaluated once, at the end.

A peer that completed two rounds between two polls (or that skipped rounds while its group re-formed)
is missing from the rounds it was not seen at; ``honest_peers`` says how many each round had. Reads are
bounded by ``timeout_s``, so a hung database delays only its own sample.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pandas as pd
import redis

from .keys import Keys

#: how often the peers' states are polled
POLL_S = 0.02
#: a round is closed without the peers that are this many rounds behind the most advanced one (dead,
#: partitioned or rejoining), so that memory stays bounded
LAG = 5


class Observer:
    """Watches the peers ``clients`` (index -> a client of its database) in a daemon thread."""

    def __init__(self, clients: dict[int, redis.Redis]):
        self.clients = clients
        self._seen: dict[int, int] = {}  # peer -> last round sampled
        self._digests: dict[int, dict[int, bytes]] = {}  # round -> peer -> digest of its state
        self._open: dict[int, dict[int, np.ndarray]] = {}  # round -> peer -> parameters (disagreement only)
        self._tried: set[tuple[int, int]] = set()  # (peer, round) whose parameters were asked for
        self.rows: list[dict] = []
        self.averages: dict[int, np.ndarray] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="observer", daemon=True)

    def __enter__(self) -> Observer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(10)
        for r in sorted(self._digests):
            self._close(r)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for q, c in self.clients.items():
                self._sample(q, c)
            if self._seen:
                low = min(self._seen.values()) if len(self._seen) == len(self.clients) else -1
                high = max(self._seen.values())
                for r in [r for r in self._digests if r <= low or r < high - LAG]:
                    self._close(r)
            self._stop.wait(POLL_S)

    def _sample(self, q: int, c: redis.Redis) -> None:
        """Peer q's latest state; its parameters only when its digest for that round differs from one
        already seen (agreeing peers cost one small read per poll)."""
        K = Keys(q)
        try:
            raw = c.get(K.state)
            if raw is None:
                return
            r_text, _, digest = raw.partition(b"|")
            r = int(r_text)
            if self._seen.get(q) == r:
                return
            params = None
            seen = self._digests.setdefault(r, {})
            if seen and digest not in seen.values():
                state, params = c.pipeline(transaction=True).get(K.state).get(K.params).execute()
                if state != raw:  # it moved on meanwhile: that round's parameters are gone
                    params = None
        except (redis.RedisError, ValueError):
            return  # unreachable, restarting or hung: this round goes without its sample
        self._seen[q] = r
        seen[q] = digest
        if params is not None:
            self._open.setdefault(r, {})[q] = np.frombuffer(params, dtype="<f4").copy()
        if len(set(seen.values())) > 1:  # a disagreement: the others' parameters, while they are at r
            for p, d in seen.items():
                if p != q and (p, r) not in self._tried:
                    self._tried.add((p, r))
                    self._fetch(p, r, d)

    def _fetch(self, q: int, r: int, digest: bytes) -> None:
        K = Keys(q)
        try:
            state, params = self.clients[q].pipeline(transaction=True).get(K.state).get(K.params).execute()
        except redis.RedisError:
            return
        if state == str(r).encode() + b"|" + digest and params is not None:
            self._open.setdefault(r, {})[q] = np.frombuffer(params, dtype="<f4").copy()

    def _close(self, r: int) -> None:
        digests = self._digests.pop(r, {})
        params = self._open.pop(r, {})
        self._tried = {(p, rr) for p, rr in self._tried if rr != r}
        distinct = len(set(digests.values()))
        distance = 0.0 if distinct <= 1 else float("nan")
        if distinct > 1 and len(params) > 1:  # the parameters of the peers that were still at round r
            vecs = list(params.values())
            distance = max(float(np.linalg.norm(vecs[i].astype(np.float64) - vecs[j]))
                           for i in range(len(vecs)) for j in range(i + 1, len(vecs)))
            self.averages[r] = np.mean(np.stack(vecs), axis=0, dtype=np.float64).astype("<f4")
        self.rows.append({"round": r, "honest_peers": len(digests), "honest_states": distinct,
                          "honest_distance": distance})

    def table(self, accuracy: Callable[[bytes], float] | None = None) -> pd.DataFrame:
        """One row per observed round; with ``accuracy`` (parameters -> test accuracy), the accuracy of
        the honest peers' average model where they disagreed (NaN where they agreed: it is their
        model's, in the peers' own rows)."""
        df = pd.DataFrame(self.rows, columns=["round", "honest_peers", "honest_states", "honest_distance"])
        df = df.sort_values("round", ignore_index=True)
        df["honest_average_accuracy"] = [
            accuracy(self.averages[r].tobytes()) if accuracy is not None and r in self.averages else np.nan
            for r in df["round"]]
        return df
