"""Writing results: CSV (pandas), Markdown tables and PNG plots (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def write_table(df: pd.DataFrame, out_dir: str | Path, stem: str, title: str, notes: str = "",
                floatfmt: str = ".4g") -> tuple[Path, Path]:
    """``<stem>.csv`` and ``<stem>.md`` (a title, optional notes, the table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / f"{stem}.csv"
    md = out / f"{stem}.md"
    df.to_csv(csv, index=False)
    body = df.to_markdown(index=False, floatfmt=floatfmt)
    md.write_text(f"# {title}\n\n{notes.strip()}\n\n{body}\n" if notes else f"# {title}\n\n{body}\n")
    return csv, md


def plot_update_speedups(df: pd.DataFrame, path: str | Path) -> Path:
    """One panel per K: speedup over client-side versus tensor size, a line per backend."""
    ks = sorted(df["k"].unique())
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.8), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks, strict=True):
        sub = df[(df["k"] == k) & (df["backend"] != "client")]
        for backend, g in sub.groupby("backend"):
            g = g.sort_values("n_floats")
            ax.plot(g["n_floats"], g["speedup_vs_client"], marker="o", label=backend)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"K = {k} gradients")
        ax.set_xlabel("floats per tensor")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("speedup over client-side (x)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Model-update time: average K gradients + SGD step, relative to client-side")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def fmt_ratio(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}x"


def plot_rounds(df: pd.DataFrame, path: str | Path, title: str = "SPIRT training") -> Path:
    """Loss, test accuracy and the per-phase time split of a training run."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for peer, g in df.groupby("peer"):
        axes[0].plot(g["round"], g["loss"], lw=0.8, label=f"peer {peer}")
        e = g.dropna(subset=["accuracy"])
        axes[1].plot(e["round"], e["accuracy"], marker=".", label=f"peer {peer}")
    axes[0].set(title="training loss (mean of the K minibatches)", xlabel="round")
    axes[1].set(title="test accuracy", xlabel="round")
    axes[0].legend(fontsize=7)
    phases = [c for c in df.columns if c.startswith("t_") and c not in ("t_round", "t_evaluate")]
    means = df[phases].mean() * 1e3
    axes[2].bar([c[2:] for c in phases], means.values, color="tab:blue")
    axes[2].set(title="mean time per round and phase (ms)")
    axes[2].tick_params(axis="x", rotation=45)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_comparison(summaries: dict[str, dict], out_dir: str | Path) -> Path:
    """Side-by-side table of training runs (e.g. in-database vs client-side aggregation)."""
    df = pd.DataFrame([{"backend": k, **v} for k, v in summaries.items()])
    base = summaries.get("client", {}).get("mean_round_s")
    if base:
        df["round_speedup_vs_client"] = base / df["mean_round_s"]
    write_table(df, out_dir, "training_comparison", "Training: in-database vs client-side aggregation",
                "Same configuration and seed; only the aggregation backend differs. Times are means per round "
                "(evaluation excluded); `non_compute_share` = (store + average + barrier + exchange + aggregate "
                "+ update + cleanup) / (that + compute).")
    return Path(out_dir) / "training_comparison.md"
