"""Peer identities (Ed25519), the group's trust anchors, and challenge-response admission.

A peer proves it holds the private key of its index by signing a fresh nonce chosen by the verifier,
with a timestamp. The verifier takes the public key from its own trust store (the allow-list, or a
certificate signed by the group's CA key), never from the message alone: a key carried in a message is
only believed when the CA signed it for that index. Each nonce is single use and expires, and the
timestamp must lie within a bounded clock skew, so a recorded response cannot be replayed.

Files of a keys directory::

    peer-<i>.key      PKCS#8 PEM private key of peer i (mode 0600)
    peer-<i>.pub      its raw public key, hex
    peer-<i>.cert     optional: JSON certificate of peer i signed by the group CA
    allow-list.json   {"<i>": "<public key hex>", ...}
    ca.pub            optional: the group CA's raw public key, hex
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 32
#: admission messages are small JSON documents; anything longer is refused unparsed
MAX_MESSAGE_BYTES = 4096


class AdmissionError(RuntimeError):
    """A peer is refused admission; the message says why (never with secrets)."""


class MalformedInput(ValueError):
    """Bytes written by another party do not parse; the message says what is wrong with them."""


def canonical(*fields: bytes | str | int) -> bytes:
    """Length-prefixed concatenation: no two different field lists give the same bytes, so a signature
    over one tuple cannot be reinterpreted as a signature over another."""
    out = bytearray()
    for f in fields:
        b = f if isinstance(f, bytes) else str(f).encode()
        out += len(b).to_bytes(4, "big") + b
    return bytes(out)


def _public_from_hex(text: str, what: str) -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(text)
    except (ValueError, TypeError) as exc:
        raise MalformedInput(f"{what} is not hex") from exc
    if len(raw) != PUBLIC_KEY_BYTES:
        raise MalformedInput(f"{what} has {len(raw)} bytes, an Ed25519 public key has {PUBLIC_KEY_BYTES}")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


@dataclass(frozen=True)
class Identity:
    """Peer ``index`` and its private key."""

    index: int
    key: Ed25519PrivateKey = field(repr=False)
    cert: dict | None = None  # certificate signed by the group CA, when the group uses one

    @classmethod
    def generate(cls, index: int) -> Identity:
        return cls(index, Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()

    @property
    def public_hex(self) -> str:
        return public_hex(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    def database_password(self, verifier: int, group: str, session: str = "") -> str:
        """The password this peer uses at peer ``verifier``'s database in run ``session`` (the launcher
        draws a fresh one per run, so passwords rotate with every run). Ed25519 signatures are
        deterministic, so only the holder of the private key can compute it, at any time during the run
        (after a restart too), and the verifier stores only its SHA-256 (bound into the signed admission
        response)."""
        sig = self.sign(canonical(b"spirt-db-password-v2", group, session, verifier, self.index))
        return hashlib.sha256(sig).hexdigest()

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"peer-{self.index}.key"
        pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        (d / f"peer-{self.index}.pub").write_text(self.public_hex + "\n")
        if self.cert is not None:
            (d / f"peer-{self.index}.cert").write_text(json.dumps(self.cert))

    @classmethod
    def load(cls, directory: str | os.PathLike, index: int) -> Identity:
        d = Path(directory)
        path = d / f"peer-{index}.key"
        if not path.exists():
            raise AdmissionError(f"no private key for peer {index} in {str(d)!r} (expected {path.name})")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise AdmissionError(f"{path} is not an Ed25519 private key")
        cert_path = d / f"peer-{index}.cert"
        cert = json.loads(cert_path.read_text()) if cert_path.exists() else None
        return cls(index, key, cert)


def issue_certificate(ca: Ed25519PrivateKey, index: int, public: Ed25519PublicKey, group: str) -> dict:
    """The CA's statement "peer ``index`` of ``group`` holds this key"."""
    key_hex = public_hex(public)
    sig = ca.sign(canonical(b"spirt-cert-v1", group, index, key_hex))
    return {"peer": index, "key": key_hex, "sig": sig.hex()}


