"""Quotas on what a member can write into another peer's database. A guarded inbox takes TENSOR.PUSH
only: for the open rounds, of the exact sizes, with a time to live, and a wake-up list trimmed by the
server. What one member can keep there is bounded (:func:`spirt.security.context.member_budget`). Each
attack is mounted on a real server, on Valkey and on Redis; each fails if the guard is off."""

from __future__ import annotations

import numpy as np
import pytest
import redis
from test_security_peer import _admitted_peers, _cfg

from spirt.exchange import NOTIFY_KEEP, ROUND_KEY_TTL_MS
from spirt.keys import Keys
from spirt.security.context import INBOX_AHEAD, KEY_OVERHEAD, member_budget, value_allocation, value_limit
from spirt.security.identity import make_group
from spirt.security.signing import ENVELOPE_BYTES, sign_update
from spirt.servers import start_server

PUSH = "TENSOR.PUSH"
INBOX, NOTIFY = "{p0}:in:1", "{p0}:notify:1"


def _open(c, lo=3, hi=5, width=8, envelope=4, ttl=60_000, keep=3):
    return c.execute_command("TENSOR.INBOX", "WIDTH", width, "ENVELOPE", envelope, "ROUNDS", lo, hi, "TTL", ttl,
                             "KEEP", keep)


def test_the_inbox_takes_pushes_for_open_rounds_of_exact_sizes_only(server_flavor):
    with start_server(server_flavor) as srv:
        c = srv.client()
        with pytest.raises(redis.ResponseError, match="closed"):  # a (re)started server takes nothing
            c.execute_command(PUSH, INBOX, NOTIFY, 3, b"\1" * 8, b"env!")
        for bad, match in [({"width": 6}, "WIDTH"), ({"lo": 5, "hi": 3}, "ROUNDS"), ({"lo": 0, "hi": 64}, "ROUNDS"),
                           ({"keep": 0}, "KEEP"), ({"ttl": 0}, "TTL"), ({"envelope": 70_000}, "ENVELOPE")]:
            with pytest.raises(redis.ResponseError, match=match):
                _open(c, **bad)
        assert _open(c) == b"OK"
        settings = c.execute_command("TENSOR.INBOX")
        assert dict(zip(settings[::2], settings[1::2], strict=True))[b"hi"] == 5
        refused = {
            "round before": (2, b"\1" * 8, b"env!"), "round after": (6, b"\1" * 8, b"env!"),
            "leading zero": ("03", b"\1" * 8, b"env!"), "negative": ("-1", b"\1" * 8, b"env!"),
            "sign": ("+3", b"\1" * 8, b"env!"), "not a number": ("3x", b"\1" * 8, b"env!"),
            "long vector": (3, b"\1" * 12, b"env!"), "short vector": (3, b"\1" * 4, b"env!"),
            "no envelope": (3, b"\1" * 8, None), "long envelope": (3, b"\1" * 8, b"env!!"),
        }
        for what, (r, vec, env) in refused.items():
            with pytest.raises(redis.ResponseError):
                c.execute_command(PUSH, INBOX, NOTIFY, r, vec, *(() if env is None else (env,)))
            assert c.dbsize() == 0, what  # checked in full before anything is written
        for r in (3, 4, 5, 5, 4, 3, 5):
            assert c.execute_command(PUSH, INBOX, NOTIFY, r, bytes([r]) * 8, b"env!") == b"OK"
        assert sorted(c.keys("*")) == sorted([f"{INBOX}:{r}{s}".encode() for r in (3, 4, 5) for s in ("", ":sig")]
                                             + [NOTIFY.encode()])
        assert c.get(f"{INBOX}:4") == b"\4" * 8 and c.get(f"{INBOX}:4:sig") == b"env!"
        assert c.lrange(NOTIFY, 0, -1) == [b"4", b"3", b"5"]  # the last KEEP announcements
        assert all(0 < c.pttl(k) <= 60_000 for k in c.keys("*"))
        c.delete(NOTIFY)
        c.set(NOTIFY, b"not a list")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            c.execute_command(PUSH, INBOX, NOTIFY, 4, b"\7" * 8, b"env!")
        assert c.get(f"{INBOX}:4") == b"\4" * 8


