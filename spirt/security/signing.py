"""Signed updates: a published average bound to (group, sender, round, SHA-256 of its float32 bytes).

The vector itself stays raw float32 in the inbox key, so the in-database aggregation reads it as
before; the envelope travels beside it (``<inbox key>:sig``, a key only the sender may write). The
receiver checks the envelope before the vector enters the aggregation: a wrong sender or round
(a replay of an older round), a digest that does not match the bytes (tampering) or a signature that
the trusted key of the sender did not make (forgery) exclude the vector.

Wire format of an envelope (fixed size, big-endian)::

    magic "SPU1" | sender u32 | round u64 | sha256 digest (32) | Ed25519 signature (64)   = 112 bytes
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .identity import Identity, MalformedInput, canonical

MAGIC = b"SPU1"
_HEAD = struct.Struct(">4sIQ32s")
ENVELOPE_BYTES = _HEAD.size + 64


class UpdateRejected(ValueError):
    """A received update fails verification. ``reason`` is one of malformed, replayed, misaddressed,
    tampered, forged, non_finite, size."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Envelope:
    sender: int
    round: int
    digest: bytes
    signature: bytes

    def encode(self) -> bytes:
        return _HEAD.pack(MAGIC, self.sender, self.round, self.digest) + self.signature


def _message(group: str, sender: int, r: int, digest: bytes) -> bytes:
    return canonical(b"spirt-update-v1", group, sender, r, digest)


def sign_update(identity: Identity, group: str, r: int, raw: bytes | memoryview) -> bytes:
    digest = hashlib.sha256(raw).digest()
    sig = identity.sign(_message(group, identity.index, r, digest))
    return Envelope(identity.index, r, digest, sig).encode()


def parse_envelope(blob) -> Envelope:
    """Strict parse of bytes another peer wrote; :class:`MalformedInput` for anything not an envelope."""
    if blob is None:
        raise MalformedInput("no signature envelope beside the vector")
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise MalformedInput(f"signature envelope is a {type(blob).__name__}, not bytes")
    blob = bytes(blob)
    if len(blob) != ENVELOPE_BYTES:
        raise MalformedInput(f"signature envelope has {len(blob)} bytes, expected {ENVELOPE_BYTES}")
    magic, sender, r, digest = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise MalformedInput(f"signature envelope starts with {magic!r}, not {MAGIC!r}")
    return Envelope(sender, r, digest, blob[_HEAD.size:])


def verify_update(blob, raw, *, group: str, sender: int, r: int, key: Ed25519PublicKey) -> Envelope:
    """Check the envelope ``blob`` of vector ``raw`` that sender ``sender`` published for round ``r``.
    Cheapest checks first: the digest (hashing the vector) and the signature only for well-formed,
    well-addressed envelopes."""
    try:
        env = parse_envelope(blob)
    except MalformedInput as exc:
        raise UpdateRejected("malformed", str(exc)) from None
    if env.sender != sender:
        raise UpdateRejected("misaddressed", f"envelope of peer {env.sender} in peer {sender}'s inbox")
    if env.round != r:
        kind = "replayed" if env.round < r else "misaddressed"
        raise UpdateRejected(kind, f"envelope of round {env.round} presented for round {r}")
    if raw is None or hashlib.sha256(raw).digest() != env.digest:
        raise UpdateRejected("tampered", "the vector's SHA-256 does not match the signed digest")
    try:
        key.verify(env.signature, _message(group, env.sender, env.round, env.digest))
    except InvalidSignature:
        raise UpdateRejected("forged", f"signature not made with peer {sender}'s key") from None
    return env


def verify_signature(env: Envelope, *, group: str, key: Ed25519PublicKey) -> bool:
    """Whether ``env``'s signature is its sender's over its (group, sender, round, digest)."""
    try:
        key.verify(env.signature, _message(group, env.sender, env.round, env.digest))
    except InvalidSignature:
        return False
    return True


def split_heard(record: object) -> list[Envelope]:
    """The envelopes of a ``heard`` record another peer wrote (concatenated envelopes); a record that is
    not a whole number of well-formed envelopes yields none of them (it proves nothing)."""
    if not isinstance(record, (bytes, bytearray)) or len(record) % ENVELOPE_BYTES:
        return []
    try:
        return [parse_envelope(record[i:i + ENVELOPE_BYTES]) for i in range(0, len(record), ENVELOPE_BYTES)]
    except MalformedInput:
        return []


def _snapshot_message(group: str, source: int, r: int, digest: bytes) -> bytes:
    return canonical(b"spirt-snapshot-v1", group, source, r, digest)


def snapshot_digest(params: bytes, momentum: bytes | None) -> bytes:
    return hashlib.sha256(bytes(params) + b"|" + bytes(momentum or b"")).digest()


def sign_snapshot(identity: Identity, group: str, r: int, params: bytes, momentum: bytes | None) -> bytes:
    """The source's signature over the state it hands to joiners after round r (64 bytes)."""
    return identity.sign(_snapshot_message(group, identity.index, r, snapshot_digest(params, momentum)))


def verify_snapshot(sig: object, params: bytes, momentum: bytes | None, *, group: str, source: int, r: int,
                    key: Ed25519PublicKey) -> bool:
    """Whether ``sig`` is ``source``'s signature over this state after round r."""
    if not isinstance(sig, (bytes, bytearray)) or len(sig) != 64:
        return False
    try:
        key.verify(bytes(sig), _snapshot_message(group, source, r, snapshot_digest(params, momentum)))
    except InvalidSignature:
        return False
    return True
