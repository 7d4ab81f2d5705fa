"""Servers started by the harness: flavors, module loading, fallbacks, and that none outlives its owner."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import redis

from spirt.backends import get_backend
from spirt.servers import ServerError, capabilities, connect, find_server_binary, start_server, start_servers


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_module_loaded_on_both_flavors(server):
    caps = server.capabilities()
    assert caps.module and caps.best_backend() == "module"
    assert caps.flavor in ("valkey", "redis")
    # nothing on disk unless persistence is asked for
    assert server.client().config_get("appendonly")["appendonly"] == "no"
    assert server.client().config_get("save")["save"] == ""


def test_unix_socket_and_stop_removes_everything():
    srv = start_server("valkey", unix_socket=True)
    assert srv.url.startswith("unix://") and srv.client().ping()
    workdir, pid = srv.workdir, srv.pid
    srv.stop()
    assert _wait_dead(pid) and not workdir.exists()
    srv.stop()  # idempotent


def test_user_server_without_module_falls_back_with_clear_message():
    with start_server("valkey", module=False) as plain:
        user = connect(plain.url)
        caps = capabilities(user.client())
        assert not caps.module and caps.best_backend() == "lua"
        assert "does not have the spirt tensor module" in caps.describe() and "--loadmodule" in caps.describe()
        with pytest.raises(RuntimeError, match="TENSOR.AVG is unknown"):
            get_backend("module").prepare(user.client())
    with pytest.raises(ServerError, match="cannot reach"):
        connect("redis://127.0.0.1:1")


def test_bad_binary_is_named():
    with pytest.raises(ServerError, match="does not exist"):
        find_server_binary("/nonexistent/valkey-server")
    with pytest.raises(ServerError, match="did not start"):
        start_server("valkey", extra_args=["--no-such-option", "1"])


def test_a_server_that_cannot_start_leaves_no_directory(tmp_path, monkeypatch):
    """Refused before it starts (no module, a bad setting) or failing to start: its working directory
    is gone either way."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ServerError, match="not found"):
        start_server("valkey", module=tmp_path / "missing.so")
    with pytest.raises(ValueError, match="fsync"):
        start_server("valkey", persistence=True, fsync="sometimes")
    with pytest.raises(ServerError, match="did not start"):
        start_server("valkey", extra_args=["--no-such-option", "1"])
    assert list(tmp_path.iterdir()) == []


def test_start_servers_launches_every_server_before_waiting_for_any(monkeypatch):
    """The servers of a run start side by side: each takes tens of milliseconds to answer, mostly
    waiting, and ten waited for in turn held every run back by that much ten times over."""
    import spirt.servers as servers

    spawned: list[int] = []
    at_first_wait: list[int] = []
    real_spawn, real_wait = servers._spawn, servers._wait_ready

    def spawn(args, netns=None):
        proc = real_spawn(args, netns)
        spawned.append(proc.pid)
        return proc

    def wait(server, timeout):
        if not at_first_wait:
            at_first_wait.append(len(spawned))
        return real_wait(server, timeout)

    monkeypatch.setattr(servers, "_spawn", spawn)
    monkeypatch.setattr(servers, "_wait_ready", wait)
    started = start_servers([{"unix_socket": True}] * 3 + [{"binary": "valkey", "module": False}])
    try:
        assert at_first_wait == [4]
        assert [s.pid for s in started] == spawned  # in the order given
        assert all(s.client().ping() for s in started)
        assert started[3].unix_socket is None and started[3].port
    finally:
        for s in started:
            s.stop()


@pytest.mark.parametrize("bad", [{"extra_args": ["--no-such-option", "1"]}, {"fsync": "sometimes", "persistence": True}])
def test_start_servers_stops_the_others_when_one_cannot_start(tmp_path, monkeypatch, bad):
    """A server that fails to answer (or is refused before it is launched) ends the whole start: the
    servers launched before and after it are stopped and no working directory is left."""
    import tempfile

    import spirt.servers as servers

    spawned = []
    real_spawn = servers._spawn
    monkeypatch.setattr(servers, "_spawn", lambda args, netns=None: spawned.append(real_spawn(args, netns)) or spawned[-1])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises((ServerError, ValueError)):
        start_servers([{"unix_socket": True}, {"unix_socket": True}, {"unix_socket": True, **bad}, {"unix_socket": True}])
    assert len(spawned) == (4 if "extra_args" in bad else 2)
    assert all(_wait_dead(p.pid) for p in spawned)
    assert list(tmp_path.iterdir()) == []


SCRIPT = textwrap.dedent(
    """
    import sys, time
    from spirt.servers import start_server, install_signal_handlers
    install_signal_handlers()
    s = start_server("valkey")
    print(s.pid, flush=True)
    if sys.argv[1] == "raise":
        raise RuntimeError("boom")
    time.sleep(60)
    """
)


@pytest.mark.parametrize("how", ["sigkill", "sigterm", "sigint", "raise"])
def test_servers_never_outlive_their_process(how):
    # Ctrl-C reaches a foreground program; a shell running this suite in the background (CI launched
    # with `&`) ignores SIGINT in its children, and Python keeps an inherited SIG_IGN: restore the default
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, how], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        pid = int(proc.stdout.readline())
        assert _pid_alive(pid)
        if how != "raise":
            sig = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}[how]
            proc.send_signal(sig)
        proc.wait(20)
        assert _wait_dead(pid), f"server {pid} outlived its parent ({how})"
    finally:
        proc.kill()
        proc.wait()