def test_a_member_cannot_flood_a_guarded_database(tmp_path, server_flavor):
    """The attack: an admitted member writes 300 values of 1.5 MB under its inbox pattern and 100
    announcements in one RPUSH (+461 MB before). Behind the guard every raw write is refused, and the
    most it can keep through TENSOR.PUSH (every round it can, the longest announcements list, its join
    request at the value limit) stays within the member budget."""
    make_group(tmp_path, 2, "g")
    servers = [start_server(server_flavor) for _ in range(2)]
    peers = []
    try:
        peers = _admitted_peers(_cfg(tmp_path), servers)
        p0, p1 = peers
        c, K = p1.members[0].client, Keys(0)
        width = p0.width
        before = p0.db.info("memory")["used_memory"]
        keys_before = set(p0.db.scan_iter())
        big = b"\0" * (3 * (1 << 19))
        for attempt in [lambda: c.set(K.incoming(1, 7), big), lambda: c.set(K.envelope(1, 7), big),
                        lambda: c.rpush(K.notify(1), *range(100)), lambda: c.set(K.notify(1), big),
                        lambda: c.set(K.inbox(1), big), lambda: c.set(K.incoming(1, 0), b"\0" * width)]:
            with pytest.raises(redis.RedisError):
                attempt()
        vec = np.ones(width // 4, dtype="<f4").tobytes()
        accepted = 0
        for r in range(300):
            try:
                c.execute_command(PUSH, K.inbox(1), K.notify(1), r, vec, sign_update(p1.guard.identity, "g", r, vec))
                accepted += 1
            except redis.ResponseError:
                pass
        assert accepted == INBOX_AHEAD + 1  # rounds 0 .. INBOX_AHEAD are open before the first round
        for _ in range(NOTIFY_KEEP + 200):
            c.execute_command(PUSH, K.inbox(1), K.notify(1), 1, vec, sign_update(p1.guard.identity, "g", 1, vec))
        c.set(K.join(1), b"\0" * (value_limit(width) - 64))
        with pytest.raises(redis.RedisError):
            c.set(K.join(1), b"\0" * (value_limit(width) + 1))
        added = p0.db.info("memory")["used_memory"] - before
        budget = member_budget(width, signed=True)
        assert p0.db.llen(K.notify(1)) == NOTIFY_KEEP
        assert len(list(p0.db.scan_iter(match=K.inbox_pattern(1)))) == 2 * (INBOX_AHEAD + 1)
        assert 0 < p0.db.pttl(K.incoming(1, 0)) <= ROUND_KEY_TTL_MS
        new = set(p0.db.scan_iter()) - keys_before
        theirs = set(p0.db.scan_iter(match=K.inbox_pattern(1))) | {K.notify(1).encode(), K.join(1).encode()}
        assert new <= theirs, sorted(new - theirs)  # nothing it wrote landed outside its own keys
        # what its keys hold, by the server's own count of each key's allocations (exact, unlike the
        # growth of used_memory, which moves with client buffers and the server's cron)
        kept = sum(p0.db.memory_usage(k, samples=0) for k in theirs)
        print(f"[{server_flavor}] width {width} B: a flooding member keeps {kept} B in its keys (used_memory "
              f"+{added} B); budget {budget} B")
        assert kept <= budget, (kept, budget)
        # nothing is kept elsewhere either; a client's query buffer may still hold one value until the cron
        assert added <= budget + value_limit(width), (added, budget)
        assert ENVELOPE_BYTES < width
    finally:
        for p in peers:
            p.close()
        for s in servers:
            s.stop()


@pytest.mark.parametrize("size", [100, 4096, 20_000, 70_000, 796_840, 1 << 20, (1 << 20) + 1, 1_597_712])
def test_the_member_budget_counts_values_as_the_server_allocates_them(server_flavor, size):
    """:func:`value_allocation` bounds what the server really spends on a value (jemalloc rounds a
    796,840-byte vector up to 917,504 bytes on Redis 7), so the member budget, made of it, holds on
    either server; counting the bytes sent instead falls short by up to a quarter."""
    with start_server(server_flavor, module=False) as srv:
        c = srv.client()
        c.set("{p0}:in:1:3", b"\0" * size, px=60_000)
        used = c.memory_usage("{p0}:in:1:3", samples=0)
        assert size < used <= value_allocation(size) + KEY_OVERHEAD, (size, used, value_allocation(size))
