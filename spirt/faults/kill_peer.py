"""A peer crashes: SIGKILL its orchestrator in the middle of a round; it never comes back.

Why: the most common failure of a serverless peer (its orchestrator is killed or its host goes away).
Its database lives on but nobody writes to it any more: no round vectors, and its heartbeat key
expires. The survivors must notice it at their barrier (heartbeat gone after at most two intervals),
exclude it from the round, remove it after ``membership.max_misses`` misses, and go on training among
themselves without losing a round.

This module is the template of a fault: a class derived from :class:`~spirt.faults.Fault`, registered
with ``@register("name")``, with a one-line ``description``, the victim's ``fate``, the default
scenario (``victim``, ``at``, ``duration_s``) and :meth:`inject`. Copy it to a new module of this
package, change those, and add a scenario test to ``tests/test_faults.py``; nothing else needs editing
(the scenarios, the report and the command line take the registered faults).
"""

from __future__ import annotations

from ..cluster import Cluster
from ._base import Fate, Fault, Scenario, register


@register("kill_peer")
class KillPeer(Fault):
    """SIGKILL a peer's orchestrator mid-round; it never comes back."""

    description = "SIGKILL peer {victim}'s orchestrator mid-round"
    fate = Fate.LOST
    victim = 3  # lost for good: the last peer, so the fault-free run with the survivors has their data parts
    into_round = 0.4  # in the middle of its round (a peer is rarely killed between two rounds)

    def inject(self, cluster: Cluster, scenario: Scenario) -> float:
        return cluster.kill_orchestrator(scenario.victim)
