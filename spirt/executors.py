"""How a peer invokes its K gradient functions: inline, a warm local process pool, or Ray tasks.

All three run the same :func:`spirt.functions.compute_gradient` on the same tasks, so results are the
same whichever executor runs them. Failed invocations (the function raised, its worker died, or it
hung past the timeout) are retried with exponential backoff up to ``retries`` times; an invocation that
still fails is reported, not raised, so the round can go on with the gradients that arrived.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from .functions import FunctionSpec, GradResult, GradTask, compute_gradient, warm_up
from .processes import exit_with
from .registry import Registry

registry = Registry("executor")


@dataclass
class Invocation:
    task: GradTask
    result: GradResult | None
    error: str | None
    attempts: int
    #: (wall time, error) of every failed attempt, also when a retry then succeeded
    failures: list[tuple[float, str]] = field(default_factory=list)


def cpu_share(slot: int, workers: int, slots: int, cpus: set[int] | None = None) -> set[int] | None:
    """The CPUs of this host that the pool of the peer in ``slot`` (its index, of ``slots`` peers whose
    pools run here) is pinned to: ``workers`` of the CPUs we may use, round-robin over the slots. None
    (no pinning) where it is not possible (not Linux), where it would take CPUs away (a pool at least
    as large as the host), or where the pools cannot be spread evenly (3 single-worker peers on 2 cores
    would put two on one core and leave the third alone on the other: pinned, rounds took 21% longer).

    Why: co-located peers' single-threaded workers, left to the scheduler, are moved between CPUs and
    share them unevenly (three on one core, one alone on the other for a while); each peer then ends
    its fan-out at a different time and the others wait at the barrier. Measured with 4 peers x 1
    worker on 2 cores (cnn): the spread of the peers' fan-out times fell from 26 ms to 9 ms a round.
    """
    if not hasattr(os, "sched_getaffinity"):
        return None
    avail = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if workers >= len(avail) or (slots * workers) % len(avail):
        return None
    return {avail[(slot * workers + j) % len(avail)] for j in range(workers)}


def _worker_init(spec: FunctionSpec, cpus: set[int] | None = None, peer: int | None = None) -> None:
    # a SIGKILLed orchestrator cannot shut its pool down: its workers go with it
    if peer is not None:
        exit_with(peer)
    # pinned first: the torch import and the data loading run on the worker's own share too
    if cpus:
        os.sched_setaffinity(0, cpus)
    import torch

    torch.set_num_threads(1)
    warm_up(spec)


def _warm_pid(spec: FunctionSpec) -> int:
    """A warm-up task that says which worker ran it (the short sleep lets a worker that is still starting
    take the next one instead of the busy one)."""
    warm_up(spec)
    time.sleep(0.02)
    return os.getpid()


class Executor:
    """Runs a peer's gradient functions. Subclasses implement :meth:`map`; :meth:`warm` and :meth:`close`
    have do-nothing defaults for executors without processes of their own."""

    name = "base"
    #: runs its functions in worker processes on this host, which can be pinned to CPUs (``cpus=``)
    local_workers: bool = False

    def __init__(self, spec: FunctionSpec, *, workers: int = 2, retries: int = 2, timeout_s: float = 60.0,
                 backoff_s: float = 0.05):
        self.spec, self.workers, self.retries, self.timeout_s, self.backoff_s = spec, workers, retries, timeout_s, backoff_s

    def map(self, tasks: list[GradTask]) -> list[Invocation]:
        raise NotImplementedError

    def warm(self, timeout_s: float | None = None) -> None:
        """Block until the functions can run without start-up cost (torch imported, data loaded)."""

    def close(self) -> None:
        """Release the executor's workers."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@registry.register("inline")
class InlineExecutor(Executor):
    """Runs the functions one after another in the caller (debugging, tests, deterministic runs)."""

    name = "inline"

    def map(self, tasks):
        out = []
        for t in tasks:
            failures: list[tuple[float, str]] = []
            for attempt in range(self.retries + 1):
                try:
                    out.append(Invocation(t, compute_gradient(t), None, attempt + 1, failures))
                    break
                except Exception as exc:  # noqa: BLE001 - reported per invocation
                    failures.append((time.time(), f"{type(exc).__name__}: {exc}"))
                    if attempt < self.retries:
                        time.sleep(self.backoff_s * 2**attempt)
            else:
                out.append(Invocation(t, None, failures[-1][1], self.retries + 1, failures))
        return out


