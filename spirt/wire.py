"""Parsers of the values a peer reads that another peer wrote.

Every value here comes from a database another peer controls, so it is hostile input: it is parsed
strictly (type, size, range), and a value that does not parse raises :class:`BadValue` saying what is
wrong. The caller drops the value and holds it against its sender (an event naming the sender and the
reason); nothing here lets a bad value through or raises anything else.

=====================  ==================================================  ==================================
value                  written by                                          parser
=====================  ==================================================  ==================================
round mark (``ready``) a peer, when it publishes a round                   :func:`parse_mark`
joining round          a peer sitting out (the round it asked to join at)  :func:`parse_joining`
aggregated set         a peer, with its update (the peers it aggregated)   :func:`parse_member_set`
state digest           a peer, with its update (SHA-1 of its parameters)   :func:`parse_digest`
latest state           a peer, with its update (``round|digest``)          :func:`parse_state`
snapshot meta          a peer serving a joiner (round, members, its URL)   :func:`parse_snapshot_meta`
join request           a peer asking to be admitted (``url|first round``)  :func:`parse_join_request`
``heard`` record       a peer, with its update (signed envelopes it took)  ``security.signing.split_heard``
=====================  ==================================================  ==================================

Vectors are checked where they are read (byte width in the exchange, contents by the guard's screen);
the wake-up lists carry nothing that is used.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field

#: a round number or peer index as decimal text: at most 18 digits (below 2**63)
MAX_INT_DIGITS = 18
MAX_JOIN_REQUEST_BYTES = 2048
MAX_URL_BYTES = 1024
MAX_META_BYTES = 64 * 1024
#: a member admitted for a later round than a joiner's first: at most this many rounds later (honest
#: joiners ask a few rounds ahead of the marks they read)
MAX_SINCE_AHEAD = 64
DIGEST_HEX = 40  # SHA-1, as the database computes it (``redis.sha1hex``)
URL_SCHEMES = ("redis://", "rediss://", "unix://")


class BadValue(ValueError):
    """A value another peer wrote does not parse; the message says what is wrong with it."""


def _text(raw: object, what: str, limit: int) -> str:
    if raw is None:
        raise BadValue(f"{what} is missing")
    if isinstance(raw, str):
        raw = raw.encode("utf-8", errors="surrogatepass")
    if not isinstance(raw, bytes | bytearray):
        raise BadValue(f"{what} is not a string")
    if len(raw) > limit:
        raise BadValue(f"{what} of {len(raw)} bytes (at most {limit})")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadValue(f"{what} is not UTF-8 text") from None


def _int(text: str, what: str) -> int:
    body = text[1:] if text.startswith("-") else text
    if not (body.isascii() and body.isdigit()) or len(body) > MAX_INT_DIGITS:
        raise BadValue(f"{what} {text[:24]!r} is not an integer")
    return int(text)


def check_url(url: object, what: str = "URL") -> str:
    """A database URL another peer gave us: a string with a Redis scheme, of bounded length."""
    if not isinstance(url, str) or len(url.encode("utf-8", errors="replace")) > MAX_URL_BYTES:
        raise BadValue(f"{what} is not a string of at most {MAX_URL_BYTES} bytes")
    if not url.startswith(URL_SCHEMES) or any(c.isspace() or ord(c) < 32 for c in url):
        raise BadValue(f"{what} is not a redis://, rediss:// or unix:// URL")
    return url


def parse_mark(raw: object, rounds: int) -> int | None:
    """The last round a peer announced (its ``ready`` key): None when it has announced none; -1 to
    ``rounds - 1`` otherwise. A round beyond the training's last one is implausible.

    >>> parse_mark(b"41", rounds=100), parse_mark(None, rounds=100)
    (41, None)
    >>> parse_mark(b"1000000", rounds=100)
    Traceback (most recent call last):
    ...
    spirt.wire.BadValue: round mark 1000000 is not a round of this training (-1 to 99)
    """
    return _round_or_none(raw, "round mark", rounds - 1)


def parse_joining(raw: object, rounds: int) -> int | None:
    """The round a peer sitting out for a state transfer asked to join at (its ``joining`` key): None
    when it is not sitting out; -1 while it has not asked yet; at most ``rounds`` (the training's end:
    it takes the final state).

    >>> parse_joining(b"12", rounds=36), parse_joining(b"-1", rounds=36), parse_joining(None, rounds=36)
    (12, -1, None)
    >>> parse_joining(b"37", rounds=36)
    Traceback (most recent call last):
    ...
    spirt.wire.BadValue: joining round 37 is not a round of this training (-1 to 36)
    """
    return _round_or_none(raw, "joining round", rounds)


def _round_or_none(raw: object, what: str, last: int) -> int | None:
    """None for a missing value, else a round from -1 (none yet) to ``last``."""
    if raw is None:
        return None
    v = _int(_text(raw, what, MAX_INT_DIGITS + 1), what)
    if not -1 <= v <= last:
        raise BadValue(f"{what} {v} is not a round of this training (-1 to {last})")
    return v


def parse_digest(raw: object) -> str:
    """The digest of a peer's parameters after a round (``digest:r``): 40 lowercase hex digits.

    >>> parse_digest(b"a977238f3452a6b751b28077741fc0989e3ac2a4")
    'a977238f3452a6b751b28077741fc0989e3ac2a4'
    >>> parse_digest(b"not a digest")
    Traceback (most recent call last):
    ...
    spirt.wire.BadValue: state digest 'not a digest' is not 40 hex digits
    """
    text = _text(raw, "state digest", DIGEST_HEX)
    if len(text) != DIGEST_HEX or any(c not in "0123456789abcdef" for c in text):
        raise BadValue(f"state digest {text[:24]!r} is not {DIGEST_HEX} hex digits")
    return text


def parse_state(raw: object, rounds: int) -> tuple[int, str] | None:
    """A peer's latest state (``state``): (the last round it completed, the digest of its parameters
    then); None when it completed none.

    >>> parse_state(b"12|a977238f3452a6b751b28077741fc0989e3ac2a4", rounds=100)
    (12, 'a977238f3452a6b751b28077741fc0989e3ac2a4')
    >>> parse_state(b"500|a977238f3452a6b751b28077741fc0989e3ac2a4", rounds=100)
    Traceback (most recent call last):
    ...
    spirt.wire.BadValue: completed round 500 is not a round of this training (0 to 99)
    """
    if raw is None:
        return None
    round_text, sep, digest = _text(raw, "state", MAX_INT_DIGITS + 1 + DIGEST_HEX).partition("|")
    if not sep:
        raise BadValue("state is not 'round|digest'")
    r = _int(round_text, "completed round")
    if not 0 <= r < rounds:
        raise BadValue(f"completed round {r} is not a round of this training (0 to {rounds - 1})")
    return r, parse_digest(digest)


def parse_member_set(raw: object, peers: Collection[int]) -> str:
    """A set of peers a peer aggregated, in its canonical form (comma-separated, increasing indices,
    each one of ``peers``), as stored; BadValue otherwise.

    >>> parse_member_set(b"0,1,3", peers=range(4))
    '0,1,3'
    >>> parse_member_set(b"3,1", peers=range(4))
    Traceback (most recent call last):
    ...
    spirt.wire.BadValue: aggregated set '3,1' is not increasing
    """
    limit = max(1, len(peers)) * (MAX_INT_DIGITS + 1)
    text = _text(raw, "aggregated set", limit)
    items = [_int(x, "aggregated set entry") for x in text.split(",")]
    if any(b <= a for a, b in zip(items, items[1:], strict=False)):
        raise BadValue(f"aggregated set {text[:40]!r} is not increasing")
    unknown = [q for q in items if q not in peers]
    if unknown:
        raise BadValue(f"aggregated set names peers {unknown[:5]} that are not in the group")
    return text


@dataclass(frozen=True)
class SnapshotMeta:
    """What a peer serving a joiner says of the state it snapshot: the round the state is after, the
    serving peer, the group's current members (index -> database URL), its own URL, and the members it
    admitted for a round after the joiner's first (index -> that round: not awaited before it)."""

    round: int
    source: int
    members: dict[int, str]
    self_url: str
    since: dict[int, int] = field(default_factory=dict)


