"""The ``spirt`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from importlib import resources
from pathlib import Path

#: The committed speedup baseline of ``spirt bench update --check`` and of the test command: package data,
#: so an installed ``spirt`` checks against it too (an editable install reads and writes the source file).
BASELINE = Path(str(resources.files("spirt.benchmarks").joinpath("baseline_update.json")))


def _cmd_module_path(args) -> int:
    from .native import module_path

    print(module_path())
    return 0


def _bench_client(args):
    from .servers import connect, start_server

    if args.url:
        server = connect(args.url)
    else:
        server = start_server(args.server)
    return server, server.client(socket_timeout=1800)


def _progress_printer(console):
    def show(row):
        console.print(
            f"  {row['op']:>12} {row['backend']:>16}  n={row['n_floats']:>10,}  K={row['k']:>2}  "
            f"median {row['median_s'] * 1e3:9.2f} ms  ({row['rounds']} rounds)"
        )

    return show


def _cmd_bench_update(args) -> int:
    from rich.console import Console

    from .benchmarks import update as ub

    console = Console(stderr=True)
    out = Path(args.out) if args.out else ub.reports_dir()
    server, client = _bench_client(args)
    args.profile = args.profile or ("regression" if args.check or args.write_baseline else "small")
    try:
        if args.check or args.write_baseline:
            console.print(f"[bold]update-time speedups[/] profile={args.profile}, {args.repeats} repeats")
            path = Path(args.baseline)
            if args.write_baseline:
                current = ub.repeated_profile(client, args.profile, args.repeats, _progress_printer(console))
                # the ratios and settings are replaced; other fields (the note on how it was measured) stay
                payload = json.loads(path.read_text()) if path.exists() else {}
                payload.update({"profile": args.profile, "tolerance": args.tolerance, "speedups": current})
                path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
                console.print(f"baseline written to {path}")
                return 0
            if not path.exists():
                console.print(f"[red]no baseline at {path}; create it with: spirt bench update --write-baseline")
                return 2
            base = json.loads(path.read_text())
            if base.get("profile") != args.profile:
                console.print(f"[red]baseline {path} is for profile {base.get('profile')!r}, not {args.profile!r}")
                return 2
            current, failures, again = ub.checked_profile(client, {**base, "tolerance": args.tolerance},
                                                          args.repeats, progress=_progress_printer(console))
            for line in again:
                print("note  " + line)
            for key in sorted(base["speedups"]):
                now = current.get(key, float("nan"))
                mark = "FAIL" if any(f.startswith(key + ":") for f in failures) else "ok"
                print(f"{mark:4}  {key:40} now {now:8.2f}x  baseline {base['speedups'][key]:8.2f}x")
            if failures:
                print(f"{len(failures)} speedup regression(s) beyond {args.tolerance:.0%}:")
                for f in failures:
                    print("  " + f)
                return 1
            print(f"speedups within {args.tolerance:.0%} of the baseline ({len(base['speedups'])} ratios)")
            return 0
        rows = ub.run_profile(client, args.profile, _progress_printer(console))
        stem = ub.report_stem(args.profile)
        ub.write_reports(rows, out, profile=args.profile, stem=stem)
        console.print(f"reports written to {out}/{stem}.{{csv,md,png}}")
        return 0
    finally:
        client.close()
        server.stop()


def _registered(module: str, function: str = "names", *args: str) -> str:
    """The names a flag accepts, read from the registry of ``module`` (``module.function(*args)``)."""
    from importlib import import_module

    return ", ".join(getattr(import_module(module), function)(*args))


RUN_FLAGS = {
    # flag: (config field, type, help)
    "rounds": ("run.rounds", int, "training rounds"),
    "seed": ("run.seed", int, "seed of model, data split and minibatches"),
    "eval_every": ("run.eval_every", int, "evaluate every E rounds"),
    "peers": ("peers.count", int, "number of peers"),
    "functions": ("peers.functions", int, "gradient functions per peer and round (K)"),
    "batch_size": ("peers.batch_size", int, "minibatch size of one function"),
    "server": ("peers.server", str, "valkey, redis or a server binary"),
    "mode": ("peers.mode", str, "peer orchestrators as 'process' (default) or 'thread'"),
    "model": ("model.name", str, f"model: {_registered('spirt.models')}"),
    "dataset": ("data.dataset", str, f"data set: {_registered('spirt.data')}"),
    "data_dir": ("data.data_dir", str, "directory of the data set"),
    "partition": ("data.partition", str, f"data partition: {_registered('spirt.data', 'partition_names')}"),
    "alpha": ("data.alpha", float, "Dirichlet concentration (non-IID)"),
    "lr": ("optim.lr", float, "learning rate"),
    "momentum": ("optim.momentum", float, "SGD momentum"),
    "backend": ("aggregation.backend", str, f"where peers aggregate: {_registered('spirt.backends')} "
                "(see `spirt list`)"),
    "defense": ("aggregation.defense", str, f"aggregation rule: {_registered('defenses', 'names', 'aggregator')} "
                "(see `spirt list`)"),
    "executor": ("executor.kind", str, f"where gradient functions run: {_registered('spirt.executors')}"),
    "workers": ("executor.workers", int, "warm function workers per peer"),
    "attack": ("attack.name", str, f"attack of the Byzantine peers: {_registered('attacks')} (see `spirt list`)"),
    "byzantine": ("attack.byzantine", int, "number of Byzantine peers"),
}


def _overrides(args) -> dict:
    from .config import parse_override

    over = {field: getattr(args, flag) for flag, (field, _, _) in RUN_FLAGS.items()}
    for item in args.set or []:
        key, value = parse_override(item)
        over[key] = value
    return over


@contextlib.contextmanager
def _config_file(arg: str | None):
    """The config file ``arg`` names: a path, or the name of a shipped example (``quickstart``,
    ``spirt_paper``, ``byzantine``), so that an installed ``spirt`` runs them too."""
    if arg is None or Path(arg).exists():
        yield arg
        return
    example = resources.files("spirt").joinpath("examples", f"{Path(arg).stem}.toml")
    if not example.is_file():
        yield arg  # load_config names the missing file
        return
    with resources.as_file(example) as path:
        yield path


def _cmd_run(args) -> int:
    from rich.console import Console

    from .config import ConfigError, load_config
    from .runner import TrainingError, run_training, state_config, write_run_reports

    console = Console(stderr=True)
    try:
        if args.resume:
            if args.config or any(v is not None for v in _overrides(args).values()):
                console.print("[red]--resume takes the configuration the run was started with: no config "
                              "file or overrides")
                return 2
            cfg = state_config(args.resume)
        else:
            with _config_file(args.config) as path:
                cfg = load_config(path, _overrides(args))
    except (ConfigError, TrainingError) as exc:
        console.print(f"[red]{exc}")
        return 2
    out = Path(args.out or cfg.run.out)
    df = run_training(cfg, progress=not args.quiet, state_dir=args.resume or args.state_dir,
                      resume=bool(args.resume))
    label = args.label if args.label is not None else cfg.aggregation.backend
    summary = write_run_reports(df, out, label)
    console.print(f"[bold]{cfg.run.name}[/] ({label}): final accuracy {summary['final_accuracy']:.4f}, "
                  f"{summary['mean_round_s'] * 1e3:.0f} ms per round, non-compute share "
                  f"{summary['non_compute_share']:.1%}; reports in {out}")
    if summary["final_states"] > 1:
        console.print(f"[red]the honest peers ended with {summary['final_states']} different models: the run "
                      "did not end in agreement (see the peers' events)")
        return 1
    return 0


def _load(args, console):
    """The configuration of ``args.config`` with the ``--set`` overrides, or None (the error printed)."""
    from .config import ConfigError, load_config, parse_override

    try:
        over = dict(parse_override(item) for item in args.set or [])
        with _config_file(args.config) as path:
            return load_config(path, over)
    except ConfigError as exc:
        console.print(f"[red]{exc}")
        return None


def _cmd_peer(args) -> int:
    """One peer of a group on this host (see spirt.host)."""
    from rich.console import Console

    from .host import HostError, run_peer

    console = Console(stderr=True)
    cfg = _load(args, console)
    if cfg is None:
        return 2
    try:
        run_peer(cfg, args.index, url=args.url, server=not args.no_server, state_dir=args.state_dir,
                 start_timeout_s=args.start_timeout, hold=not args.no_hold, hold_timeout_s=args.hold_timeout,
                 log=lambda msg: console.print(msg, highlight=False))
    except (HostError, TimeoutError) as exc:
        console.print(f"[red]peer {args.index}: {exc}")
        return 2
    return 0


def _cmd_collect(args) -> int:
    """Every peer's metrics and events, over the network, into the run reports."""
    from rich.console import Console

    from .host import HostError, collect
    from .runner import write_run_reports

    console = Console(stderr=True)
    cfg = _load(args, console)
    if cfg is None:
        return 2
    try:
        joined = {}
        for item in args.joined or []:
            index, sep, url = item.partition("=")
            if not sep or not index.strip().isdigit():
                raise HostError(f"--joined {item!r}: expected INDEX=URL")
            joined[int(index)] = url.strip()
        df, missing = collect(cfg, joined=joined, release=args.release)
    except HostError as exc:
        console.print(f"[red]{exc}")
        return 2
    if missing:
        console.print(f"[red]no answer from the databases of peers {missing}: their metrics are missing")
    rejected = df.attrs.get("rejected", {})
    for i, why in sorted(rejected.items()):
        console.print(f"[red]peer {i}'s report is left out, it does not parse: {why}")
    if df.empty:
        console.print("[red]no metrics in any peer's database")
        return 1
    out = Path(args.out or cfg.run.out)
    summary = write_run_reports(df, out, args.label if args.label is not None else "collected")
    console.print(f"[bold]{cfg.run.name}[/]: {summary['peers']} peers, {summary['rounds']} rounds, final accuracy "
                  f"{summary['final_accuracy']:.4f}; reports in {out}")
    if summary["final_states"] > 1:
        console.print(f"[red]the honest peers ended with {summary['final_states']} different models")
        return 1
    return 1 if missing or rejected else 0