@dataclass
class TrustStore:
    """Who may join ``group``: an allow-list of public keys by peer index, and/or a CA key."""

    group: str
    allow: dict[int, Ed25519PublicKey] = field(default_factory=dict)
    ca: Ed25519PublicKey | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike, group: str) -> TrustStore:
        d = Path(directory)
        allow: dict[int, Ed25519PublicKey] = {}
        path = d / "allow-list.json"
        if path.exists():
            for k, v in json.loads(path.read_text()).items():
                allow[int(k)] = _public_from_hex(v, f"allow-list entry {k}")
        ca_path = d / "ca.pub"
        ca = _public_from_hex(ca_path.read_text().strip(), "ca.pub") if ca_path.exists() else None
        if not allow and ca is None:
            raise AdmissionError(f"{str(d)!r} has neither allow-list.json nor ca.pub: nobody could be admitted")
        return cls(group, allow, ca)

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "allow-list.json").write_text(json.dumps({str(i): public_hex(k) for i, k in sorted(self.allow.items())}))
        if self.ca is not None:
            (d / "ca.pub").write_text(public_hex(self.ca) + "\n")

    def key_for(self, index: int, cert: dict | None = None) -> Ed25519PublicKey:
        """Peer ``index``'s public key: from the allow-list, else from a certificate the CA signed."""
        if index in self.allow:
            return self.allow[index]
        if cert is None or self.ca is None:
            raise AdmissionError(f"peer {index} is not on the allow-list"
                                 + ("" if self.ca is None else " and presents no CA certificate"))
        if not isinstance(cert, dict) or set(cert) != {"peer", "key", "sig"}:
            raise AdmissionError(f"peer {index}: malformed certificate")
        if cert["peer"] != index or not isinstance(cert["key"], str) or not isinstance(cert["sig"], str):
            raise AdmissionError(f"peer {index}: the certificate is for peer {cert['peer']!r}")
        try:
            key = _public_from_hex(cert["key"], "certificate key")
            self.ca.verify(bytes.fromhex(cert["sig"]), canonical(b"spirt-cert-v1", self.group, index, cert["key"]))
        except (MalformedInput, ValueError, InvalidSignature) as exc:
            raise AdmissionError(f"peer {index}: certificate not signed by the group CA") from exc
        return key


