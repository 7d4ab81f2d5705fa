"""What security costs a round: the same training with ``[security]`` on (identities, admission, ACL users,
signed and checked updates, the guarded inbox and pre-admission area, value and memory limits) and off,
side by side in one run, alternating, on the in-database backend. Writes
reports/round_time_security.{csv,md}: the medians of the repetitions and their ratio."""

from __future__ import annotations

import statistics

import pytest

from spirt.benchmarks.update import bench_profile, reports_dir
from spirt.config import load_config
from spirt.reports import write_table
from spirt.runner import run_training, summarize

PROFILE = bench_profile()
# model: (peers, functions, batch, rounds), as in bench/test_round_time.py
MODELS = {"mlp": (4, 4, 64, 100), "cnn": (4, 4, 64, 100)}
REPEATS = 3 if PROFILE == "full" else 1


def _round_time(model: str, keys_dir: str | None) -> dict:
    peers, functions, batch, rounds = MODELS[model]
    secured = {"security.enabled": True, "security.keys_dir": keys_dir, "security.group": "bench"} if keys_dir else {}
    cfg = load_config(None, {
        "run.rounds": rounds + 1, "run.eval_every": 10_000, "run.eval_samples": 200, "data.limit_test": 200,
        "model.name": model, "peers.count": peers, "peers.functions": functions, "peers.batch_size": batch,
        "aggregation.backend": "module", "executor.kind": "process", "executor.workers": 1, **secured,
    })
    df = run_training(cfg, progress=False, timeout_s=1800)
    assert df.attrs.get("final_states", 1) == 1
    return summarize(df[df["round"] > 0])  # the first round pays one-off costs


@pytest.mark.parametrize("model", list(MODELS))
def test_security_round_time(model, tmp_path):
    from spirt.security.provision import provision_group

    keys = str(provision_group(tmp_path / "keys", MODELS[model][0], "bench"))
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(REPEATS):  # alternating: a slow spell of the machine hits both
        times["off"].append(_round_time(model, None)["mean_round_s"])
        times["on"].append(_round_time(model, keys)["mean_round_s"])
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    row = {"model": model, "repeats": REPEATS, "round_s_security_off": off, "round_s_security_on": on,
           "ratio_on_off": on / off, "runs_off": " ".join(f"{t:.4f}" for t in times["off"]),
           "runs_on": " ".join(f"{t:.4f}" for t in times["on"])}
    _rows.append(row)
    assert on > 0 and off > 0


_rows: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _write(interrupted):
    yield
    if not _rows or interrupted():
        return
    import pandas as pd

    write_table(pd.DataFrame(_rows), reports_dir(), "round_time_security",
                "Round time with security on and off",
                "The same training (4 peers x 4 functions, batch 64, 100 rounds after the first, in-database "
                "aggregation, Valkey over unix sockets) with `[security]` off and on (per-peer key folders "
                "from `spirt keys`; admission, ACL users, signed and checked updates, the guarded inbox and "
                "pre-admission area, value and memory limits), alternating; medians of the repetitions. "
                "`ratio_on_off` is what security costs a round.")
