"""Update time over an emulated link: the orchestrator on one host, its database on another.

On loopback the client-side path pays only a local copy for each gradient it fetches; in SPIRT's setting
the orchestrator pulls the K gradients over a link. Here two emulated hosts (:class:`spirt.netns.Hosts`,
network namespaces on a bridge) stand for the two machines: the database (with the tensor module) on
host 1, the measuring client on host 0, each host's egress limited with tbf to the link rate. The round
trip comes from the kernel path itself (``kernel``: veth and bridge, tens of microseconds) or, since this
kernel has no netem qdisc, from a delay line in a user-space proxy on host 0 (``proxy``,
:class:`spirt.links.Links`; the measured round trip is reported beside the requested one, and the
proxy's own throughput ceiling is a row of its own).

Backends, side by side in one run per link (their calls in alternation, :func:`update.measure_interleaved`):
``module`` (TENSOR.AVGSGD), ``module-unfused``, ``client`` (the steady-allocator client: the fair
reference) and, measured in a second process on the same link, ``client-default-allocator`` (what a
plain Python client gets from glibc's default allocator; the allocator is per process).

Then the round time per model with every peer on a host of its own (:class:`spirt.cluster.Cluster` with
``hosts=True``: each peer's database server, orchestrator and gradient functions in its own namespace,
the exchange crossing the bridge), next to the same training on loopback (unix sockets) and with every
host's egress limited with tbf.

    spirt bench network -- --out reports          # as root; writes reports/network.{csv,md,png}
                                                  # and network_rounds.csv
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .update import RESNET18, SIZE_NAMES, measure_interleaved, out_dir, steady_client_allocator

#: (rate in Mbit/s, requested round trip in ms: None = the kernel path alone)
LINKS = [(1000, None), (1000, 0.5), (10000, None), (10000, 0.5)]
#: (floats, K)
CELLS = [(1_000_000, 8), (RESNET18, 16)]
STEADY = ("module", "module-unfused", "client")
DB_PORT = 6379


def _rtt_ms(client, n: int = 30) -> float:
    """Median PING round trip, in ms."""
    client.ping()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.ping()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def worker(url: str, rtt_ms: float | None, steady: bool, cells: list[tuple[int, int]], budget_s: float) -> list[dict]:
    """Measure on this host (run inside host 0's namespace): the database at ``url`` (host 1), through a
    delay proxy when ``rtt_ms`` is given."""
    from ..links import Links
    from ..servers import make_client

    if steady:
        steady_client_allocator()
    host_port = url.removeprefix("redis://")
    links = None
    if rtt_ms is not None:
        links = Links({0: "127.0.0.1:1", 1: host_port})
        links.delay(0, 1, rtt_ms / 2e3)
        url = links.links[0, 1].url
    client = make_client(url=url, socket_timeout=1800)
    try:
        measured = _rtt_ms(client)
        rows = []
        for n, k in cells:
            backends = STEADY if steady else ("client",)
            for cell in measure_interleaved(client, "update", n, k, backends, budget_s=budget_s, max_rounds=20,
                                            min_rounds=3, steady_allocator=steady):
                row = cell.row()
                if not steady:
                    row["backend"] = "client-default-allocator"
                rows.append({**row, "rtt_measured_ms": measured})
        return rows
    finally:
        client.close()
        if links is not None:
            links.close()


def _server_argv(address: str) -> list[str]:
    from ..native import module_path
    from ..servers import find_server_binary

    return [str(find_server_binary("valkey")), "--bind", address, "--port", str(DB_PORT), "--protected-mode", "no",
            "--save", "", "--appendonly", "no", "--loadmodule", str(module_path()), "--dir", "/tmp"]


def run(cells=CELLS, links=LINKS, budget_s: float = 10.0, log=print) -> list[dict]:
    """Every link of ``links`` and cell of ``cells``; returns the rows (see :data:`COLUMNS`)."""
    from ..netns import Hosts, delay_mechanism
    from ..servers import make_client

    rows = []
    with Hosts(2) as hosts:
        server = hosts.popen(1, _server_argv(hosts.address(1)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://{hosts.address(1)}:{DB_PORT}"
        probe = make_client(url=url, socket_timeout=5, connect_timeout=2)
        deadline = time.monotonic() + 30
        while True:
            try:
                probe.ping()
                break
            except Exception:  # noqa: BLE001 - starting
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the database on host 1 did not start") from None
                time.sleep(0.1)
        probe.close()
        for mbit, rtt in links:
            for i in (0, 1):
                hosts.rate(i, mbit)
            for steady in (True, False):
                argv = [sys.executable, "-m", "spirt.benchmarks.network", "--worker", url,
                        "--cells", json.dumps(cells), "--budget", str(budget_s)]
                argv += ["--rtt", str(rtt)] if rtt is not None else []
                argv += [] if steady else ["--default-allocator"]
                log(f"link {mbit} Mbit/s, rtt {rtt if rtt is not None else 'kernel'}: "
                    f"{'steady' if steady else 'default'} allocator")
                out = hosts.run(0, argv, capture_output=True, text=True, timeout=3600)
                if out.returncode != 0:
                    raise RuntimeError(f"the measuring process failed:\n{out.stderr[-3000:]}")
                for row in json.loads(out.stdout.strip().splitlines()[-1]):
                    rows.append({**row, "link_mbit": mbit, "rtt_requested_ms": rtt,
                                 "delay": "none" if rtt is None else delay_mechanism()})
                    log(f"  {row['backend']:>24} n={row['n_floats']:>10,} K={row['k']:>2} "
                        f"median {row['median_s'] * 1e3:9.1f} ms")
    return with_ratios(rows)


def with_ratios(rows: list[dict]) -> list[dict]:
    """``speedup_vs_client`` (steady-allocator client median / this median) and ``speedup_vs_default_client``
    per link and cell."""
    def ref(backend):
        return {(r["link_mbit"], r["rtt_requested_ms"], r["n_floats"], r["k"]): r["median_s"]
                for r in rows if r["backend"] == backend}

    steady, default = ref("client"), ref("client-default-allocator")
    for r in rows:
        key = (r["link_mbit"], r["rtt_requested_ms"], r["n_floats"], r["k"])
        r["speedup_vs_client"] = steady[key] / r["median_s"] if key in steady else float("nan")
        r["speedup_vs_default_client"] = default[key] / r["median_s"] if key in default else float("nan")
    return rows


#: round-time part: model -> (peers, functions, batch, rounds measured); as bench/test_round_time.py
ROUND_MODELS = {"mlp": (4, 4, 64, 30), "cnn": (4, 4, 64, 30)}
#: (network, egress limit in Mbit/s or None)
ROUND_NETWORKS = [("loopback", None), ("netns", None), ("netns", 1000)]
ROUND_BACKENDS = ("module", "client")


def round_times(models=ROUND_MODELS, networks=ROUND_NETWORKS, backends=ROUND_BACKENDS, log=print) -> list[dict]:
    """Mean round time and its phases per model, backend and network (see the module docstring); the first
    round, which pays one-off costs, is left out."""
    from ..cluster import Cluster
    from ..config import load_config
    from ..runner import PHASES

    rows = []
    for model, (peers, functions, batch, rounds) in models.items():
        for backend in backends:
            cfg = load_config(None, {
                "run.rounds": rounds + 1, "run.eval_every": 10_000, "run.eval_samples": 200,
                "data.limit_test": 200, "model.name": model, "peers.count": peers, "peers.functions": functions,
                "peers.batch_size": batch, "aggregation.backend": backend, "executor.kind": "process",
                "executor.workers": 1})
            for network, mbit in networks:
                t0 = time.perf_counter()
                with Cluster(cfg, hosts=network == "netns") as c:
                    if mbit is not None:
                        for i in range(peers):
                            c.hosts.rate(i, mbit)
                    c.wait_finished(list(range(peers)), timeout_s=1800)
                    m = c.metrics()
                m = m[m["round"] > 0]
                phases = {f"t_{p}": float(m[f"t_{p}"].mean()) for p in PHASES if f"t_{p}" in m}
                rows.append({"model": model, "backend": backend, "network": network, "link_mbit": mbit,
                             "peers": peers, "functions": functions, "batch": batch, "rounds": rounds,
                             "mean_round_s": float(m["t_round"].mean()), **phases,
                             "wall_s": time.perf_counter() - t0})
                log(f"round time {model} {backend} {network} {mbit or '-'} Mbit/s: "
                    f"{rows[-1]['mean_round_s'] * 1e3:.1f} ms (exchange {phases.get('t_exchange', 0) * 1e3:.1f} ms)")
    for r in rows:  # the same training on loopback is the reference
        ref = next(x for x in rows if (x["model"], x["backend"], x["network"]) == (r["model"], r["backend"], "loopback"))
        r["vs_loopback"] = r["mean_round_s"] / ref["mean_round_s"]
    return rows


COLUMNS = ["link_mbit", "delay", "rtt_requested_ms", "rtt_measured_ms", "backend", "size", "n_floats", "k", "rounds",
           "median_s", "min_s", "speedup_vs_client", "speedup_vs_default_client"]


def write_reports(rows: list[dict], out, command: str, rounds: list[dict] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from ..reports import write_table

    df = pd.DataFrame(rows)
    df["size"] = df["n_floats"].map(lambda n: SIZE_NAMES.get(n, str(n)))
    df = df[COLUMNS].sort_values(["link_mbit", "rtt_requested_ms", "n_floats", "backend"], na_position="first")
    notes = (
        "One peer's model-update time (average K float32 gradients + SGD step with momentum) with the "
        "orchestrator on one emulated host and its database on another (network namespaces on a bridge, "
        "spirt.netns), each host's egress limited with tbf to `link_mbit`. `delay`: `none` (the kernel path "
        "alone), or `proxy` (a delay line in a user-space TCP proxy on the orchestrator's host, spirt.links: "
        "this kernel has no netem qdisc); `rtt_measured_ms` is the median PING round trip as the client saw "
        "it. `module` runs TENSOR.AVGSGD (one round trip: nothing but the command crosses the link); "
        "`module-unfused` the earlier two-pass form; `client` fetches the K gradients over the link, averages "
        "them with numpy and stores the parameters back (the steady-allocator client, the fair reference); "
        "`client-default-allocator` is the same with glibc's default allocator, in its own process. The proxy "
        "copies every byte in Python, so on the proxy rows the client paths are bounded by it as well as by "
        "the link. Medians of calls taken in alternation; ratios within one link and cell.\n\n"
        f"Command: `{command}`"
    )
    _, md = write_table(df, out, "network", "Update time over an emulated link", notes)
    if rounds:
        rt = pd.DataFrame(rounds)
        rt.to_csv(Path(out) / "network_rounds.csv", index=False)
        cols = ["model", "backend", "network", "link_mbit", "mean_round_s", "vs_loopback"]
        cols += [c for c in rt.columns if c.startswith("t_")]
        with open(md, "a") as f:
            f.write(
                "\n## Round time with every peer on its own emulated host\n\n"
                "A training of 4 peers x 4 gradient functions (process pools, batch 64) per model and backend, "
                "as in `round_time.md`: `loopback`, every server on a unix socket of one host; `netns`, every "
                "peer (its database server, orchestrator and functions) in its own network namespace on a "
                "bridge, so the exchange crosses the emulated network, with each host's egress limited with "
                "tbf to `link_mbit` where given (no delay added). Mean over the rounds after the first "
                "(`t_*`: the phases, seconds); `vs_loopback`: round time over the loopback run's. All "
                "peers share this machine's 2 cores. Rows also in `network_rounds.csv`.\n\n"
                + rt[cols].to_markdown(index=False, floatfmt=".4g") + "\n")
    cells = sorted({(r["n_floats"], r["k"]) for r in rows})
    fig, axes = plt.subplots(1, len(cells), figsize=(5.5 * len(cells), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (n, k) in zip(axes, cells, strict=True):
        sub = df[(df["n_floats"] == n) & (df["k"] == k)]
        labels = [f"{m // 1000} Gbit/s\n{'kernel' if pd.isna(t) else f'{t:g} ms'}"
                  for m, t in sub[["link_mbit", "rtt_requested_ms"]].drop_duplicates().itertuples(index=False)]
        for j, (backend, g) in enumerate(sub.groupby("backend", sort=False)):
            ax.bar([x + 0.2 * j for x in range(len(g))], g["median_s"], width=0.2, label=backend)
        ax.set_xticks([x + 0.3 for x in range(len(labels))], labels)
        ax.set_yscale("log")
        ax.set_title(f"{SIZE_NAMES.get(n, n)}, K = {k}")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("update time (s, median)")
    axes[-1].legend(fontsize=8)
    fig.suptitle("Update time with the database across an emulated link")
    fig.tight_layout()
    fig.savefig(Path(out) / "network.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spirt bench network", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="report directory (default: $SPIRT_REPORTS_DIR, else reports/ in the working "
                                 "directory; with --quick: results/, so that a smoke run never replaces the full "
                                 "run's reports)")
    p.add_argument("--budget", type=float, default=10.0, help="seconds of calls per backend and cell")
    p.add_argument("--quick", action="store_true", help="1M floats only, and a short mlp training (a smoke run)")
    p.add_argument("--no-rounds", action="store_true", help="the update-time part only")
    p.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--rtt", type=float, help=argparse.SUPPRESS)
    p.add_argument("--cells", help=argparse.SUPPRESS)
    p.add_argument("--default-allocator", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        cells = [tuple(c) for c in json.loads(args.cells)]
        print(json.dumps(worker(args.worker, args.rtt, not args.default_allocator, cells, args.budget)))
        return 0
    from ..netns import available

    ok, why = available()
    if not ok:
        print(f"spirt bench network needs network namespaces: {why}", file=sys.stderr)
        return 2
    cells = CELLS[:1] if args.quick else CELLS
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    rows = run(cells, budget_s=args.budget, log=log)
    rounds = []
    if not args.no_rounds:
        models = {"mlp": (4, 2, 32, 3)} if args.quick else ROUND_MODELS
        rounds = round_times(models, log=log)
    command = "spirt bench network -- " + " ".join(argv if argv is not None else sys.argv[1:])
    out = out_dir(args.out, args.quick)
    write_reports(rows, out, command.strip(), rounds)
    print(f"reports written to {out}/network.{{csv,md,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