@dataclass(frozen=True)
class Challenge:
    verifier: int
    prover: int
    nonce: bytes
    issued: float  # verifier's wall clock

    def encode(self) -> bytes:
        return json.dumps({"v": 1, "verifier": self.verifier, "prover": self.prover, "nonce": self.nonce.hex(),
                           "issued": self.issued}).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> Challenge:
        d = _json_object(raw, "challenge")
        try:
            ch = cls(_int(d, "verifier"), _int(d, "prover"), bytes.fromhex(d["nonce"]), float(d["issued"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedInput(f"challenge: missing or invalid field ({exc})") from exc
        if len(ch.nonce) != NONCE_BYTES:
            raise MalformedInput(f"challenge: nonce of {len(ch.nonce)} bytes, expected {NONCE_BYTES}")
        return ch


@dataclass(frozen=True)
class Response:
    """A prover's answer: its signature over (verifier, prover, nonce, timestamp, binding).

    ``binding`` is what the admission grants access with (the SHA-256 of the prover's database
    password at the verifier): signing it stops a man in the middle from swapping in its own."""

    verifier: int
    prover: int
    nonce: bytes
    timestamp: float
    binding: str
    signature: bytes
    cert: dict | None = None

    def message(self, group: str) -> bytes:
        return signed_message(group, self.verifier, self.prover, self.nonce, self.timestamp, self.binding)

    def encode(self) -> bytes:
        d = {"v": 1, "verifier": self.verifier, "prover": self.prover, "nonce": self.nonce.hex(),
             "ts": repr(self.timestamp), "binding": self.binding, "sig": self.signature.hex()}
        if self.cert is not None:
            d["cert"] = self.cert
        return json.dumps(d).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> Response:
        d = _json_object(raw, "admission response")
        if d.get("v") != 1:
            raise MalformedInput(f"admission response: unsupported version {d.get('v')!r}")
        try:
            nonce, sig = bytes.fromhex(d["nonce"]), bytes.fromhex(d["sig"])
            ts = float(d["ts"])
            binding = d["binding"]
            cert = d.get("cert")
            out = cls(_int(d, "verifier"), _int(d, "prover"), nonce, ts, binding, sig, cert)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedInput(f"admission response: missing or invalid field ({exc!r})") from exc
        if len(nonce) != NONCE_BYTES or len(sig) != SIGNATURE_BYTES:
            raise MalformedInput("admission response: nonce or signature of the wrong length")
        if not isinstance(binding, str) or len(binding) != 64 or any(c not in "0123456789abcdef" for c in binding):
            raise MalformedInput("admission response: binding is not a SHA-256 hex digest")
        if ts != ts or ts in (float("inf"), float("-inf")):
            raise MalformedInput("admission response: timestamp is not finite")
        if cert is not None and not isinstance(cert, dict):
            raise MalformedInput("admission response: certificate is not an object")
        return out


def signed_message(group: str, verifier: int, prover: int, nonce: bytes, timestamp: float, binding: str) -> bytes:
    return canonical(b"spirt-admission-v1", group, verifier, prover, nonce, repr(float(timestamp)), binding)


def _json_object(raw, what: str) -> dict:
    if raw is None:
        raise MalformedInput(f"{what}: missing")
    if not isinstance(raw, (bytes, bytearray, str)):
        raise MalformedInput(f"{what}: not a string")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MalformedInput(f"{what}: {len(raw)} bytes, at most {MAX_MESSAGE_BYTES} accepted")
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting exhausts the parser
        raise MalformedInput(f"{what}: not JSON") from exc
    if not isinstance(d, dict):
        raise MalformedInput(f"{what}: not a JSON object")
    return d


def _int(d: dict, name: str) -> int:
    v = d[name]
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**31:
        raise MalformedInput(f"field {name!r} is not a peer index")
    return v


def respond(identity: Identity, challenge: Challenge, group: str, binding: str, now: float | None = None) -> Response:
    if challenge.prover != identity.index:
        raise AdmissionError(f"challenge is for peer {challenge.prover}, we are peer {identity.index}")
    ts = time.time() if now is None else now
    sig = identity.sign(signed_message(group, challenge.verifier, identity.index, challenge.nonce, ts, binding))
    return Response(challenge.verifier, identity.index, challenge.nonce, ts, binding, sig, identity.cert)


class Verifier:
    """Issues challenges for peer ``index`` and checks the responses.

    One nonce per prover is outstanding at a time (and the one before it, for a response already under
    way): asking again while it is fresh gets the same challenge, so requests in a prover's name (anyone
    can send them before admission) neither grow what we keep nor replace the nonce its holder is
    answering. A nonce lives ``nonce_ttl_s``. Only a valid response consumes it: a forged one naming it
    is refused and the nonce stays open for its holder. Used nonces are remembered (replay cache) until
    they could no longer pass the clock-skew check."""

    def __init__(self, trust: TrustStore, index: int, *, max_skew_s: float = 30.0, nonce_ttl_s: float = 60.0):
        self.trust, self.index = trust, index
        self.max_skew_s, self.nonce_ttl_s = max_skew_s, nonce_ttl_s
        self._outstanding: dict[int, list[Challenge]] = {}  # prover -> its open challenges, newest last
        self._used: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def challenge(self, prover: int, now: float | None = None) -> Challenge:
        """Prover's open challenge while it has more than half its life left, else a fresh one."""
        now = time.time() if now is None else now
        with self._lock:
            self._expire(now)
            open_ = self._outstanding.setdefault(prover, [])
            if open_ and now - open_[-1].issued < self.nonce_ttl_s / 2:
                return open_[-1]
            ch = Challenge(self.index, prover, secrets.token_bytes(NONCE_BYTES), now)
            open_.append(ch)
            del open_[:-2]
            return ch

    def _expire(self, now: float) -> None:
        for prover, open_ in list(self._outstanding.items()):
            open_[:] = [ch for ch in open_ if now - ch.issued <= self.nonce_ttl_s]
            if not open_:
                del self._outstanding[prover]
        horizon = self.nonce_ttl_s + 2 * self.max_skew_s
        for n, t in list(self._used.items()):
            if now - t > horizon:
                del self._used[n]

    def verify(self, resp: Response, now: float | None = None) -> Ed25519PublicKey:
        """The prover's key if the response is valid; otherwise :class:`AdmissionError` saying why."""
        now = time.time() if now is None else now
        with self._lock:
            self._expire(now)
            if resp.nonce in self._used:
                raise AdmissionError(f"peer {resp.prover}: replayed response (nonce already used)")
            if not any(ch.nonce == resp.nonce for ch in self._outstanding.get(resp.prover, ())):
                raise AdmissionError(f"peer {resp.prover}: response to a nonce we did not issue to it "
                                     "(or that expired)")
        if resp.verifier != self.index:
            raise AdmissionError(f"peer {resp.prover}: response addressed to peer {resp.verifier}, not us")
        if abs(now - resp.timestamp) > self.max_skew_s:
            raise AdmissionError(f"peer {resp.prover}: timestamp {now - resp.timestamp:+.1f} s off our clock "
                                 f"(at most {self.max_skew_s:g} s accepted)")
        key = self.trust.key_for(resp.prover, resp.cert)
        try:
            key.verify(resp.signature, resp.message(self.trust.group))
        except InvalidSignature:
            raise AdmissionError(f"peer {resp.prover}: bad signature (not made with the key we trust "
                                 "for this peer)") from None
        with self._lock:  # valid: the nonce is spent (a second copy of this response is a replay)
            if resp.nonce in self._used:
                raise AdmissionError(f"peer {resp.prover}: replayed response (nonce already used)")
            self._used[resp.nonce] = now
            open_ = self._outstanding.get(resp.prover, [])
            open_[:] = [ch for ch in open_ if ch.nonce != resp.nonce]
        return key

    def open_challenges(self) -> int:
        """How many challenges are outstanding (bounded by two per admissible prover)."""
        with self._lock:
            return sum(len(v) for v in self._outstanding.values())


def make_group(directory: str | os.PathLike, n: int, group: str, *, ca: bool = False) -> list[Identity]:
    """Provision a group of ``n`` peers in ``directory``: keys, and the allow-list (or, with ``ca``, a CA
    key whose public half is the trust anchor and a certificate per peer). Returns the identities."""
    ids = [Identity.generate(i) for i in range(n)]
    if ca:
        ca_key = Ed25519PrivateKey.generate()
        ids = [Identity(i.index, i.key, issue_certificate(ca_key, i.index, i.public_key, group)) for i in ids]
        trust = TrustStore(group, {}, ca_key.public_key())
    else:
        trust = TrustStore(group, {i.index: i.public_key for i in ids})
    for i in ids:
        i.save(directory)
    trust.save(directory)
    return ids
