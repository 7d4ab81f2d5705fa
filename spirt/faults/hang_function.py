"""A gradient function hangs: SIGSTOP one of a peer's function workers while it computes.

Why: a hung invocation is worse than a crashed one, because nothing tells the caller: the worker neither
answers nor dies. Only the executor's timeout (``executor.timeout_s``) ends the wait; it then kills the
pool (a stopped process reacts to SIGKILL only), starts a new one and retries. The round goes on as
without the fault, one timeout later; detection is the victim's own ``function_failed`` event.
"""

from __future__ import annotations

import os
import signal
import time

from ..cluster import Cluster
from ._base import Fault, Scenario, register


@register("hang_function")
class HangFunction(Fault):
    """SIGSTOP one of a peer's gradient-function workers while it computes (a hung function)."""

    description = "SIGSTOP a gradient-function worker of peer {victim} while it computes (hung function)"
    victim = 1
    noticed_by = ("function_failed",)
    noticed_by_victim = True

    def inject(self, cluster: Cluster, scenario: Scenario) -> float:
        os.kill(cluster.busy_worker(scenario.victim), signal.SIGSTOP)
        return time.time()
