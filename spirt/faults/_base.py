"""The fault base class, the fault registry, and the scenario a fault is injected in."""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from ..registry import Registry

if TYPE_CHECKING:
    import pandas as pd

    from ..cluster import Cluster
    from ._scenarios import ScenarioResult


class Fate(StrEnum):
    """What becomes of the victim peer: who must finish the training, and what is measured."""

    LOST = "lost"  # gone for good; the survivors are the other peers
    STAYS = "stays"  # keeps training (the fault hits something of its own, such as a function)
    RETURNS = "returns"  # leaves the training for a while and comes back
    JOINS = "joins"  # a newcomer: not training at the start, admitted while the others train


#: the order of the faults in reports and listings
FATE_ORDER = (Fate.LOST, Fate.STAYS, Fate.RETURNS, Fate.JOINS)


@dataclass(frozen=True)
class FaultInfo:
    """Metadata of a registered fault, as returned by :func:`spirt.faults.info`."""

    name: str
    summary: str  # one line: what the default scenario does
    fate: Fate
    #: the default scenario: the victim peer, the fault round as a fraction of the rounds, the duration
    params: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


def _describe(name: str, cls: type[Fault]) -> FaultInfo:
    return FaultInfo(name=name, summary=cls.describe(), fate=cls.fate,
                     params={"victim": cls.victim, "at": cls.at, "duration_s": cls.duration_s},
                     aliases=tuple(cls.aliases))


registry = Registry("fault", _describe)


