"""The per-link TCP proxies of spirt.links, against a real database server: a delay adds latency to every
round trip without capping the link's throughput."""

from __future__ import annotations

import time

from spirt.links import Links
from spirt.servers import make_client, start_server


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_delay_is_latency_not_a_throughput_cap():
    with start_server("valkey", module=False) as srv, Links({0: f"127.0.0.1:{srv.port}", 1: "127.0.0.1:1"}) as links:
        c = make_client(url=links.links[1, 0].url, socket_timeout=30)
        try:
            value = b"x" * (8 << 20)  # 128 chunks of the proxy each way
            c.set("k", value)
            fast_ping = min(_timed(c.ping) for _ in range(5))
            links.delay(1, 0, 0.02)
            c.connection_pool.disconnect()  # new connections see the delay from their first byte
            slow_ping = min(_timed(c.ping) for _ in range(5))
            assert slow_ping >= 0.04 > fast_ping, (slow_ping, fast_ping)  # 20 ms each way
            took = _timed(lambda: c.get("k"))
            # a proxy that slept before each chunk would take 128 x 20 ms = 2.6 s for the 8 MB reply
            assert took < 1.0, took
        finally:
            c.close()