def test_persistence_survives_restart(tmp_path):
    srv = start_server("valkey", persistence=True, workdir=tmp_path)
    c = srv.client()
    c.set("k", b"\x00\x00\x80\x3f")
    srv.kill(signal.SIGTERM)  # a clean shutdown flushes the AOF
    again = start_server("valkey", persistence=True, workdir=tmp_path)
    try:
        assert again.client().get("k") == b"\x00\x00\x80\x3f"
    finally:
        again.stop()


def test_client_timeout_does_not_resend():
    # a long server-side call must not be silently re-sent by redis-py's retry
    with start_server("valkey") as srv:
        c = srv.client(socket_timeout=0.2)
        t0 = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            c.blpop(["nothing"], timeout=1)
        assert time.monotonic() - t0 < 0.9  # raised at the first timeout, not after re-sends


# -- the data-path client ---------------------------------------------------------------------------


def test_large_arguments_reach_the_socket_uncopied():
    """The client's packer hands a tensor's buffer to the socket as it is (hiredis' packer copies it
    into a new command buffer: ~1.5 ms per 0.8 MB) and counts bytes, not items, for any memoryview."""
    import numpy as np

    from spirt.servers import ZeroCopyPacker

    vec = np.arange(200_000, dtype=np.float32)
    mv = memoryview(vec).cast("B")
    chunks = ZeroCopyPacker().pack("SET", "k", mv)
    assert any(c is mv for c in chunks), "the 0.8 MB argument was copied"
    grid = memoryview(np.ones((3, 4), dtype=np.float32))  # 2-D, float items: 48 bytes in 3 rows
    assert b"$48\r\n" in b"".join(bytes(c) for c in ZeroCopyPacker().pack("SET", "k", grid))


@pytest.mark.parametrize("flavor", ["valkey", "redis"])
def test_clients_store_tensors_byte_exact(flavor):
    import numpy as np

    if flavor == "redis" and not (shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")):
        pytest.skip("redis-server not installed")
    rng = np.random.default_rng(0)
    with start_server(flavor, unix_socket=True) as srv:
        c = srv.client()
        for shape in [(1,), (1500,), (200_000,), (3, 70_000)]:
            x = rng.standard_normal(shape, dtype=np.float32)
            c.set("as-view", memoryview(x))  # float items, possibly 2-D
            c.set("as-bytes", x.tobytes())
            pipe = c.pipeline(transaction=False)
            pipe.set("piped", memoryview(x))
            pipe.get("piped")
            _, piped = pipe.execute()
            assert c.get("as-view") == c.get("as-bytes") == piped == x.tobytes()
        assert c.strlen("as-view") == 3 * 70_000 * 4


def test_pipelines_at_once_replies_per_server_and_names_failures():
    from spirt.servers import pipelines_at_once

    a, b, gone = start_server("valkey"), start_server("valkey"), start_server("valkey")
    try:
        ca, cb, cg = a.client(), b.client(), gone.client(socket_timeout=2, connect_timeout=1)
        cg.ping()
        gone.stop()  # its client still holds a connection to a server that is no more
        ca.rpush("a-list", 1)
        out = pipelines_at_once({
            "a": (ca, [("SET", "x", b"\x00" * 100_000), ("GET", "x"), ("INCR", "a-list")]),
            "b": (cb, [("RPUSH", "q", 7), ("LRANGE", "q", 0, -1)]),
            "gone": (cg, [("GET", "x")]),
        })
        assert out["a"][:2] == [b"OK", b"\x00" * 100_000]  # raw replies: no redis-py conversions
        assert isinstance(out["a"][2], redis.ResponseError) and "WRONGTYPE" in str(out["a"][2])
        assert out["b"] == [1, [b"7"]]
        assert isinstance(out["gone"], redis.ConnectionError)
        # the connections went back to their pools in a usable state
        assert ca.get("x") == b"\x00" * 100_000 and cb.llen("q") == 1
        assert pipelines_at_once({}) == {}
    finally:
        for s in (a, b, gone):
            s.stop()


def test_pipelines_at_once_a_hung_server_holds_back_no_other():
    """A SIGSTOPped server stops reading: a large value sent to it fills the socket buffers and the send
    blocks until the client's timeout. The server after it in the jobs gets its value meanwhile."""
    import threading

    from spirt.servers import pipelines_at_once

    hung, live = start_server("valkey"), start_server("valkey")
    try:
        ch, cl = hung.client(socket_timeout=4, connect_timeout=1), live.client()
        ch.ping()
        watcher = live.client()
        hung.process.send_signal(signal.SIGSTOP)
        big = b"\x01" * (16 << 20)  # far more than the kernel buffers hold
        out: dict = {}
        call = threading.Thread(target=lambda: out.update(pipelines_at_once({
            "hung": (ch, [("SET", "v", big)]), "live": (cl, [("SET", "v", b"small")])})))
        call.start()
        arrived_while_blocked = False
        while call.is_alive():
            if watcher.get("v") == b"small":
                arrived_while_blocked = call.is_alive()
                break
            time.sleep(0.02)
        call.join()
        assert arrived_while_blocked  # not after the hung server's timeout
        assert out["live"] == [b"OK"] and isinstance(out["hung"], redis.TimeoutError)
    finally:
        hung.process.send_signal(signal.SIGCONT)
        for s in (hung, live):
            s.stop()
