"""A peer's event log: membership, fault and security events, as JSON lines in its own database.

Every exclusion, removal, re-admission, rejection, resynchronisation and recovery is an event here (and
a log line), so that a run that ended wrong says so in its reports. Each record carries the wall time
``t``, the round, the peer that saw it (``peer``) and the peer it is about (``about``).
"""

from __future__ import annotations

import json
import logging
import time

import redis

log = logging.getLogger("spirt.peer")

#: an event's detail is cut to this many characters (an error message can be long); whoever reads the
#: log back refuses longer ones (spirt.rows)
MAX_DETAIL = 8192


class EventLog:
    """Appends events to ``key`` (``Keys(p).events``) in peer ``index``'s database."""

    def __init__(self, db: redis.Redis, key: str, index: int):
        self.db, self.key, self.index = db, key, index

    def __call__(self, r: int, event: str, about: int, detail: str = "", t: float | None = None) -> None:
        rec = {"t": time.time() if t is None else t, "round": r, "peer": self.index, "event": event,
               "about": about, "detail": detail[:MAX_DETAIL]}
        log.info("peer %s round %s: %s peer %s %s", self.index, r, event, about, detail)
        try:
            self.db.rpush(self.key, json.dumps(rec))
        except redis.RedisError:
            pass  # our own database is down: the orchestrator notices on its own and logs the recovery