def parse_snapshot_meta(raw: object, *, source: int, round: int, max_peers: int) -> SnapshotMeta:
    """The meta of a snapshot read from peer ``source`` for the state after ``round``: a JSON object
    with exactly ``round``, ``from``, ``members`` and ``self_url`` (and ``since`` where some members
    join later); the round and the source must be the ones asked for, members at most ``max_peers``
    entries of peer index -> URL, ``since`` a map of some of them to a round from ``round + 2`` (after
    the joiner's first) to ``MAX_SINCE_AHEAD`` rounds later.

    >>> m = parse_snapshot_meta(b'{"round": 6, "from": 1, "members": {"0": "unix:///a"}, '
    ...                         b'"self_url": "unix:///b"}', source=1, round=6, max_peers=8)
    >>> m.members, m.self_url
    ({0: 'unix:///a'}, 'unix:///b')
    """
    text = _text(raw, "snapshot meta", MAX_META_BYTES)
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise BadValue("snapshot meta is not JSON") from None
    if not isinstance(obj, dict) or not {"round", "from", "members", "self_url"} <= set(obj) <= {
            "round", "from", "members", "self_url", "since"}:
        raise BadValue("snapshot meta is not an object with round, from, members, self_url (and since)")
    if type(obj["round"]) is not int or obj["round"] != round:
        raise BadValue(f"snapshot meta's round {str(obj['round'])[:24]} is not the round asked for ({round})")
    if type(obj["from"]) is not int or obj["from"] != source:
        raise BadValue(f"snapshot meta's source {str(obj['from'])[:24]} is not the peer it was read from ({source})")
    members = obj["members"]
    if not isinstance(members, dict) or len(members) > max_peers:
        raise BadValue(f"snapshot meta's members are not a map of at most {max_peers} peers")
    parsed = {}
    for q, url in members.items():
        index = _int(q, "snapshot meta's member index")
        if not 0 <= index < max_peers:
            raise BadValue(f"snapshot meta names member {index}, outside 0 to {max_peers - 1}")
        parsed[index] = check_url(url, f"snapshot meta's URL of member {index}")
    since = obj.get("since", {})
    if not isinstance(since, dict) or len(since) > len(parsed):
        raise BadValue("snapshot meta's since is not a map of its members to rounds")
    later = {}
    for q, r in since.items():
        index = _int(q, "snapshot meta's since index")
        if index not in parsed:
            raise BadValue(f"snapshot meta's since names peer {index}, not one of its members")
        if type(r) is not int or not round + 2 <= r <= round + 1 + MAX_SINCE_AHEAD:
            raise BadValue(f"snapshot meta's since of member {index} is not a round from {round + 2} to "
                           f"{round + 1 + MAX_SINCE_AHEAD}")
        later[index] = r
    return SnapshotMeta(round, source, parsed, check_url(obj["self_url"], "snapshot meta's own URL"), later)