@registry.register("process")
class ProcessExecutor(Executor):
    """A pool of warm worker processes (torch imported, data loaded, one torch thread each).

    Failure handling, per batch of invocations (``map``):

    - a function that raises is retried, with exponential backoff, up to ``retries`` times;
    - a worker that dies (killed, out of memory) breaks the pool: the pool is replaced and every
      invocation it had not finished is resubmitted (each counts an attempt);
    - a worker that hangs (stopped, deadlocked) is noticed by the timeout: when no invocation of the
      batch finished for ``timeout_s``, the pool's processes are killed, a fresh pool is warmed up and
      the unfinished invocations are resubmitted.

    An invocation that still fails after its retries is returned with its error, so the round goes on
    with the gradients that arrived. Worker processes exit on their own when the orchestrator dies.
    """

    name = "process"
    local_workers = True

    def __init__(self, spec, *, warm_timeout_s: float = 300.0, cpus: set[int] | None = None, **kw):
        super().__init__(spec, **kw)
        self.warm_timeout_s = warm_timeout_s
        self.cpus = set(cpus) if cpus else None  # the workers' CPU affinity (None: the scheduler's choice)
        self.pool_restarts = 0
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                   initializer=_worker_init, initargs=(self.spec, self.cpus, os.getpid()))

    def worker_pids(self) -> list[int]:
        return [p.pid for p in list((self._pool._processes or {}).values()) if p.pid is not None]

    def warm(self, timeout_s: float | None = None) -> None:
        """Block until every worker has run its initializer and built its cache.

        One task per worker is not enough: a worker that is done can take the next warm-up task while
        another is still importing torch (and is not yet pinned). So the warm-up repeats until every
        worker process has answered with its pid."""
        limit = timeout_s or self.warm_timeout_s
        deadline = time.monotonic() + limit
        answered: set[int] = set()
        while True:
            futs = [self._pool.submit(_warm_pid, self.spec) for _ in range(self.workers)]
            done, not_done = wait(futs, timeout=max(0.0, deadline - time.monotonic()))
            if not_done:
                raise TimeoutError(f"worker pool not warm after {limit:g} s")
            answered |= {f.result() for f in done}
            if len(answered) >= self.workers and set(self.worker_pids()) <= answered:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker pool not warm after {limit:g} s: {len(answered)} of "
                                   f"{self.workers} workers answered")

    def _kill_pool(self) -> None:
        """Kill the pool's processes (a stopped or hung worker does not react to anything else) and
        let the pool go."""
        procs = list((self._pool._processes or {}).values())
        for p in procs:
            try:
                p.kill()
            except (OSError, AttributeError, ValueError):
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            try:
                p.join(5)
            except (AssertionError, ValueError):
                pass

    def _replace_pool(self) -> None:
        self._kill_pool()
        self.pool_restarts += 1
        self._pool = self._new_pool()
        try:
            self.warm()
        except Exception:  # noqa: BLE001 - the resubmitted invocations fail and are reported instead
            pass

    def _submit(self, task: GradTask) -> Future:
        try:
            return self._pool.submit(compute_gradient, task)
        except (BrokenProcessPool, RuntimeError):
            self._replace_pool()
            return self._pool.submit(compute_gradient, task)

    def map(self, tasks):
        n = len(tasks)
        attempts = [0] * n
        failures: list[list[tuple[float, str]]] = [[] for _ in range(n)]
        results: dict[int, Invocation] = {}
        todo = list(range(n))
        while todo:
            futs: dict[Future, int] = {}
            for i in todo:
                attempts[i] += 1
                futs[self._submit(tasks[i])] = i
            # hung: no invocation finished for timeout_s (with queued invocations, each one gets
            # timeout_s from the end of the one before it in its worker)
            deadline = time.monotonic() + self.timeout_s
            not_done = set(futs)
            failed: list[int] = []
            broken = False
            while not_done:
                left = max(0.0, deadline - time.monotonic())
                t_call = time.monotonic()
                done, not_done = wait(not_done, timeout=left, return_when=FIRST_COMPLETED)
                if not done:
                    if time.monotonic() - t_call > left + 0.5:
                        # we overslept: this process itself was stopped (SIGSTOP, suspended VM) and the
                        # results may be waiting to be collected; a short grace before calling it a hang
                        deadline = time.monotonic() + min(1.0, self.timeout_s)
                        continue
                    break
                deadline = time.monotonic() + self.timeout_s
                for f in done:
                    i = futs[f]
                    try:
                        results[i] = Invocation(tasks[i], f.result(), None, attempts[i], failures[i])
                    except BrokenProcessPool as exc:  # a worker died: every unfinished invocation fails
                        broken = True
                        failures[i].append((time.time(), f"worker died ({type(exc).__name__})"))
                        failed.append(i)
                    except Exception as exc:  # noqa: BLE001 - the function raised: retry it
                        failures[i].append((time.time(), f"{type(exc).__name__}: {exc}"))
                        failed.append(i)
            for f in not_done:  # hung (or far too slow): the workers are killed below
                i = futs[f]
                failures[i].append((time.time(), f"timed out (no function finished for {self.timeout_s:g} s)"))
                failed.append(i)
            if not_done or broken:
                self._replace_pool()
            todo = [i for i in sorted(failed) if attempts[i] <= self.retries]
            for i in failed:
                if attempts[i] > self.retries:
                    results[i] = Invocation(tasks[i], None, failures[i][-1][1], attempts[i], failures[i])
            if todo:
                time.sleep(self.backoff_s * 2 ** (max(attempts[i] for i in todo) - 1))
        return [results[i] for i in range(n)]

    def close(self):
        """Shut the pool down; workers that do not finish within a few seconds (hung) are killed."""
        procs = list((self._pool._processes or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join(5)
            except (AssertionError, ValueError, OSError):
                pass


@registry.register("ray")
class RayExecutor(Executor):
    """Gradient functions as Ray tasks (``pip install spirt[ray]``), with Ray's own retries, preferring the
    node of the peer that invokes them (soft node affinity)."""

    name = "ray"

    def __init__(self, spec, *, address: str | None = None, **kw):
        super().__init__(spec, **kw)
        try:
            import ray
        except ImportError as exc:
            raise RuntimeError("the ray executor needs Ray: pip install 'spirt[ray]'") from exc
        self._ray = ray
        self._owns = False
        if not ray.is_initialized():
            ray.init(address=address, num_cpus=None if address else self.workers, include_dashboard=False,
                     log_to_driver=False, ignore_reinit_error=True)
            self._owns = True
        # near the peer: tasks prefer this process's node, where the peer's database is (a peer placed on a
        # Ray cluster, spirt.placement), and go elsewhere only when that node cannot take them
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
        self._fn = ray.remote(num_cpus=1, max_retries=self.retries, retry_exceptions=True,
                              scheduling_strategy=here)(_ray_gradient)

    def map(self, tasks):
        refs = [self._fn.remote(t) for t in tasks]
        out = []
        for t, ref in zip(tasks, refs, strict=True):
            try:
                out.append(Invocation(t, self._ray.get(ref, timeout=self.timeout_s * (self.retries + 1)), None, 1))
            except Exception as exc:  # noqa: BLE001
                err = f"{type(exc).__name__}: {exc}"
                out.append(Invocation(t, None, err, self.retries + 1, [(time.time(), err)]))
        return out

    def close(self):
        if self._owns:
            self._ray.shutdown()


def _ray_gradient(task: GradTask) -> GradResult:
    import torch

    torch.set_num_threads(1)
    return compute_gradient(task)


#: name -> executor class (the registry's view)
EXECUTORS: dict[str, type[Executor]] = {n: registry.cls(n) for n in registry.names()}


def names() -> list[str]:
    return registry.names()


def make_executor(kind: str, spec: FunctionSpec, **kw) -> Executor:
    return registry.cls(kind)(spec, **kw)


def executor_for(section, spec: FunctionSpec, slot: int, slots: int) -> Executor:
    """The executor an ``[executor]`` config section describes, for the peer in ``slot`` of ``slots``
    co-located peers: executors with local worker processes are pinned to that peer's share of the
    CPUs when ``pin_cpus`` is on (see :func:`cpu_share`)."""
    cls = registry.cls(section.kind)
    kw = {}
    if cls.local_workers and section.pin_cpus:
        kw["cpus"] = cpu_share(slot, section.workers, slots)
    return cls(spec, workers=section.workers, retries=section.retries, timeout_s=section.timeout_s, **kw)
