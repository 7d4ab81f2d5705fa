"""One link breaks: the victim and peer 0 cannot reach each other's databases; the rest is fine.

Why: the partial partition that makes peers diverge without anyone noticing: every peer still has a
majority, but the victim and peer 0 exclude each other while the others aggregate both, so after one
round three different models exist. The peers compare the digests of their states before each round;
every peer whose state is not the one most of them hold resynchronises (``resync``, then ``joined``).
After the heal they end with one model.
"""

from __future__ import annotations

import time

from ..cluster import Cluster
from ._base import Fate, Fault, Scenario, register


@register("cut_link")
class CutLink(Fault):
    """Cut the links between a peer and peer 0, both ways, then heal them."""

    description = "cut the links between peer {victim} and peer 0 (both ways) for {duration_s:g} s, then heal"
    fate = Fate.RETURNS
    victim = 1
    duration_s = 15.0  # longer than the barrier deadline (10 s): the others give up waiting
    links = True

    def inject(self, cluster: Cluster, scenario: Scenario) -> float:
        t = time.time()
        cluster.links.cut(0, scenario.victim)
        time.sleep(scenario.duration_s)
        cluster.links.heal()
        return t
