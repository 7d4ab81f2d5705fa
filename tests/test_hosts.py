"""One peer per host: ``spirt peer`` processes (each its own process tree: database server, orchestrator,
function workers) form a group from a shared configuration, and ``spirt collect`` gathers their metrics.

The group must train exactly as ``spirt run`` trains the same configuration on one host: the same loss in
every round at every peer and the same final accuracy. Over loopback TCP here; every peer in its own
network namespace in ``test_peers_in_their_own_network_namespaces`` (root only).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest

from spirt.config import load_config
from spirt.host import HostError, collect, listen_address
from spirt.runner import run_training

pytestmark = pytest.mark.timeout(400)

ROUNDS = 6
SETTINGS = {"run.rounds": ROUNDS, "run.eval_every": 3, "run.eval_samples": 300, "model.name": "mlp",
            "executor.kind": "inline", "peers.functions": 2, "data.limit_train": 4000, "data.limit_test": 300}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def group_config(tmp_path: Path, urls: list[str], **over) -> Path:
    """The group's configuration, as one JSON file every host reads."""
    with resources.as_file(resources.files("spirt").joinpath("examples", "quickstart.toml")) as example:
        cfg = load_config(example, {**SETTINGS, "peers.count": len(urls), "peers.urls": urls, **over})
    path = tmp_path / "group.json"
    path.write_text(cfg.model_dump_json(indent=1))
    return path


def spirt_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "spirt", *args]


