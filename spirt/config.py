"""Run configuration: a TOML file validated by pydantic, overridable from the command line.

Every section forbids unknown fields, so a typo is an error that names the field; values with a fixed
set of choices list them when wrong. Names of pluggable parts (model, data set, partition scheme,
aggregation backend, executor, defense and pre-aggregators, attack) are checked against their registries,
and the defense and the attack are built once with their parameters, so that a bad name or parameter is
reported when the configuration is loaded, naming the field, before any process starts. Registered names
are stored in their canonical form (an alias or another case is accepted on input).

The registries are imported when a section is validated, not with this module; none of them imports
torch.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """The configuration is invalid; the message names each bad field and what it allows."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _choice_error(value: Any, allowed: Iterable[str]) -> PydanticCustomError:
    return PydanticCustomError(
        "choice", "got {got}; allowed: {allowed}", {"got": repr(value), "allowed": ", ".join(map(repr, allowed))}
    )


def _field_error(field: str, message: str) -> PydanticCustomError:
    """An error a section's validator finds in its field ``field``; :func:`_format` reports it under that
    field rather than the section."""
    return PydanticCustomError("field_error", "{message}", {"field": field, "message": message})


def _one_of(value: str, allowed: list[str]) -> str:
    if value not in allowed:
        raise _choice_error(value, allowed)
    return value


def _registered(registry: Any, value: str, allowed: list[str] | None = None) -> str:
    """The canonical name of ``value`` in ``registry`` (aliases and any case accepted), or an error listing
    ``allowed`` (by default every registered name)."""
    allowed = registry.names() if allowed is None else allowed
    if value not in registry or registry.canonical(value) not in allowed:
        raise _choice_error(value, allowed)
    return registry.canonical(value)


class RunSection(_Section):
    name: str = "spirt"
    seed: int = Field(0, ge=0)
    rounds: int = Field(100, ge=1)
    eval_every: int = Field(10, ge=1, description="evaluate every E rounds (and after the last)")
    eval_samples: int = Field(2000, ge=0, description="test samples per intermediate evaluation; 0 = all")
    out: str = Field("results", description="report directory of `spirt run` (reports/ holds the committed reference run)")


class ModelSection(_Section):
    name: str = Field("cnn", description="a registered model (spirt.models.names())")
    norm: Literal["group", "batch"] = "group"

    @field_validator("name")
    @classmethod
    def _model(cls, value: str) -> str:
        from . import models

        return _registered(models.registry, value)


class DataSection(_Section):
    dataset: str = Field("fashion-mnist", description="a registered data set (spirt.data.names())")
    data_dir: str | None = None
    download: bool = False
    partition: str = Field("iid", description="a registered partition scheme (spirt.data.partition_names())")
    alpha: float = Field(0.5, gt=0)
    limit_train: int | None = Field(None, ge=1)
    limit_test: int | None = Field(None, ge=1)
    parts: int | None = Field(None, ge=1, description="data parts (default: peers.count); peers joining later "
                              "take the parts beyond the initial peers")

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str) -> str:
        from . import data

        return _registered(data.registry, value)

    @field_validator("partition")
    @classmethod
    def _partition(cls, value: str) -> str:
        from . import data

        return _registered(data.partition_registry, value)


class PeersSection(_Section):
    count: int = Field(4, ge=1)
    functions: int = Field(4, ge=1, description="gradient functions per peer per round (K)")
    batch_size: int = Field(64, ge=1)
    server: str = Field("valkey", description="valkey, redis, or a server binary path")
    urls: list[str] = Field(default_factory=list, description="databases of already running servers, one per peer")
    persistence: bool = Field(False, description="AOF with fsync on every write: a restarted database "
                              "resumes from its last completed round")
    unix_socket: bool = Field(True, description="started servers listen on unix sockets (faster than TCP loopback)")
    mode: Literal["process", "thread"] = Field(
        "process", description="peer orchestrators as separate processes (default) or threads of one process"
    )
    placement: Literal["local", "ray"] = Field(
        "local", description="where peers run: on this host (local), or each a Ray actor on a node of a Ray "
        "cluster, its database on that node (ray; see spirt.placement)")
    ray_address: str | None = Field(None, description="placement = ray: the cluster to join ('auto': the one "
                                    "this machine is part of; None: start a Ray instance on this machine)")
    ray_max_restarts: int = Field(1, ge=0, description="placement = ray: how often Ray restarts a peer's actor "
                                  "that died with its node (it rejoins the training by state transfer)")


class OptimSection(_Section):
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum of the SGD step applied to the aggregate")
    weight_decay: float = Field(0.0, ge=0)
    peer_momentum: float = Field(
        0.0, ge=0, lt=1,
        description="beta of peer (worker) momentum: each peer publishes m = beta*m + (1-beta)*average instead "
                    "of its average (0: off). Shrinks the spread between honest vectors that Byzantine "
                    "attacks hide in; usually combined with momentum = 0",
    )