def _cmd_demo(args) -> int:
    """The README's main job: the quickstart training with in-database and client-side aggregation,
    then the update-time benchmark, all into one report directory."""
    from rich.console import Console

    from .benchmarks import update as ub
    from .config import load_config
    from .reports import write_comparison
    from .runner import run_training, write_run_reports

    console = Console(stderr=True)
    out = Path(args.out)
    # package data, so that the demo runs from an installed wheel as from the source tree
    with resources.as_file(resources.files("spirt").joinpath("examples", "quickstart.toml")) as example:
        configs = {backend: load_config(args.config or example,
                                        {"aggregation.backend": backend, "run.rounds": args.rounds})
                   for backend in ("module", "client")}
    summaries = {}
    for backend, cfg in configs.items():
        console.print(f"[bold]training[/] {cfg.run.name}: {cfg.peers.count} peers x {cfg.peers.functions} "
                      f"functions, {cfg.model.name} on {cfg.data.dataset}, aggregation backend {backend}")
        df = run_training(cfg, progress=not args.quiet)
        summaries[backend] = write_run_reports(df, out, backend)
        console.print(f"  final accuracy {summaries[backend]['final_accuracy']:.4f}, "
                      f"{summaries[backend]['mean_round_s'] * 1e3:.0f} ms per round")
    write_comparison(summaries, out)
    console.print("[bold]update-time benchmark[/] (profile small)")
    from .servers import start_server

    with start_server("valkey") as srv:
        client = srv.client(socket_timeout=1800)
        rows = ub.run_profile(client, "small", _progress_printer(console))
        client.close()
    ub.write_reports(rows, out, profile="small", stem=ub.report_stem("small"))
    console.print(f"reports written to {out}/")
    return 0


