"""Network links between peers as user-space TCP proxies, to cut, heal and slow them without root.

Each ordered pair (p, q) gets its own link: a proxy that peer p's orchestrator uses to reach peer q's
database. A link is ``up`` (bytes flow, after an optional one-way delay) or ``cut`` (a silent partition:
bytes are swallowed in both directions, as by a dropped route; connections stay open and new ones are
accepted, so the peer sees timeouts, not refusals). Healing closes the connections that lost bytes
(their protocol stream is broken), so clients reconnect cleanly.

Cutting p -> q alone is a one-way partition: p cannot reach q's database, while q still reaches p's.
The nemeses of :class:`Links` (after Jepsen's) build on that: cut a pair both ways, isolate one peer,
split into halves (or a majority and a minority), or split with a bridge peer that sees both sides.

All proxies run on one asyncio loop in a daemon thread of the process that owns the links;
:meth:`Links.close` stops them. The kernel here has no netem qdisc, which is why delay lives here too.
"""

from __future__ import annotations

import asyncio
import itertools
import selectors
import threading
from dataclasses import dataclass, field

#: bytes read at once from either side of a proxied connection
CHUNK = 1 << 16


@dataclass
class Link:
    """Peer ``src``'s route to peer ``dst``'s database."""

    src: int
    dst: int
    target: str  # the database: a unix socket path or host:port
    port: int = 0  # where the proxy listens (127.0.0.1)
    cut: bool = False
    delay_s: float = 0.0  # added to every chunk, each way
    #: open connections: writer pairs, and whether the stream lost bytes while cut
    conns: dict[int, list] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"


class Links:
    """A link for every ordered pair of ``targets`` (peer -> its database: unix socket path or
    ``host:port``). Use as a context manager, or call :meth:`close`."""

    def __init__(self, targets: dict[int, str]):
        self.targets = dict(targets)
        self.links = {(p, q): Link(p, q, targets[q]) for p in targets for q in targets if p != q}
        self._ids = itertools.count()
        # select(2) takes its timeout in microseconds, epoll in milliseconds: with epoll every delay shorter
        # than a millisecond would round up to one (a 0.5 ms round trip would become 2 ms)
        self._loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        self._servers: list[asyncio.base_events.Server] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="links", daemon=True)
        self._thread.start()
        self._call(self._listen_all())

    def __enter__(self) -> Links:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- routes ------------------------------------------------------------------------------------
    def urls_for(self, p: int, own: dict[int, str]) -> list[str | None]:
        """Peer p's view of the group: its own database directly (``own[p]``), every other one through
        its link."""
        n = max(self.targets) + 1
        return [own[p] if q == p else (self.links[p, q].url if (p, q) in self.links else None) for q in range(n)]

    # -- nemeses -----------------------------------------------------------------------------------
    def cut_one_way(self, src: int, dst: int) -> None:
        """``src`` can no longer reach ``dst``'s database (``dst`` still reaches ``src``'s)."""
        self._call(self._set_cut(self.links[src, dst], True))

    def cut(self, a: int, b: int) -> None:
        """Neither of a and b reaches the other's database."""
        self.cut_one_way(a, b)
        self.cut_one_way(b, a)

    def isolate(self, p: int) -> None:
        for q in self.targets:
            if q != p:
                self.cut(p, q)

    def split(self, *sides: list[int]) -> None:
        """Cut every pair of peers on different sides (halves, or a majority and a minority)."""
        for i, a in enumerate(sides):
            for b in sides[i + 1:]:
                for p in a:
                    for q in b:
                        self.cut(p, q)

    def bridge(self, left: list[int], bridge: int, right: list[int]) -> None:
        """Two sides that cannot reach each other, and a ``bridge`` peer (on neither) that reaches both."""
        if bridge in left or bridge in right:
            raise ValueError(f"the bridge peer {bridge} is on a side")
        self.split(left, right)

    def heal(self) -> None:
        """Every link up again."""
        for link in self.links.values():
            self._call(self._set_cut(link, False))

    def delay(self, src: int, dst: int, seconds: float) -> None:
        """Add ``seconds`` each way on the link src -> dst (a delay line: latency, not a throughput cap;
        sub-millisecond delays hold, see the event loop's selector). Applies to connections that carry
        bytes after the call."""
        self.links[src, dst].delay_s = seconds

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._close_all(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    # -- the proxies (on the loop) -----------------------------------------------------------------
    def _call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen_all(self) -> None:
        for link in self.links.values():
            server = await asyncio.start_server(lambda r, w, link=link: self._serve(link, r, w), "127.0.0.1", 0)
            link.port = server.sockets[0].getsockname()[1]
            self._servers.append(server)

    async def _open_target(self, target: str):
        if target.startswith("/"):
            return await asyncio.open_unix_connection(target)
        host, _, port = target.rpartition(":")
        return await asyncio.open_connection(host, int(port))

    async def _serve(self, link: Link, client_r, client_w) -> None:
        cid = next(self._ids)
        try:
            server_r, server_w = await self._open_target(link.target)
        except OSError:
            client_w.close()
            return
        state = [client_w, server_w, False]
        link.conns[cid] = state
        try:
            await asyncio.gather(self._pump(link, state, client_r, server_w),
                                 self._pump(link, state, server_r, client_w))
        finally:
            link.conns.pop(cid, None)
            for w in (client_w, server_w):
                w.close()

    async def _pump(self, link: Link, state: list, reader, writer) -> None:
        """Copy one direction of a connection. With a delay, the bytes go through a delay line: each chunk
        is due ``delay_s`` after it was read and the reader goes on meanwhile, so the link adds latency
        without capping its throughput (sleeping before each write would allow one chunk per delay)."""
        line: asyncio.Queue | None = None
        deliver = None
        try:
            while data := await reader.read(CHUNK):
                if link.delay_s and line is None:
                    line = asyncio.Queue()
                    deliver = asyncio.ensure_future(self._deliver(link, state, line, writer))
                if line is not None:
                    line.put_nowait((asyncio.get_running_loop().time() + link.delay_s, data))
                elif not self._cut(link, state):
                    writer.write(data)
                    await writer.drain()
            if line is not None:
                line.put_nowait(None)
                await deliver
        except (ConnectionError, OSError):
            pass
        finally:
            if deliver is not None and not deliver.done():
                deliver.cancel()
            for w in state[:2]:
                w.close()

    async def _deliver(self, link: Link, state: list, line: asyncio.Queue, writer) -> None:
        """The far end of a delay line: write each chunk once it is due, in order."""
        loop = asyncio.get_running_loop()
        while (item := await line.get()) is not None:
            due, data = item
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not self._cut(link, state):
                writer.write(data)
                await writer.drain()

    @staticmethod
    def _cut(link: Link, state: list) -> bool:
        """Whether bytes are swallowed now: the link is cut, or was while this stream was open (it is
        broken for good then)."""
        if link.cut or state[2]:
            state[2] = True
        return state[2]

    async def _set_cut(self, link: Link, cut: bool) -> None:
        link.cut = cut
        if not cut:  # a stream that lost bytes cannot be resumed: close it, the client reconnects
            for state in list(link.conns.values()):
                if state[2]:
                    for w in state[:2]:
                        w.close()

    async def _close_all(self) -> None:
        for server in self._servers:
            server.close()
        for link in self.links.values():
            for state in list(link.conns.values()):
                for w in state[:2]:
                    w.close()
        for server in self._servers:
            await server.wait_closed()
        # the connections' tasks end here (their streams see the closes), not with the loop, which would
        # warn of tasks destroyed while pending
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=2)
