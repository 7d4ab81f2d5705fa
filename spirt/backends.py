"""Aggregation backends: where a peer averages its K gradients and applies the model update.

All backends do the same arithmetic on the same float32 strings:

    g = mean(grad_1 .. grad_K)
    torch.optim.SGD step: d = g + wd * p; buf = d (first step) or momentum * buf + d; p -= lr * buf

- ``module``: the spirt tensor module's TENSOR.AVGSGD (TENSOR.AVG and TENSOR.SGD in one pass), inside the
  database, in one round trip.
- ``lua``: the same in a Redis Function (Lua), for servers that cannot load modules.
- ``client``: pipelined fetch, in-place numpy accumulation, store back (what a peer does without help
  from its database).

A backend declares what it needs from the server (:attr:`Backend.needs`: the tensor module, Redis
Functions) and which reductions it runs inside the database (:attr:`Backend.in_database`); callers
choose by these capabilities, never by the backend's name. The benchmark's reference point, the
released SPIRT code's JSON lists averaged in Lua, lives with the benchmark
(:mod:`spirt.benchmarks.reference`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import ClassVar

import numpy as np
import redis

from .registry import Registry
from .tensors import F32, as_f32_bytes, from_f32_bytes

__all__ = ["Backend", "ModuleBackend", "LuaBackend", "ClientBackend", "get_backend", "names", "needs", "needs_module",
           "registry", "BACKENDS", "TENSOR_MODULE", "REDIS_FUNCTIONS"]

#: Server features a backend may need.
TENSOR_MODULE = "tensor_module"
REDIS_FUNCTIONS = "redis_functions"

registry = Registry("aggregation backend")


@dataclass(frozen=True)
class SGDConfig:
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0


def lua_library() -> str:
    return resources.files("spirt").joinpath("lua/spirt.lua").read_text()


def load_lua(client: redis.Redis) -> None:
    """Load (or replace) the spirt Redis Functions library."""
    client.execute_command("FUNCTION", "LOAD", "REPLACE", lua_library())


class Backend:
    """Averages gradients and applies the SGD update in (or through) one database."""

    name = "base"
    #: stores tensors as raw float32 (True) or JSON lists (the SPIRT reference)
    raw = True
    #: what the server must offer: TENSOR_MODULE (the spirt tensor module loaded), REDIS_FUNCTIONS
    needs: ClassVar[frozenset[str]] = frozenset()
    #: reductions run inside the database: "mean", "median", "trimmed_mean" (the defenses' InDBPlan
    #: ops), "dist" (pairwise squared distances) and "finite" (a finiteness check)
    in_database: ClassVar[frozenset[str]] = frozenset()
    #: runs inside the server's one thread at interpreter speed: blocks it for seconds at 10M floats
    blocking: ClassVar[bool] = False
    #: a Lua expression of the 40-hex digest of the value at KEYS[1], computed inside the database
    #: (the peers compare their parameters' digests; every peer of a group uses the same backend)
    digest_lua: ClassVar[str] = "redis.sha1hex(redis.call('GET', KEYS[1]))"

    def prepare(self, client: redis.Redis) -> None:
        """One-time set-up on a server (loading scripts); idempotent."""

    def encode(self, x) -> bytes | memoryview:
        return as_f32_bytes(x)

    def decode(self, data) -> np.ndarray:
        return from_f32_bytes(data)

    def average(self, client: redis.Redis, dst: str, srcs: list[str]) -> int:
        raise NotImplementedError

    def reduce(self, client: redis.Redis, op: str, dst: str, srcs: list[str], args: dict | None = None) -> None:
        """``dst`` = the row reduction ``op`` (one of :attr:`in_database`: "mean", "median",
        "trimmed_mean" with ``args["trim"]``) of the tensors ``srcs``, inside the database."""
        if op == "mean" and "mean" in self.in_database:
            self.average(client, dst, srcs)
            return
        raise ValueError(f"the {self.name} backend has no in-database {op!r}")

    def distances(self, client: redis.Redis, srcs: list[str]) -> np.ndarray:
        """The (n, n) squared Euclidean distances of the tensors ``srcs``, computed in the database."""
        raise ValueError(f"the {self.name} backend computes no distances in the database")

    def finite_check(self, pipe, key: str) -> bool:
        """Queue a finiteness check of ``key`` (a reply of 1 or 0) on ``pipe`` when it runs in the
        database; False when the caller must fetch the tensor and check it itself."""
        return False

    def queue_average(self, pipe, dst: str, srcs: list[str]) -> bool:
        """Queue the average on ``pipe`` when it runs inside the database (one round trip with what else
        the caller queues); False when it must run through the client (call :meth:`average`)."""
        return False

    def update(self, client: redis.Redis, param: str, buf: str, grads: list[str], sgd: SGDConfig) -> int:
        """Average ``grads`` and apply one SGD step to ``param`` (momentum state in ``buf``)."""
        raise NotImplementedError

    def queue_update(self, pipe, client: redis.Redis, param: str, buf: str, grad: str,
                     sgd: SGDConfig) -> str | None:
        """Queue the SGD step with the aggregated gradient ``grad`` on a transaction ``pipe``, so that it
        lands atomically with the peer's bookkeeping (round completed, parameter version). Returns the
        digest of the new parameters (as ``digest_lua`` gives it) when they were computed on the client,
        else None (the database computes it)."""
        raise NotImplementedError

    def peer_momentum(self, client: redis.Redis, state: str, vec: str, beta: float) -> None:
        """Peer (worker) momentum, in place: ``vec = beta*state + (1-beta)*vec`` (``vec`` unchanged when
        ``state`` is missing: the first step, as torch's SGD with dampening), then ``state = vec``.
        The peer publishes ``vec`` afterwards, so its momentum is what the others aggregate.
        This form runs on the client in the backend's own encoding; in-database backends override it."""
        m_raw, v_raw = client.mget(state, vec)
        if v_raw is None:
            raise ValueError(f"peer momentum: key {vec!r} does not exist")
        v = np.array(self.decode(v_raw), dtype=F32)
        if m_raw is not None:
            m = self.decode(m_raw)
            if m.size != v.size:
                raise ValueError(f"peer momentum {state!r} has {m.size} floats, {vec!r} has {v.size}")
            v *= np.float32(1.0 - beta)
            v += np.float32(beta) * m
        data = self.encode(v)
        client.mset({vec: data, state: data})


@registry.register("module")
class ModuleBackend(Backend):
    """The spirt tensor module's commands, inside the database (one round trip per step)."""

    name = "module"
    needs = frozenset({TENSOR_MODULE})
    digest_lua = "redis.call('TENSOR.DIGEST', KEYS[1])"  # at memory speed, no copy into Lua
    in_database = frozenset({"mean", "median", "trimmed_mean", "dist", "finite"})

    def prepare(self, client):
        from .servers import has_command, module_path

        if not has_command(client, "TENSOR.AVG"):
            raise RuntimeError(
                "the server does not have the spirt tensor module loaded (TENSOR.AVG is unknown); "
                f"start it with --loadmodule {module_path()} or choose the 'lua' or 'client' backend"
            )
        if not has_command(client, "TENSOR.AVGSGD"):
            raise RuntimeError(
                "the server's spirt tensor module predates TENSOR.AVGSGD (version 1.1.0); load the one this "
                f"spirt builds ({module_path()})"
            )

    def average(self, client, dst, srcs):
        return int(client.execute_command("TENSOR.AVG", dst, *srcs))

    def queue_average(self, pipe, dst, srcs):
        pipe.execute_command("TENSOR.AVG", dst, *srcs)
        return True

    def reduce(self, client, op, dst, srcs, args=None):
        if op == "mean":
            client.execute_command("TENSOR.AVG", dst, *srcs)
        elif op == "median":
            client.execute_command("TENSOR.MEDIAN", dst, *srcs)
        elif op == "trimmed_mean":
            client.execute_command("TENSOR.TRIMMEAN", dst, int((args or {})["trim"]), *srcs)
        else:
            super().reduce(client, op, dst, srcs, args)

    def distances(self, client, srcs):
        flat = client.execute_command("TENSOR.DIST", *srcs)
        n = len(srcs)
        return np.asarray([float(v) for v in flat], dtype=np.float64).reshape(n, n)

    def finite_check(self, pipe, key):
        pipe.execute_command("TENSOR.FINITE", key)
        return True

    @staticmethod
    def sgd_options(buf: str, sgd: SGDConfig) -> list:
        """The learning rate and options of TENSOR.SGD and TENSOR.AVGSGD for ``sgd``."""
        args = [repr(float(sgd.lr))]
        if sgd.momentum > 0:
            args += ["MOMENTUM", repr(float(sgd.momentum)), buf]
        if sgd.weight_decay > 0:
            args += ["WD", repr(float(sgd.weight_decay))]
        return args

    def sgd_args(self, param: str, grad: str, buf: str, sgd: SGDConfig) -> list:
        return ["TENSOR.SGD", param, grad, *self.sgd_options(buf, sgd)]

    def queue_update(self, pipe, client, param, buf, grad, sgd):
        pipe.execute_command(*self.sgd_args(param, grad, buf, sgd))

    def peer_momentum(self, client, state, vec, beta):
        pipe = client.pipeline(transaction=False)
        if client.exists(state):  # only this peer writes its state, so the check cannot go stale
            pipe.execute_command("TENSOR.AXPY", vec, repr(float(beta)), state, repr(1.0 - float(beta)), vec)
        pipe.execute_command("COPY", vec, state, "REPLACE")
        pipe.execute()

    def update(self, client, param, buf, grads, sgd):
        # TENSOR.AVGSGD: the average and the step in one pass, with no temporary key to allocate, write,
        # read back and delete (the same bytes as TENSOR.AVG into a temporary, then TENSOR.SGD)
        return int(client.execute_command("TENSOR.AVGSGD", param, len(grads), *grads, *self.sgd_options(buf, sgd)))


@registry.register("lua")
class LuaBackend(Backend):
    """Redis Functions (Lua) on the raw strings, for servers that cannot load modules (slow, blocking)."""

    name = "lua"
    needs = frozenset({REDIS_FUNCTIONS})
    in_database = frozenset({"mean"})
    blocking = True

    def prepare(self, client):
        load_lua(client)

    def average(self, client, dst, srcs):
        return int(client.fcall("spirt_avg", 1 + len(srcs), dst, *srcs))

    def queue_average(self, pipe, dst, srcs):
        pipe.fcall("spirt_avg", 1 + len(srcs), dst, *srcs)
        return True

    def update(self, client, param, buf, grads, sgd):
        return int(
            client.fcall(
                "spirt_update", 2 + len(grads), param, buf, *grads, sgd.lr, sgd.momentum, sgd.weight_decay
            )
        )

    def queue_update(self, pipe, client, param, buf, grad, sgd):
        pipe.fcall("spirt_update", 3, param, buf, grad, sgd.lr, sgd.momentum, sgd.weight_decay)

    def peer_momentum(self, client, state, vec, beta):
        client.fcall("spirt_peer_momentum", 2, state, vec, beta)


@registry.register("client")
class ClientBackend(Backend):
    """Pipelined fetch, in-place numpy accumulation and store back: a peer without help from its database."""

    name = "client"

    def average(self, client, dst, srcs):
        acc = self._mean(client, srcs)
        client.set(dst, as_f32_bytes(acc))
        return acc.size

    @staticmethod
    def _mean(client, srcs, extra: list[str] = ()) -> np.ndarray:
        pipe = client.pipeline(transaction=False)
        for k in list(extra) + list(srcs):
            pipe.get(k)
        raw = pipe.execute()
        grads = raw[len(extra) :]
        acc = from_f32_bytes(grads[0], key=srcs[0], writable=True)
        for key, data in zip(srcs[1:], grads[1:], strict=True):
            g = from_f32_bytes(data, key=key)
            if g.size != acc.size:
                raise ValueError(f"gradient {key!r} has {g.size} floats, expected {acc.size}")
            np.add(acc, g, out=acc)
        acc *= np.float32(1.0 / len(srcs))
        return (acc, raw[: len(extra)]) if extra else acc

    def update(self, client, param, buf, grads, sgd):
        pipe = client.pipeline(transaction=False)
        n, _ = self._queue_update(pipe, client, param, buf, grads, sgd)
        pipe.execute()
        return n

    def queue_update(self, pipe, client, param, buf, grad, sgd):
        return self._queue_update(pipe, client, param, buf, grad, sgd)[1]

    def _queue_update(self, pipe, client, param, buf, grad, sgd) -> tuple[int, str]:
        """(floats, digest of the new parameters): the parameters are here anyway, and SHA-1 through
        hashlib costs a fraction of redis.sha1hex in Lua on the stored copy (0.5 against 4 ms for the
        MLP's 0.8 MB): most of what agreeing on the state costs this backend."""
        grads = [grad] if isinstance(grad, str) else list(grad)
        g, (p_raw, b_raw) = self._mean(client, grads, extra=[param, buf])
        p = from_f32_bytes(p_raw, key=param, writable=True)
        if p.size != g.size:
            raise ValueError(f"parameter {param!r} has {p.size} floats, gradients have {g.size}")
        d = g
        if sgd.weight_decay > 0:
            d += np.float32(sgd.weight_decay) * p
        if sgd.momentum > 0:
            if b_raw is not None:
                b = from_f32_bytes(b_raw, key=buf, writable=True)
                b *= np.float32(sgd.momentum)
                b += d
                d = b
            pipe.set(buf, as_f32_bytes(d))
        p -= np.float32(sgd.lr) * d
        new = as_f32_bytes(p)
        pipe.set(param, new)
        return p.size, hashlib.sha1(new).hexdigest()  # noqa: S324 - a state digest, not a signature


#: name -> backend class (the registry's view)
BACKENDS: dict[str, type[Backend]] = {n: registry.cls(n) for n in registry.names()}


def names() -> list[str]:
    return registry.names()


def needs(name: str) -> frozenset[str]:
    """What the server must offer for the backend ``name``."""
    return registry.cls(name).needs


def needs_module(name: str) -> bool:
    """Whether the servers of a run with backend ``name`` must load the tensor module."""
    return TENSOR_MODULE in needs(name)


def get_backend(name: str) -> Backend:
    return registry.get(name)
