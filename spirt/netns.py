"""Emulated hosts on one Linux machine: network namespaces on a private bridge, with real partitions,
bandwidth limits and packet loss (needs root).

Each host is a network namespace with one veth end (``eth0``) on a Linux bridge, on a private IPv4 /24;
the root namespace has ``.254`` on the bridge, so the creating process reaches every host directly.
Partitions are blackhole routes (connect fails at once) or iptables DROP rules (silent: timeouts),
bandwidth is tbf, loss is a random iptables DROP. Without the netem qdisc (this kernel has none) there is
no kernel delay: :func:`delay_mechanism` says ``"proxy"`` and delay belongs to :class:`spirt.links.Links`.

    with Hosts(3) as hosts:
        server = hosts.popen(1, [sys.executable, "server.py", hosts.address(1)])
        hosts.rate(0, 8)                 # host 0 sends at most 8 Mbit/s
        hosts.cut(0, 1)                  # 0 and 1 no longer reach each other; hosts.heal() undoes it
        hosts.run(0, [sys.executable, "client.py", hosts.address(1)])
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import functools
import ipaddress
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence

__all__ = ["Hosts", "NetnsError", "PeerCuts", "available", "delay_mechanism", "enter", "netem_available"]

#: where root's commands live, searched after PATH
_SBIN = ("/usr/sbin", "/sbin")
#: Debian packages of the commands this module drives, named in the error when one is missing
_PACKAGES = {"ip": "iproute2", "tc": "iproute2", "iptables": "iptables"}
#: where subnets are picked from when none is given: 10.200.0.0/24 ... 10.254.255.0/24
_FIRST_OCTET, _OCTETS = 200, 55
#: serializes subnet choice + bridge address between processes (pytest-xdist workers)
_LOCK_PATH = "/run/lock/spirt-netns.lock" if os.path.isdir("/run/lock") else "/tmp/spirt-netns.lock"
#: errors that mean the object to remove is gone already (with its namespace, say): fine when undoing
_GONE = ("Cannot find device", "No such file", "No such process", "does not exist", "Bad rule")
MODES = ("route", "drop")
_ROOT = -1  # the root namespace, as a peer in the internal cut primitives
_CLONE_NEWNET = 0x40000000
_counter = itertools.count()
_netem: bool | None = None


class NetnsError(RuntimeError):
    """A command failed (its argv and stderr are in the message), or a tool or kernel feature is missing."""


def _tool(name: str) -> str:
    # root's PATH usually has /usr/sbin, a virtualenv's activation or sudo's secure_path may not
    candidates = (shutil.which(name), *(f"{d}/{name}" for d in _SBIN))
    path = next((p for p in candidates if p and os.access(p, os.X_OK)), None)
    if path is None:
        pkg = _PACKAGES[name]
        raise NetnsError(f"the {name} command is missing: install the Debian package {pkg} "
                         f"(apt-get install -y --no-install-recommends {pkg})")
    return path


def _run(argv: Sequence[str], *, gone_ok: bool = False) -> str:
    """Run one command; raise NetnsError with the command and its stderr when it fails (unless
    ``gone_ok`` and the error says the object to remove no longer exists)."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"`{shlex.join(argv)}` timed out after 30 s") from e
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()
        if gone_ok and any(s in err for s in _GONE):
            return ""
        raise NetnsError(f"`{shlex.join(argv)}` failed (exit {proc.returncode}): {err}")
    return proc.stdout