class AggregationSection(_Section):
    backend: str = Field("module", description="where a peer aggregates (spirt.backends.names())")
    defense: str = Field("mean", description="the aggregation rule, a registered aggregator (defenses.names())")
    params: dict[str, Any] = Field(default_factory=dict, description="hyperparameters of the defense")
    pre: list[str] = Field(default_factory=list, description="pre-aggregators applied before the defense")

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        from . import backends

        return _one_of(value, backends.names())

    @field_validator("defense")
    @classmethod
    def _defense(cls, value: str) -> str:
        import defenses

        return _registered(defenses.registry, value, defenses.names("aggregator"))

    @field_validator("pre")
    @classmethod
    def _pre(cls, value: list[str]) -> list[str]:
        import defenses

        return [_registered(defenses.registry, v, defenses.names("preaggregator")) for v in value]

    @model_validator(mode="after")
    def _rule(self) -> AggregationSection:
        """Build the rule as the peers will, so that its parameter checks run now."""
        import defenses

        try:
            rule = defenses.get(self.defense, **self.params)
        except (TypeError, ValueError) as exc:
            raise _field_error("params", str(exc)) from None
        if self.pre:
            try:
                defenses.compose(self.pre, rule)
            except (TypeError, ValueError) as exc:
                raise _field_error("pre", str(exc)) from None
        return self


class ExecutorSection(_Section):
    kind: str = Field("process", description="where gradient functions run (spirt.executors.names())")
    workers: int = Field(2, ge=1, description="warm worker processes per peer (process executor)")
    pin_cpus: bool = Field(True, description="pin each peer's workers to its own share of the host's CPUs "
                           "(round-robin by peer index; process executor; only when the pools spread evenly "
                           "over the CPUs), so co-located peers compute at the same pace and reach the "
                           "barrier together")
    retries: int = Field(2, ge=0)
    timeout_s: float = Field(60.0, gt=0)

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        from . import executors

        return _one_of(value, executors.names())


class BarrierSection(_Section):
    timeout_s: float = Field(10.0, gt=0, description="deadline for the other peers' averages of a round")


class MembershipSection(_Section):
    heartbeat_s: float = Field(1.0, gt=0, description="liveness advertised every interval; a dead peer is "
                               "detected within 2 intervals")
    max_misses: int = Field(3, ge=1, description="missed barriers before a peer is removed from the membership")
    join_timeout_s: float = Field(120.0, gt=0, description="how long a joining peer waits for state transfer")
    db_recovery_s: float = Field(30.0, gt=0, description="how long a peer waits for its own restarted database")
    quorum_timeout_s: float = Field(300.0, gt=0, description="how long a peer without a quorum (a strict "
                                    "majority of the group reachable) waits before it gives up")


class AttackSection(_Section):
    name: str | None = Field(None, description="the attack of the Byzantine peers (attacks.names())")
    byzantine: int = Field(0, ge=0, description="number of Byzantine peers (the last ones)")
    params: dict[str, Any] = Field(default_factory=dict, description="hyperparameters of the attack")

    @field_validator("name")
    @classmethod
    def _attack(cls, value: str | None) -> str | None:
        if value is None:
            return None
        import attacks

        return _registered(attacks.registry, value)

    @model_validator(mode="after")
    def _build(self) -> AttackSection:
        """Build the attack as the peers will, so that its parameter checks run now. A peer adds its own
        ``seed`` when the attack takes one and ``params`` has none; every seed it adds is valid, so building
        without it decides the same."""
        if self.name is None:
            if self.params:
                raise _field_error("params", "given without attack.name")
            return self
        import attacks

        if "defense" in self.params and getattr(attacks.registry.cls(self.name), "needs_defense", False):
            # the peers hand such an attack the rule they run; a second one here would contradict it
            raise _field_error("params", f"{self.name} is tuned against the rule the peers run: set it with "
                               "aggregation.defense, .params and .pre, not attack.params.defense")
        try:
            attacks.get(self.name, **self.params)
        except (TypeError, ValueError) as exc:
            raise _field_error("params", str(exc)) from None
        return self


