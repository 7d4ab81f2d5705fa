"""The group splits into two halves that cannot reach each other, then the links heal.

Why: the classic split brain. With 4 peers neither half is a strict majority, so neither may move the
model on: the round in flight is not applied (its barrier gathered no majority of vectors) and both
halves wait (``no_quorum``), keeping their heartbeats and probing the others. When the links heal, a
majority is reachable again, every peer still holds the state of the last round before the split, and
training goes on from there with one model.
"""

from __future__ import annotations

import time

from ..cluster import Cluster
from ._base import Fate, Fault, Scenario, register


@register("split_halves")
class SplitHalves(Fault):
    """Cut every link between the peers below the victim's half and the others, then heal."""

    description = "split the peers into halves (peer {victim}'s and the other) for {duration_s:g} s, then heal"
    fate = Fate.RETURNS
    victim = 0
    duration_s = 15.0  # longer than the barrier deadline (10 s): the others give up waiting
    links = True
    back_with = ("quorum", "joined")  # back with the others, or through state transfer
    noticed_by = ("no_quorum",)
    noticed_by_victim = True

    def inject(self, cluster: Cluster, scenario: Scenario) -> float:
        n = len(cluster.servers)
        mine = [i for i in range(n) if (i < n // 2) == (scenario.victim < n // 2)]
        t = time.time()
        cluster.links.split(mine, [i for i in range(n) if i not in mine])
        time.sleep(scenario.duration_s)
        cluster.links.heal()
        return t
