"""The faults as a registry: each fault is one module, and everything else (scenarios, what is measured,
the report, the command line) follows from the registered classes.

The proof that a new fault needs only its own file: a fault written to a file of its own in a fresh
package, loaded the way :mod:`spirt.faults` loads its modules, shows up in the scenarios, the listing,
the help and the report, and runs end to end on a real cluster (``-m faults``).
"""

from __future__ import annotations

import inspect
import math
import re
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from spirt import faults
from spirt.faults import Fate, Fault, Scenario, ScenarioResult

CRASH_PEER = textwrap.dedent('''
    """A fault of the tests, in a module of its own: SIGKILL the last peer's orchestrator."""

    from spirt.faults import Fate, Fault, register


    @register("crash_peer")
    class CrashPeer(Fault):
        """SIGKILL a peer's orchestrator at the start of a round; it never comes back."""

        description = "SIGKILL peer {victim}'s orchestrator at round {at:.0%} of the training"
        fate = Fate.LOST
        victim = 2
        at = 0.4

        def inject(self, cluster, scenario):
            return cluster.kill_orchestrator(scenario.victim)
''')


@pytest.fixture
def crash_peer(tmp_path, monkeypatch):
    """The fault ``crash_peer``, registered from its own file for the test only."""
    pkg = tmp_path / "more_faults"
    pkg.mkdir()
    (pkg / "crash_peer.py").write_text(CRASH_PEER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(faults.registry, "_classes", dict(faults.registry._classes))
    monkeypatch.setattr(faults.registry, "_aliases", dict(faults.registry._aliases))
    faults.registry.load_package("more_faults", [str(pkg)])
    yield "crash_peer"
    for name in [m for m in sys.modules if m == "more_faults" or m.startswith("more_faults.")]:
        del sys.modules[name]


def test_every_fault_is_one_complete_module():
    # discovery: every module of the package registers its fault, and only the shipped ones are found
    modules = {p.stem for p in Path(faults.__file__).parent.glob("[!_]*.py")}
    assert set(faults.names()) == modules
    assert {"kill_peer", "kill_db", "kill_function", "hang_function", "straggler", "join", "restart_db"} <= modules
    for name in faults.names():
        cls = faults.registry.cls(name)
        module = sys.modules[cls.__module__]
        assert module.__name__ == f"spirt.faults.{name}"  # its own module, named after it
        assert len(inspect.getdoc(module)) > 200, f"{name}: the module should say what the fault does and why"
        assert cls.inject is not Fault.inject and isinstance(cls.fate, Fate)
        info = faults.info(name)
        assert info.summary and "\n" not in info.summary and "{" not in info.summary
        assert info.summary == faults.SCENARIOS[name].description
        assert info.params == {"victim": cls.victim, "at": cls.at, "duration_s": cls.duration_s}
        s = faults.SCENARIOS[name]
        assert (s.name, s.fault, s.victim, s.at, s.duration_s) == (name, name, cls.victim, cls.at, cls.duration_s)
        faults.scenario_config(s)  # the default scenario fits the default training


def test_scenario_config_follows_the_fault_class():
    cfg, n = faults.scenario_config(faults.SCENARIOS["restart_db"])
    assert n == 4 and cfg.peers.persistence and cfg.peers.count == 4
    cfg, n = faults.scenario_config(faults.SCENARIOS["join"])
    assert n == 4 and cfg.peers.count == 3 and cfg.data.parts == 4 and not cfg.peers.persistence
    with pytest.raises(ValueError, match="must be the last one"):
        faults.scenario_config(Scenario("early", "kill_peer", victim=1))
    with pytest.raises(ValueError, match="does not fit"):
        faults.scenario_config(Scenario("newcomer", "join", victim=2))
    with pytest.raises(ValueError, match="unknown fault 'nope'; allowed: .*kill_peer"):
        Scenario("x", "nope")
    s = Scenario("short", "straggler", victim=1, duration_s=2.5)
    assert s.description == "SIGSTOP peer 1's orchestrator for 2.5 s, then SIGCONT"
    assert s.survivors(4) == [0, 1, 2, 3] and faults.SCENARIOS["kill_db"].survivors(4) == [0, 1, 2]


def _result(fault: str, events: list[tuple], metrics: list[dict] | None = None, t_fault: float = 100.0,
            survivors=(0, 1, 2, 3)) -> ScenarioResult:
    ev = pd.DataFrame(events, columns=["t", "round", "peer", "event", "about", "detail"])
    return ScenarioResult(faults.SCENARIOS[fault], 4, 10, list(survivors), 0.0, t_fault, pd.DataFrame(metrics or []),
                          ev, {}, {}, 0.0)


def _rounds(survivors, barrier_at: dict[int, float]) -> list[dict]:
    """Rounds 0..9 of 1 s each from t = 95, with barrier times 0.1 s unless given."""
    return [{"round": r, "peer": i, "wall_begin": 95.0 + r, "wall_end": 96.0 + r, "t_barrier": barrier_at.get(r, 0.1)}
            for r in range(10) for i in survivors]


def test_measures_follow_the_fault_class():
    # a function fault is noticed by the victim itself; the others' events do not count
    res = _result("kill_function", [(100.2, 5, 0, "excluded", 1, ""), (100.5, 5, 1, "function_failed", 1, "")],
                  _rounds(range(4), {5: 3.0}))
    assert res.detection_s == pytest.approx(0.5)
    assert res.recovery_s == pytest.approx(102.0 - 100.0)  # round 6: the first normal one begun after it
    # a lost peer is noticed by the others, and the survivors' rounds tell the recovery
    res = _result("kill_peer", [(99.0, 4, 0, "removed", 3, ""), (101.0, 5, 0, "excluded", 3, ""),
                                (101.5, 5, 1, "removed", 3, "")], _rounds(range(3), {6: 3.0}), survivors=(0, 1, 2))
    assert res.detection_s == pytest.approx(1.0)  # not the event before the fault
    assert res.recovery_s == pytest.approx(103.0 - 100.0)  # round 6 begun after it, but waited long
    # a returning peer recovers with its own event: joined first, else recovered
    restart = [(100.3, 5, 0, "excluded", 2, ""), (102.0, 5, 2, "recovered", 2, ""), (104.0, 7, 2, "joined", 2, "")]
    res = _result("restart_db", restart, _rounds(range(4), {}))
    assert (res.detection_s, res.recovery_s) == (pytest.approx(0.3), pytest.approx(4.0))
    assert res.victim_story() == "recovered@5 joined@7"
    res = _result("restart_db", restart[:2], _rounds(range(4), {}))
    assert res.recovery_s == pytest.approx(2.0)
    assert math.isnan(_result("restart_db", restart[:1], _rounds(range(4), {})).recovery_s)
    # a straggler without such an event: the survivors' rounds
    assert _result("straggler", restart[:1], _rounds(range(4), {})).recovery_s == pytest.approx(2.0)
    # a newcomer: noticed when admitted, its fault time is its join request, its rounds count from its join
    joined = [(100.0, 5, 3, "join_request", 3, ""), (100.1, 5, 0, "admitted", 3, ""),
              (100.4, 6, 3, "joined", 3, "from peers 0,1")]
    ev = pd.DataFrame(joined, columns=["t", "round", "peer", "event", "about", "detail"])
    assert faults.registry.get("join").fault_time(faults.SCENARIOS["join"], 99.0, ev) == 100.0
    res = _result("join", joined, [m for m in _rounds(range(4), {}) if m["peer"] != 3 or m["round"] >= 6])
    assert (res.detection_s, res.recovery_s) == (pytest.approx(0.1), pytest.approx(0.4))
    assert res.expected_start(3) == 6 and res.rounds_lost == 0


def test_a_new_fault_in_its_own_file_is_listed_everywhere(crash_peer, capsys, tmp_path):
    assert crash_peer in faults.names() and crash_peer in faults.SCENARIOS
    s = faults.SCENARIOS[crash_peer]
    assert s.description == "SIGKILL peer 2's orchestrator at round 40% of the training"
    assert s.survivors(3) == [0, 1]  # from its fate
    assert faults.names().index(crash_peer) < faults.names().index("kill_function")  # grouped with the lost
    assert faults.info(crash_peer).fate is Fate.LOST
    assert faults.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert re.search(rf"^{crash_peer} +lost +{re.escape(s.description)}$", listed, re.M), listed
    assert all(n in listed for n in faults.names())
    assert crash_peer in faults.parser().format_help()
    with pytest.raises(SystemExit) as exc:
        faults.main(["--scenarios", "crash_peer,nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown scenario(s) ['nope']" in err and "crash_peer" in err
    row = {"scenario": crash_peer, "fault": s.description, "fate": "lost", "detection_s": 1.0}
    faults.write_reports([row], tmp_path)
    assert s.description in (tmp_path / "faults.md").read_text()


def test_a_fault_is_gone_with_its_module():
    assert "crash_peer" not in faults.SCENARIOS and "crash_peer" not in faults.listing()


@pytest.mark.faults
@pytest.mark.timeout(420)
def test_a_new_fault_in_its_own_file_runs_through_the_scenario_machinery(crash_peer):
    t0 = time.time()
    res = faults.run_scenario(crash_peer, {"peers.count": 3, "run.rounds": 20})
    assert res.scenario.name == crash_peer and res.peers == 3 and res.survivors == [0, 1]
    assert t0 < res.t_start < res.t_fault < time.time()
    assert res.victim_completed_before is not None and res.victim_completed_before >= 7  # at round 8
    m = res.metrics
    for i in res.survivors:
        assert m[m["peer"] == i]["round"].max() == res.rounds - 1
    assert res.survivors_identical
    hb = faults.BASE["membership.heartbeat_s"]
    assert 0 < res.detection_s <= 2 * hb + 0.5 and not math.isnan(res.recovery_s)
    row = res.row(res.final_accuracy)
    assert row["fate"] == "lost" and row["fault"] == faults.SCENARIOS[crash_peer].description
    assert row["survivors"] == "0 1" and row["aggregated_last_round"] == 2
