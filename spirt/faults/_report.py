"""The fault report (``faults.{md,csv}``) and the listing of the registered faults."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ._base import registry
from ._scenarios import BASE, names

COLUMNS = ["scenario", "detection_s", "recovery_s", "rounds_lost", "final_accuracy", "fault_free_accuracy",
           "difference_points"]


def listing() -> str:
    """One line per registered fault: its name, what becomes of the victim, what it does (plain text)."""
    infos = [registry.info(n) for n in names()]
    width = max((len(i.name) for i in infos), default=0)
    return "\n".join(f"{i.name:<{width}}  {i.fate:<7}  {i.summary}" for i in infos)


def describe_training(over: dict) -> str:
    return (f"{over['peers.count']} peers x {over['peers.functions']} functions, {over['model.name']}, "
            f"batch {over['peers.batch_size']}, lr {over['optim.lr']}, momentum {over['optim.momentum']}, "
            f"{over['run.rounds']} rounds, heartbeat {over['membership.heartbeat_s']} s, "
            f"barrier deadline {over['barrier.timeout_s']} s, removal after {over['membership.max_misses']} misses, "
            f"function timeout {over['executor.timeout_s']} s with {over['executor.retries']} retries")


def write_reports(rows: list[dict], out_dir: str | Path, notes: str = "") -> pd.DataFrame:
    from ..reports import write_table

    df = pd.DataFrame(rows)
    lead = [c for c in COLUMNS if c in df]
    df = df[lead + [c for c in df.columns if c not in lead]]
    text = (
        "Real processes and signals: one database server and one orchestrator process per peer, each with a "
        "warm gradient-function worker process. "
        f"Training: {describe_training(BASE)}.\n\n"
        "- `fault`: what the scenario does (each fault is a module of `spirt/faults/`); `fate`: what becomes of "
        "the victim (lost for good, stays, returns, joins as a newcomer).\n"
        "- `detection_s`: fault -> first event of another peer about the victim (excluded / removed / admitted), "
        "or the victim's own `function_failed` event for function faults.\n"
        "- `recovery_s`: a peer lost for good or a function fault: fault -> end of the first round every survivor "
        "started after the detection with a normal barrier time; a peer coming back: fault -> its `joined` "
        "(state transfer) or `recovered` event. Join: from the newcomer's join request.\n"
        "- `rounds_lost`: over the peers that should have kept training (survivors and returning victims), "
        "rounds expected minus rounds whose update they completed.\n"
        "- `final_accuracy`: the survivors' final parameters on the full Fashion-MNIST test set (10,000 images); "
        "`fault_free_accuracy`: the same training without the fault and with the same surviving peers "
        "(same seed, same data parts); `difference_points` = 100 x (final - fault-free).\n"
        "- `survivors_identical`: the survivors end with bit-identical parameters; `victim_events`: what the "
        "victim logged after the fault (event@round); `wall_s`: the whole scenario, including starting 8 "
        "processes and 4 servers and the final evaluation.\n\n"
        "Training is deterministic for given inputs: a fault that only delays work (a retried function) ends "
        "bit-identical to the fault-free run, and two faults that remove the same peer from the same round on "
        "end identical to each other.\n"
        + (f"\n{notes.strip()}\n" if notes else "")
    )
    write_table(df, out_dir, "faults", "Fault tolerance: detection, recovery, rounds lost, accuracy", text)
    return df
