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
        "processes and 4 servers and the final evaluation.\n"
        "- Honest disagreement, from an observer that reads every peer's parameters as it completes each "
        "round (`spirt/disagreement.py`): `disagreeing_rounds`, rounds after which the honest peers held more "
        "than one model; `max_honest_distance`, the largest L2 distance between two of them over the run; "
        "`min_average_accuracy`, the lowest test accuracy of their average model in those rounds.\n\n"
        "Training is deterministic for given inputs: a fault that only delays work (a retried function) ends "
        "bit-identical to the fault-free run, and two faults that remove the same peer from the same round on "
        "end identical to each other.\n"
        + (f"\n{notes.strip()}\n" if notes else "")
    )
    text += ("\nMade by `spirt bench faults` (`-- --scenarios a,b` for some; `tox -e bench -- -k faults` runs "
             "every one).\n")
    write_table(df, out_dir, "faults", "Fault tolerance: detection, recovery, rounds lost, accuracy", text)
    return df


def write_partition_reports(faults: pd.DataFrame, rounds: pd.DataFrame, out_dir: str | Path) -> None:
    """``partitions.{md,csv}``: per round of every scenario that cut links, the honest peers' number of
    distinct models, the largest distance between two of them and the accuracy of their average."""
    from ..reports import write_table

    cols = ["scenario", "round", "honest_peers", "honest_states", "honest_distance", "honest_average_accuracy"]
    rounds = rounds[cols]
    split = rounds[rounds["honest_states"] > 1]
    summary = faults[faults["scenario"].isin(rounds["scenario"].unique())]
    lines = [f"- `{r.scenario}` ({r.fault}): {int(r.disagreeing_rounds)} round(s) with more than one honest "
             f"model, largest distance {r.max_honest_distance:.4g}; survivors identical at the end: "
             f"{r.survivors_identical}; final accuracy {r.final_accuracy:.4f} vs fault-free "
             f"{r.fault_free_accuracy:.4f}" for r in summary.itertuples()]
    text = (
        "Network partitions between real peer processes, cut in two ways. In the plain scenarios every peer "
        "reaches every other peer's database through its own TCP proxy (`spirt/links.py`), which the "
        "scenario cuts (silently: bytes are swallowed) and heals. In the `@netns` scenarios every peer, its "
        "database server and its orchestrator, lives on an emulated host of its own: a network namespace on "
        "a bridge (`spirt/netns.py`), with the other peers' databases at their own addresses, and a cut is an "
        "iptables DROP rule between two hosts (silent too: packets vanish); no delay is added on either "
        f"network. Training: {describe_training(BASE)}.\n\n"
        "Per round, from an observer that reads each peer's parameters as it completes the round: "
        "`honest_states`, the number of distinct models among the `honest_peers` seen at that round; "
        "`honest_distance`, the largest L2 distance between two of them; `honest_average_accuracy`, the "
        "test accuracy of their average model where they disagreed. The table below lists the rounds with "
        "disagreement; `partitions.csv` has every round; `partitions.png` plots the distance. Made by "
        "`spirt bench faults` (every scenario, with `faults.md`; `tox -e bench -- -k faults` does the same).\n\n"
        + "\n".join(lines) + "\n"
    )
    write_table(split, out_dir, "partitions", "Partitions: honest disagreement per round", text)
    rounds.to_csv(Path(out_dir) / "partitions.csv", index=False)  # every round, not only the split ones
    plot_partitions(rounds, Path(out_dir) / "partitions.png")


def plot_partitions(rounds: pd.DataFrame, path: Path) -> None:
    """The honest peers' largest distance per round, one line per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, g in rounds.groupby("scenario"):
        ax.plot(g["round"], g["honest_distance"], marker=".", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("largest L2 distance between honest models")
    ax.set_title("Partitions: honest disagreement per round (0: one model)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