def _cmd_list(args) -> int:
    """Every registered part, read from its registry, in plain text (docstrings' reST markup removed)."""
    import attacks
    import defenses

    from . import backends, data, executors, faults, models
    from .registry import plain_text, summary_of

    def section(title: str, widths: tuple[int, ...], rows) -> None:
        """Columns padded to ``widths``, the last one as long as it is."""
        print(f"{title}:")
        for *cols, last in rows:
            cells = [f"{plain_text(str(c)):{w}}" for c, w in zip(cols, widths, strict=True)]
            print("  " + " ".join([*cells, plain_text(str(last))]).rstrip())

    section("defenses (kind, (n, f) requirement)", (20, 13),
            ((n, i.kind, i.requirement) for n in defenses.names() for i in [defenses.info(n)]))
    section("attacks (kind, omniscient, summary)", (20, 6, 10),
            ((n, i.kind, "omniscient" if i.omniscient else "", i.summary)
             for n in attacks.names() for i in [attacks.info(n)]))
    section("models", (20,), ((n, models.info(n)) for n in models.names()))
    section("data sets", (20,), ((n, data.info(n)) for n in data.names()))
    section("data partitions", (20,), ((n, data.partition_info(n)) for n in data.partition_names()))
    section("aggregation backends", (20,), ((n, summary_of(backends.registry.cls(n))) for n in backends.names()))
    section("executors", (20,), ((n, summary_of(executors.registry.cls(n))) for n in executors.names()))
    if hasattr(faults, "names") and hasattr(faults, "info"):
        section("fault scenarios (victim's fate, summary)", (20, 7),
                ((n, i.fate, i.summary) for n in faults.names() for i in [faults.info(n)]))
    return 0


