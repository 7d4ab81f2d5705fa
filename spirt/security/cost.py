"""What checking signed updates costs next to the in-database update it guards.

The vectors stay in the database for the aggregation; checking one needs its bytes on the client
(the SHA-256 digest): a transaction copies it out of the sender's slot and reads it, then the digest,
the signature and a finiteness scan. A peer checks each vector as it arrives, while the barrier waits
for the others, so after the barrier only the last arrival's check remains. This module times the
in-database average + SGD step over K vectors, the checks of all K, and the check of the last one.

    python -m spirt.security.cost [n_floats ...]
"""

from __future__ import annotations

import statistics
import sys

import numpy as np
import redis

from ..benchmarks.update import time_call
from ..keys import Keys
from .identity import Identity
from .signing import sign_update, verify_update


def measure(client: redis.Redis, n: int, k: int = 4, reps: int = 5, tag: str = "seccost") -> dict:
    """Median seconds of: the in-database update (TENSOR.AVG of K vectors + TENSOR.SGD), the
    receiver's check of K signed vectors, and the sender's signing of one vector."""
    rng = np.random.default_rng(0)
    ids = [Identity.generate(q) for q in range(k)]
    K = Keys(0, prefix=f"{tag}-")
    keys = [K.incoming(q, 1) for q in range(k)]
    params, mom, agg = K.params, K.momentum, K.agg(1)
    raws = []
    for q, key in enumerate(keys):
        raw = rng.standard_normal(n, dtype=np.float32).tobytes()
        raws.append(raw)
        client.set(key, raw)
        client.set(K.envelope(q, 1), sign_update(ids[q], "g", 1, raw))
    client.set(params, rng.standard_normal(n, dtype=np.float32).tobytes())

    def update():
        client.execute_command("TENSOR.AVG", agg, *keys)
        client.execute_command("TENSOR.SGD", params, agg, "0.01", "MOMENTUM", "0.9", mom)

    def check_one(q: int) -> None:  # as the peer does: copy out of the slot, read, verify
        src, dst = keys[q], K.verified(q, 1)
        pipe = client.pipeline(transaction=True)
        pipe.execute_command("COPY", src, dst, "REPLACE")
        pipe.execute_command("COPY", K.envelope(q, 1), K.verified_envelope(q, 1), "REPLACE")
        pipe.get(src)
        pipe.get(K.envelope(q, 1))
        _, _, raw, sig = pipe.execute()
        verify_update(sig, raw, group="g", sender=q, r=1, key=ids[q].public_key)
        if not np.isfinite(np.frombuffer(raw, dtype="<f4")).all():
            raise AssertionError("non-finite test vector")

    def check():
        for q in range(k):
            check_one(q)

    def check_last():
        check_one(k - 1)

    def sign():
        sign_update(ids[0], "g", 1, raws[0])

    out = {"n_floats": n, "k": k}
    try:
        for name, fn in (("update_s", update), ("check_s", check), ("check_last_s", check_last), ("sign_s", sign)):
            out[name] = statistics.median(time_call(fn, reps, warmup=1))
    finally:
        client.delete(*keys, *[K.envelope(q, 1) for q in range(k)], *[K.verified(q, 1) for q in range(k)],
                      *[K.verified_envelope(q, 1) for q in range(k)], params, mom, agg)
    out["check_over_update"] = out["check_s"] / out["update_s"]
    out["check_last_over_update"] = out["check_last_s"] / out["update_s"]
    return out


def main(argv: list[str]) -> None:
    from ..servers import start_server

    sizes = [int(a) for a in argv] or [100_000, 1_000_000]
    with start_server("valkey", unix_socket=True) as srv:
        c = srv.client()
        print("| floats | K | in-DB update (ms) | check all K (ms) | all K / update | check last one (ms) "
              "| last / update | sign one (ms) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in sizes:
            m = measure(c, n)
            print(f"| {n:,} | {m['k']} | {m['update_s'] * 1e3:.2f} | {m['check_s'] * 1e3:.2f} | "
                  f"{m['check_over_update']:.1f}x | {m['check_last_s'] * 1e3:.2f} | "
                  f"{m['check_last_over_update']:.1f}x | {m['sign_s'] * 1e3:.2f} |")
        c.close()


if __name__ == "__main__":
    main(sys.argv[1:])
