"""End-to-end round time with in-database vs client-side aggregation, per model, side by side.

Also the quickstart setting's time split (is everything but gradient computation <= 20% of a round?).
Writes reports/round_time.{csv,md}.
"""

from __future__ import annotations

import pytest

from spirt.benchmarks.update import bench_profile, reports_dir
from spirt.config import load_config
from spirt.reports import write_table
from spirt.runner import run_training, summarize

PROFILE = bench_profile()
# model: (peers, functions, batch, rounds) sized for a 2-core machine
MODELS = {
    "mlp": (4, 4, 64, 100),
    "cnn": (4, 4, 64, 100),
    "mobilenet_v3_small": (2, 2, 32, 6),
    "resnet18": (2, 2, 16, 3),
}
if PROFILE == "small":
    MODELS = {k: MODELS[k] for k in ("mlp", "cnn")}
_rows: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _write(interrupted):
    yield
    if not _rows or interrupted():
        return
    import pandas as pd

    df = pd.DataFrame(_rows)
    client = df[df.backend == "client"].set_index("model")["mean_round_s"]
    df["round_speedup_vs_client"] = [client.get(m, float("nan")) / t for m, t in zip(df.model, df.mean_round_s, strict=False)]
    write_table(df, reports_dir(), "round_time", "End-to-end round time: in-database vs client-side aggregation",
                "Peers are processes with warm function pools, one server each, evaluation excluded. "
                "`non_compute_share` = everything but gradient computation (function I/O, average, barrier, "
                "exchange, aggregate, update, cleanup) over the round.")


@pytest.mark.parametrize("backend", ["module", "client"])
@pytest.mark.parametrize("model", list(MODELS))
def test_round_time(model, backend):
    peers, functions, batch, rounds = MODELS[model]
    cfg = load_config(None, {
        "run.rounds": rounds + 1, "run.eval_every": 10_000, "run.eval_samples": 200, "data.limit_test": 200,
        "model.name": model, "peers.count": peers, "peers.functions": functions, "peers.batch_size": batch,
        "aggregation.backend": backend, "executor.kind": "process", "executor.workers": 1,
    })
    df = run_training(cfg, progress=False, timeout_s=1800)
    df = df[df["round"] > 0]  # the first round pays one-off costs (first allocation of every key)
    s = summarize(df)
    _rows.append({"model": model, "backend": backend, "peers": peers, "functions": functions, "batch": batch,
                  "rounds": rounds, "mean_round_s": s["mean_round_s"], "compute_s": s["compute_s"],
                  "non_compute_s": s["non_compute_s"], "non_compute_share": s["non_compute_share"],
                  **{c: df[c].mean() for c in df.columns if c.startswith("t_") and c != "t_evaluate"}})
    assert s["mean_round_s"] > 0
