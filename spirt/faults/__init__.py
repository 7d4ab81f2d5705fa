"""Fault injection with real processes and real signals, and what the faults cost.

Each fault of a peer-to-peer training is a class in its own module of this package, registered by name
(``spirt bench faults -- --list`` prints them): killing a peer's orchestrator or its database server,
killing or hanging one of its gradient-function workers, stopping an orchestrator for a while,
restarting a database on its files, a newcomer joining. A fault is injected into a
:class:`~spirt.cluster.Cluster`: one database server and one orchestrator *process* per peer, each with
its warm pool of gradient-function worker processes.

:func:`run_scenario` runs one fault's scenario and measures, from the peers' per-round metrics and
membership events (each peer appends JSON events to ``{p}:events`` in its own database, with wall time
``t``):

- detection latency: fault -> the first event of another peer about the victim (excluded, removed,
  admitted), or the victim's own ``function_failed`` event for function faults;
- recovery time: for a peer lost for good or a function fault, fault -> end of the first round that
  every survivor started after the detection and that had a normal barrier time (at most the 95th
  percentile of the barrier times before the fault, + 50 ms); for a peer that comes back, fault ->
  its ``joined`` event (state transfer) or else its ``recovered`` event;
- rounds lost: over the peers that should have kept training, rounds expected minus rounds whose update
  they completed;
- final accuracy of the survivors on the full test set (evaluated here, from their parameters), next to
  a fault-free run with the same surviving peers (same seed and data parts: the run starts
  ``peers.count = survivors`` with ``data.parts`` = all peers, so each survivor keeps its part).

``python -m spirt.faults`` (or ``spirt bench faults --``) runs scenarios and writes
``reports/faults.{md,csv}``; see :func:`main`.

Public API
----------
``names()``, ``info(name)``
    The registered faults (in report order) and their metadata (:class:`FaultInfo`: one-line summary,
    the victim's :class:`Fate`, the default scenario).
``SCENARIOS``, ``run_scenario``, ``run_all``, ``reference_for``, ``write_reports``, ``main``
    The default scenario of every fault (derived from the registry), running them, the report.

Adding a fault: one module in this package with a class derived from :class:`Fault`, decorated with
``@register("name")`` (copy ``kill_peer.py``); modules are imported automatically, and the scenarios,
the report and the command line take their faults from the registry.
"""

from __future__ import annotations

from ..cluster import Cluster, ClusterError, heartbeat_process, peer_context
from ._base import Fate, Fault, FaultInfo, NoFault, Scenario, fault_class, register, registry
from ._cli import main, parser, run_all
from ._report import COLUMNS, listing, write_partition_reports, write_reports
from ._scenarios import (
    BASE,
    SCENARIOS,
    ScenarioResult,
    accuracy_of,
    fault_free_accuracy,
    names,
    reference_for,
    run_scenario,
    scenario_config,
)

registry.load_package(__name__, __path__)


def info(name: str) -> FaultInfo:
    """Metadata of the fault ``name`` (or an alias)."""
    return registry.info(name)


__all__ = [
    "names", "info", "register", "registry", "Fault", "FaultInfo", "Fate", "NoFault", "fault_class",
    "Scenario", "SCENARIOS", "BASE", "scenario_config", "run_scenario", "run_all", "ScenarioResult",
    "reference_for", "fault_free_accuracy", "accuracy_of", "write_reports", "write_partition_reports", "listing",
    "COLUMNS", "main",
    "parser", "Cluster", "ClusterError", "peer_context", "heartbeat_process",
]
