"""The key folders of a group: one folder per peer, holding that peer's private keys and no other's, and
the CA private keys in a folder of their own.

Layout of a keys directory ``DIR``::

    DIR/
      ca/                 0700; the CA private keys, never read by a peer
        ca.key            the group CA's Ed25519 key (a group with a CA)
        tls-ca.key        the TLS CA's key and certificate (a group with TLS)
        tls-ca.crt
      launcher/tls/       0700; the launcher's TLS client files (a group with TLS):
                          ca.crt, client.crt, client.key (URI launcher_uri(group))
      peer-<i>/           0700; everything peer i needs
        peer-<i>.key      its Ed25519 private key (0600)
        peer-<i>.pub      its public key
        peer-<i>.cert     its certificate signed by the group CA (a group with a CA)
        allow-list.json   the trust store: every peer's public key (a group without a CA)
        ca.pub            the trust store: the group CA's public key (a group with a CA)
        tls/              0700; ca.crt (the TLS CA certificate), server.crt / server.key (server
                          authentication) and client.crt / client.key (client authentication), both
                          with URI peer_uri(group, i) (a group with TLS)

Each party is handed its own folder only. A keys directory without ``peer-<i>`` folders (every peer's
files side by side, as :func:`spirt.security.identity.make_group` writes them) is read as the folder
of every peer.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .identity import AdmissionError, Identity, TrustStore, issue_certificate
from .tls import (
    TLS_CA_CERT,
    TLS_CA_KEY,
    PeerTls,
    TlsFiles,
    issue_peer_tls,
    launcher_uri,
    load_tls_ca,
    new_tls_ca,
    peer_uri,
    private_dir,
    save_tls_ca,
    write_private_key,
)

CA_DIR = "ca"
CA_KEY = "ca.key"
TLS_DIR = "tls"
LAUNCHER_DIR = "launcher"

_PEER_DIR = re.compile(r"peer-(0|[1-9][0-9]*)")
#: the files of a peer folder the layout defines; re-provisioning removes them before writing anew, so
#: that nothing of the group before (another peer's key, a trust anchor of the other kind) stays behind
_PEER_FILES = ("peer-*.key", "peer-*.pub", "peer-*.cert", "allow-list.json", "ca.pub")
_TLS_FILES = ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")
_CA_FILES = (CA_KEY, TLS_CA_KEY, TLS_CA_CERT)


def provision_group(directory: str | os.PathLike, n: int, group: str, *, ca: bool = False,
                    tls: bool = False) -> Path:
    """The key folders of a new group of ``n`` peers in ``directory`` (layout in the module docstring):
    peers trust an allow-list of every peer's key or, with ``ca``, the group CA's key; with ``tls``,
    every peer also gets the certificates of its database server and of itself as a client, and the
    launcher its client certificate. A group already in ``directory`` is replaced."""
    if n < 1:
        raise ValueError(f"a group has at least one peer, not {n}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _clear_ca(d / CA_DIR)
    ids = [Identity.generate(i) for i in range(n)]
    if ca:
        ca_key = Ed25519PrivateKey.generate()
        write_private_key(private_dir(d / CA_DIR) / CA_KEY, ca_key)
        ids = [_certified(ca_key, identity, group) for identity in ids]
        trust = TrustStore(group, {}, ca_key.public_key())
    else:
        trust = TrustStore(group, {i.index: i.public_key for i in ids})
    tls_ca = _new_tls_ca(d / CA_DIR) if tls else None
    for identity in ids:
        _write_peer(d, identity, trust, group, tls_ca)
    _write_launcher(d, group, tls_ca)
    for folder in peer_folders(d)[n:]:
        _remove_peer(folder)
    return d


def add_peer(directory: str | os.PathLike, index: int, group: str) -> Path:
    """The folder of a newcomer, peer ``index``, in the group of ``directory``: certified by the group CA
    (``ca/ca.key``) in a group with one, else added to the allow-list of every peer folder. With a TLS CA
    in ``ca/``, the newcomer gets its TLS files too."""
    if index < 0:
        raise ValueError(f"a peer index is not negative: {index}")
    d = Path(directory)
    folder = d / f"peer-{index}"
    if folder.exists():
        raise FileExistsError(f"{folder} exists: peer {index} already has keys (provision the group anew "
                              "to replace them)")
    existing = peer_folders(d)
    ca_key = _load_ca_key(d / CA_DIR)
    if ca_key is None and not existing:
        raise ValueError(f"{str(d)!r} holds no group with peer folders: provision one first")
    identity = Identity.generate(index)
    if ca_key is not None:
        trust = TrustStore(group, {}, ca_key.public_key())
        _check_group(existing, trust)
        identity = _certified(ca_key, identity, group)
    else:
        trust = TrustStore(group, {**_merged_allow_lists(existing, group), index: identity.public_key})
    # the newcomer's folder first: should writing it fail, no peer trusts a key that nobody holds
    out = _write_peer(d, identity, trust, group, load_tls_ca(d / CA_DIR))
    if ca_key is None:
        for other in existing:
            _allow(other, identity, group)
    return out


def is_ca_group(directory: str | os.PathLike) -> bool:
    """Whether the group of ``directory`` admits peers by certificates of its CA (whose key it keeps)."""
    return (Path(directory) / CA_DIR / CA_KEY).exists()


def peer_folders(directory: str | os.PathLike) -> list[Path]:
    """The ``peer-<i>`` folders of ``directory``, by index."""
    found = [p for p in Path(directory).glob("peer-*") if p.is_dir() and _PEER_DIR.fullmatch(p.name)]
    return sorted(found, key=_index)


def _index(folder: Path) -> int:
    return int(_PEER_DIR.fullmatch(folder.name).group(1))


def peer_folder(keys_dir: str | os.PathLike, index: int) -> Path:
    """Where peer ``index`` finds its keys: ``keys_dir/peer-<index>``, or ``keys_dir`` itself when that
    folder does not exist (every peer's files side by side)."""
    folder = Path(keys_dir) / f"peer-{index}"
    return folder if folder.is_dir() else Path(keys_dir)


def peer_tls(folder: str | os.PathLike) -> PeerTls | None:
    """The TLS files in a peer's ``folder`` (its ``tls/``); ``None`` when it has none."""
    d = Path(folder) / TLS_DIR
    client = _tls_pair(d, "client")
    if client is None:
        return None
    server = _tls_pair(d, "server")
    return PeerTls(None if server is None else replace(server, client=client), client)


def launcher_tls(keys_dir: str | os.PathLike) -> TlsFiles | None:
    """The launcher's TLS client files in ``keys_dir``; ``None`` when the group has none."""
    return _tls_pair(Path(keys_dir) / LAUNCHER_DIR / TLS_DIR, "client")


def _tls_pair(d: Path, stem: str) -> TlsFiles | None:
    cert, key = d / f"{stem}.crt", d / f"{stem}.key"
    return TlsFiles(str(cert), str(key), str(d / "ca.crt")) if cert.exists() and key.exists() else None


def _certified(ca_key: Ed25519PrivateKey, identity: Identity, group: str) -> Identity:
    return Identity(identity.index, identity.key,
                    issue_certificate(ca_key, identity.index, identity.public_key, group))


def _new_tls_ca(ca_dir: Path):
    key, cert = new_tls_ca()
    save_tls_ca(ca_dir, key, cert)
    return key, cert


def _write_peer(d: Path, identity: Identity, trust: TrustStore, group: str, tls_ca) -> Path:
    """Peer ``identity``'s folder in ``d``, in place of what the layout had there."""
    folder = private_dir(d / f"peer-{identity.index}")
    _remove_files(folder, _PEER_FILES)
    _remove_files(folder / TLS_DIR, _TLS_FILES)
    identity.save(folder)
    _save_trust(trust, folder)
    if tls_ca is not None:
        issue_peer_tls(*tls_ca, folder / TLS_DIR, uri=peer_uri(group, identity.index))
    else:
        _remove_if_empty(folder / TLS_DIR)
    return folder


def _write_launcher(d: Path, group: str, tls_ca) -> None:
    tls_dir = d / LAUNCHER_DIR / TLS_DIR
    _remove_files(tls_dir, _TLS_FILES)
    if tls_ca is not None:
        private_dir(d / LAUNCHER_DIR)
        issue_peer_tls(*tls_ca, tls_dir, uri=launcher_uri(group), server=False)
    else:
        _remove_if_empty(tls_dir, d / LAUNCHER_DIR)


def _save_trust(trust: TrustStore, folder: Path) -> None:
    trust.save(folder)
    if trust.ca is not None and not trust.allow:
        # TrustStore.save writes an allow-list in any case: an empty one next to ca.pub would only
        # suggest to a reader (or to add_peer) that the group admits by allow-list
        (folder / "allow-list.json").unlink()


def _clear_ca(ca_dir: Path) -> None:
    _remove_files(ca_dir, _CA_FILES)
    _remove_if_empty(ca_dir)


def _remove_peer(folder: Path) -> None:
    """A peer folder beyond the new group's size: its keys go; other files (and so the folder) stay."""
    _remove_files(folder, _PEER_FILES)
    _remove_files(folder / TLS_DIR, _TLS_FILES)
    _remove_if_empty(folder / TLS_DIR, folder)


def _remove_files(d: Path, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        for path in d.glob(pattern):
            path.unlink()


def _remove_if_empty(*dirs: Path) -> None:
    for d in dirs:
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def _load_ca_key(ca_dir: Path) -> Ed25519PrivateKey | None:
    path = ca_dir / CA_KEY
    if not path.exists():
        return None
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def _check_group(existing: list[Path], trust: TrustStore) -> None:
    """Refuse to certify a newcomer for another group than the one the CA certified the peers for: the
    peers would not accept its certificate. One peer's certificate tells."""
    for folder in existing:
        index = _index(folder)
        cert_path = folder / f"peer-{index}.cert"
        if not cert_path.exists():
            continue
        try:
            trust.key_for(index, json.loads(cert_path.read_text()))
        except AdmissionError as exc:
            raise ValueError(f"the peers in {str(folder.parent)!r} are not certified for group "
                             f"{trust.group!r}: {exc}") from exc
        return


def _merged_allow_lists(existing: list[Path], group: str) -> dict:
    """Every key on the existing peers' allow-lists. Peers that trust a CA cannot take a newcomer
    without its key."""
    allow = {}
    for folder in existing:
        trust = TrustStore.load(folder, group)
        if trust.ca is not None:
            raise ValueError(f"{folder} trusts a group CA whose key is not in {folder.parent / CA_DIR}: "
                             "a newcomer needs a certificate of it")
        allow.update(trust.allow)
    return allow


def _allow(folder: Path, identity: Identity, group: str) -> None:
    trust = TrustStore.load(folder, group)
    trust.allow[identity.index] = identity.public_key
    trust.save(folder)


# -- what a configured party uses -------------------------------------------------------------------
def tls_for(sec, index: int | None) -> tuple[PeerTls | None, bool]:
    """The TLS files of peer ``index`` (``None``: the launcher) under the ``[security]`` section ``sec``,
    and whether they name their holder (so clients pin the peer they mean). Its own folder's ``tls/``
    first; else the configured ``tls_*_file`` set, one for every party and naming nobody."""
    if sec.keys_dir:
        if index is None:
            own = launcher_tls(sec.keys_dir)
            if own is not None:
                return PeerTls(None, own), True
        else:
            folder = peer_folder(sec.keys_dir, index)
            found = peer_tls(folder) if folder != Path(sec.keys_dir) else None
            if found is not None:
                return found, True
    if sec.tls_cert_file:
        files = TlsFiles(sec.tls_cert_file, sec.tls_key_file, sec.tls_ca_file)
        return PeerTls(files, files), False
    return None, False


def tls_required(sec, files: PeerTls | None) -> bool:
    """``security.require_tls``, which defaults to on as soon as the party has TLS files."""
    return sec.require_tls if sec.require_tls is not None else files is not None
