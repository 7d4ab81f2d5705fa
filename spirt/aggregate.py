"""Aggregating the peers' published averages: in the database where the rule has a database form.

The defense objects (``defenses`` package) hold the maths and say, as data, whether they have a
database form (``in_db_plan()``). This module maps such a plan onto the tensor module's commands:

    mean -> TENSOR.AVG;  median -> TENSOR.MEDIAN;  trimmed_mean -> TENSOR.TRIMMEAN
    krum / multi_krum -> TENSOR.DIST (n x n squared distances) -> select() on the client -> TENSOR.AVG

Any other rule, or any rule on a server without the module, runs on the client over the fetched
(n, d) matrix and the result is stored back.
"""

from __future__ import annotations

import numpy as np
import redis

from .tensors import as_f32_bytes, from_f32_bytes


def in_db_possible(defense) -> bool:
    plan = getattr(defense, "in_db_plan", lambda: None)()
    return plan is not None and plan.op in ("mean", "median", "trimmed_mean")


def aggregate_in_db(client: redis.Redis, defense, keys: list[str], out_key: str) -> list[int]:
    """Run ``defense`` over the tensors at ``keys`` inside the database; returns the indices used."""
    plan = defense.in_db_plan()
    if plan is None:
        raise ValueError(f"{type(defense).__name__} has no in-database form")
    n = len(keys)
    if hasattr(defense, "check"):
        defense.check(n)
    chosen = list(range(n))
    if plan.select:
        flat = client.execute_command("TENSOR.DIST", *keys)
        d = np.asarray([float(v) for v in flat], dtype=np.float64).reshape(n, n)
        chosen = [int(i) for i in np.atleast_1d(defense.select(d).indices)]
    use = [keys[i] for i in chosen]
    if plan.op == "mean":
        client.execute_command("TENSOR.AVG", out_key, *use)
    elif plan.op == "median":
        client.execute_command("TENSOR.MEDIAN", out_key, *use)
    elif plan.op == "trimmed_mean":
        client.execute_command("TENSOR.TRIMMEAN", out_key, int(plan.args["trim"]), *use)
    else:
        raise ValueError(f"no database command for the plan {plan.op!r}")
    return chosen


def aggregate_on_client(client: redis.Redis, defense, keys: list[str], out_key: str,
                        vectors: np.ndarray | None = None, ttl_ms: int | None = None) -> np.ndarray:
    """Fetch (unless given), aggregate with numpy, store the result at ``out_key``."""
    if vectors is None:
        raw = client.mget(keys)
        vectors = np.stack([from_f32_bytes(b, key=k) for k, b in zip(keys, raw, strict=True)])
    out = np.asarray(defense(vectors), dtype=np.float32)
    client.set(out_key, as_f32_bytes(out), px=ttl_ms)
    return out