def register(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator: register a fault under ``name``."""
    return registry.register(name, aliases)


class Fault(ABC):
    """A fault of a peer-to-peer training, injected into a running :class:`~spirt.cluster.Cluster`.

    A fault is a class in its own module of :mod:`spirt.faults`, decorated with ``@register("name")``.
    Its class attributes say what it is (``description``, ``fate``), where and when it strikes by
    default (``victim``, ``at``, ``duration_s``, ``into_round``), what the training needs for it
    (``config``) and how its detection and the victim's return show in the peers' events
    (``noticed_by``, ``noticed_by_victim``, ``back_with``); :meth:`inject` does it. The scenario runner
    (:func:`spirt.faults.run_scenario`) waits for the moment (:meth:`aim`), calls :meth:`inject`, lets
    the training finish and measures detection (:meth:`detected_at`) and recovery (:meth:`recovered_at`),
    which a fault may override when the events above do not tell.
    """

    name: ClassVar[str] = "fault"
    aliases: ClassVar[tuple[str, ...]] = ()
    #: one line; ``{victim}``, ``{at}`` and ``{duration_s}`` are replaced by the scenario's values
    description: ClassVar[str] = ""
    fate: ClassVar[Fate] = Fate.STAYS

    # the default scenario
    victim: ClassVar[int] = 3  # a peer that is lost for good or joins must be the last one
    at: ClassVar[float] = 0.3  # strikes in round int(at * rounds) of the victim (of peer 0 for a newcomer)
    duration_s: ClassVar[float] = 0.0  # how long a fault that ends by itself lasts
    #: how far into its round to strike, as a fraction of the mean round time so far (0: at its start)
    into_round: ClassVar[float] = 0.0

    #: training config the fault needs, over the scenario's (section.field -> value)
    config: ClassVar[Mapping[str, Any]] = {}
    #: the fault cuts network links: every peer reaches the others' databases through its own proxies
    #: (:class:`spirt.links.Links`, ``cluster.links``)
    links: ClassVar[bool] = False

    #: events that show the fault was noticed (the first one at or after the fault counts): logged by
    #: the other peers about the victim, or by the victim itself if ``noticed_by_victim``
    noticed_by: ClassVar[tuple[str, ...]] = ("excluded", "removed")
    noticed_by_victim: ClassVar[bool] = False
    #: the victim's own events that mark its return (the first kind found, in this order); empty: the
    #: training has recovered when the survivors' rounds are back to normal
    back_with: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def describe(cls, victim: int | None = None, at: float | None = None, duration_s: float | None = None) -> str:
        """The description with the scenario's values (the defaults if not given)."""
        return cls.description.format(victim=cls.victim if victim is None else victim,
                                      at=cls.at if at is None else at,
                                      duration_s=cls.duration_s if duration_s is None else duration_s)

    @classmethod
    def scenario(cls) -> Scenario:
        """The default scenario of this fault, named after it."""
        return Scenario(cls.name, cls.name, cls.victim, cls.at, cls.duration_s)

    def watched(self, scenario: Scenario) -> int:
        """The peer whose rounds decide when the fault strikes: the victim, or peer 0 if it is a newcomer
        (it is not training yet)."""
        return 0 if self.fate is Fate.JOINS else scenario.victim

    def aim(self, cluster: Cluster, scenario: Scenario, timeout_s: float = 600.0) -> None:
        """Wait for the moment to strike: the watched peer is in round ``int(at * rounds)`` (at least
        round 1: one whole round is over, so its mean round time means something), plus ``into_round``
        of a round."""
        peer = self.watched(scenario)
        cluster.wait_round(peer, max(1, int(scenario.at * cluster.cfg.run.rounds)), timeout_s=timeout_s)
        if self.into_round:
            time.sleep(self.into_round * cluster.round_time(peer))

    @abstractmethod
    def inject(self, cluster: Cluster, scenario: Scenario) -> float:
        """Do it to ``scenario.victim``; returns the wall time (``time.time()``) the fault happened."""

    def fault_time(self, scenario: Scenario, t_injected: float, events: pd.DataFrame) -> float:
        """The wall time measures count from, once the training is over (default: what :meth:`inject`
        returned)."""
        return t_injected

    def detected_at(self, result: ScenarioResult) -> float:
        """Wall time the fault was noticed (NaN: never), from the ``noticed_by`` events."""
        if not self.noticed_by:
            return math.nan
        return result.first_event(self.noticed_by, by_victim=self.noticed_by_victim)

    def recovered_at(self, result: ScenarioResult) -> float:
        """Wall time the training had recovered (NaN: never): the victim's first ``back_with`` event
        if the fault names any, else the end of the survivors' first normal round after the detection."""
        if self.back_with:
            return result.victim_back_at(self.back_with)
        return result.normal_round_end()


class NoFault(Fault):
    """No fault: the fault-free reference run the scenarios are compared with. Not registered (it is
    not a fault); scenarios name it ``"none"``."""

    name = "none"
    description = "no fault"
    victim = 0
    noticed_by = ()

    def aim(self, cluster: Cluster, scenario: Scenario, timeout_s: float = 600.0) -> None:
        pass

    def inject(self, cluster: Cluster, scenario: Scenario) -> float:
        return math.nan

    def recovered_at(self, result: ScenarioResult) -> float:
        return math.nan


def fault_class(name: str) -> type[Fault]:
    """The registered fault ``name`` (or alias), or :class:`NoFault` for ``"none"``; ValueError naming
    the registered faults otherwise."""
    return NoFault if name == NoFault.name else registry.cls(name)


#: where a scenario's links are cut (see :attr:`Scenario.network`)
NETWORKS = ("proxy", "netns")


@dataclass(frozen=True)
class Scenario:
    """A fault with its parameters: who is hit, when, for how long. The description defaults to the
    fault's, with these values."""

    name: str
    fault: str
    victim: int = 3
    at: float = 0.3  # the fault hits in round int(at * rounds)
    duration_s: float = 0.0  # how long a fault that ends by itself lasts
    description: str = ""
    #: for a fault that cuts links, what it cuts: the peers' TCP proxies (``"proxy"``), or the network
    #: between emulated hosts (``"netns"``: each peer in a network namespace of its own, cuts are iptables
    #: DROP rules; needs root)
    network: str = "proxy"

    def __post_init__(self):
        cls = fault_class(self.fault)
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {NETWORKS}, not {self.network!r}")
        if self.network != "proxy" and not cls.links:
            raise ValueError(f"{self.fault} cuts no links: it runs on the proxies' network only")
        if not self.description:
            text = cls.describe(self.victim, self.at, self.duration_s)
            if self.network == "netns":
                text += ", hosts in network namespaces cut by iptables DROP rules"
            object.__setattr__(self, "description", text)

    @property
    def fault_class(self) -> type[Fault]:
        return fault_class(self.fault)

    def survivors(self, n: int) -> list[int]:
        """The peers that must finish the training, of ``n``."""
        lost = self.fault_class.fate is Fate.LOST
        return [i for i in range(n) if not (lost and i == self.victim)]
