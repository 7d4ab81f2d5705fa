"""Peers placed on a Ray cluster (``peers.placement = "ray"``).

Each peer is a Ray actor. It starts its database server on its own node, listening on the node's
address, and runs the peer's orchestrator there: the entry point :func:`spirt.peer.peer_main` that
``spirt run`` and ``spirt peer`` start. With ``executor.kind = "ray"`` its gradient functions are Ray
tasks that prefer that node (soft node affinity, see :class:`spirt.executors.RayExecutor`), so gradients
travel to their peer's database over the node's loopback, not across the cluster. Peers are spread
over the alive nodes round-robin, by peer index.

Peers are pinned to their nodes (hard node affinity: Ray's soft affinity and SPREAD strategy do not
keep peers apart reliably), spread over the alive nodes round-robin by peer index.

A node that goes away takes its peers' actors and databases with it. The other peers exclude them as
crashed peers and go on. A peer's process that dies on a live node is restarted there by Ray
(``max_restarts``); a peer whose node is gone is replaced by the launcher with a new actor on another
alive node. Either way, up to ``peers.ray_max_restarts`` times per peer, the launcher calls its training
again, and the peer, knowing it is a restart, starts a fresh database and joins the running training by
state transfer, as a newcomer does. The others follow a member at the address they first learnt only (a
join request cannot redirect their traffic), so the restarted peer takes its old address back where its
node has it (the same node; the nodes of a one-machine test cluster); a peer restarted on a node with
another address stays out, and the others' events say so. Metrics and events stay in the peers'
databases and are collected at the end from the addresses the actors hold then; what a lost database
held is lost with it, and the run says which peers are missing.

On a real cluster: ``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on the others,
then ``spirt run CONFIG --set peers.placement='"ray"' --set peers.ray_address='"auto"'`` on any of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pandas as pd

from .config import Config

__all__ = ["run_on_ray", "PeerActor"]

#: how long an actor that died may wait for its node to be declared dead (then it is replaced elsewhere)
#: before it counts as dead on a live node; Ray's health checks declare a node dead within ~30 s
DEAD_NODE_S = 45.0


class PeerActor:
    """One peer on a Ray node: its database server and its orchestrator (a Ray actor class; see
    :func:`run_on_ray`)."""

    def __init__(self, cfg_json: str, index: int, replacement: bool = False):
        import ray

        from .backends import needs_module
        from .servers import start_server

        self.cfg_json, self.index = cfg_json, index
        cfg = Config.model_validate_json(cfg_json)
        # restarted by Ray (its process died), or a new actor in place of one whose node is gone
        self.restarted = replacement or ray.get_runtime_context().was_current_actor_reconstructed
        self.server = start_server(cfg.peers.server, module=needs_module(cfg.aggregation.backend),
                                   host=ray.util.get_node_ip_address())

    def where(self) -> tuple[str, str]:
        """(database URL, node id)."""
        import ray

        return self.server.url, ray.get_runtime_context().get_node_id()

    def train(self, urls: list[str], start_key: str) -> dict:
        """Train as peer ``index`` of the group whose databases are ``urls``; a restarted actor joins the
        running training under its new database instead (see the module docstring)."""
        from .host import own_results
        from .peer import peer_main
        from .servers import make_client

        urls = list(urls)
        if self.restarted:
            self._take_back(urls[self.index])
        urls[self.index] = self.server.url
        if self.restarted:
            peer_main(self.cfg_json, self.index, urls, None, join=True)
        else:
            peer_main(self.cfg_json, self.index, urls, start_key)
        db = make_client(url=self.server.url, socket_timeout=30)
        try:
            return {**own_results(db, self.index), "restarted": self.restarted, "url": self.server.url}
        finally:
            db.close()

    def _take_back(self, url: str) -> None:
        """A restarted actor on a node with the address its database had (a restarted process, or a node of
        one machine's test cluster) takes that address back: the others follow a member at the address
        they first learnt only (a join request cannot redirect their traffic for a known member), so at
        another address it could not rejoin."""
        from urllib.parse import urlsplit

        from .backends import needs_module
        from .servers import ServerError, start_server

        old = urlsplit(url)
        if old.hostname != self.server.host or old.port == self.server.port:
            return
        cfg = Config.model_validate_json(self.cfg_json)
        try:
            again = start_server(cfg.peers.server, module=needs_module(cfg.aggregation.backend),
                                 host=self.server.host, port=old.port)
        except ServerError:  # the port is taken: keep the new address (and stay out, said by the others)
            return
        self.server.stop()
        self.server = again

    def stop(self) -> None:
        self.server.stop()


def _bring_back(ray, i: int, actors: list, placed: list, start, timeout_s: float) -> bool:
    """Peer ``i``'s actor failed: wait until Ray has restarted it on its node, or, once its node is gone,
    start a new actor for it on the alive node with the fewest peers. True when it answers again
    (``actors[i]`` and ``placed[i]`` are then its actor and its (URL, node))."""
    deadline = time.monotonic() + timeout_s
    died = None
    while time.monotonic() < deadline:
        alive = _nodes(ray)
        if placed[i][1] not in alive:  # the node is gone (Ray's health checks take a few seconds to say so)
            ray.kill(actors[i], no_restart=True)
            load = {n: sum(p[1] == n for k, p in enumerate(placed) if k != i) for n in alive}
            if not load:
                return False
            actors[i] = start(i, min(load, key=lambda n: (load[n], n)), replacement=True)
            placed[i] = ray.get(actors[i].where.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return True
        try:
            ray.get(actors[i].where.remote(), timeout=5)
            return True
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):  # restarting, or its
            time.sleep(0.5)  # node is going
        except ray.exceptions.RayError:  # dead: no restarts left, or its node is going (said soon)
            died = died if died is not None else time.monotonic()
            if time.monotonic() - died > DEAD_NODE_S:
                return False
            time.sleep(0.5)
    return False


def _nodes(ray) -> list[str]:
    """The alive nodes that can run a peer, in a stable order."""
    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))


def run_on_ray(cfg: Config, *, timeout_s: float | None = None,
               on_placed: Callable[[list[str], list[str]], None] | None = None) -> pd.DataFrame:
    """Train ``cfg`` with every peer a Ray actor (see the module docstring); returns the per-round metrics
    as :func:`spirt.runner.run_training` does, with ``attrs["missing"]``: peers whose databases were
    lost (their metrics are not in the table) and ``attrs["placement"]``: each peer's node and whether
    Ray restarted it. ``on_placed(urls, nodes)`` is called once every peer's database is up, before the
    training starts (to watch or disturb a run)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .host import collect
    from .keys import START_KEY, Keys
    from .servers import make_client

    if cfg.security.enabled:
        raise ValueError("peers.placement = 'ray' runs open groups only (security.enabled = false)")
    owns = not ray.is_initialized()
    if owns:
        ray.init(address=cfg.peers.ray_address, include_dashboard=False, log_to_driver=False)
    actors: list = []
    try:
        nodes = _nodes(ray)
        # a lost actor's training call is submitted again from here (not retried by Ray, which could run
        # it twice), once it answers again
        cls = ray.remote(num_cpus=0, max_restarts=cfg.peers.ray_max_restarts, max_task_retries=0)(PeerActor)
        cfg_json = cfg.model_dump_json()

        def start(i: int, node: str, replacement: bool = False):
            pin = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
            return cls.options(scheduling_strategy=pin).remote(cfg_json, i, replacement)

        actors += [start(i, nodes[i % len(nodes)]) for i in range(cfg.peers.count)]
        placed = ray.get([a.where.remote() for a in actors], timeout=300)
        urls = [u for u, _ in placed]
        if on_placed is not None:
            on_placed(urls, [n for _, n in placed])
        c0 = make_client(url=urls[0], socket_timeout=10)
        try:
            c0.delete(START_KEY)
            runs = [a.train.remote(urls, START_KEY) for a in actors]
            deadline = time.monotonic() + 300
            clients = [make_client(url=u, socket_timeout=5) for u in urls]
            while not all(c.exists(Keys(i).up) for i, c in enumerate(clients)):
                ready, _ = ray.wait(runs, timeout=0)
                if ready:
                    ray.get(ready)  # a peer that failed before it was up fails the run with its error
                if time.monotonic() > deadline:
                    raise TimeoutError("the peers were not up within 300 s")
                time.sleep(0.05)
            for c in clients:
                c.close()
            c0.set(START_KEY, 1)
        finally:
            c0.close()
        results: dict[int, dict | str] = {}
        t0 = time.monotonic()
        left = lambda: None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - t0))  # noqa: E731
        restarts = dict.fromkeys(range(len(actors)), cfg.peers.ray_max_restarts)
        pending = dict(zip(runs, range(len(runs)), strict=True))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left())
            if not ready:
                raise TimeoutError(f"training did not finish within {timeout_s} s")
            i = pending.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # its node went away, or it failed
                results[i] = f"{type(exc).__name__}: {str(exc)[:300]}"
                if restarts[i] > 0:
                    restarts[i] -= 1
                    if _bring_back(ray, i, actors, placed, start, min(300.0, left() or 300.0)):
                        pending[actors[i].train.remote(urls, START_KEY)] = i
        # collect from the databases the actors hold now (a restarted actor has a new one)
        final = ray.get([a.where.remote() for a in actors], timeout=60) if all(
            isinstance(r, dict) for r in results.values()) else []
        urls_now = [u for u, _ in final] if final else [r["url"] if isinstance(r, dict) else urls[i]
                                                        for i, r in sorted(results.items())]
        df, missing = collect(cfg.model_copy(update={"peers": cfg.peers.model_copy(update={"urls": urls_now})}))
        df.attrs["missing"] = missing
        df.attrs["placement"] = {i: {"node": placed[i][1], "result": results[i],
                                     "restarts": cfg.peers.ray_max_restarts - restarts[i]}
                                 for i in range(cfg.peers.count)}
        return df
    finally:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)  # its database server dies with its process
            except Exception:  # noqa: BLE001 - already gone
                pass
        if owns:
            ray.shutdown()
