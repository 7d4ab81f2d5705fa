"""Peers placed on a Ray cluster (``peers.placement = "ray"``), on Ray's own multi-node test cluster
(``ray.cluster_utils.Cluster``: a head and worker nodes, each a raylet of its own, on this machine).

Every peer is an actor with its database on its node and its gradient functions as Ray tasks near it.
The group trains exactly as ``spirt run`` trains the same configuration on one host; when a node goes
away mid-run, its peer is excluded like a crashed one, the others finish in agreement, and Ray's restart
of the peer's actor joins the training again by state transfer.
"""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest

from spirt.config import load_config
from spirt.keys import Keys
from spirt.placement import run_on_ray
from spirt.runner import run_training
from spirt.servers import make_client

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

BASE = {"run.eval_every": 4, "run.eval_samples": 300, "model.name": "mlp", "peers.functions": 2,
        "peers.count": 3, "data.limit_train": 4000, "data.limit_test": 300, "executor.kind": "ray",
        "executor.workers": 1, "peers.placement": "ray"}


@pytest.fixture
def cluster():
    """A head and two more nodes, one CPU each (a raylet per node: keep them few on a small machine)."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes = [c.head_node] + [c.add_node(num_cpus=1) for _ in range(2)]
        c.wait_for_nodes()
        ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()


def test_peers_on_three_nodes_train_as_spirt_run(cluster):
    cfg = load_config(None, {**BASE, "run.rounds": 6})
    df = run_training(cfg, progress=False, timeout_s=300)
    placement = df.attrs["placement"]
    assert len({p["node"] for p in placement.values()}) == 3, placement  # one peer per node
    assert df.attrs["missing"] == [] and df.attrs["final_states"] == 1
    reference = run_training(cfg.model_copy(update={"peers": cfg.peers.model_copy(update={"placement": "local"}),
                                                    "executor": cfg.executor.model_copy(update={"kind": "inline"})}),
                             progress=False, timeout_s=300)
    cols = ["round", "peer", "loss", "accuracy"]
    pd.testing.assert_frame_equal(df[cols].sort_values(["round", "peer"], ignore_index=True),
                                  reference[cols].sort_values(["round", "peer"], ignore_index=True), check_exact=True)


def test_a_node_removed_mid_run_is_survived_like_a_crashed_peer(cluster):
    c, nodes = cluster
    # Ray declares the node dead after about 15 s, and the peer must rejoin well before the end. The two
    # survivors' rounds take about 0.017 s here: 1,000 of them ended 0.4 s before it rejoined
    rounds = 2500
    cfg = load_config(None, {**BASE, "run.rounds": rounds, "barrier.timeout_s": 3.0})
    placed: dict = {}
    out: dict = {}

    def train():
        try:
            out["df"] = run_on_ray(cfg, timeout_s=500, on_placed=lambda urls, ids: placed.update(urls=urls, ids=ids))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            out["error"] = exc

    t = threading.Thread(target=train, daemon=True)
    t.start()
    deadline = time.monotonic() + 300
    while "urls" not in placed:
        assert t.is_alive() and time.monotonic() < deadline, f"the peers were not placed: {out}"
        time.sleep(0.2)
    # a peer on a worker node (not the head: the head holds the cluster's control store and the driver)
    by_id = {n.node_id: n for n in nodes}
    victim = next(i for i, n in enumerate(placed["ids"]) if n != c.head_node.node_id)
    node = by_id[placed["ids"][victim]]
    others = [i for i in range(3) if i != victim]
    while _completed(placed["urls"][victim], victim) < 6:  # well into the run
        assert t.is_alive(), f"the run ended before the node could be removed: {out}"
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.2)
    c.remove_node(node, allow_graceful=False)
    t_removed = time.time()
    t.join(500)
    assert not t.is_alive() and "error" not in out, out
    df = out["df"]
    assert len(df) and set(df.attrs["missing"]) <= {victim}, (df.attrs["missing"], df.attrs["placement"])
    survivors = df[df["peer"].isin(others)]
    assert sorted(survivors["round"].unique()) == list(range(rounds))
    assert df.attrs["final_states"] == 1  # every peer that finished (the restarted one too) agrees
    events = df.attrs["events"]
    about_victim = set(events[(events["about"] == victim) & (events["peer"].isin(others))]["event"])
    assert "excluded" in about_victim, about_victim
    result = df.attrs["placement"][victim]["result"]
    assert isinstance(result, dict) and result["restarted"], result  # Ray restarted it; it rejoined
    mine = events[events["peer"] == victim]
    joined = mine[mine["event"] == "joined"]
    assert len(joined), mine  # by state transfer, at the address its database had
    back_at = int(joined["round"].iloc[-1])
    story = events[events["about"].eq(victim) | events["peer"].eq(victim)].assign(t=lambda e: e["t"] - t_removed)
    assert back_at < rounds - 5, f"it rejoined only at round {back_at} of {rounds}:\n{story.to_string()}"
    after = survivors[survivors["round"] > back_at + 1]
    assert (after["peers_aggregated"] == 3).all(), after[["round", "peer", "peers_aggregated"]]  # with it again
    assert df[(df["peer"] == victim)]["round"].max() == rounds - 1  # and it finished with them

def _completed(url: str, index: int) -> int:
    try:
        c = make_client(url=url, socket_timeout=2, connect_timeout=1)
        try:
            v = c.get(Keys(index).completed)
            return -1 if v is None else int(v)
        finally:
            c.close()
    except Exception:  # noqa: BLE001 - not up yet
        return -1
