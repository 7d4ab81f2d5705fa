"""How a peer invokes its K gradient functions: inline, a warm local process pool, or Ray tasks.

All three run the same :func:`spirt.functions.compute_gradient` on the same tasks, so results are the
same whichever executor runs them. Failed invocations are retried with exponential backoff up to
``retries`` times; an invocation that still fails is reported, not raised, so the round can go on
with the gradients that arrived.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from .functions import FunctionSpec, GradResult, GradTask, compute_gradient, warm_up


@dataclass
class Invocation:
    task: GradTask
    result: GradResult | None
    error: str | None
    attempts: int


def _worker_init(spec: FunctionSpec) -> None:
    import torch

    torch.set_num_threads(1)
    warm_up(spec)


class Executor:
    name = "base"

    def __init__(self, spec: FunctionSpec, *, workers: int = 2, retries: int = 2, timeout_s: float = 60.0,
                 backoff_s: float = 0.05):
        self.spec, self.workers, self.retries, self.timeout_s, self.backoff_s = spec, workers, retries, timeout_s, backoff_s

    def map(self, tasks: list[GradTask]) -> list[Invocation]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class InlineExecutor(Executor):
    """Runs the functions one after another in the caller (debugging, tests, deterministic runs)."""

    name = "inline"

    def map(self, tasks):
        out = []
        for t in tasks:
            err, attempts = None, 0
            for attempt in range(self.retries + 1):
                attempts = attempt + 1
                try:
                    out.append(Invocation(t, compute_gradient(t), None, attempts))
                    break
                except Exception as exc:  # noqa: BLE001 - reported per invocation
                    err = f"{type(exc).__name__}: {exc}"
                    time.sleep(self.backoff_s * 2**attempt)
            else:
                out.append(Invocation(t, None, err, attempts))
        return out


class ProcessExecutor(Executor):
    """A pool of warm worker processes (torch imported, data loaded, one torch thread each)."""

    name = "process"

    def __init__(self, spec, **kw):
        super().__init__(spec, **kw)
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                   initializer=_worker_init, initargs=(self.spec,))

    def warm(self) -> None:
        """Block until every worker has started and built its cache."""
        futs = [self._pool.submit(warm_up, self.spec) for _ in range(self.workers)]
        for f in futs:
            f.result()

    def map(self, tasks):
        pending: dict[int, tuple[GradTask, Future, int]] = {}
        for i, t in enumerate(tasks):
            pending[i] = (t, self._pool.submit(compute_gradient, t), 1)
        results: dict[int, Invocation] = {}
        deadline = time.monotonic() + self.timeout_s * (self.retries + 1)
        while pending:
            for i, (t, fut, attempts) in list(pending.items()):
                try:
                    res = fut.result(timeout=max(0.0, min(self.timeout_s, deadline - time.monotonic())))
                    results[i] = Invocation(t, res, None, attempts)
                    del pending[i]
                except (FutureTimeout, BrokenProcessPool, Exception) as exc:  # noqa: BLE001
                    err = "timed out" if isinstance(exc, FutureTimeout) else f"{type(exc).__name__}: {exc}"
                    if isinstance(exc, BrokenProcessPool):
                        # a worker died (killed, OOM): replace the pool, then retry
                        self._pool.shutdown(wait=False, cancel_futures=True)
                        self._pool = self._new_pool()
                        for j, (tj, fj, aj) in list(pending.items()):
                            if j != i and not fj.done():
                                pending[j] = (tj, self._pool.submit(compute_gradient, tj), aj)
                    if attempts <= self.retries and time.monotonic() < deadline:
                        time.sleep(self.backoff_s * 2 ** (attempts - 1))
                        pending[i] = (t, self._pool.submit(compute_gradient, t), attempts + 1)
                    else:
                        results[i] = Invocation(t, None, err, attempts)
                        del pending[i]
        return [results[i] for i in range(len(tasks))]

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor(Executor):
    """Gradient functions as Ray tasks (``pip install spirt[ray]``), with Ray's own retries."""

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
        self._fn = ray.remote(num_cpus=1, max_retries=self.retries, retry_exceptions=True)(_ray_gradient)

    def map(self, tasks):
        refs = [self._fn.remote(t) for t in tasks]
        out = []
        for t, ref in zip(tasks, refs, strict=True):
            try:
                out.append(Invocation(t, self._ray.get(ref, timeout=self.timeout_s * (self.retries + 1)), None, 1))
            except Exception as exc:  # noqa: BLE001
                out.append(Invocation(t, None, f"{type(exc).__name__}: {exc}", self.retries + 1))
        return out

    def close(self):
        if self._owns:
            self._ray.shutdown()


def _ray_gradient(task: GradTask) -> GradResult:
    import torch

    torch.set_num_threads(1)
    return compute_gradient(task)


EXECUTORS = {e.name: e for e in (InlineExecutor, ProcessExecutor, RayExecutor)}


def make_executor(kind: str, spec: FunctionSpec, **kw) -> Executor:
    try:
        cls = EXECUTORS[kind]
    except KeyError:
        raise ValueError(f"unknown executor {kind!r}; allowed: {', '.join(EXECUTORS)}") from None
    return cls(spec, **kw)
