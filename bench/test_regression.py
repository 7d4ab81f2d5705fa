"""CI regression check of the update-time speedups (ratios, never absolute times).

Measures the ``regression`` profile (the baseline's cells) side by side three times on one server and compares every backend's
speedup over client-side with ``spirt/benchmarks/baseline_update.json`` (package data, the file that
``spirt bench update --check`` reads too); a drop of more than 25% fails when it holds in two more
measurements of its cells (the best of the three counts: a neighbour's load lowers some, a regression
all). The measurement starts once the machine is quiet (see ``checked_profile``).
Refresh the baseline (after an intended change) with:  spirt bench update --write-baseline
"""

from __future__ import annotations

import json

from spirt.benchmarks import update as ub
from spirt.cli import BASELINE


def test_update_speedups_against_baseline(bench_client):
    base = json.loads(BASELINE.read_text())
    current, failures, again = ub.checked_profile(bench_client, base, repeats=3)
    summary = "\n".join(f"{k}: now {current.get(k, float('nan')):.2f}x, baseline {v:.2f}x" for k, v in sorted(base["speedups"].items()))
    summary += "".join(f"\n{line}" for line in again)
    assert not failures, "speedup regressions:\n" + "\n".join(failures) + "\n\nall ratios:\n" + summary
    print(summary)  # shown with -s or -rP: the ratios of a passing check, the load, any measured again
