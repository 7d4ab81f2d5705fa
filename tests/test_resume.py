"""Resuming after a full stop: every database and orchestrator killed at once, as by a power loss.

``spirt run --state-dir DIR`` keeps each peer's database files in DIR (every write on disk before its
reply); the whole run (launcher, orchestrators, servers) is SIGKILLed halfway; ``spirt run --resume
DIR`` must finish the training: every peer goes on after the last round its database completed, each
round appears once per peer in the report, and the peers end with one model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from spirt.keys import Keys
from spirt.servers import make_client

pytestmark = [pytest.mark.faults, pytest.mark.timeout(400)]

ROUNDS = 24
FLAGS = ["--rounds", str(ROUNDS), "--quiet", "--set", "model.name=mlp", "--set", "executor.kind=inline",
         "--set", "data.limit_train=4000", "--set", "data.limit_test=200", "--set", "run.eval_samples=200",
         "--set", "peers.functions=1", "--set", "peers.count=3", "--set", "run.eval_every=8",
         # no peer is killed alone here: a long heartbeat keeps a loaded machine's starved peer from being
         # taken for dead (the default 1 s heartbeat's key lives 1.5 s)
         "--set", "membership.heartbeat_s=3"]


def _spirt(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "spirt", *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _completed(state, i: int) -> int:
    sock = state / f"peer-{i}" / "db.sock"
    if not sock.exists():
        return -1
    c = make_client(unix_socket_path=str(sock), socket_timeout=2)
    try:
        v = c.get(Keys(i).completed)
        return -1 if v is None else int(v)
    except Exception:  # noqa: BLE001 - not up yet
        return -1
    finally:
        c.close()


def test_power_loss_then_resume_finishes_the_training(tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    run = _spirt("run", "quickstart", *FLAGS, "--state-dir", str(state), "--out", str(out))
    # the rounds the databases completed, read while they still answer: a lower bound at the kill
    before = [-1] * 3
    try:
        deadline = time.monotonic() + 240
        while min(before) < ROUNDS // 3:
            assert run.poll() is None, run.stdout.read().decode()
            assert time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.05)
            before = [_completed(state, i) for i in range(3)]
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # everything at once: launcher, orchestrators, servers
        run.wait(30)
    time.sleep(1)  # the servers die with their launcher (parent-death signal)
    assert all(b < ROUNDS - 1 for b in before), before

    resumed = _spirt("run", "--resume", str(state), "--out", str(out), "--label", "resumed")
    try:
        output = resumed.communicate(timeout=300)[0].decode()
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
    assert resumed.returncode == 0, output
    df = pd.read_csv(out / "rounds_resumed.csv")
    events = pd.read_csv(out / "rounds_resumed_events.csv")
    said = f"before the kill: {before}\n{events.to_string()}"
    for i in range(3):
        mine = events[events["peer"] == i]
        rounds = sorted(df[df["peer"] == i]["round"])
        assert len(rounds) == len(set(rounds)), f"peer {i}: a round twice: {rounds}\n{said}"
        # it went on right after the last round its database completed, and every round before kept its row
        start = mine[mine["event"] == "resumed"]["round"].tolist()
        assert len(start) == 1 and start[0] > before[i], f"peer {i}\n{said}"
        assert set(range(start[0])) <= set(rounds), f"peer {i}: {rounds}\n{said}"
        # from there on every round, except those it sat out for a state transfer, which it says
        missing = sorted(set(range(start[0], ROUNDS)) - set(rounds))
        sat_out = mine[(mine["event"] == "resync") & (mine["round"] >= start[0])]["round"]
        assert not missing or (len(sat_out) and missing[0] >= sat_out.min()), f"peer {i}: {missing}\n{said}"
    last = df[df["round"] == ROUNDS - 1]
    assert (last["peers_aggregated"] == 3).all()
    assert "final_states: 1" in (out / "rounds_resumed.md").read_text()


def test_resume_refuses_a_directory_without_a_run(tmp_path):
    p = _spirt("run", "--resume", str(tmp_path))
    output = p.communicate(timeout=60)[0].decode()
    assert p.returncode == 2 and "no persisted run" in " ".join(output.split())


RESTART = {
    "run.rounds": 30, "run.eval_every": 10_000, "run.seed": 0, "model.name": "mlp", "data.limit_train": 4000,
    "data.limit_test": 100, "peers.count": 4, "peers.functions": 1, "peers.batch_size": 32,
    "executor.kind": "inline", "peers.persistence": True, "membership.heartbeat_s": 0.5,
    "membership.max_misses": 2, "membership.join_timeout_s": 60.0, "barrier.timeout_s": 3.0,
}


@pytest.mark.parametrize("run", range(0, 10, 2))
def test_every_database_restarted_at_once_ends_with_one_state(run):
    """SIGKILL all four databases at once (persistence on), restart them on their files: the peers must
    finish with one model, in each of 5 runs struck at different moments of a round (0.0 to 0.8 of it)."""
    from spirt.cluster import Cluster
    from spirt.config import load_config

    cfg = load_config(None, RESTART)
    with Cluster(cfg) as c:
        c.wait_round(0, 8 + run)
        time.sleep(run / 10 * c.round_time(0))
        for i in range(4):
            c.kill_db(i)
        time.sleep(1.0)
        for i in range(4):
            c.restart_db(i)
        c.wait_finished(list(range(4)), timeout_s=240)
        params = [c.params(i) for i in range(4)]
        events = c.events()
    assert all(p is not None for p in params) and len(set(params)) == 1, events.to_string()
    assert set(events[events["event"] == "recovered"]["peer"]) == {0, 1, 2, 3}


def test_full_disk_ends_the_run_naming_the_cause(tmp_path):
    """The database's disk fills up mid-run (a 3 MB file system): the server exits, and the run's error
    says why, from the server's log, instead of only that the peer failed."""
    from spirt.config import load_config
    from spirt.runner import TrainingError, run_training

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)]).returncode:
        pytest.skip("mounting a small file system needs root")
    try:
        cfg = load_config(None, {**RESTART, "peers.count": 1, "peers.mode": "thread", "run.rounds": 200,
                                 "membership.db_recovery_s": 2.0})
        with pytest.raises(TrainingError, match="the disk is full"):
            run_training(cfg, progress=False, state_dir=small / "state")
    finally:
        subprocess.run(["umount", "-l", str(small)])