def parse_join_request(raw_q: object, raw: object) -> tuple[int, str, int]:
    """(peer, database URL, first round) of one join request: the requester's index as found in the
    key name, and the value ``url|first round``; BadValue saying what is wrong otherwise.

    >>> parse_join_request(b"4", b"unix:///tmp/p4.sock|12")
    (4, 'unix:///tmp/p4.sock', 12)
    """
    if raw is None or len(raw) > MAX_JOIN_REQUEST_BYTES:
        raise BadValue(f"join request of {0 if raw is None else len(raw)} bytes (at most {MAX_JOIN_REQUEST_BYTES})")
    try:
        text_q = raw_q.decode("ascii") if isinstance(raw_q, bytes) else str(raw_q)
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as exc:
        raise BadValue("join request is not text") from exc
    if not text_q.isdigit() or len(text_q) > 9:
        raise BadValue(f"join request field {text_q[:20]!r} is not a peer index")
    if "|" not in text:
        raise BadValue("join request is not url|first-round")
    url, first = text.rsplit("|", 1)
    if not (first.isascii() and first.isdigit()) or len(first) > MAX_INT_DIGITS:
        raise BadValue(f"join request's first round {first[:20]!r} is not a round number")
    if not url.startswith(URL_SCHEMES):
        raise BadValue("join request's URL is not a redis://, rediss:// or unix:// URL")
    return int(text_q), url, int(first)