@functools.cache
def available() -> tuple[bool, str]:
    """Whether this process can create network namespaces, and why not (``""`` when it can)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    try:
        ip = _tool("ip")
        name = f"spprobe{os.getpid()}"
        _run([ip, "netns", "add", name])
        _run([ip, "netns", "del", name])
    except NetnsError as e:
        return False, f"cannot create a network namespace: {e}"
    return True, ""


def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (probed once, on ``lo`` of a scratch namespace)."""
    global _netem
    if _netem is None:
        _netem = False
        if available()[0]:
            ip, tc = _tool("ip"), _tool("tc")
            name = f"spnetem{os.getpid()}"
            _run([ip, "netns", "add", name])
            try:
                _run([tc, "-n", name, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
                _netem = True
            except NetnsError:
                pass  # "Specified qdisc kind is unknown": no sch_netem
            finally:
                _run([ip, "netns", "del", name])  # takes its lo and qdisc along
    return _netem


def delay_mechanism() -> str:
    """``"netem"`` when :meth:`Hosts.delay` works, else ``"proxy"`` (delay by :class:`spirt.links.Links`)."""
    return "netem" if netem_available() else "proxy"


def _in_use() -> list[ipaddress.IPv4Network]:
    """IPv4 networks already on the machine: addresses (with their prefix) and routes of every table."""
    ip = _tool("ip")
    nets = []
    for link in json.loads(_run([ip, "-j", "-4", "addr"]) or "[]"):
        for a in link.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for route in json.loads(_run([ip, "-j", "-4", "route", "show", "table", "all"]) or "[]"):
        if route.get("dst", "default") != "default":  # the default route overlaps everything
            nets.append(ipaddress.ip_network(route["dst"], strict=False))
    return nets


class Hosts:
    """``n`` emulated hosts: host ``i`` is namespace :meth:`namespace` with address :meth:`address`.

    ``subnet`` (an IPv4 /24) defaults to a free one in 10.200-254.x.0/24; ``prefix`` (default ``"sp"``,
    at most 4 characters) starts every name, followed by a tag unique to this process and instance.
    Everything created is removed by :meth:`close` (also on ``__exit__``, at interpreter exit, and when
    the constructor fails half way).

    Cut modes, as a TCP client sees them:

    - ``"route"``: blackhole routes in both namespaces; ``connect()`` fails at once with EINVAL, on both
      sides, as if the route were withdrawn. No iptables needed (except for one-way cuts, see below).
    - ``"drop"``: iptables DROP on input, on both sides; packets vanish silently, ``connect()`` times out
      and open connections stall, as in a real partition.

    One-way cuts (:meth:`cut_one_way`) act on connections, as those of :mod:`spirt.links`: ``i`` can no
    longer reach ``j`` over the connections ``i`` opens (new ones and those already open), while ``j``
    still opens connections to ``i`` and gets replies. (A blackhole route from ``i`` to ``j`` would swallow
    those replies too, which for TCP is a two-way cut.) They are iptables rules matching the connections
    ``i`` originated (conntrack's original source): REJECT with net-unreachable in ``i``'s output
    (``"route"``: ``connect()`` fails at once with ENETUNREACH) or DROP in ``j``'s input (``"drop"``).
    :meth:`isolate` also cuts the host from the root namespace: in ``"route"`` mode with a blackhole route
    in the root namespace as well; in ``"drop"`` mode with rules in the host only (the root's iptables are
    left alone), so there the host's own UDP sends to the root fail with EPERM rather than vanish.
    """

    def __init__(self, n: int, *, subnet: str | None = None, prefix: str | None = None):
        if not 1 <= n <= 253:
            raise ValueError(f"between 1 and 253 hosts fit a /24 next to the root's .254, not {n}")
        prefix = "sp" if prefix is None else prefix
        if not (prefix.isalnum() and prefix.isascii() and len(prefix) <= 4):
            raise ValueError(f"prefix must be 1-4 ASCII letters or digits, not {prefix!r}")
        self.n = n
        #: unique per process (pid, 5 base-36 digits) and instance (counter): names never collide
        self.tag = _base36(os.getpid()).rjust(5, "0") + _base36(next(_counter))
        self.bridge = f"{prefix}{self.tag}b"
        self._veths = [f"{prefix}{self.tag}v{i}" for i in range(n)]
        self._namespaces = [f"{prefix}{self.tag}n{i}" for i in range(n)]
        if len(self._veths[-1]) > 15:  # IFNAMSIZ - 1
            raise ValueError(f"interface name {self._veths[-1]!r} is longer than 15 characters")
        self._ip, self._tc = _tool("ip"), _tool("tc")
        self._undo: list[Callable[[], None]] = []  # in creation order, run in reverse by close()
        self._procs: list[subprocess.Popen] = []
        self._cuts: dict[tuple[str, ...], tuple[str, ...]] = {}  # add argv -> removal argv, in order
        self._loss: dict[int, list[str]] = {}  # host -> its iptables loss rule
        self._shaping: dict[int, dict[str, object]] = {i: {} for i in range(n)}
        self._closed = False
        atexit.register(self.close)
        try:
            self.subnet = self._create_bridge(subnet)
            for i in range(n):
                self._add_host(i)
        except BaseException:
            self.close()
            raise

    # -- creation -----------------------------------------------------------------------------------
    def _create_bridge(self, subnet: str | None) -> ipaddress.IPv4Network:
        ip = self._ip
        # the lock spans the check and the bridge address, so two processes cannot pick the same /24
        with open(_LOCK_PATH, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = _in_use()
            if subnet is not None:
                net = ipaddress.IPv4Network(subnet)
                if net.prefixlen != 24:
                    raise ValueError(f"subnet must be a /24, not {subnet}")
                if any(net.overlaps(u) for u in used):
                    raise NetnsError(f"subnet {net} is already in use on this machine")
            else:
                net = self._free_subnet(used)
            _run([ip, "link", "add", self.bridge, "type", "bridge"])
            self._undo.append(lambda: _run([ip, "link", "del", self.bridge], gone_ok=True))
            _run([ip, "addr", "add", f"{net[254]}/24", "dev", self.bridge])
        _run([ip, "link", "set", self.bridge, "up"])
        return net

    def _free_subnet(self, used: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
        total = _OCTETS * 256
        start = (os.getpid() * 7919 + int(self.tag, 36)) % total  # spread processes over the range
        for k in range(total):
            c = (start + k) % total
            net = ipaddress.IPv4Network(f"10.{_FIRST_OCTET + c // 256}.{c % 256}.0/24")
            if not any(net.overlaps(u) for u in used):
                return net
        raise NetnsError(f"no free /24 in 10.{_FIRST_OCTET}-{_FIRST_OCTET + _OCTETS - 1}.x.0: pass subnet=")

    def _add_host(self, i: int) -> None:
        ip, ns, veth = self._ip, self._namespaces[i], self._veths[i]
        _run([ip, "netns", "add", ns])
        self._undo.append(lambda: self._remove_namespace(ns))
        # the peer is born inside the namespace, so it can be called eth0 there
        _run([ip, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        self._undo.append(lambda: _run([ip, "link", "del", veth], gone_ok=True))
        _run([ip, "link", "set", veth, "master", self.bridge, "up"])
        _run([ip, "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0"])
        _run([ip, "-n", ns, "link", "set", "eth0", "up"])
        _run([ip, "-n", ns, "link", "set", "lo", "up"])  # servers inside may listen on 127.0.0.1
        self._track_connections(i)

    def _track_connections(self, i: int) -> None:
        # A namespace tracks connections only once a rule needs it. A one-way cut matches the connections
        # a host opened (conntrack's original source), and a connection first seen mid-stream gets its
        # origin from whichever packet comes first: made at the cut, a reply would pass for the opener.
        # So tracking starts with the host, by a rule that does nothing else (without iptables, there are
        # no one-way cuts to make).
        try:
            iptables = _tool("iptables")
        except NetnsError:
            return
        _run(self.command(i, [iptables, "-w", "5", "-t", "mangle", "-A", "PREROUTING", "-m", "conntrack",
                              "--ctstate", "NEW", "-j", "RETURN"]))

    def _remove_namespace(self, ns: str) -> None:
        self._kill_inside(ns)
        _run([self._ip, "netns", "del", ns], gone_ok=True)

    def _kill_inside(self, ns: str) -> None:
        # a namespace lives on (with its veth and rules) while a process is in it: kill them all first
        deadline = time.monotonic() + 5
        while pids := _run([self._ip, "netns", "pids", ns], gone_ok=True).split():
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise NetnsError(f"processes {pids} in namespace {ns} survive SIGKILL")
            time.sleep(0.02)

    # -- the hosts ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Hosts({self.n}, subnet={getattr(self, 'subnet', None)}, bridge={self.bridge!r})"

    def _host(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"host {i} is not one of 0..{self.n - 1}")
        return i

    def address(self, i: int) -> str:
        """Host ``i``'s IPv4 address (``.i+1`` of the subnet)."""
        return str(self.subnet[self._host(i) + 1])

    @property
    def root_address(self) -> str:
        """The root namespace's address on the bridge (``.254``)."""
        return str(self.subnet[254])

    def namespace(self, i: int) -> str:
        """Host ``i``'s network namespace name (for ``ip netns exec``)."""
        return self._namespaces[self._host(i)]

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside host ``i``."""
        return [self._ip, "netns", "exec", self.namespace(i), *argv]

    def popen(self, i: int, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside host ``i`` in a process group of its own; :meth:`close` kills it."""
        proc = subprocess.Popen(self.command(i, argv), start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, i: int, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``argv`` inside host ``i``."""
        return subprocess.run(self.command(i, argv), **kwargs)

    # -- bandwidth and delay ------------------------------------------------------------------------
    def rate(self, i: int, mbit: float | None, *, burst_kb: float | None = None,
             latency_ms: float = 50) -> None:
        """Limit host ``i``'s egress to ``mbit`` Mbit/s with tbf (``None``: no limit).

        The burst defaults to 10 ms of traffic, but at least 3200 bytes: tbf needs at least rate/HZ to
        reach the rate (10 ms covers HZ=100, the coarsest kernel tick) and at least one full frame (two
        1514-byte frames, with slack). ``latency_ms`` bounds how long a packet may queue (tbf's limit)."""
        self._host(i)
        if mbit is None:
            self._shaping[i].pop("rate", None)
        else:
            if mbit <= 0:
                raise ValueError(f"rate must be positive, not {mbit}")
            burst = int(burst_kb * 1024) if burst_kb is not None else max(int(mbit * 1e6 / 8 / 100), 3200)
            self._shaping[i]["rate"] = ["rate", f"{round(mbit * 1000)}kbit", "burst", str(burst),
                                        "latency", f"{latency_ms}ms"]
        self._shape(i)

    def delay(self, i: int, ms: float | None) -> None:
        """Delay every packet host ``i`` sends by ``ms`` milliseconds with netem (``None``/0: no delay).
        Raises NetnsError when the kernel has no netem (see :func:`delay_mechanism`)."""
        self._host(i)
        if not ms:
            if self._shaping[i].pop("delay", None) is not None:
                self._shape(i)
            return
        if not netem_available():
            raise NetnsError("delay needs the netem qdisc, which this kernel lacks (delay_mechanism() == "
                             "'proxy'): delay connections in user space with spirt.links.Links.delay")
        self._shaping[i]["delay"] = ["delay", f"{ms}ms"]
        self._shape(i)

    def netem_available(self) -> bool:
        """See :func:`netem_available`."""
        return netem_available()

    def delay_mechanism(self) -> str:
        """See :func:`delay_mechanism`."""
        return delay_mechanism()

    def _shape(self, i: int) -> None:
        # rebuilt from scratch: tbf at the root with netem as its child, or either one alone
        tc = [self._tc, "-n", self.namespace(i), "qdisc"]
        shaping = self._shaping[i]
        if shaping.get("active"):
            _run([*tc, "del", "dev", "eth0", "root"], gone_ok=True)
            shaping.pop("active")
        rate, delay = shaping.get("rate"), shaping.get("delay")
        if rate:
            _run([*tc, "add", "dev", "eth0", "root", "handle", "1:", "tbf", *rate])
        if delay:
            _run([*tc, "add", "dev", "eth0", *(["parent", "1:1"] if rate else ["root"]), "handle", "10:",
                  "netem", *delay])
        if rate or delay:
            shaping["active"] = True

    # -- partitions and loss ------------------------------------------------------------------------
    def cut(self, i: int, j: int, *, mode: str = "route") -> None:
        """Hosts ``i`` and ``j`` can no longer reach each other, either way."""
        if i == j:
            raise ValueError(f"cannot cut host {i} from itself")
        self._block(self._host(i), self._host(j), mode)
        self._block(j, i, mode)

    def drop(self, i: int, j: int) -> None:
        """``cut(i, j, mode="drop")``: a silent partition, connects time out."""
        self.cut(i, j, mode="drop")

    def cut_one_way(self, i: int, j: int, *, mode: str = "route") -> None:
        """Host ``i`` can no longer reach ``j`` over connections it opens (new ones and those already
        open: a connection pool does not outlive the cut); ``j`` still opens connections to ``i``."""
        if i == j:
            raise ValueError(f"cannot cut host {i} from itself")
        self._block(self._host(i), self._host(j), mode, originated=True)

    def isolate(self, i: int, *, mode: str = "route") -> None:
        """Host ``i`` reaches no other host and not the root namespace, and none of them reaches it."""
        for j in range(self.n):
            if j != i:
                self.cut(i, j, mode=mode)
        self._block(self._host(i), _ROOT, mode)
        self._block(_ROOT, i, mode)

    def split(self, *groups: Sequence[int], mode: str = "route") -> None:
        """Cut every pair of hosts in different groups."""
        for g, left in enumerate(groups):
            for right in groups[g + 1:]:
                for i in left:
                    for j in right:
                        self.cut(i, j, mode=mode)

    def heal(self) -> None:
        """Remove every cut (both modes); rate limits, delay and loss stay."""
        while self._cuts:
            _run(self._cuts.popitem()[1], gone_ok=True)  # newest first

    def loss(self, i: int, fraction: float) -> None:
        """Drop ``fraction`` of the packets host ``i`` receives, at random (0: no loss)."""
        self._host(i)
        if not 0 <= fraction <= 1:
            raise ValueError(f"loss must be a fraction in [0, 1], not {fraction}")
        if old := self._loss.pop(i, None):
            _run(self._iptables(i, "-D", *old), gone_ok=True)
        if fraction > 0:
            rule = ["INPUT", "-m", "statistic", "--mode", "random", "--probability", f"{fraction:.6f}",
                    "-j", "DROP"]
            _run(self._iptables(i, "-A", *rule))
            self._loss[i] = rule

    def _iptables(self, i: int, *args: str) -> list[str]:
        # -w: wait for the xtables lock rather than fail when another iptables runs (legacy backend)
        return self.command(i, [_tool("iptables"), "-w", "5", *args])

    def _block(self, src: int, dst: int, mode: str, *, originated: bool = False) -> None:
        """``src``'s packets to ``dst`` no longer arrive (``originated``: only those of connections ``src``
        opened).
        Either may be _ROOT; one-way cuts involve hosts only."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        addr = lambda k: self.root_address if k == _ROOT else self.address(k)  # noqa: E731
        conn = ["-m", "conntrack", "--ctorigsrc", addr(src)] if originated else []
        if mode == "route" and not originated:
            where = [self._ip] if src == _ROOT else [self._ip, "-n", self.namespace(src)]
            add = (*where, "route", "add", "blackhole", f"{addr(dst)}/32")
            remove = (*where, "route", "del", "blackhole", f"{addr(dst)}/32")
        elif mode == "route":
            rule = ["OUTPUT", "-d", addr(dst), *conn, "-j", "REJECT", "--reject-with", "icmp-net-unreachable"]
            add, remove = tuple(self._iptables(src, "-A", *rule)), tuple(self._iptables(src, "-D", *rule))
        elif dst == _ROOT:  # rules in the root namespace are not ours to add: drop on the way out
            rule = ["OUTPUT", "-d", self.root_address, "-j", "DROP"]
            add, remove = tuple(self._iptables(src, "-A", *rule)), tuple(self._iptables(src, "-D", *rule))
        else:  # on the way in: the sender's send() succeeds and the packet vanishes, as on a real network
            rule = ["INPUT", "-s", addr(src), *conn, "-j", "DROP"]
            add, remove = tuple(self._iptables(dst, "-A", *rule)), tuple(self._iptables(dst, "-D", *rule))
        if add not in self._cuts:
            _run(add)
            self._cuts[add] = remove

    # -- teardown -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove everything this instance created: processes inside, namespaces (with their routes,
        rules and qdiscs), veths, the bridge and blackhole routes in the root namespace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        errors = []
        for proc in self._procs:  # ours: kill the whole group, and reap it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired as e:
                errors.append(e)
        # only the root namespace's blackhole routes outlive the namespaces (they are tied to no device)
        steps = [functools.partial(_run, rm, gone_ok=True) for rm in self._cuts.values() if rm[1] == "route"]
        self._cuts.clear()
        for step in steps + self._undo[::-1]:
            try:
                step()
            except (NetnsError, OSError) as e:  # keep going: remove as much as possible
                errors.append(e)
        self._undo.clear()
        if errors:
            raise NetnsError("close left something behind: " + "; ".join(map(str, errors)))



def enter(namespace: str) -> None:
    """Move the calling thread into the network namespace ``namespace`` (one of :meth:`Hosts.namespace`),
    as ``ip netns exec`` does, and with it every process and thread it starts from then on (needs root).

    For a process's own start (a peer process, a server between fork and exec): once it has threads,
    those keep their namespace."""
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hasattr(os, "setns"):  # Python >= 3.12
            os.setns(fd, _CLONE_NEWNET)
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetnsError(f"setns into network namespace {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)


class PeerCuts:
    """The partitions of :class:`spirt.links.Links` (``cut``, ``cut_one_way``, ``isolate``, ``split``,
    ``bridge``, ``heal``) made on emulated hosts: peer ``i`` lives on host ``i`` and a cut is a blackhole
    route or an iptables rule (``mode``, see :class:`Hosts`) instead of a silent proxy. Only links between
    peers are cut: the root namespace, where the harness observes the peers' databases from, keeps
    reaching every host, as the observer of a proxied cluster reaches the databases directly."""

    def __init__(self, hosts: Hosts, mode: str = "drop"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.hosts, self.mode = hosts, mode

    def cut_one_way(self, src: int, dst: int) -> None:
        """``src`` can no longer reach ``dst``'s database (``dst`` still reaches ``src``'s)."""
        self.hosts.cut_one_way(src, dst, mode=self.mode)

    def cut(self, a: int, b: int) -> None:
        """Neither of a and b reaches the other's database."""
        self.hosts.cut(a, b, mode=self.mode)

    def isolate(self, p: int) -> None:
        """No other peer reaches p, and p reaches none of them."""
        for q in range(self.hosts.n):
            if q != p:
                self.cut(p, q)

    def split(self, *sides: Sequence[int]) -> None:
        """Cut every pair of peers on different sides."""
        self.hosts.split(*sides, mode=self.mode)

    def bridge(self, left: Sequence[int], bridge: int, right: Sequence[int]) -> None:
        """Two sides that cannot reach each other, and a ``bridge`` peer (on neither) that reaches both."""
        if bridge in left or bridge in right:
            raise ValueError(f"the bridge peer {bridge} is on a side")
        self.split(left, right)

    def heal(self) -> None:
        """Every link up again."""
        self.hosts.heal()


def _base36(k: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        k, r = divmod(k, 36)
        out = digits[r] + out
        if not k:
            return out
