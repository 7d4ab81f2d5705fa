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
import select
import signal
import threading
import time
from collections.abc import Iterable
from typing import Protocol

import psutil

__all__ = ["RUNNING", "SLEEPING", "STOPPED", "ZOMBIE", "GONE", "state", "alive", "descendants", "command_line",
           "handle", "signal_if_same", "stop_processes", "exit_with", "interrupt_on_sigterm", "terminated"]

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


def exit_with(pid: int) -> threading.Thread:
    """End this process (``os._exit(1)``) as soon as process ``pid`` has exited; returns the watching thread.

    The backstop of clean shutdown for the processes a run starts below its harness (peer orchestrators,
    gradient-function workers, the grid's cell workers): a harness that is SIGKILLed, or SIGTERMed where
    nothing turns SIGTERM into an exit, cannot stop them. Left alone they wait forever: a pool worker
    holds both ends of its task queue, and a peer started from the forkserver holds the forkserver's
    "alive" pipe, so neither ever sees its parent go (observed: a SIGTERMed ``pytest bench/test_faults.py``
    left 4 peers, their 4 workers, the forkserver and the resource tracker running). Their own children
    watch them in turn, so the whole tree goes. The servers are covered apart from this: they get SIGTERM
    when the thread that started them ends (``PR_SET_PDEATHSIG``).

    ``pid`` is the harness, given explicitly: the parent of a forkserver child is the forkserver. The
    thread blocks on a pidfd of ``pid`` (Linux >= 5.3: it cannot confuse a later process that reuses the
    pid, and costs nothing while it waits), else polls the psutil handle (which compares start times).
    """

    def _wait_pidfd(fd: int) -> None:
        waiter = select.poll()  # not select(): it refuses descriptors above 1023
        waiter.register(fd, select.POLLIN)
        while not waiter.poll():
            pass
        os._exit(1)

    def _wait_poll(proc: psutil.Process | None) -> None:
        try:
            while proc is not None and proc.is_running() and proc.status() != ZOMBIE:
                time.sleep(0.5)
        except psutil.Error:  # gone between the two checks
            pass
        os._exit(1)

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)  # already gone
    except (AttributeError, OSError):  # no pidfd on this platform or kernel
        t = threading.Thread(target=_wait_poll, args=(handle(pid),), name=f"exit-with-{pid}", daemon=True)
    else:
        t = threading.Thread(target=_wait_pidfd, args=(fd,), name=f"exit-with-{pid}", daemon=True)
    t.start()
    return t


#: set by the SIGTERM handler of :func:`interrupt_on_sigterm` before it raises: whoever writes results at
#: teardown asks this rather than the test runner's own status, which the runner may fail to record (pytest
#: on Python 3.11 can crash while it reports an interrupt that landed on an instruction without a line
#: number, and then tears down as if the run were complete)
terminated = threading.Event()


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread, as Ctrl-C does (the test suites call this).

    Python dies of SIGTERM at once, so a SIGTERMed pytest (``tox`` stopped, a CI job cancelled) ran no
    ``finally``, context manager or fixture teardown: its servers died with it, the processes below it
    only by :func:`exit_with`. As a KeyboardInterrupt, pytest ends the test, tears its fixtures down and
    reports the run as interrupted (exit status 2). Only from the main thread, and only where SIGTERM
    still has its default action."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):

        def _on_term(signum, frame):
            terminated.set()
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, _on_term)
