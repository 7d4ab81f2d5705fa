"""A peer is cut off from every other one for a few seconds (a network partition), then the links heal.

Why: a switch port, a firewall rule, a routing flap. Every link between the victim and the others goes
silent both ways (user-space proxies swallow the bytes; nobody gets an error). The victim, alone, is no
majority: it applies no update on its own and waits (``no_quorum``). The others exclude and then remove
it, and train on. When the links heal, the victim finds the others ahead and comes back through state
transfer (``joined``); the others never aggregate its vectors after removing it.
"""

from __future__ import annotations

import time

from ..cluster import Cluster
from ._base import Fate, Fault, Scenario, register


@register("isolate_peer")
class IsolatePeer(Fault):
    """Cut every link between a peer and the others, both ways, then heal them."""

    description = "cut every link of peer {victim} (both ways) for {duration_s:g} s, then heal"
    fate = Fate.RETURNS
    victim = 3
    duration_s = 15.0  # longer than the barrier deadline (10 s): the others give up waiting
    links = True
    back_with = ("joined",)

    def inject(self, cluster: Cluster, scenario: Scenario) -> float:
        t = time.time()
        cluster.links.isolate(scenario.victim)
        time.sleep(scenario.duration_s)
        cluster.links.heal()
        return t
