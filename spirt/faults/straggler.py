"""A straggler: SIGSTOP a peer's orchestrator for a few seconds, then SIGCONT.

Why: a peer that is slow for a while (a paused VM, a swapped-out process, a long garbage collection)
must neither stall the others nor be lost for good. Its heartbeat stops with it, so the others see it
expire at their barrier (within two heartbeat intervals), exclude it and, after
``membership.max_misses`` misses, remove it; when it runs again it finds itself behind, and joins again
through state transfer (its ``joined`` event marks its return).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from ..cluster import Cluster
from ._base import Fate, Fault, Scenario, register

if TYPE_CHECKING:
    from ._scenarios import ScenarioResult


@register("straggler")
class Straggler(Fault):
    """SIGSTOP a peer's orchestrator for a few seconds, then SIGCONT."""

    description = "SIGSTOP peer {victim}'s orchestrator for {duration_s:g} s, then SIGCONT"
    fate = Fate.RETURNS
    victim = 2
    duration_s = 5.0
    into_round = 0.4
    back_with = ("joined", "recovered")

    def inject(self, cluster: Cluster, scenario: Scenario) -> float:
        t = cluster.stop(scenario.victim)
        time.sleep(scenario.duration_s)
        cluster.resume(scenario.victim)
        return t

    def recovered_at(self, result: ScenarioResult) -> float:
        # a short pause may leave no event of its return (it catches up without a state transfer):
        # the training has recovered when the survivors' rounds are normal again
        t = result.victim_back_at(self.back_with)
        return t if not math.isnan(t) else result.normal_round_end()
