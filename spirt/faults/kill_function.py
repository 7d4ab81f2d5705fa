"""A gradient function crashes: SIGKILL one of a peer's function workers while it computes.

Why: in a serverless deployment a function invocation may die at any time (out of memory, the platform
reclaims the container). The peer's executor sees the worker die, replaces its pool and retries the
invocation; the gradient arrives, late, and the round is the same as without the fault (bit-identical
parameters in the end). Detection is the victim's own ``function_failed`` event, not the other peers':
for them nothing happened, unless the retry made the victim miss their barrier deadline.
"""

from __future__ import annotations

import os
import signal
import time

from ..cluster import Cluster
from ._base import Fault, Scenario, register


@register("kill_function")
class KillFunction(Fault):
    """SIGKILL one of a peer's gradient-function workers while it computes."""

    description = "SIGKILL a gradient-function worker of peer {victim} while it computes"
    victim = 1
    noticed_by = ("function_failed",)
    noticed_by_victim = True

    def inject(self, cluster: Cluster, scenario: Scenario) -> float:
        # a worker that waits for work would die unnoticed until the next round; one that computes is
        # the failure of an invocation
        os.kill(cluster.busy_worker(scenario.victim), signal.SIGKILL)
        return time.time()
