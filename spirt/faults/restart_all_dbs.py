"""Every database restarts at once: SIGKILL all the servers, start them again on their files.

Why: a shared power feed, a host reboot, an operator restarting the fleet. Every peer loses its
database at the same moment and every orchestrator waits for its own (``membership.db_recovery_s``).
With persistence on (append-only file, fsync on every write) each database comes back with the last
update its peer completed, but the peers may stand at different rounds (one had finished a round the
others had not), and vectors pushed just before the kill may or may not have reached the disk. The
peers compare their states before each round (``spirt.agreement``): they must end with one model, with
every divergence and resynchronisation said as an event.
"""

from __future__ import annotations

import time

from ..cluster import Cluster
from ._base import Fate, Fault, Scenario, register


@register("restart_all_dbs")
class RestartAllDbs(Fault):
    """SIGKILL every peer's database server at once and restart them all on their files."""

    description = ("SIGKILL every database at once (AOF, fsync always), restart them all {duration_s:g} s "
                   "later on their files")
    fate = Fate.RETURNS
    victim = 0  # every peer is hit; the measures follow peer 0
    duration_s = 2.0
    into_round = 0.4
    config = {"peers.persistence": True}
    noticed_by = ("recovered",)
    noticed_by_victim = True
    back_with = ("recovered",)

    def inject(self, cluster: Cluster, scenario: Scenario) -> float:
        t = time.time()
        for i in range(len(cluster.servers)):
            cluster.kill_db(i)
        time.sleep(scenario.duration_s)
        for i in range(len(cluster.servers)):
            cluster.restart_db(i)  # from this (the main) thread: the server dies with its thread
        return t
