"""The rows a peer reports about itself, read back from its database: its per-round metrics and events.

A peer keeps them in its own database (``Keys(p).metrics``: one JSON object per round it completed,
:class:`spirt.peer.RoundMetrics`; ``Keys(p).events``: :class:`spirt.events.EventLog`). Whoever reads
them back (``spirt collect`` over the network, the launcher of a one-host run) reads values that peer
wrote, so they are hostile input like anything else a peer writes (:mod:`spirt.wire`): both lists are
parsed strictly, with bounded sizes, the known fields only, their types, and plausible values (rounds
of this training, the row's peer being the database's owner, accuracies in [0, 1], wall times finite;
only a loss may be infinite, as a diverged model's is).

One bad row makes the peer's whole report unusable (a peer that writes one may have written others that
parse but lie): the reader drops that peer's rows, names it and says why (:func:`read_reports`), and
goes on with the others. Nothing here raises anything but :class:`spirt.wire.BadValue`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .keys import Keys
from .wire import BadValue

#: one row's JSON text, at most (an event's detail is a sentence or a list of peers)
MAX_ROW_BYTES = 64 * 1024
#: rows in one list, at most: a metrics row per round (a peer that resumed after a restart may repeat a
#: few), events by the thousand in the longest fault runs
MAX_METRIC_ROWS_PER_ROUND = 4
MAX_EVENT_ROWS = 200_000
#: rows read per LRANGE, so that an oversized list is refused before it is all in memory
CHUNK = 2000
#: a peer index, a count of peers or functions: far above any group this harness runs
MAX_COUNT = 100_000
#: the extra columns of a metrics row: a phase's wall time, ``t_<phase>``
TIME_COLUMN = re.compile(r"t_[a-z_]{1,32}")
EVENT_NAME = re.compile(r"[a-z][a-z_]{0,47}")

Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
#: an event row's columns, in the reports' order
EVENT_COLUMNS = ["t", "round", "peer", "event", "about", "detail"]


class _Row(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class MetricRow(_Row):
    """One round of one peer (:class:`spirt.peer.RoundMetrics`), with ``t_<phase>`` columns."""

    model_config = ConfigDict(strict=True, extra="allow")

    round: Count
    peer: Count
    loss: float
    accuracy: float
    test_loss: float
    functions_ok: Count
    functions_failed: Count
    functions_retried: Count
    peers_aggregated: Count
    peers_excluded: str = Field(max_length=16 * 1024)
    updates_rejected: Count
    members: Count
    byzantine: bool
    wall_begin: float
    wall_end: float


class EventRow(_Row):
    """One event (:class:`spirt.events.EventLog`)."""

    t: float
    round: int = Field(ge=-1)
    peer: Count
    event: str = Field(max_length=48)
    about: int = Field(ge=-1, le=MAX_COUNT)
    detail: str = Field(max_length=32 * 1024)


def _loads(raw: object, what: str) -> dict:
    if not isinstance(raw, bytes | bytearray | str):
        raise BadValue(f"{what} is not a string")
    if len(raw) > MAX_ROW_BYTES:
        raise BadValue(f"{what} of {len(raw)} bytes (at most {MAX_ROW_BYTES})")
    try:
        row = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadValue(f"{what} is not JSON") from None
    if not isinstance(row, dict):
        raise BadValue(f"{what} is not a JSON object")
    return row


def _validated(model: type[_Row], row: dict, what: str) -> _Row:
    try:
        return model.model_validate(row)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "the row"
        raise BadValue(f"{what}: {where}: {first['msg']}") from None


def _plausible_number(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isinf(v) or abs(v) > 1e12:
        raise BadValue(f"{what} is not a finite number (or NaN)")
    return float(v)


def parse_metric_row(raw: object, peer: int, rounds: int, what: str = "metrics row") -> dict:
    """One metrics row peer ``peer`` wrote about itself, as a dict (the columns the reports use).

    >>> row = {"round": 3, "peer": 1, "loss": 0.5, "accuracy": float("nan"), "test_loss": float("nan"),
    ...        "functions_ok": 2, "functions_failed": 0, "functions_retried": 0, "peers_aggregated": 3,
    ...        "peers_excluded": "", "updates_rejected": 0, "members": 3, "byzantine": False,
    ...        "wall_begin": 1.0, "wall_end": 2.0, "t_compute": 0.25}
    >>> parse_metric_row(json.dumps(row), peer=1, rounds=10)["t_compute"]
    0.25
    >>> parse_metric_row(json.dumps({**row, "peer": 2}), peer=1, rounds=10)
    Traceback (most recent call last):
    ...
    spirt.wire.BadValue: metrics row: about peer 2, in peer 1's database
    """
    m = _validated(MetricRow, _loads(raw, what), what)
    if m.peer != peer:
        raise BadValue(f"{what}: about peer {m.peer}, in peer {peer}'s database")
    if m.round >= rounds:
        raise BadValue(f"{what}: round {m.round} is not a round of this training (0 to {rounds - 1})")
    # a loss is any float: a model that diverged (a collapsing defense) has an infinite one
    for name, v in (("wall_begin", m.wall_begin), ("wall_end", m.wall_end)):
        _plausible_number(v, f"{what}: {name}")
    if not (math.isnan(m.accuracy) or 0.0 <= m.accuracy <= 1.0):
        raise BadValue(f"{what}: accuracy {m.accuracy!r} is not in [0, 1]")
    out = m.model_dump(exclude=set(m.model_extra or {}))
    for name, v in (m.model_extra or {}).items():
        if not TIME_COLUMN.fullmatch(name):
            raise BadValue(f"{what}: unknown column {name[:40]!r}")
        out[name] = _plausible_number(v, f"{what}: {name}")
    return out


def parse_event_row(raw: object, peer: int, rounds: int, what: str = "event") -> dict:
    """One event peer ``peer`` logged, as a dict (``t``, ``round``, ``peer``, ``event``, ``about``,
    ``detail``). Its round is -1 (none) to ``rounds`` (the training's end).

    >>> parse_event_row('{"t": 5.0, "round": 2, "peer": 0, "event": "excluded", "about": 1, "detail": "x"}',
    ...                 peer=0, rounds=10)["event"]
    'excluded'
    >>> parse_event_row('{"t": 5.0, "round": 2, "peer": 0, "event": "<b>", "about": 1, "detail": ""}',
    ...                 peer=0, rounds=10)
    Traceback (most recent call last):
    ...
    spirt.wire.BadValue: event: name '<b>' is not a lower-case word
    """
    e = _validated(EventRow, _loads(raw, what), what)
    if e.peer != peer:
        raise BadValue(f"{what}: logged by peer {e.peer}, in peer {peer}'s database")
    if e.round > rounds:
        raise BadValue(f"{what}: round {e.round} is not a round of this training (-1 to {rounds})")
    if not EVENT_NAME.fullmatch(e.event):
        raise BadValue(f"{what}: name {e.event[:48]!r} is not a lower-case word")
    if not math.isfinite(e.t) or e.t < 0:
        raise BadValue(f"{what}: time {e.t!r} is not a wall-clock time")
    return e.model_dump()


def _read_list(db: redis.Redis, key: str, limit: int, what: str) -> list[bytes]:
    """Every item of the list ``key``: refused when it holds more than ``limit``."""
    n = db.llen(key)
    if n > limit:
        raise BadValue(f"{n} {what}s (at most {limit})")
    items: list[bytes] = []
    for start in range(0, n, CHUNK):
        items += db.lrange(key, start, min(n, start + CHUNK) - 1)
    return items


def read_reports(db: redis.Redis, peer: int, rounds: int) -> tuple[list[dict], list[dict]]:
    """(metrics rows, events) peer ``peer`` keeps in its database ``db``, each parsed strictly; raises
    :class:`~spirt.wire.BadValue` naming the first bad row (and ``redis.RedisError`` when the database
    does not answer)."""
    K = Keys(peer)
    metrics = [parse_metric_row(raw, peer, rounds, f"metrics row {i}") for i, raw in
               enumerate(_read_list(db, K.metrics, MAX_METRIC_ROWS_PER_ROUND * rounds, "metrics row"))]
    events = [parse_event_row(raw, peer, rounds, f"event {i}") for i, raw in
              enumerate(_read_list(db, K.events, MAX_EVENT_ROWS, "event"))]
    return metrics, events


def rejected_event(peer: int, reason: str, t: float) -> dict:
    """The event row that says a peer's report was rejected (logged by the reader: ``peer`` -1)."""
    return {"t": t, "round": -1, "peer": -1, "event": "report_rejected", "about": peer,
            "detail": f"peer {peer}'s metrics and events are left out: {reason}"}