class SecuritySection(_Section):
    enabled: bool = Field(False, description="identities, admission, database ACLs, signed updates, input checks")
    group: str = Field("spirt", min_length=1, description="group name, bound into every signature")
    keys_dir: str | None = Field(None, description="peer-<i>.key files and the group's allow-list.json / ca.pub")
    sign_updates: bool = Field(True, description="sign published averages; verify them before aggregation")
    max_clock_skew_s: float = Field(30.0, gt=0, description="accepted clock difference in admission responses")
    admission_timeout_s: float = Field(60.0, gt=0, description="how long a peer waits to admit and be admitted")
    require_tls: bool | None = Field(None, description="refuse plain connections and servers without TLS support; "
                                     "default: on whenever TLS certificates are configured (tls_*_file, or "
                                     "tls/ in the peers' key folders)")
    inbox_guard: bool = Field(True, description="other peers write into our inbox only through TENSOR.PUSH, "
                              "which bounds what each can keep there (needs the tensor module in every database)")
    max_peers: int = Field(64, ge=1, le=4096, description="in a group with a CA: the pre-admission area is open "
                           "for peer indices below this (with an allow-list: for the indices on it)")
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None
    session: str | None = Field(None, pattern=r"^[0-9a-f]{32}$", description="set by the launcher, fresh per "
                                "run: bound into the passwords peers derive for each other's databases")
    launcher_password_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="set by the launcher: its read-only user in every database")

    def _tls_in_key_folders(self) -> bool:
        return bool(self.keys_dir) and any(Path(self.keys_dir).glob("peer-*/tls/client.crt"))

    @model_validator(mode="after")
    def _checks(self) -> SecuritySection:
        if self.enabled and not self.keys_dir:
            raise ValueError("security.keys_dir is required when security.enabled is true")
        tls = [self.tls_cert_file, self.tls_key_file, self.tls_ca_file]
        if any(tls) and not all(tls):
            raise ValueError("security.tls_cert_file, tls_key_file and tls_ca_file go together")
        if self.require_tls and not all(tls) and not self._tls_in_key_folders():
            raise ValueError("security.require_tls needs TLS certificates: security.tls_cert_file, tls_key_file "
                             "and tls_ca_file, or key folders with tls/ (spirt keys DIR --tls)")
        return self


class Config(_Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    peers: PeersSection = Field(default_factory=PeersSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    aggregation: AggregationSection = Field(default_factory=AggregationSection)
    executor: ExecutorSection = Field(default_factory=ExecutorSection)
    barrier: BarrierSection = Field(default_factory=BarrierSection)
    membership: MembershipSection = Field(default_factory=MembershipSection)
    attack: AttackSection = Field(default_factory=AttackSection)
    security: SecuritySection = Field(default_factory=SecuritySection)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.peers.urls and len(self.peers.urls) != self.peers.count:
            raise _field_error("peers.urls", f"{len(self.peers.urls)} entries but peers.count is {self.peers.count}")
        if self.attack.byzantine >= self.peers.count:
            raise _field_error("attack.byzantine", f"{self.attack.byzantine} must be below peers.count ({self.peers.count})")
        if self.data.parts is not None and self.data.parts < self.peers.count:
            raise _field_error("data.parts", f"{self.data.parts} must be at least peers.count ({self.peers.count})")
        if self.attack.byzantine and not self.attack.name:
            raise _field_error("attack.name", "attack.byzantine > 0 needs an attack")
        self._defense_fits()
        return self

    @property
    def max_group(self) -> int:
        """How many peer indices the group can have: the list's, and those of the peers joining from beyond
        it, which take the data parts after the list's. A value another peer writes may name a member we
        have not heard of yet (it joined while we were away), but none beyond this."""
        return max(self.peers.count, self.data.parts or 0)

    @property
    def byzantine_bound(self) -> int:
        """f: how many Byzantine members the group is configured to tolerate, the defense's ``f``. State
        transfer and catching up need f + 1 peers to agree; the aggregation rule bounds their influence."""
        return int(self.aggregation.params.get("f", 0))

    def _defense_fits(self) -> None:
        """The rule's (n, f) condition with every peer's vector in: a run that breaks it would fail at
        its first aggregation, so it is refused now. (A round that has fewer vectors, after exclusions,
        is checked again when it aggregates.)"""
        import defenses

        a = self.aggregation
        rule = defenses.get(a.defense, pre=a.pre or None, **a.params)
        try:
            rule.check(self.peers.count)
        except ValueError as exc:
            raise _field_error("aggregation.defense", f"{exc} with peers.count = {self.peers.count}") from None


def _format(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "field_error":
            loc = f"{loc}.{err['ctx']['field']}" if loc else err["ctx"]["field"]
        loc = loc or "(config)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "literal_error":
            msg = f"got {err.get('input')!r}; allowed: {err['ctx']['expected']}"
        lines.append(f"  {loc}: {msg}")
    return ConfigError(f"invalid configuration in {source}:\n" + "\n".join(lines))


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "peers.count", 8)``: one override of the nested dict ``d``."""
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {p} is not a section")
    node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"peers.count=8"`` -> ("peers.count", 8); the value is read as TOML (falls back to a string)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        if p.suffix == ".json":  # what Config.model_dump_json writes: one file a launcher hands every host
            try:
                data = json.loads(p.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{p}: not valid JSON: {exc}") from exc
            if not isinstance(data, dict):
                raise ConfigError(f"{p}: a configuration is a JSON object, not {type(data).__name__}")
        else:
            try:
                data = tomllib.loads(p.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
        source = str(p)
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _format(exc, source) from None