def _passthrough(rest: list[str]) -> list[str]:
    """Arguments for a benchmark's own parser; the ``--`` that separates them is not one of them."""
    return rest[1:] if rest[:1] == ["--"] else rest


def _cmd_bench_byzantine(args) -> int:
    from .benchmarks.byzantine import main as byz_main

    return byz_main(_passthrough(args.rest))


def _cmd_bench_protocol(args) -> int:
    from .benchmarks.protocol import main as protocol_main

    return protocol_main(_passthrough(args.rest))


def _cmd_bench_network(args) -> int:
    from .benchmarks.network import main as network_main

    return network_main(_passthrough(args.rest))


def _cmd_bench_scaling(args) -> int:
    from .benchmarks.scaling import main as scaling_main

    return scaling_main(_passthrough(args.rest))


def _cmd_bench_faults(args) -> int:
    from .faults import main as faults_main

    return faults_main(_passthrough(args.rest))


def _print_files(paths) -> None:
    """Mode and path of every file in ``paths`` (files, or folders walked), never their content: some are
    private keys."""
    for top in map(Path, paths):
        for path in [top] if top.is_file() else sorted(f for f in top.rglob("*") if f.is_file()):
            print(f"{path.stat().st_mode & 0o777:04o}  {path}")


def _cmd_keys(args) -> int:
    from .security import provision
    from .security.identity import AdmissionError

    root = Path(args.dir)
    if args.add is None and args.peers is None:
        print("spirt keys: --peers N to provision a group, or --add INDEX to add a peer to it", file=sys.stderr)
        return 2
    if args.add is not None and (args.peers is not None or args.ca or args.tls):
        print("spirt keys --add: the group's folder decides CA and TLS; no --peers, --ca or --tls", file=sys.stderr)
        return 2
    try:
        if args.add is None:
            provision.provision_group(root, args.peers, args.group, ca=args.ca, tls=args.tls)
        else:
            folder = provision.add_peer(root, args.add, args.group)
    except (OSError, ValueError, AdmissionError) as exc:
        print(f"spirt keys: {exc}", file=sys.stderr)
        return 2
    if args.add is None:
        print(f"group {args.group!r}: {args.peers} peer folders in {root}; hand each party its own folder only")
        _print_files(p for p in [root / provision.CA_DIR, root / provision.LAUNCHER_DIR,
                                 *provision.peer_folders(root)] if p.is_dir())
        return 0
    print(f"peer {args.add} added to group {args.group!r}: {folder}")
    _print_files([folder])
    if not provision.is_ca_group(root):
        print("its public key is now on the allow-list of the other peers:")
        _print_files(f / "allow-list.json" for f in provision.peer_folders(root) if f != folder)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spirt", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    mp = sub.add_parser("module-path", help="print the path of the built tensor module (for --loadmodule)")
    mp.set_defaults(func=_cmd_module_path)

    run = sub.add_parser("run", help="train with a TOML configuration; flags override the file")
    run.add_argument("config", nargs="?", help="TOML file, or a shipped example by name (quickstart, spirt_paper, "
                     "byzantine); defaults apply without one")
    run.add_argument("--out", help="report directory (default: run.out of the config, 'results')")
    run.add_argument("--label", help="suffix of the report files (default: the aggregation backend)")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.add_argument("--state-dir", metavar="DIR", help="keep the databases' files in DIR (persistence on), so "
                     "that the run can be resumed after a full stop")
    run.add_argument("--resume", metavar="DIR", help="resume the run persisted in DIR (started with "
                     "--state-dir) after every database and orchestrator stopped, e.g. a power loss")
    run.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="any other config field")
    for flag, (_, typ, help_) in RUN_FLAGS.items():
        run.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, help=help_)
    run.set_defaults(func=_cmd_run)

    peer = sub.add_parser("peer", help="run one peer of a group on this host: its database, its functions and "
                          "its orchestrator (peers.urls lists every peer's database)")
    peer.add_argument("config", help="the group's configuration (TOML, or JSON as Config.model_dump_json writes), "
                      "the same on every host")
    peer.add_argument("--index", type=int, required=True, help="this peer's index in peers.urls (beyond it: a "
                      "peer joining the running group, with --url)")
    peer.add_argument("--url", help="a joining peer's own database URL (redis://host:port)")
    peer.add_argument("--no-server", action="store_true", help="use the database already serving at "
                      "peers.urls[INDEX] instead of starting one")
    peer.add_argument("--state-dir", metavar="DIR", help="keep the database's files in DIR (persistence on)")
    peer.add_argument("--start-timeout", type=float, default=600.0, metavar="S",
                      help="give up when the group has not started within S seconds (default 600)")
    peer.add_argument("--no-hold", action="store_true", help="stop when training ends instead of serving the "
                      "metrics until spirt collect --release")
    peer.add_argument("--hold-timeout", type=float, metavar="S", help="serve the metrics at most S seconds")
    peer.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="any other config field")
    peer.set_defaults(func=_cmd_peer)

    col = sub.add_parser("collect", help="gather every peer's metrics and events (peers.urls) into the run "
                         "reports")
    col.add_argument("config", help="the group's configuration")
    col.add_argument("--out", help="report directory (default: run.out of the config)")
    col.add_argument("--label", help="suffix of the report files (default: collected)")
    col.add_argument("--release", action="store_true", help="then tell every peer of spirt peer it may stop")
    col.add_argument("--joined", action="append", metavar="INDEX=URL",
                     help="a peer that joined from beyond peers.urls, and its database URL (repeatable)")
    col.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="any other config field")
    col.set_defaults(func=_cmd_collect)

    demo = sub.add_parser("demo", help="the main job: quickstart training (in-database and client-side) + "
                          "update-time benchmark -> results/")
    # results/, not reports/: a user's run never overwrites the committed reference run in reports/,
    # which only an explicit --out reports refreshes
    demo.add_argument("--out", default="results", help="report directory (default: results)")
    demo.add_argument("--config", help="training config (default: the packaged spirt/examples/quickstart.toml)")
    demo.add_argument("--rounds", type=int, help="override the number of rounds")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=_cmd_demo)

    ls = sub.add_parser("list", help="registered defenses, attacks, models, data sets, partitions, aggregation "
                        "backends, executors and fault scenarios")
    ls.set_defaults(func=_cmd_list)

    keys = sub.add_parser("keys", help="key folders of a group: one per peer (its own private keys only), "
                          "the CA keys apart")
    keys.add_argument("dir", metavar="DIR", help="keys directory (a group already there is replaced)")
    keys.add_argument("--peers", type=int, metavar="N", help="number of peers")
    keys.add_argument("--group", default="spirt", help="group name (default: spirt)")
    keys.add_argument("--ca", action="store_true", help="peers trust a group CA (key in DIR/ca) instead of an "
                      "allow-list, so that peers can be added without touching the others' folders")
    keys.add_argument("--tls", action="store_true", help="TLS certificates too: per peer a server and a client "
                      "certificate naming it, and the launcher's client certificate")
    keys.add_argument("--add", type=int, metavar="INDEX", help="add peer INDEX to the group in DIR instead")
    keys.set_defaults(func=_cmd_keys)

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    bu = bsub.add_parser("update", help="model-update time per backend; regression check against a baseline")
    bu.add_argument("--profile", default=None, choices=["small", "full", "regression"],
                    help="cells to measure (default: small; regression with --check and --write-baseline)")
    bu.add_argument("--server", default="valkey", help="valkey (default), redis, or a server binary path")
    bu.add_argument("--url", help="use a running server instead of starting one (redis://, unix://)")
    bu.add_argument("--out", help="report directory (default: $SPIRT_REPORTS_DIR or reports)")
    bu.add_argument("--check", action="store_true", help="compare speedup ratios with the baseline; exit 1 on regression")
    bu.add_argument("--write-baseline", action="store_true", help="measure and (over)write the baseline")
    bu.add_argument("--baseline", default=str(BASELINE), help=f"baseline file (default: {BASELINE})")
    bu.add_argument("--tolerance", type=float, default=0.25, help="allowed relative drop (default 0.25)")
    bu.add_argument("--repeats", type=int, default=3, help="side-by-side repeats for --check (median)")
    bu.set_defaults(func=_cmd_bench_update)
    bb = bsub.add_parser("byzantine", help="attack x defense x fraction x partition grid (cached); "
                         "options: spirt bench byzantine -- --help", add_help=False)
    bb.add_argument("rest", nargs=argparse.REMAINDER)
    bb.set_defaults(func=_cmd_bench_byzantine)
    bp = bsub.add_parser("protocol", help="attacks on the peer-to-peer protocol, f = 1, 2 of n = 5, 10 -> "
                         "reports/byzantine_protocol.*; options: spirt bench protocol -- --help", add_help=False)
    bp.add_argument("rest", nargs=argparse.REMAINDER)
    bp.set_defaults(func=_cmd_bench_protocol)
    bn = bsub.add_parser("network", help="update time with the database across an emulated link (root: "
                         "network namespaces) -> reports/network.*; options: spirt bench network -- --help",
                         add_help=False)
    bn.add_argument("rest", nargs=argparse.REMAINDER)
    bn.set_defaults(func=_cmd_bench_network)
    bs = bsub.add_parser("scaling", help="round time, phases and exchange traffic versus the number of peers, "
                         "with a cost model to 1,000 peers -> reports/scaling.*; options: spirt bench scaling -- "
                         "--help", add_help=False)
    bs.add_argument("rest", nargs=argparse.REMAINDER)
    bs.set_defaults(func=_cmd_bench_scaling)
    bf = bsub.add_parser("faults", help="fault-injection scenarios -> reports/faults.{md,csv}; "
                         "options: spirt bench faults -- --help", add_help=False)
    bf.add_argument("rest", nargs=argparse.REMAINDER)
    bf.set_defaults(func=_cmd_bench_faults)
    return p


def main(argv: list[str] | None = None) -> int:
    from .servers import install_signal_handlers

    install_signal_handlers()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader stopped early (`spirt list | head`): nothing is wrong with the command; point stdout at
        # /dev/null so that flushing it at exit does not raise again (the Python documentation's recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away


if __name__ == "__main__":
    sys.exit(main())
