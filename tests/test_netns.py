"""spirt.netns with real namespaces and real sockets: reachability, partitions (blackhole routes and silent
drops, both ways and one way), tbf bandwidth limits, random loss, delay (netem or a clear error), and a
teardown that leaves nothing behind. Needs root; skipped with the reason otherwise."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import time

import pytest

from spirt import netns
from spirt.netns import Hosts, NetnsError, available, delay_mechanism

pytestmark = [pytest.mark.skipif(not available()[0], reason=available()[1]), pytest.mark.timeout(120)]

PORT = 7000

#: the programs run inside the hosts: servers print "ready" once they listen, clients print one JSON line
TOOL = r'''
import errno, json, socket, sys, time

def echo(host, port):
    srv = socket.create_server((host, int(port)))
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(conn.recv(100))

def slowecho(host, port):  # answers each message a second late, for as long as the connection lasts
    import threading
    srv = socket.create_server((host, int(port)))
    print("ready", flush=True)

    def serve(conn):
        with conn:
            while data := conn.recv(100):
                time.sleep(1.0)
                conn.sendall(data)
    while True:
        threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()

def sink(host, port):  # reads until EOF, answers with the byte count
    srv = socket.create_server((host, int(port)))
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            total = 0
            while data := conn.recv(1 << 16):
                total += len(data)
            conn.sendall(str(total).encode())

def timed(attempt):  # runs attempt() (a ping), prints its result and how long it took as one JSON line
    t = time.monotonic()
    try:
        result = attempt()
    except TimeoutError:
        result = "timeout"
    except OSError as e:
        result = errno.errorcode.get(e.errno, str(e))
    print(json.dumps({"result": result, "seconds": time.monotonic() - t}), flush=True)

def ping(conn):
    conn.sendall(b"ping")
    return "ok" if conn.recv(100) == b"ping" else "bad echo"

def connect(host, port, timeout):
    def attempt():
        with socket.create_connection((host, int(port)), timeout=float(timeout)) as conn:
            return ping(conn)
    timed(attempt)

def held(host, port, timeout):  # a connection opened at once and used twice, each time when told (a line)
    conn = socket.create_connection((host, int(port)), timeout=float(timeout))
    print("open", flush=True)
    for _ in range(2):
        sys.stdin.readline()
        timed(lambda: ping(conn))

def send(host, port, nbytes):  # timed until the sink confirmed every byte
    chunk, left = b"x" * (1 << 16), int(nbytes)
    with socket.create_connection((host, int(port)), timeout=20) as conn:
        t = time.monotonic()
        while left > 0:
            conn.sendall(chunk[:left])
            left -= len(chunk)
        conn.shutdown(socket.SHUT_WR)
        got = int(conn.recv(100))
        print(json.dumps({"bytes": got, "seconds": time.monotonic() - t}))

def udpsink(host, port):  # counts datagrams until 1 s of silence after the first
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, 33, 1 << 22)  # SO_RCVBUFFORCE: no drops of our own
    sock.bind((host, int(port)))
    print("ready", flush=True)
    seen, sock_timeout = set(), 10.0
    while True:
        sock.settimeout(sock_timeout)
        try:
            seen.add(sock.recv(100))
        except TimeoutError:
            break
        sock_timeout = 1.0
    print(len(seen), flush=True)

def udpsend(host, port, count):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for k in range(int(count)):
        sock.sendto(str(k).encode(), (host, int(port)))
        time.sleep(0.0005)

globals()[sys.argv[1]](*sys.argv[2:])
'''


@pytest.fixture(scope="module")
def tool(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("netns") / "tool.py"
    path.write_text(TOOL)
    return str(path)


def serve(hosts: Hosts, i: int, tool: str, kind: str = "echo", port: int = PORT) -> subprocess.Popen:
    """A server inside host i, listening on its address once this returns."""
    proc = hosts.popen(i, [sys.executable, tool, kind, hosts.address(i), str(port)], stdout=subprocess.PIPE,
                       text=True)
    assert proc.stdout.readline().strip() == "ready", f"the {kind} server in host {i} did not start"
    return proc


def client(hosts: Hosts, i: int, tool: str, *args) -> dict:
    """Run the tool's client ``args`` inside host i; its JSON result."""
    out = hosts.run(i, [sys.executable, tool, *map(str, args)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def connect(hosts: Hosts, src: int, dst: int, tool: str, timeout: float = 1.0) -> dict:
    return client(hosts, src, tool, "connect", hosts.address(dst), PORT, timeout)


@pytest.fixture
def pair(tool):
    """Two hosts, each with an echo server."""
    with Hosts(2) as hosts:
        serve(hosts, 0, tool)
        serve(hosts, 1, tool)
        yield hosts


def leftovers(tag: str, subnet) -> list[str]:
    """Lines of the root namespace's state that name this instance or its subnet."""
    net = str(subnet.network_address).rsplit(".", 1)[0] + "."
    lines = []
    for argv in (["ip", "netns", "list"], ["ip", "-o", "link"], ["ip", "-o", "addr"],
                 ["ip", "route", "show", "table", "all"], ["iptables", "-S"]):
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        lines += [line for line in out.splitlines() if tag in line or net in line]
    return lines


def gone(pid: int) -> bool:
    """No such process, or only its zombie (a reparented orphan waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_hosts_reach_each_other_and_the_root(tool):
    with Hosts(2) as hosts:
        assert len(hosts) == 2
        assert [hosts.address(0), hosts.address(1)] == [str(hosts.subnet[1]), str(hosts.subnet[2])]
        assert hosts.root_address == str(hosts.subnet[254])
        serve(hosts, 1, tool)
        assert connect(hosts, 0, 1, tool)["result"] == "ok"
        with socket.create_connection((hosts.address(1), PORT), timeout=2) as conn:  # from the root namespace
            conn.sendall(b"hello")
            assert conn.recv(100) == b"hello"
        # really another namespace: host 0 has no listener on that port, the root can't see host 1's loopback
        assert connect(hosts, 1, 0, tool)["result"] == "ECONNREFUSED"


def test_cut_by_route_fails_fast_and_heal_restores(pair, tool):
    pair.cut(0, 1)
    for src, dst in ((0, 1), (1, 0)):
        r = connect(pair, src, dst, tool)
        assert r["result"] == "EINVAL" and r["seconds"] < 0.5, r
    pair.heal()
    assert connect(pair, 0, 1, tool)["result"] == "ok"
    assert connect(pair, 1, 0, tool)["result"] == "ok"


def test_cut_one_way_blocks_new_connections_from_one_side_only(pair, tool):
    pair.cut_one_way(0, 1)
    r = connect(pair, 0, 1, tool)
    assert r["result"] == "ENETUNREACH" and r["seconds"] < 0.5, r
    assert connect(pair, 1, 0, tool)["result"] == "ok"
    pair.heal()
    pair.cut_one_way(0, 1, mode="drop")
    r = connect(pair, 0, 1, tool)
    assert r["result"] == "timeout" and r["seconds"] >= 0.9, r
    assert connect(pair, 1, 0, tool)["result"] == "ok"
    pair.heal()
    assert connect(pair, 0, 1, tool)["result"] == "ok"


def test_cut_one_way_also_stops_connections_already_open(tool):
    """A connection opened before the cut does not get through it, even when the first packet after the
    cut is the other side's (an answer on its way): one-way cuts match the connection's opener, so the
    hosts track connections from the start. Connections the other side opened keep working."""
    with Hosts(2) as hosts:
        serve(hosts, 0, tool, "slowecho")
        serve(hosts, 1, tool, "slowecho")

        def hold(src, dst):
            proc = hosts.popen(src, [sys.executable, tool, "held", hosts.address(dst), str(PORT), "3.0"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == "open"
            return proc

        def ask(proc):  # a ping the slow echo answers a second later
            proc.stdin.write("go\n")
            proc.stdin.flush()

        def answer(proc):
            return json.loads(proc.stdout.readline())

        for mode in ("drop", "route"):
            forward, backward = hold(0, 1), hold(1, 0)
            ask(forward)
            ask(backward)
            time.sleep(0.3)  # both pings are in, their answers not yet: the cut comes in between
            hosts.cut_one_way(0, 1, mode=mode)
            assert answer(forward)["result"] == "ok", mode  # the answer crosses (it goes 1 -> 0)
            assert answer(backward)["result"] == "ok", mode
            ask(forward)
            ask(backward)
            assert answer(forward)["result"] != "ok", mode  # 0's next ping, on 0's connection, does not
            assert answer(backward)["result"] == "ok", mode  # 1's connection still works both ways
            hosts.heal()


def test_drop_is_silent_both_ways(pair, tool):
    pair.drop(0, 1)
    for src, dst in ((0, 1), (1, 0)):
        r = connect(pair, src, dst, tool)
        assert r["result"] == "timeout" and r["seconds"] >= 0.9, r
    pair.heal()
    assert connect(pair, 0, 1, tool)["result"] == "ok"


def test_isolate_and_split(tool):
    with Hosts(3) as hosts:
        for i in range(3):
            serve(hosts, i, tool)
        hosts.isolate(1)
        assert connect(hosts, 0, 1, tool)["result"] == "EINVAL"
        assert connect(hosts, 0, 2, tool)["result"] == "ok"
        with pytest.raises(OSError):  # the root namespace too, both ways
            socket.create_connection((hosts.address(1), PORT), timeout=1).close()
        r = client(hosts, 1, tool, "connect", hosts.root_address, PORT, 1.0)
        assert r["result"] == "EINVAL", r  # ECONNREFUSED (nothing listens there) when not cut
        hosts.heal()
        socket.create_connection((hosts.address(1), PORT), timeout=1).close()
        hosts.isolate(1, mode="drop")
        with pytest.raises(TimeoutError):
            socket.create_connection((hosts.address(1), PORT), timeout=0.5).close()
        hosts.heal()
        hosts.split([0], [1, 2])
        assert connect(hosts, 1, 2, tool)["result"] == "ok"
        assert connect(hosts, 0, 2, tool)["result"] == "EINVAL"
        assert connect(hosts, 2, 0, tool)["result"] == "EINVAL"
        hosts.heal()
        assert connect(hosts, 2, 0, tool)["result"] == "ok"


def test_rate_limits_throughput(tool):
    nbytes = 2_000_000
    with Hosts(2) as hosts:
        serve(hosts, 1, tool, "sink")
        hosts.rate(0, 8)
        limited = client(hosts, 0, tool, "send", hosts.address(1), PORT, nbytes)
        assert limited["bytes"] == nbytes
        limited_mbit = nbytes * 8 / limited["seconds"] / 1e6
        assert limited["seconds"] >= 1.5 and limited_mbit < 12, limited
        hosts.rate(0, None)
        free = client(hosts, 0, tool, "send", hosts.address(1), PORT, nbytes)
        assert free["bytes"] == nbytes
        assert nbytes * 8 / free["seconds"] / 1e6 > 3 * limited_mbit, (limited, free)


def test_full_loss_times_out_and_clears(tool):
    with Hosts(2) as hosts:
        serve(hosts, 1, tool)
        hosts.loss(1, 1.0)
        assert connect(hosts, 0, 1, tool)["result"] == "timeout"
        hosts.loss(1, 0)
        assert connect(hosts, 0, 1, tool)["result"] == "ok"


def test_half_loss_drops_about_half_the_datagrams(tool):
    sent = 400
    with Hosts(2) as hosts:
        sink = serve(hosts, 1, tool, "udpsink")
        hosts.loss(1, 0.5)
        hosts.run(0, [sys.executable, tool, "udpsend", hosts.address(1), str(PORT), str(sent)], check=True,
                  timeout=30)
        received = int(sink.stdout.readline())
        assert 0.25 * sent <= received <= 0.75 * sent, received


def test_iptables_missing_is_a_clear_error(tmp_path, monkeypatch):
    with Hosts(1) as hosts:
        monkeypatch.setenv("PATH", str(tmp_path))
        monkeypatch.setattr(netns, "_SBIN", ())
        with pytest.raises(NetnsError, match="install the Debian package iptables"):
            hosts.loss(0, 0.5)


def test_close_removes_everything(tool):
    hosts = Hosts(2)
    tag, subnet = hosts.tag, hosts.subnet
    server = serve(hosts, 1, tool)
    out = hosts.run(0, ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                    check=True)
    orphan = int(out.stdout)
    hosts.rate(0, 8)
    hosts.loss(1, 0.1)
    hosts.isolate(0)  # blackhole routes in the root namespace too
    hosts.cut_one_way(1, 0, mode="drop")
    assert leftovers(tag, subnet)
    hosts.close()
    assert leftovers(tag, subnet) == []
    assert server.poll() is not None
    assert gone(orphan)
    hosts.close()  # idempotent


def test_failed_construction_leaves_nothing(monkeypatch):
    real, seen = netns._run, []

    def flaky(argv, **kwargs):  # fails half way through host 1: after its namespace and veth exist
        seen.append(list(argv))
        if "-n" in argv and argv[argv.index("-n") + 1].endswith("n1") and "addr" in argv:
            raise NetnsError("injected failure")
        return real(argv, **kwargs)

    monkeypatch.setattr(netns, "_run", flaky)
    with pytest.raises(NetnsError, match="injected failure"):
        Hosts(3)
    bridge = next(argv[3] for argv in seen if argv[1:3] == ["link", "add"] and "bridge" in argv)
    tag = bridge[2:-1]
    assert any(argv[1:3] == ["netns", "add"] and argv[3].endswith("n1") for argv in seen)
    subnet = next(argv[3] for argv in seen if argv[1:3] == ["addr", "add"])
    assert leftovers(tag, ipaddress.ip_interface(subnet).network) == []
    with pytest.raises(ValueError):  # an invalid subnet fails before creating anything
        Hosts(2, subnet="10.1.2.0/28")


def test_two_instances_do_not_interfere(tool):
    with Hosts(2) as a, Hosts(2) as b:
        assert a.tag != b.tag and a.bridge != b.bridge and a.subnet != b.subnet
        assert not set(map(a.namespace, range(2))) & set(map(b.namespace, range(2)))
        with pytest.raises(NetnsError, match="in use"):
            Hosts(1, subnet=str(a.subnet))
        serve(a, 1, tool)
        serve(b, 1, tool)
        a.cut(0, 1)
        assert connect(a, 0, 1, tool)["result"] == "EINVAL"
        assert connect(b, 0, 1, tool)["result"] == "ok"
        a.close()
        assert connect(b, 0, 1, tool)["result"] == "ok"


def test_delay_by_netem_or_a_clear_error(tool):
    with Hosts(2) as hosts:
        assert isinstance(hosts.netem_available(), bool)
        assert delay_mechanism() == ("netem" if hosts.netem_available() else "proxy")
        if not hosts.netem_available():
            with pytest.raises(NetnsError, match="netem.*spirt.links"):
                hosts.delay(0, 100)
            hosts.delay(0, None)  # removing no delay is fine
            return
        serve(hosts, 1, tool)
        hosts.delay(0, 100)  # the SYN and the request each wait 100 ms on the way out
        assert connect(hosts, 0, 1, tool)["seconds"] >= 0.2
        hosts.delay(0, None)
        assert connect(hosts, 0, 1, tool)["seconds"] < 0.1
