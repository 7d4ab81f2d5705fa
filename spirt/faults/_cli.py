"""``spirt bench faults`` (``python -m spirt.faults``): run fault scenarios, write the report."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ..benchmarks.update import reports_dir
from ._report import COLUMNS, listing, write_partition_reports, write_reports
from ._scenarios import BASE, SCENARIOS, reference_for, run_scenario


def run_all(names: list[str] | None = None, overrides: dict | None = None, out_dir: str | Path | None = None,
            progress=print) -> pd.DataFrame:
    """Run the scenarios ``names`` (default: every registered fault) with their fault-free references;
    writes ``faults.{md,csv}`` to ``out_dir`` if given, and ``partitions.{md,csv}`` (the honest peers'
    disagreement per round) for the faults that cut links."""
    rows, rounds = [], []
    for name in names or list(SCENARIOS):
        s = SCENARIOS[name]
        ref = reference_for(s, overrides)
        res = run_scenario(s, overrides)
        row = res.row(ref)
        rows.append(row)
        if s.fault_class.links and res.disagreement is not None:
            rounds.append(res.disagreement.assign(scenario=name, fault=s.description))
        if progress:
            progress(f"{name}: detection {row['detection_s']:.2f} s, recovery {row['recovery_s']:.2f} s, "
                     f"rounds lost {row['rounds_lost']}, accuracy {row['final_accuracy']:.4f} vs "
                     f"{row['fault_free_accuracy']:.4f} ({row['difference_points']:+.2f} points), {row['wall_s']:.0f} s")
    df = pd.DataFrame(rows)
    if out_dir is not None:
        df = write_reports(rows, out_dir)
        if rounds:
            write_partition_reports(df, pd.concat(rounds, ignore_index=True), out_dir)
    return df


def parser() -> argparse.ArgumentParser:
    allowed = ", ".join(SCENARIOS)
    ap = argparse.ArgumentParser(
        prog="spirt bench faults", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="fault-injection scenarios with real processes and signals -> faults.{md,csv}",
        epilog="faults (name, what becomes of the victim, what the scenario does):\n\n"
               + "\n".join("  " + line for line in listing().splitlines()))
    ap.add_argument("--list", action="store_true", help="print the faults with their descriptions and exit")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated, from: {allowed} (default: all)")
    ap.add_argument("--rounds", type=int, help=f"training rounds (default {BASE['run.rounds']})")
    ap.add_argument("--out", default=str(reports_dir()),
                    help="report directory (default: $SPIRT_REPORTS_DIR, else reports/ in the working directory)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override the scenario training config")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``python -m spirt.faults [--list] [--scenarios a,b] [--rounds N] [--out DIR] [--set key=value ...]``"""
    from ..config import parse_override

    argv = list(argv or [])
    if argv[:1] == ["--"]:
        argv = argv[1:]
    ap = parser()
    args = ap.parse_args(argv)
    if args.list:
        print(listing())
        return 0
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; allowed: {', '.join(SCENARIOS)}")
    over = dict(parse_override(x) for x in args.set)
    if args.rounds:
        over["run.rounds"] = args.rounds
    df = run_all(names, over, args.out)
    print(df[[c for c in COLUMNS if c in df]].to_string(index=False))
    return 0
