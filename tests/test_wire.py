"""Parsers of values other peers write (spirt.wire): what they accept, what they refuse, and that
arbitrary bytes only ever raise BadValue."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spirt.wire import (
    BadValue,
    check_url,
    parse_join_request,
    parse_mark,
    parse_member_set,
    parse_snapshot_meta,
)


@pytest.mark.parametrize("raw, expect", [(None, None), (b"-1", -1), (b"0", 0), (b"99", 99), ("42", 42)])
def test_mark_accepts_the_rounds_of_the_training(raw, expect):
    assert parse_mark(raw, rounds=100) == expect


@pytest.mark.parametrize("raw, why", [
    (b"100", "not a round of this training"), (b"1000000", "not a round"), (b"-2", "not a round"),
    (b"", "not an integer"), (b"1.5", "not an integer"), (b" 3", "not an integer"), (b"+3", "not an integer"),
    (b"\xff3", "not UTF-8"), (b"9" * 40, "bytes"), ("\u0663", "not an integer"),  # an Arabic-Indic 3
    (3, "not a string"),
])
def test_mark_refuses_what_is_not_a_round(raw, why):
    with pytest.raises(BadValue, match=why):
        parse_mark(raw, rounds=100)


def test_member_set():
    assert parse_member_set(b"0,2,3", range(4)) == "0,2,3"
    assert parse_member_set(b"1", {1}) == "1"
    for raw, why in [(b"0,0", "increasing"), (b"2,1", "increasing"), (b"0,7", "not in the group"),
                     (b"", "not an integer"), (b"0,,1", "not an integer"), (b"a", "not an integer"),
                     (b"0," * 200, "bytes")]:
        with pytest.raises(BadValue, match=why):
            parse_member_set(raw, range(4))


META = {"round": 6, "from": 1, "members": {"0": "unix:///tmp/a.sock", "2": "redis://h:1"},
        "self_url": "unix:///tmp/b.sock"}


def _meta(**change) -> bytes:
    return json.dumps({**META, **change}).encode()


def test_snapshot_meta_accepted():
    m = parse_snapshot_meta(_meta(), source=1, round=6, max_peers=4)
    assert (m.round, m.source, m.members, m.self_url) == (6, 1, {0: "unix:///tmp/a.sock", 2: "redis://h:1"},
                                                          "unix:///tmp/b.sock")
    assert m.since == {}
    assert parse_snapshot_meta(_meta(since={"2": 9}), source=1, round=6, max_peers=4).since == {2: 9}


@pytest.mark.parametrize("raw, why", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{not json", "not JSON"),
    (b"[1, 2]", "not an object"),
    (json.dumps({**META, "extra": 1}).encode(), "not an object with"),
    (_meta(round=7), "not the round asked for"),
    (_meta(round=True), "not the round asked for"),
    (_meta(round="6"), "not the round asked for"),
    (_meta(**{"from": 3}), "not the peer it was read from"),
    (_meta(members=[1]), "not a map"),
    (_meta(members={str(i): "unix:///x" for i in range(5)}), "not a map of at most 4"),
    (_meta(members={"9": "unix:///x"}), "outside 0 to 3"),
    (_meta(members={"x": "unix:///x"}), "not an integer"),
    (_meta(members={"0": "http://evil"}), "not a redis"),
    (_meta(members={"0": 5}), "not a string"),
    (_meta(members={"0": "unix:///a b"}), "not a redis"),
    (_meta(self_url="file:///etc/passwd"), "own URL"),
    (_meta(since=[2]), "since is not a map"),
    (_meta(since={"3": 9}), "not one of its members"),
    (_meta(since={"2": 7}), "not a round from 8"),  # the joiner's first round: awaited there anyway
    (_meta(since={"2": 6 + 1 + 65}), "not a round from 8"),
    (_meta(since={"2": "9"}), "not a round"),
    (_meta(since={"2": True}), "not a round"),
    (b"[" * 100_000, "bytes"),
    (("[" * 5000 + "]" * 5000).encode(), "not"),  # deep nesting: refused, never a RecursionError
])
def test_snapshot_meta_refused(raw, why):
    with pytest.raises(BadValue, match=why):
        parse_snapshot_meta(raw, source=1, round=6, max_peers=4)


def test_url():
    assert check_url("rediss://h:6380/0") == "rediss://h:6380/0"
    for bad in ["", "redis", "ftp://x", "unix:///a\nb", "redis://" + "x" * 2000, None]:
        with pytest.raises(BadValue):
            check_url(bad)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(raw=st.one_of(st.none(), st.binary(max_size=300), st.text(max_size=100)))
def test_parsers_only_ever_raise_bad_value(raw):
    calls = [lambda: parse_mark(raw, rounds=50), lambda: parse_member_set(raw, range(8)),
             lambda: parse_snapshot_meta(raw, source=1, round=3, max_peers=8),
             lambda: parse_join_request(raw, raw), lambda: parse_join_request(b"1", raw)]
    for call in calls:
        try:
            call()
        except BadValue:
            pass


@settings(max_examples=200, deadline=None, derandomize=True)
@given(obj=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                        max_leaves=20))
def test_any_json_meta_only_ever_raises_bad_value(obj):
    for value in (obj, {**META, "members": obj}, {**META, "round": obj}, {**META, "self_url": obj},
                  {**META, "since": obj}):
        try:
            parse_snapshot_meta(json.dumps(value).encode(), source=1, round=6, max_peers=4)
        except BadValue:
            pass