def start(argv: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    """A process in its own session (its tree is stopped as one), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(argv, start_new_session=True, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)


def stop_all(procs: dict[int, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs.values():
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def wait_trained(procs, logs, cfg, timeout_s=240):
    """Until every peer's log says it trained (then they serve their metrics)."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = [i for i in procs if "trained" in logs[i].read_text()]
        if len(done) == len(procs):
            return
        for i, p in procs.items():
            assert p.poll() is None, f"peer {i} exited ({p.returncode}):\n{logs[i].read_text()[-3000:]}"
        assert time.monotonic() < deadline, {i: logs[i].read_text()[-1500:] for i in procs}
        time.sleep(0.2)


def same_training(collected: pd.DataFrame, reference: pd.DataFrame) -> None:
    """Bit for bit the same losses at every peer and round, and the same accuracies."""
    cols = ["round", "peer", "loss", "accuracy"]
    a = collected[cols].sort_values(["round", "peer"], ignore_index=True)
    b = reference[cols].sort_values(["round", "peer"], ignore_index=True)
    assert len(a) == len(b) == ROUNDS * a["peer"].nunique()
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def run_group(tmp_path: Path, cfg_path: Path, argv_of, order: list[int]) -> pd.DataFrame:
    """Start the peers (``argv_of(i)``, in ``order``, staggered: a group does not start at one instant),
    wait until they trained, collect and release them; every process is stopped at the end."""
    cfg = load_config(cfg_path)
    procs, logs = {}, {}
    try:
        for i in order:
            logs[i] = tmp_path / f"peer-{i}.log"
            procs[i] = start(argv_of(i), logs[i], Path.cwd())
            time.sleep(0.5)
        wait_trained(procs, logs, cfg)
        df, missing = collect(cfg, release=True)
        assert missing == []
        for i, p in procs.items():  # released: each stops its database and exits by itself
            assert p.wait(30) == 0, logs[i].read_text()[-2000:]
        return df
    finally:
        stop_all(procs)


def reference_run(cfg_path: Path) -> pd.DataFrame:
    cfg = load_config(cfg_path, {"peers.urls": []})
    return run_training(cfg, progress=False, timeout_s=300)


def test_peers_started_one_per_process_tree_train_as_spirt_run(tmp_path):
    urls = [f"redis://127.0.0.1:{free_port()}" for _ in range(3)]
    cfg_path = group_config(tmp_path, urls)
    df = run_group(tmp_path, cfg_path, lambda i: spirt_argv("peer", str(cfg_path), "--index", str(i)), [2, 0, 1])
    assert df.attrs["final_states"] == 1 and (df["peers_aggregated"] == 3).all()
    same_training(df, reference_run(cfg_path))


def test_a_peer_beyond_the_list_joins_the_running_group(tmp_path):
    """Three peers of the list train; a fourth with its own URL, started with them, asks them to admit it
    once they train, takes their state by state transfer and trains with them to the end; collect finds
    it with --joined."""
    urls = [f"redis://127.0.0.1:{free_port()}" for _ in range(3)]
    joiner = f"redis://127.0.0.1:{free_port()}"
    rounds = 200  # the joiner, started with the others, asks to join once they train
    cfg_path = group_config(tmp_path, urls, **{"run.rounds": rounds, "data.parts": 4})
    cfg = load_config(cfg_path)
    procs, logs = {}, {i: tmp_path / f"peer-{i}.log" for i in range(4)}
    try:
        procs[3] = start(spirt_argv("peer", str(cfg_path), "--index", "3", "--url", joiner), logs[3], Path.cwd())
        for i in range(3):
            procs[i] = start(spirt_argv("peer", str(cfg_path), "--index", str(i)), logs[i], Path.cwd())
        wait_trained(procs, logs, cfg)
        df, missing = collect(cfg, joined={3: joiner})
        out = subprocess.run(spirt_argv("collect", str(cfg_path), "--joined", f"3={joiner}", "--out",
                                        str(tmp_path / "out"), "--release"), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        for i, p in procs.items():
            assert p.wait(30) == 0, logs[i].read_text()[-2000:]
    finally:
        stop_all(procs)
    assert missing == [] and df.attrs["final_states"] == 1
    events = df.attrs["events"]
    assert {"join_request", "joined"} <= set(events[events["peer"] == 3]["event"])
    assert set(events[(events["event"] == "admitted") & (events["about"] == 3)]["peer"]) == {0, 1, 2}
    last = df[df["round"] == rounds - 1]
    assert sorted(last["peer"]) == [0, 1, 2, 3] and (last["peers_aggregated"] == 4).all()
    assert df[df["peer"] == 3]["round"].min() > 0  # it joined a running training
    assert "the group is training: asking to join" in logs[3].read_text()


def test_a_joining_peer_needs_its_url_and_a_data_part():
    from spirt.host import group_urls

    group = load_config(None, {"peers.count": 2, "peers.urls": ["redis://a:1", "redis://b:2"], "data.parts": 3})
    assert group_urls(group, 1) == ["redis://a:1", "redis://b:2"]
    assert group_urls(group, 2, "redis://c:3") == ["redis://a:1", "redis://b:2", "redis://c:3"]
    with pytest.raises(HostError, match="--url"):
        group_urls(group, 2)
    with pytest.raises(HostError, match="data.parts to at least 4"):
        group_urls(group, 3, "redis://d:4")
    with pytest.raises(HostError, match="peer 1's database is redis://b:2"):
        group_urls(group, 1, "redis://elsewhere:2")


def test_collect_writes_the_run_reports_and_names_silent_peers(tmp_path):
    # nothing listens at these ports: collect names every peer rather than reporting an empty run as fine
    urls = [f"redis://127.0.0.1:{free_port()}" for _ in range(2)]
    cfg_path = group_config(tmp_path, urls)
    df, missing = collect(load_config(cfg_path), timeout_s=1)
    assert missing == [0, 1] and df.empty
    out = subprocess.run(spirt_argv("collect", str(cfg_path), "--out", str(tmp_path / "out")), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "no answer from the databases of peers [0, 1]" in out.stderr


def test_a_peer_refuses_what_a_group_cannot_run(tmp_path):
    cfg = load_config(None, {"peers.count": 2, "peers.urls": ["redis://127.0.0.1:7001", "unix:///tmp/x.sock"]})
    with pytest.raises(HostError, match="explicit port"):
        listen_address(cfg.peers.urls[1])
    with pytest.raises(HostError, match="explicit port"):
        listen_address("redis://10.0.0.1")
    from spirt.host import check_group

    with pytest.raises(HostError, match="peers.urls"):
        check_group(load_config(None, {"peers.count": 3}))
    group = load_config(None, {"peers.count": 2, "peers.urls": ["redis://a:1", "redis://b:2"]})
    check_group(group)
    secured = group.model_copy(update={"security": group.security.model_copy(update={"enabled": True})})
    with pytest.raises(HostError, match="open groups only"):
        check_group(secured)


def test_a_peer_whose_group_never_starts_gives_up_and_says_why(tmp_path):
    # peer 1 alone: peer 0's database never answers, so no start signal comes
    urls = [f"redis://127.0.0.1:{free_port()}" for _ in range(2)]
    cfg_path = group_config(tmp_path, urls)
    log = tmp_path / "peer-1.log"
    p = start(spirt_argv("peer", str(cfg_path), "--index", "1", "--start-timeout", "3"), log, Path.cwd())
    try:
        assert p.wait(120) == 2
    finally:
        stop_all({1: p})
    text = log.read_text()
    assert "no start signal" in text and urls[0] in text, text[-2000:]


def test_peers_in_their_own_network_namespaces(tmp_path):
    """Four peers, each in its own network namespace (its own address, reached over a bridge), each
    started by spirt peer: the same training as spirt run."""
    netns = pytest.importorskip("spirt.netns")
    ok, why = netns.available()
    if not ok:
        pytest.skip(why)
    with netns.Hosts(4) as hosts:
        urls = [f"redis://{hosts.address(i)}:6379" for i in range(4)]
        cfg_path = group_config(tmp_path, urls)
        df = run_group(tmp_path, cfg_path,
                       lambda i: hosts.command(i, spirt_argv("peer", str(cfg_path), "--index", str(i))), [3, 1, 0, 2])
    assert df.attrs["final_states"] == 1 and (df["peers_aggregated"] == 4).all()
    same_training(df, reference_run(cfg_path))
    assert json.loads(cfg_path.read_text())["peers"]["urls"] == urls
