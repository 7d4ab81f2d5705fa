"""A peer's database server restarts: SIGKILL it, start it again on the same files a few seconds later.

Why: a database that crashes and comes back must not cost the peer its progress. With persistence on
(append-only file, fsync on every write) every write acknowledged before the kill is on disk, and the
model update of a round is one transaction with the round counter: the restarted database holds the
last update the peer completed, never half of one. The peer waits for it (``membership.db_recovery_s``),
resumes right after that round (``recovered``), and, if the others went on meanwhile, joins again
through state transfer.
"""

from __future__ import annotations

import time

from ..cluster import Cluster
from ._base import Fate, Fault, Scenario, register


@register("restart_db")
class RestartDb(Fault):
    """SIGKILL a peer's database server and restart it on the same files and unix socket."""

    description = ("SIGKILL peer {victim}'s database (AOF, fsync always), restart it {duration_s:g} s later "
                   "on the same files")
    fate = Fate.RETURNS
    victim = 2
    duration_s = 2.0
    into_round = 0.4
    config = {"peers.persistence": True}
    back_with = ("joined", "recovered")

    def inject(self, cluster: Cluster, scenario: Scenario) -> float:
        t = cluster.kill_db(scenario.victim)
        time.sleep(scenario.duration_s)
        cluster.restart_db(scenario.victim)  # from this (the main) thread: the server dies with its thread
        return t
