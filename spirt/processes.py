"""The processes of a run: what is below a peer, what state it is in, signals that hit the right process,
and stopping a peer with everything it started.

A peer orchestrator starts gradient-function workers (spawned pool processes); a SIGKILLed orchestrator
cannot stop them, and a SIGSTOPped process does not react to SIGTERM. The helpers here are built on
psutil. A process is remembered by a *handle* (a :class:`psutil.Process`), which keeps the process's
start time next to its pid: a pid is reused once its process is gone, and :func:`signal_if_same` never
signals the later process that got it. (Start times count clock ticks, 10 ms; a pid comes back only
after the kernel has handed out all the others, much later than that.)
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from typing import Protocol

import psutil

__all__ = ["RUNNING", "SLEEPING", "STOPPED", "ZOMBIE", "GONE", "state", "alive", "descendants", "command_line",
           "handle", "signal_if_same", "stop_processes"]

#: :func:`state` values (psutil's status names); a process blocked on a signal (SIGSTOP) is STOPPED
RUNNING = psutil.STATUS_RUNNING  # on a CPU or waiting for one: a worker that computes
SLEEPING = psutil.STATUS_SLEEPING  # waiting for something (work, I/O, a timer)
STOPPED = psutil.STATUS_STOPPED
ZOMBIE = psutil.STATUS_ZOMBIE  # exited, not yet reaped by its parent
GONE = "gone"  # no such process (exited and reaped)

_ENDED = (ZOMBIE, psutil.STATUS_DEAD, GONE)


def state(pid: int) -> str:
    """RUNNING, SLEEPING, STOPPED, ZOMBIE, GONE, or another psutil status (``"disk-sleep"``, ...)."""
    try:
        return psutil.Process(pid).status()
    except psutil.ZombieProcess:
        return ZOMBIE
    except psutil.NoSuchProcess:
        return GONE


def alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie has)."""
    return state(pid) not in _ENDED


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...); empty if ``pid`` is gone."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def command_line(pid: int) -> str:
    """The process's arguments joined by spaces ("" if it is gone or a zombie)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def handle(pid: int) -> psutil.Process | None:
    """A handle on the process ``pid`` now (None if there is none), for :func:`signal_if_same` later."""
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def signal_if_same(proc: psutil.Process, sig: int) -> bool:
    """Send ``sig`` to the process of the handle ``proc`` if it still exists: not if it is gone, and not
    to a later process that got its pid (psutil compares the start times). True if it was sent."""
    try:
        if not proc.is_running():
            return False
        proc.send_signal(sig)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return True


class _Started(Protocol):
    """What :func:`stop_processes` needs of a process: :class:`multiprocessing.Process` has it."""

    pid: int | None

    def is_alive(self) -> bool: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


def stop_processes(procs: Iterable[_Started], grace_s: float = 10.0) -> None:
    """Stop processes (peer orchestrators) and everything below them (their function workers).

    Each process is continued (SIGCONT: a stopped process would not act on SIGTERM before it), sent
    SIGTERM, and SIGKILLed if it has not exited ``grace_s`` after. The processes below are SIGKILLed
    afterwards, those that still exist: orphaned workers exit on their own within a second, but a
    stopped or hung one would not, and the caller should not wait for them. Their handles are taken
    first, so that a pid reused meanwhile is not hit.
    """
    procs = list(procs)
    below: list[psutil.Process] = []
    for p in procs:
        if p.pid is not None and p.is_alive():
            below += [h for h in map(handle, descendants(p.pid)) if h is not None]
    for p in procs:
        if p.is_alive():
            try:
                os.kill(p.pid, signal.SIGCONT)
            except OSError:
                pass
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)
    for h in below:
        signal_if_same(h, signal.SIGKILL)
