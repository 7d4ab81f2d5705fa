"""Attacks on the peer-to-peer protocol (`pytest -k byzantine`): their hooks, and each one mounted in a
real training (5 peers as threads, each with its own database server, the last one Byzantine, trimmed
mean tolerating f = 1, MLP on Fashion-MNIST) against the defense that answers it. Each training test
fails if that defense is taken out (noted at each test)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import attacks
from spirt.benchmarks import protocol
from spirt.benchmarks.protocol import Run, Training, measure, train

pytestmark = pytest.mark.byzantine

PROTOCOL = ["dissensus", "equivocation", "framing", "mark_inflation", "omission", "rushing", "stale_replay",
            "state_poisoning"]
T = Training(rounds=8)


def test_byzantine_protocol_attacks_are_registered_as_their_own_kind():
    assert attacks.names(kind="protocol") == PROTOCOL
    assert not set(PROTOCOL) & set(attacks.names(kind="model"))
    for name in PROTOCOL:
        info = attacks.info(name)
        assert info.reference and info.summary, name
        assert isinstance(attacks.get(name), attacks.ProtocolAttack)


def test_byzantine_protocol_hooks_default_to_what_an_honest_peer_does():
    honest_like = attacks.get("omission", share=1.0)
    own = np.arange(3, dtype=np.float32)
    assert list(honest_like.outgoing([2, 0, 1], own=own)) == [0, 1, 2]
    assert honest_like.delay_s(5.0) == 0 and honest_like.mark(7, rounds=10) == 7
    assert honest_like.replay(9) is None and honest_like.victim is None
    p, m = honest_like.served_state(own, None)
    assert p is own and m is None


def test_byzantine_equivocation_tells_two_camps_two_plausible_vectors():
    honest = np.random.default_rng(0).normal(size=(6, 50))
    out = attacks.get("equivocation", z=1.5).outgoing([0, 1, 2, 3], honest=honest)
    assert out[0] is out[2] and out[1] is out[3] and not np.allclose(out[0], out[1])
    mu, sigma = honest.mean(axis=0), honest.std(axis=0, ddof=1)
    np.testing.assert_allclose((out[0] + out[1]) / 2, mu)
    np.testing.assert_allclose(np.abs(out[0] - mu), 1.5 * sigma)
    ipm = attacks.get("equivocation", base="ipm", eps=0.5).outgoing([0, 1], honest=honest)
    np.testing.assert_allclose(ipm[0], -0.5 * mu)
    np.testing.assert_allclose(ipm[1], 2.5 * mu)


def test_byzantine_dissensus_pushes_each_recipient_away_from_the_others():
    honest = np.random.default_rng(1).normal(size=(4, 20))
    out = attacks.get("dissensus", eps=2.0).outgoing([0, 1, 2, 3, 9], honest=honest, rows=[0, 1, 2, 3])
    for q in range(4):
        others = np.delete(honest, q, axis=0).mean(axis=0)
        np.testing.assert_allclose(out[q], honest[q] + 2.0 * (honest[q] - others))
    np.testing.assert_allclose(out[9], honest.mean(axis=0))  # not an honest row: the mean


def test_byzantine_omission_and_the_other_hooks():
    assert sorted(attacks.get("omission", share=0.4).outgoing(range(5), own=np.zeros(2))) == [0, 1]
    assert attacks.get("omission", share=0.0).outgoing(range(5), own=np.zeros(2)) == {}
    assert attacks.get("rushing", lateness=0.9).delay_s(2.0) == pytest.approx(1.8)
    assert attacks.get("mark_inflation", ahead=3).mark(9, rounds=10) == 9  # never beyond the last round
    assert [attacks.get("stale_replay", lag=2).replay(r) for r in range(4)] == [None, None, 0, 1]
    params = np.array([1.0, 2.0], dtype=np.float32)
    a = attacks.get("state_poisoning", mode="noise", scale=0.5, key=3).served_state(params, None)[0]
    b = attacks.get("state_poisoning", mode="noise", scale=0.5, key=3).served_state(params, None)[0]
    assert a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, params)  # colluders agree


@pytest.mark.parametrize(("name", "params"), [("omission", {"share": 1.5}), ("rushing", {"lateness": -1}),
                                              ("mark_inflation", {"ahead": 0}), ("stale_replay", {"lag": 0}),
                                              ("state_poisoning", {"mode": "zero"}), ("framing", {"victim": -1}),
                                              ("equivocation", {"base": "gauss"}), ("dissensus", {"eps": -1})])
def test_byzantine_protocol_attack_parameters_are_checked(name, params):
    with pytest.raises(ValueError, match=name):
        attacks.get(name, **params)


def test_byzantine_protocol_plan_and_refusals():
    runs = protocol.plan()
    attacked = [r for r in runs if r.attack]
    assert len(attacked) == len(PROTOCOL) * len(protocol.SETTINGS) * len(protocol.MODES)
    assert all(r.joiner == (r.attack == "state_poisoning") for r in attacked)
    assert protocol.refusal(Run("state_poisoning", 5, 2, "open", True))  # 4 peers before the join, f = 2
    assert protocol.refusal(Run("omission", 5, 2, "open")) is None
    with pytest.raises(ValueError, match="not attacks on the protocol"):
        protocol.plan(["alie"])


# -- mounted in real training ------------------------------------------------------------------------


def _mount(attack: str, mode: str = "open", joiner: bool = False, n: int = 5, t: Training = T, **params):
    run = Run(attack, n, 1, mode, joiner)
    df = train(run, t, params)
    return df, df.attrs["events"], measure(df, run)


def _story(events, df=None) -> str:
    """The run's events, one line each, and the peers that failed, for an assertion's message (a failure
    says what happened)."""
    failed = [f"peer {q} failed: {why}" for q, why in (df.attrs.get("peer_failures") or {}).items()] if df is not None else []
    return "\n".join([f"r{e.round} peer {e.peer}: {e.event} {e.about} {e.detail}" for e in events.itertuples()] + failed)


def _events(events, kind: str, about: int | None = None):
    hit = events[(events["event"] == kind) & (events["peer"] < 4)]
    return hit if about is None else hit[hit["about"] == about]


@pytest.mark.parametrize("attack", ["equivocation", "dissensus"])
def test_byzantine_equivocating_peer_is_banned_when_updates_are_signed(attack):
    # the defense: peers compare the envelopes they accepted (Agreement.catch_equivocation); without it
    # the honest models part for good (see the open runs in reports/byzantine_protocol.md)
    df, events, m = _mount(attack, "signed")
    assert len(_events(events, "equivocation", about=4)), "the equivocating peer was not banned"
    # the round it equivocated in parted the honest models; with the equivocator proven Byzantine, one
    # holder fewer makes a state trustworthy, and they agree again (Agreement.check)
    assert m["final_states"] == 1, f"the honest models stayed apart after the equivocator was banned:\n{_story(events, df)}"
    assert m["honest_accused"] == [] and m["rounds_done"] == T.rounds, _story(events, df)


def test_byzantine_dissensus_without_signatures_is_a_split_that_is_said():
    # nothing can prove an unsigned equivocation: the peers train on, and every one says the group split
    df, events, m = _mount("dissensus", "open")
    assert m["final_states"] > 1
    assert len(_events(events, "split")) >= 1, "the honest models parted without a 'split' event"


def test_byzantine_omission_is_excluded_and_parted_models_agree_again():
    # defenses: the barrier's deadline (the peers left out do not wait past it) and the agreement (the
    # peers whose model parted resynchronise); without the resync, the models would stay apart
    df, events, m = _mount("omission", "open")
    assert len(_events(events, "excluded", about=4)), "the peers left out did not exclude the attacker"
    curve = dict(json.loads(json.dumps(m["disagreement"])))
    apart = [r for r, states in curve.items() if states > 1 and r < T.rounds - 1]
    assert all(curve.get(r + 1, 1) == 1 for r in apart), f"models stayed apart over rounds: {curve}"
    honest = df[df["peer"] < 4]
    assert honest["t_barrier"].max() < T.barrier_timeout_s + 2.0  # the wait is bounded by the deadline
    # the last round parts them too: the comparison after it (Agreement.close) brings them together
    assert m["final_states"] == 1, f"the training ended with the models apart:\n{_story(events, df)}"


def test_byzantine_rushing_past_the_deadline_is_not_waited_for():
    # the defense: the barrier's deadline. The attacker sends 1.5 deadlines late: the honest peers
    # exclude it at the deadline instead of waiting, and agree
    df, events, m = _mount("rushing", "open", lateness=1.5)
    honest = df[df["peer"] < 4]
    assert honest["t_barrier"].median() < T.barrier_timeout_s * 1.25
    assert len(_events(events, "excluded", about=4))
    assert m["final_states"] == 1 and m["honest_excluded"] == []


def test_byzantine_inflated_marks_make_no_honest_peer_resync():
    # the defense: lagging needs f + 1 peers ahead (agreement.decide); with one peer enough, every
    # honest peer would resynchronise after each round of the attacker's
    df, events, m = _mount("mark_inflation", "open", ahead=3)
    assert m["honest_resyncs"] == 0 and m["rounds_done"] == T.rounds
    assert m["final_states"] == 1 and m["honest_excluded"] == []


def test_byzantine_a_mark_ahead_does_not_drop_a_vector_on_its_way():
    # the defense: the barrier does not drop a vector on its sender's mark alone (Exchange.barrier).
    # When it did, an attacker advertising a later round was excluded at the peers whose barrier looked
    # before its vector landed and aggregated at the others: 10 signed peers under mark_inflation ended
    # the training with 4 different models. Here peer 1 says it published round 5 while its round-0
    # vector is still on its way (0.8 s, within the 3 s deadline): it must be waited for (peer 2, in
    # its round, makes the one peer ahead a minority: a majority ahead means that we are behind).
    import threading
    import time

    from spirt.config import load_config
    from spirt.keys import Keys
    from spirt.peer import Peer
    from spirt.servers import start_server

    cfg = load_config(None, {"peers.count": 3, "run.rounds": 10, "model.name": "mlp",
                             "barrier.timeout_s": 3.0, "membership.heartbeat_s": 1.0})
    servers = [start_server("valkey", unix_socket=True) for _ in range(3)]
    peer = None
    try:
        c0 = servers[0].client()
        for q, mark in ((1, 5), (2, 0)):
            servers[q].client().set(Keys(q).alive, 1, px=60_000)
            servers[q].client().set(Keys(q).ready, mark)
        peer = Peer(cfg, 0, [s.url for s in servers])
        peer.init_params()
        c0.set(Keys(0).incoming(2, 0), b"\0" * peer.width)

        def lands_late():
            time.sleep(0.8)
            c0.set(Keys(0).incoming(1, 0), b"\0" * peer.width)

        later = threading.Thread(target=lands_late)
        later.start()
        ready, missing = peer.exchange.barrier(0, [1, 2], peer.width)
        later.join()
        assert ready == [1, 2], f"a vector on its way was dropped on its sender's mark: {missing}"
    finally:
        if peer is not None:
            peer.close()
        for s in servers:
            s.stop()


def test_byzantine_poisoned_state_is_not_adopted_by_a_joiner():
    # the defense: a joiner takes a state only when f + 1 sources hand it over identically
    # (StateTransfer.agreeing); from the attacker alone it would start from the negated model
    df, events, m = _mount("state_poisoning", "open", joiner=True)
    joined = events[(events["event"] == "joined") & (events["peer"] == 3)]
    assert len(joined), "the joiner never joined"
    assert m["max_honest_states"] == 1, "the joiner's model parted from the others'"
    last = df[(df["round"] == df["round"].max()) & (df["peer"] < 4)]
    assert last["accuracy"].max() - last["accuracy"].min() < 0.02


def test_byzantine_framing_gets_no_honest_peer_excluded_when_secured():
    # the defenses: ACLs refuse writes in the victim's name, and a proof of equivocation needs the
    # victim's own two signatures (SecurityContext.equivocation verifies them)
    df, events, m = _mount("framing", "signed", victim=0)
    assert m["honest_excluded"] == [] and m["honest_accused"] == [], "an honest peer was excluded"
    assert len(events[(events["event"] == "attack_refused") & (events["peer"] == 4)]), "no write was refused"
    assert not len(_events(events, "equivocation", about=0)), "the victim was banned"
    assert m["final_states"] == 1 and m["rounds_done"] == T.rounds


def test_byzantine_stale_replay_is_rejected_when_updates_are_signed():
    # the defense: an envelope's signature covers its round; a replayed one is rejected before it is
    # aggregated (without that check the stale vector would count as fresh)
    df, events, m = _mount("stale_replay", "signed", lag=2)
    rejected = _events(events, "update_rejected", about=4)
    assert len(rejected), "the replayed messages were accepted"
    assert rejected["round"].min() >= 2  # before round lag the attacker sends fresh messages
    assert m["final_states"] == 1 and m["honest_excluded"] == []


# -- what the protocol does about them ------------------------------------------------------------------


def test_byzantine_a_split_without_f_plus_one_holders_is_said_and_training_goes_on():
    from spirt.agreement import Probe, decide

    def probe(d):
        return Probe(True, True, False, 8, d * 40, None)

    split = decide(0, 9, {1: probe("b"), 2: probe("c"), 3: probe("d")}, removed=set(), f=1,
                   my_digest="a" * 40, my_state=(8, "a" * 40))
    assert split.train and split.why.startswith("split: round 8 ended with 4 different models")
    # with one member proven Byzantine the others hold at most f - 1 = 0: one holder is enough, and the
    # lowest index wins the tie, so every honest peer converges on one state
    healed = decide(2, 9, {0: probe("a"), 1: probe("b"), 3: probe("d")}, removed=set(), f=0,
                    my_digest="c" * 40, my_state=(8, "c" * 40))
    assert healed.kind == "resync" and "a" * 12 in healed.why


def test_byzantine_proven_members_lower_the_rules_f():
    from spirt.aggregate import Rule
    from spirt.backends import get_backend
    from spirt.config import load_config

    cfg = load_config(None, {"peers.count": 5, "aggregation.defense": "trimmed_mean",
                             "aggregation.params": {"f": 2}})
    rule = Rule(cfg, get_backend("client"))
    with pytest.raises(ValueError, match="n > 2f"):
        rule.path(0).defense(np.zeros((3, 4)))  # both Byzantine banned: 3 vectors left
    np.testing.assert_allclose(rule.path(2).defense(np.arange(12.0).reshape(3, 4)), [4, 5, 6, 7])
    assert rule.path(2) is rule.path(2)
