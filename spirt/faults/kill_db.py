"""A peer's database server dies: SIGKILL it and do not restart it; the peer is lost.

Why: the database is the peer's only channel to the others (they push their round vectors into it and
read its own from it), so without it the peer is cut off even though its orchestrator still runs (that
waits ``membership.db_recovery_s`` for its database to come back, then gives up). The survivors see the database unreachable as soon as they
push to it or check it at the barrier, which needs no heartbeat expiry: detection within one heartbeat
interval.
"""

from __future__ import annotations

from ..cluster import Cluster
from ._base import Fate, Fault, Scenario, register


@register("kill_db")
class KillDb(Fault):
    """SIGKILL a peer's database server, without restarting it: the peer is lost."""

    description = "SIGKILL peer {victim}'s database server (no restart)"
    fate = Fate.LOST
    victim = 3
    into_round = 0.4

    def inject(self, cluster: Cluster, scenario: Scenario) -> float:
        return cluster.kill_db(scenario.victim)
