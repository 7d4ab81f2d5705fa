"""Training end to end: P2P rounds through real databases, real torch, real processes."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from spirt.config import ConfigError, load_config
from spirt.data import load_dataset, minibatch_indices, partition
from spirt.keys import Keys
from spirt.models import build_model
from spirt.peer import Peer
from spirt.runner import run_training
from spirt.servers import start_server
from spirt.tensors import FlatParams, from_f32_bytes

SMALL = {
    "run.rounds": 3, "run.eval_every": 3, "run.eval_samples": 200, "data.limit_train": 2000,
    "data.limit_test": 500, "peers.count": 2, "peers.functions": 2, "peers.batch_size": 16,
    "model.name": "cnn", "optim.lr": 0.05, "optim.momentum": 0.9, "optim.weight_decay": 1e-4,
    "peers.mode": "thread", "executor.kind": "inline",
    # no peer is faulty here: generous deadlines, so a loaded machine cannot turn slowness into exclusions
    "barrier.timeout_s": 600, "membership.heartbeat_s": 60,
}


def _centralized(cfg) -> np.ndarray:
    """Plain torch SGD over the same P x K minibatches per round (the reference)."""
    ds = load_dataset(cfg.data.dataset, limit_train=cfg.data.limit_train, limit_test=1)
    parts = partition(ds.train_labels(), cfg.peers.count, cfg.data.partition, cfg.data.alpha, seed=cfg.run.seed)
    model = build_model(cfg.model.name, ds.channels, ds.num_classes, ds.image_size, cfg.run.seed)
    if cfg.optim.peer_momentum > 0:  # the mean of the peers' momenta is torch's dampened momentum
        opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.peer_momentum,
                              dampening=cfg.optim.peer_momentum, weight_decay=cfg.optim.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                              weight_decay=cfg.optim.weight_decay)
    k = cfg.peers.functions
    for r in range(cfg.run.rounds):
        opt.zero_grad()
        for p in range(cfg.peers.count):
            for i in range(k):
                idx = minibatch_indices(parts[p], cfg.peers.batch_size, r, i, cfg.run.seed, functions_per_round=k)
                x, y = ds.batch(idx)
                (F.cross_entropy(model(x), y) / (k * cfg.peers.count)).backward()
        opt.step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()


@pytest.mark.parametrize("peer_momentum", [0.0, 0.8], ids=["server-momentum", "peer-momentum"])
@pytest.mark.parametrize("backend", ["module", "client", "lua"])
def test_p2p_mean_matches_centralized_sgd(backend, peer_momentum):
    # weight decay acts on the aggregate, outside the peers' momentum: off, to compare with torch
    over = {"optim.peer_momentum": peer_momentum, "optim.momentum": 0.0, "optim.weight_decay": 0.0} if peer_momentum else {}
    cfg = load_config(None, {**SMALL, "aggregation.backend": backend, **over})
    servers = [start_server("valkey", module=backend == "module") for _ in range(cfg.peers.count)]
    try:
        urls = [s.url for s in servers]
        peers = [Peer(cfg, i, urls) for i in range(cfg.peers.count)]
        for p in peers:
            p.init_params()
        import threading

        threads = [threading.Thread(target=p.run) for p in peers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        params = []
        for i, s in enumerate(servers):
            params.append(from_f32_bytes(s.client().get(Keys(i).params)))
        for p in peers:
            p.close()
    finally:
        for s in servers:
            s.stop()
    # all peers identical under mean aggregation ...
    np.testing.assert_allclose(params[0], params[1], rtol=0, atol=1e-6)
    # ... and equal to centralized SGD with the same total batch, parameter for parameter
    ref = _centralized(cfg)
    assert params[0].shape == ref.shape
    np.testing.assert_allclose(params[0], ref, rtol=1e-4, atol=2e-5)
    assert np.abs(params[0] - build_flat(cfg)).max() > 1e-3, "the parameters did not move"


def build_flat(cfg) -> np.ndarray:
    ds = load_dataset(cfg.data.dataset, limit_train=1, limit_test=1)
    m = build_model(cfg.model.name, ds.channels, ds.num_classes, ds.image_size, cfg.run.seed)
    return FlatParams(m).params.numpy().copy()


def test_executors_compute_identical_gradients():
    """inline, warm process pool and Ray tasks write bit-identical gradients for the same task."""
    from spirt.executors import make_executor
    from spirt.functions import GradTask
    from spirt.peer import function_spec

    cfg = load_config(None, SMALL)
    spec = function_spec(cfg)
    with start_server("valkey") as srv:
        c = srv.client()
        c.set("{p0}:params", build_flat(cfg).tobytes())
        grads = {}
        for kind in ("inline", "process", "ray"):
            tasks = [GradTask(spec, srv.url, 0, 5, i, "{p0}:params", f"{{p0}}:g:{kind}:{i}") for i in range(2)]
            with make_executor(kind, spec, workers=1, retries=1, timeout_s=120) as ex:
                inv = ex.map(tasks)
            assert all(i.result is not None for i in inv), [i.error for i in inv]
            grads[kind] = [c.get(t.grad_key) for t in tasks]
        assert grads["inline"] == grads["process"] == grads["ray"]
        assert grads["inline"][0] != grads["inline"][1]  # different minibatches


def test_cpu_shares_are_round_robin_even_and_never_shrink_a_pool():
    from spirt.executors import cpu_share

    cpus = {0, 1, 2, 3}
    assert [cpu_share(i, 1, 8, cpus) for i in range(6)] == [{0}, {1}, {2}, {3}, {0}, {1}]
    assert [cpu_share(i, 2, 4, cpus) for i in range(3)] == [{0, 1}, {2, 3}, {0, 1}]
    assert cpu_share(0, 1, 4, {4, 7, 9, 12}) == {4}  # the CPUs we may use, not 0..n-1
    assert cpu_share(3, 1, 4, {4, 7, 9, 12}) == {12}
    assert cpu_share(1, 1, 10, {0, 1}) == {1}  # 10 peers on 2 cores: 5 per core
    # a pool as large as the host (or larger) keeps every CPU: pinning would only take some away
    assert cpu_share(0, 4, 2, cpus) is None and cpu_share(3, 8, 4, cpus) is None
    # pools that cannot be spread evenly are not pinned (3 peers on 2 cores: two would share one)
    assert cpu_share(0, 1, 3, {0, 1}) is None and cpu_share(1, 2, 3, cpus) is None


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux-only")
def test_pinned_workers_run_on_their_share_and_compute_the_same():
    """A pool pinned to one CPU (what a peer gets with ``executor.pin_cpus``) keeps its workers there and
    writes the same gradients as an unpinned one."""
    from spirt.executors import ProcessExecutor
    from spirt.functions import GradTask
    from spirt.peer import function_spec

    cfg = load_config(None, SMALL)
    spec = function_spec(cfg)
    cpu = max(os.sched_getaffinity(0))
    with start_server("valkey") as srv:
        c = srv.client()
        c.set("{p0}:params", build_flat(cfg).tobytes())
        grads = {}
        for pinned in (True, False):
            with ProcessExecutor(spec, workers=2, retries=0, cpus={cpu} if pinned else None) as ex:
                ex.warm()
                affinities = {pid: os.sched_getaffinity(pid) for pid in ex.worker_pids()}
                inv = ex.map([GradTask(spec, srv.url, 0, 3, i, "{p0}:params", f"{{p0}}:g:{pinned}:{i}")
                              for i in range(2)])
            assert len(affinities) == 2
            if pinned:
                assert all(a == {cpu} for a in affinities.values()), affinities
            else:
                assert all(a == os.sched_getaffinity(0) for a in affinities.values()), affinities
            assert all(i.result is not None for i in inv), [i.error for i in inv]
            grads[pinned] = [c.get(f"{{p0}}:g:{pinned}:{i}") for i in range(2)]
        assert grads[True] == grads[False]


def test_run_in_processes_writes_rounds(tmp_path):
    """The real launcher: one server and one orchestrator process per peer, warm function pools."""
    from spirt.runner import write_run_reports

    cfg = load_config(None, {**SMALL, "peers.mode": "process", "executor.kind": "process",
                             "executor.workers": 1, "run.rounds": 4, "run.eval_every": 2})
    df = run_training(cfg, progress=False, timeout_s=300)
    assert len(df) == cfg.run.rounds * cfg.peers.count
    summary = write_run_reports(df, tmp_path, "module")
    out = pd.read_csv(tmp_path / "rounds_module.csv")
    for col in ["round", "peer", "loss", "accuracy", "t_compute", "t_store", "t_average", "t_exchange", "t_update"]:
        assert col in out.columns
    assert (tmp_path / "rounds_module.png").stat().st_size > 1000
    # the peers' events go with the rows (none in a run without faults), and the summary counts them
    events = pd.read_csv(tmp_path / "rounds_module_events.csv")
    assert list(events.columns) == ["t", "round", "peer", "event", "about", "detail"] and events.empty
    assert "- events: none" in (tmp_path / "rounds_module.md").read_text()
    assert out["functions_ok"].eq(cfg.peers.functions).all()
    assert 0.0 < summary["final_accuracy"] <= 1.0
    # peers stay identical: same accuracy at every evaluation
    ev = out.dropna(subset=["accuracy"])
    assert ev.groupby("round")["accuracy"].nunique().eq(1).all()


def test_config_errors_name_field_and_allowed_values(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nname = "vgg"\n[peers]\ncount = 4\ncuont = 3\n')
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "model.name" in msg and "'cnn'" in msg and "'vgg'" in msg
    assert "peers.cuont" in msg and "unknown field" in msg
    with pytest.raises(ConfigError, match="attack.byzantine"):
        load_config(None, {"peers.count": 2, "attack.byzantine": 2, "attack.name": "sign_flip"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_cli_run_overrides_and_reports(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "spirt.cli", "run", "--rounds", "2", "--peers", "2", "--functions", "1",
           "--mode", "thread", "--executor", "inline", "--set", "data.limit_train=500", "--set",
           "data.limit_test=200", "--set", "run.eval_every=1", "--out", str(tmp_path), "--quiet",
           "--backend", "client"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    df = pd.read_csv(tmp_path / "rounds_client.csv")
    assert sorted(df["peer"].unique()) == [0, 1] and df["round"].max() == 1
    res = subprocess.run([sys.executable, "-m", "spirt.cli", "run", "--model", "vgg"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "model.name" in res.stderr


def test_peers_of_one_process_share_an_evaluation_of_the_same_parameters(monkeypatch):
    # peers as threads mostly hold bit-identical models: one evaluation serves them all (same test
    # images, same model); other parameters, or the whole test set, are evaluated anew
    from spirt import functions
    from spirt.evaluation import Evaluator

    cfg = load_config(None, {"model.name": "mlp", "data.limit_test": 123, "run.eval_samples": 50})
    a, b = Evaluator(cfg), Evaluator(cfg)
    params = bytes(a.initial()[0])
    calls = []
    real = functions.evaluate
    monkeypatch.setattr(functions, "evaluate", lambda *args, **kw: calls.append(kw["samples"]) or real(*args, **kw))
    assert a.evaluate(params) == b.evaluate(params) and calls == [50]
    halved = (np.frombuffer(params, dtype=np.float32) * 0.5).tobytes()
    assert b.evaluate(halved) != a.evaluate(params) and calls == [50, 50]
    a.evaluate(params, full=True)
    assert calls == [50, 50, 0]
