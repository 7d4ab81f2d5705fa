"""A newcomer: a new peer asks to join the training while the others train.

Why: membership is open; a peer may join at any round. The live peers admit it from a round just
ahead, snapshot their state after the round before, and it takes that state only if two of them hand
over identical state (a single peer could lie). It is started with the others (torch imported, workers
warm) but only asks to join at the fault round, so the measure is the admission, not its start-up. The
fault time is its join request as it logged it; detection is the others' ``admitted`` event, recovery
its own ``joined`` event.
"""

from __future__ import annotations

import pandas as pd

from ..cluster import Cluster
from ._base import Fate, Fault, Scenario, register


@register("join")
class Join(Fault):
    """Start a new peer while the others train; it is admitted and gets their state."""

    # the newcomer is the last of the peers: {victim} is also the number of peers training before it
    description = "peer {victim} joins {victim} training peers"
    fate = Fate.JOINS
    victim = 3
    noticed_by = ("admitted",)
    back_with = ("joined", "recovered")

    def inject(self, cluster: Cluster, scenario: Scenario) -> float:
        return cluster.join(scenario.victim)

    def fault_time(self, scenario: Scenario, t_injected: float, events: pd.DataFrame) -> float:
        req = events[(events["peer"] == scenario.victim) & (events["event"] == "join_request")]
        return float(req["t"].min()) if len(req) else t_injected
