"""A peer's database hangs: SIGSTOP its server for a few seconds, then SIGCONT.

Why: a database server that stops answering (swapping, a stalled disk under its append-only file, a
paused virtual machine) without closing its connections. Nobody gets an error, only silence: the other
peers' pushes into its inbox and their liveness probes wait for replies, and so does its own
orchestrator. Every call to another peer's database is bounded (pushes by the barrier deadline,
liveness probes by the heartbeat interval), and a member whose database missed a push is not pushed to
again until it answers a probe: the others find it unreachable at their barrier, exclude it and go on,
delayed by at most one barrier deadline. A push to the hung server blocks once its socket buffers are
full, so each server is pushed to from its own thread: the others' vectors are not held back behind it.
The victim's own gradient functions time out on the database they read; when every one of them failed
and the database answers again, the victim runs them once more rather than ending. Once its server
answers again, the victim has fallen behind and takes the others' state (a state transfer).
"""

from __future__ import annotations

import time

from ..cluster import Cluster
from ._base import Fate, Fault, Scenario, register


@register("stall_db")
class StallDb(Fault):
    """SIGSTOP a peer's database server for a few seconds, then SIGCONT."""

    description = "SIGSTOP peer {victim}'s database server for {duration_s:g} s, then SIGCONT"
    fate = Fate.RETURNS
    victim = 2
    duration_s = 15.0  # longer than the barrier deadline (10 s): an unbounded wait would show
    into_round = 0.4
    back_with = ("joined", "recovered")

    def inject(self, cluster: Cluster, scenario: Scenario) -> float:
        t = cluster.stop_db(scenario.victim)
        time.sleep(scenario.duration_s)
        cluster.resume_db(scenario.victim)
        return t
