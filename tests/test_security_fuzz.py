"""Fuzzing what a peer parses from bytes other parties wrote: update envelopes, admission messages,
join requests, and received vectors going through the peer's screening on a real server."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from peer_threads import in_threads

from spirt.config import load_config
from spirt.keys import Keys
from spirt.peer import Peer, parse_join_request
from spirt.security.identity import Challenge, Identity, MalformedInput, Response, make_group, respond
from spirt.security.signing import (
    ENVELOPE_BYTES,
    UpdateRejected,
    parse_envelope,
    sign_update,
    verify_update,
)
from spirt.servers import start_server

COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
IDENT = Identity.generate(1)
VEC = np.arange(16, dtype="<f4").tobytes()
GOOD_ENV = sign_update(IDENT, "g", 4, VEC)


@settings(max_examples=2000, **COMMON)
@given(st.one_of(st.binary(max_size=300), st.binary(min_size=ENVELOPE_BYTES, max_size=ENVELOPE_BYTES)))
def test_envelope_parse_never_crashes(blob):
    try:
        env = parse_envelope(blob)
    except MalformedInput:
        return
    assert len(blob) == ENVELOPE_BYTES and blob[:4] == b"SPU1"
    assert env.encode() == blob


@settings(max_examples=2000, **COMMON)
@given(pos=st.integers(0, ENVELOPE_BYTES - 1), flip=st.integers(1, 255),
       vec_pos=st.integers(0, len(VEC) - 1), which=st.sampled_from(["env", "vec"]))
def test_any_bit_change_is_rejected(pos, flip, vec_pos, which):
    env, vec = bytearray(GOOD_ENV), bytearray(VEC)
    if which == "env":
        env[pos] ^= flip
    else:
        vec[vec_pos] ^= flip
    with pytest.raises(UpdateRejected) as info:
        verify_update(bytes(env), bytes(vec), group="g", sender=1, r=4, key=IDENT.public_key)
    assert info.value.reason in {"malformed", "misaddressed", "replayed", "tampered", "forged"}


def test_unchanged_envelope_verifies():
    verify_update(GOOD_ENV, VEC, group="g", sender=1, r=4, key=IDENT.public_key)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=20,
)
FIELDS = ["v", "verifier", "prover", "nonce", "ts", "binding", "sig", "cert", "issued"]


@settings(max_examples=2000, **COMMON)
@given(st.one_of(
    st.binary(max_size=400),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=9).map(lambda d: json.dumps(d).encode()),
))
def test_admission_messages_parse_or_clear_error(raw):
    for decode in (Response.decode, Challenge.decode):
        try:
            decode(raw)
        except MalformedInput as exc:
            assert str(exc)


@settings(max_examples=500, **COMMON)
@given(field=st.sampled_from(["verifier", "prover", "nonce", "ts", "binding", "sig"]), value=json_values)
def test_mutated_valid_response_parses_or_errors(field, value):
    ch = Challenge(0, 1, b"\1" * 32, 0.0)
    d = json.loads(respond(IDENT, ch, "g", "ab" * 32).encode())
    d[field] = value
    try:
        Response.decode(json.dumps(d).encode())
    except MalformedInput:
        pass


@settings(max_examples=2000, **COMMON)
@given(raw_q=st.binary(max_size=12) | st.integers(-5, 10**12).map(lambda i: str(i).encode()),
       raw=st.none() | st.binary(max_size=64) | st.text(max_size=64).map(str.encode)
       | st.tuples(st.sampled_from(["redis://h", "unix:///s", "x"]), st.text(max_size=12)).map(
           lambda t: f"{t[0]}|{t[1]}".encode()))
def test_join_request_parse_or_clear_error(raw_q, raw):
    try:
        q, url, first = parse_join_request(raw_q, raw)
    except ValueError as exc:
        assert str(exc)
        return
    assert q >= 0 and first >= 0 and url.startswith(("redis://", "rediss://", "unix://"))


# -- received vectors through the peer's screening, on a real server ------------------------------

@pytest.fixture(scope="module", params=[True, False], ids=["signed", "unsigned"])
def admitted(request, tmp_path_factory):
    """Two admitted peers sharing a module server pair; screening with and without signatures."""
    d = tmp_path_factory.mktemp("keys")
    make_group(d, 2, "g")
    cfg = load_config(None, {
        "run.rounds": 1, "data.limit_train": 100, "data.limit_test": 50, "peers.count": 2, "peers.functions": 1,
        "model.name": "mlp", "peers.mode": "thread", "executor.kind": "inline", "security.enabled": True,
        "security.keys_dir": str(d), "security.group": "g", "security.sign_updates": request.param,
        # the screen behind an unguarded inbox, where a member can leave anything (TENSOR.PUSH refuses
        # wrong sizes before they land: tests/test_security_quotas.py)
        "security.inbox_guard": False,
    })
    servers = [start_server("valkey") for _ in range(2)]
    peers = [Peer(cfg, i, [s.url for s in servers]) for i in range(2)]
    try:
        for p in peers:
            p.init_params()
        errors = in_threads(lambda p: p.guard.admit(p.members), peers, timeout_s=60)
        assert not errors, errors
        yield peers
    finally:
        for p in peers:
            p.close()
        for s in servers:
            s.stop()


@settings(max_examples=60, **COMMON)
@given(data=st.data())
def test_screen_hostile_vectors(admitted, data):
    """Whatever peer 1 writes into its inbox slot at peer 0 (vector and envelope), screening either
    accepts a finite, correctly signed vector of the right size, or drops it with a reason."""
    p0, p1 = admitted
    n = p0.width // 4
    r = data.draw(st.integers(0, 1000))
    kind = data.draw(st.sampled_from(["finite", "special", "random_bytes"]))
    if kind == "finite":
        vec = np.asarray(data.draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=8)), dtype="<f4")
        vec = np.resize(vec, n)
    elif kind == "special":
        vec = np.zeros(n, dtype="<f4")
        vec[data.draw(st.integers(0, n - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    else:
        vec = np.frombuffer(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).bytes(4 * n), dtype="<f4")
    raw = vec.tobytes()
    env_kind = data.draw(st.sampled_from(["good", "garbage", "other_round", "none"]))
    env = {"good": sign_update(p1.guard.identity, "g", r, raw), "garbage": data.draw(st.binary(max_size=200)),
           "other_round": sign_update(p1.guard.identity, "g", r + 1, raw), "none": None}[env_kind]
    assume(env_kind != "garbage" or len(env) != ENVELOPE_BYTES)
    key = Keys(0).incoming(1, r)
    c = p1.members[0].client
    if env is not None:
        c.set(key + ":sig", env, px=60_000)
    c.set(key, raw, px=60_000)
    inputs = {0: Keys(0).avg(r), 1: key}
    rejected = p0.guard.screen(r, inputs, p0.width)
    finite = bool(np.isfinite(vec).all())
    signed = p0.cfg.security.sign_updates
    should_pass = finite and (not signed or env_kind == "good")
    assert (1 in inputs) == should_pass, (kind, env_kind, rejected)
    assert 0 in inputs
    if not should_pass:
        assert len(rejected) == 1 and rejected[0][0] == 1 and rejected[0][2]
    p0.db.delete(key, key + ":sig")
