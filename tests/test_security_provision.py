"""Key folders of a group: file modes, who holds which private key, certificates naming their peer, adding
a peer, and TLS pinned to one peer against Debian's redis-server."""

from __future__ import annotations

import json
import shutil
import stat
import time
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID

from spirt import cli
from spirt.security.identity import AdmissionError, Identity, TrustStore, make_group
from spirt.security.provision import (
    add_peer,
    is_ca_group,
    launcher_tls,
    peer_folder,
    peer_folders,
    peer_tls,
    provision_group,
)
from spirt.security.tls import (
    PinnedSSLConnection,
    certificate_uris,
    launcher_uri,
    make_tls_material,
    peer_uri,
    private_dir,
    write_private_key,
)
from spirt.servers import make_client, start_server

HAVE_REDIS = bool(shutil.which("redis-server") or Path("/usr/bin/redis-server").exists())
needs_redis = pytest.mark.skipif(not HAVE_REDIS, reason="redis-server not installed")
GROUP = "g"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _private_keys(root: Path) -> dict[Path, bytes]:
    """Every PEM private key under ``root``, by path: the raw bytes of its public half."""
    out = {}
    for path in _files(root):
        if b"PRIVATE KEY" in path.read_bytes():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            out[path] = _public_bytes(key.public_key())
    return out


def _public_bytes(public) -> bytes:
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _cert(path: str | Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def _usages(cert: x509.Certificate) -> list:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _sans(cert: x509.Certificate, kind) -> list:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(kind)


@pytest.fixture(scope="module")
def ca_group(tmp_path_factory) -> Path:
    return provision_group(tmp_path_factory.mktemp("keys") / "group", 3, GROUP, ca=True, tls=True)


# -- modes -----------------------------------------------------------------------------------------------

def test_private_keys_are_0600_and_their_folders_0700(ca_group):
    keys = [p for p in _files(ca_group) if p.suffix == ".key"]
    assert len(keys) == 2 + 1 + 3 * 3  # CA keys, the launcher's, three per peer
    assert {p: oct(_mode(p)) for p in keys} == {p: oct(0o600) for p in keys}
    folders = [ca_group / "ca", ca_group / "launcher", ca_group / "launcher" / "tls",
               *[ca_group / f"peer-{i}" / sub for i in range(3) for sub in ("", "tls")]]
    assert {d: oct(_mode(d)) for d in folders} == {d: oct(0o700) for d in folders}


def test_reprovisioning_restores_the_modes(tmp_path):
    d = provision_group(tmp_path / "keys", 2, GROUP, tls=True)
    loose = [d / "peer-0" / "peer-0.key", d / "peer-0" / "tls" / "server.key", d / "ca" / "tls-ca.key"]
    for path in loose:
        path.chmod(0o644)
    (d / "peer-0").chmod(0o755)
    provision_group(d, 2, GROUP, tls=True)
    assert [oct(_mode(p)) for p in loose] == [oct(0o600)] * 3
    assert oct(_mode(d / "peer-0")) == oct(0o700)


def test_a_key_written_over_a_readable_file_is_0600(tmp_path):
    path = tmp_path / "k.key"
    path.write_text("old")
    path.chmod(0o644)
    write_private_key(path, ec.generate_private_key(ec.SECP256R1()))
    assert oct(_mode(path)) == oct(0o600)
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o755)
    assert oct(_mode(private_dir(folder))) == oct(0o700)


# -- who holds which private key ---------------------------------------------------------------------------

def test_ca_private_keys_stay_in_the_ca_folder(ca_group):
    ca_keys = _private_keys(ca_group / "ca")
    assert sorted(p.name for p in ca_keys) == ["ca.key", "tls-ca.key"]
    outside = {p: pub for p, pub in _private_keys(ca_group).items() if ca_group / "ca" not in p.parents}
    assert outside, "no private key found outside ca/: the scan is broken"
    assert not set(outside.values()) & set(ca_keys.values())
    assert not [p for p in outside if p.name in ("ca.key", "tls-ca.key")]


def test_a_peer_folder_holds_only_its_own_private_keys(ca_group):
    owner = {}  # public key -> peer, from what each peer publishes (its .pub, its certificates)
    for i in range(3):
        folder = ca_group / f"peer-{i}"
        published = bytes.fromhex((folder / f"peer-{i}.pub").read_text().strip())
        owner[_public_bytes(Ed25519PublicKey.from_public_bytes(published))] = i
        for name in ("server.crt", "client.crt"):
            owner[_public_bytes(_cert(folder / "tls" / name).public_key())] = i
    for i in range(3):
        found = _private_keys(ca_group / f"peer-{i}")
        assert sorted(p.relative_to(ca_group / f"peer-{i}").as_posix() for p in found) == [
            f"peer-{i}.key", "tls/client.key", "tls/server.key"]
        assert [owner.get(pub) for pub in found.values()] == [i, i, i]


def test_make_tls_material_writes_no_ca_key(tmp_path):
    make_tls_material(tmp_path, ["server", "client"])
    ca_public = _public_bytes(_cert(tmp_path / "ca.crt").public_key())
    keys = _private_keys(tmp_path)
    assert sorted(p.name for p in keys) == ["client.key", "server.key"]
    assert ca_public not in keys.values()


# -- certificates ------------------------------------------------------------------------------------------

def test_server_and_client_certificates_each_serve_one_purpose(ca_group):
    ca_cert = _cert(ca_group / "ca" / "tls-ca.crt")
    files = peer_tls(peer_folder(ca_group, 1))
    server, client = _cert(files.server.cert), _cert(files.client.cert)
    assert _usages(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert _sans(server, x509.UniformResourceIdentifier) == [peer_uri(GROUP, 1)]
    assert _sans(server, x509.DNSName) == ["localhost"]
    assert [str(a) for a in _sans(server, x509.IPAddress)] == ["127.0.0.1"]
    assert _usages(client) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _sans(client, x509.UniformResourceIdentifier) == [peer_uri(GROUP, 1)]
    assert not _sans(client, x509.DNSName) and not _sans(client, x509.IPAddress)
    assert Path(files.client.ca).read_bytes() == (ca_group / "ca" / "tls-ca.crt").read_bytes()
    for cert in (server, client):
        cert.verify_directly_issued_by(ca_cert)


def test_the_launcher_has_a_client_certificate_only(ca_group):
    files = launcher_tls(ca_group)
    cert = _cert(files.cert)
    assert _usages(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _sans(cert, x509.UniformResourceIdentifier) == [launcher_uri(GROUP)]
    assert sorted(p.name for p in Path(files.cert).parent.iterdir()) == ["ca.crt", "client.crt", "client.key"]


def test_the_uris_of_a_peer_certificate():
    assert certificate_uris({"subjectAltName": (("DNS", "localhost"), ("URI", "spirt://g/peer/0"))}) == [
        "spirt://g/peer/0"]
    assert certificate_uris({}) == []


# -- folders and adding peers -------------------------------------------------------------------------------

def test_peer_folder_reads_the_flat_layout_too(tmp_path, ca_group):
    make_group(tmp_path, 2, GROUP)
    assert peer_folder(tmp_path, 1) == tmp_path
    assert Identity.load(peer_folder(tmp_path, 1), 1).index == 1
    assert peer_tls(peer_folder(tmp_path, 1)) is None and launcher_tls(tmp_path) is None
    assert peer_folder(ca_group, 1) == ca_group / "peer-1"
    assert peer_tls(ca_group / "peer-1").server.client_kwargs()["ssl_certfile"].endswith("client.crt")


def _snapshot(folders) -> dict[Path, bytes]:
    return {p: p.read_bytes() for f in folders for p in _files(f)}


def test_add_peer_to_a_ca_group(tmp_path):
    d = provision_group(tmp_path / "keys", 2, GROUP, ca=True, tls=True)
    before = _snapshot(peer_folders(d))
    folder = add_peer(d, 2, GROUP)
    newcomer = Identity.load(folder, 2)
    assert TrustStore.load(folder, GROUP).key_for(0, json.loads((d / "peer-0" / "peer-0.cert").read_text()))
    for i in range(2):
        key = TrustStore.load(d / f"peer-{i}", GROUP).key_for(2, newcomer.cert)
        assert key.public_bytes_raw() == newcomer.public_key.public_bytes_raw()
    assert _snapshot([d / "peer-0", d / "peer-1"]) == before  # the others' folders are untouched
    server = _cert(peer_tls(folder).server.cert)
    assert _sans(server, x509.UniformResourceIdentifier) == [peer_uri(GROUP, 2)]
    server.verify_directly_issued_by(_cert(d / "ca" / "tls-ca.crt"))
    assert sorted(p.name for p in _private_keys(folder)) == ["client.key", "peer-2.key", "server.key"]
    with pytest.raises(FileExistsError):
        add_peer(d, 2, GROUP)
    with pytest.raises(ValueError, match="not certified for group 'other'"):
        add_peer(d, 3, "other")


def test_add_peer_to_an_allow_list_group(tmp_path):
    d = provision_group(tmp_path / "keys", 2, GROUP, tls=True)
    assert not is_ca_group(d)
    with pytest.raises(AdmissionError):
        TrustStore.load(d / "peer-0", GROUP).key_for(2)
    folder = add_peer(d, 2, GROUP)
    newcomer = Identity.load(folder, 2)
    assert sorted(TrustStore.load(folder, GROUP).allow) == [0, 1, 2]
    for i in range(2):
        key = TrustStore.load(d / f"peer-{i}", GROUP).key_for(2, newcomer.cert)
        assert key.public_bytes_raw() == newcomer.public_key.public_bytes_raw()
    assert _sans(_cert(peer_tls(folder).client.cert), x509.UniformResourceIdentifier) == [peer_uri(GROUP, 2)]


def test_reprovisioning_replaces_the_group_before(tmp_path):
    d = provision_group(tmp_path / "keys", 3, GROUP, ca=True, tls=True)
    old_key = (d / "peer-0" / "peer-0.key").read_bytes()
    provision_group(d, 2, GROUP)
    assert not (d / "ca").exists() and not (d / "launcher").exists() and not (d / "peer-2").exists()
    assert sorted(p.name for p in _files(d / "peer-0")) == ["allow-list.json", "peer-0.key", "peer-0.pub"]
    assert (d / "peer-0" / "peer-0.key").read_bytes() != old_key
    assert sorted(json.loads((d / "peer-1" / "allow-list.json").read_text())) == ["0", "1"]


def test_the_keys_command_prints_paths_not_keys(tmp_path, capsys):
    args = cli.build_parser().parse_args(["keys", str(tmp_path / "k"), "--peers", "2", "--tls"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "0600  " + str(tmp_path / "k" / "peer-1" / "tls" / "server.key") in out
    assert "PRIVATE KEY" not in out
    args = cli.build_parser().parse_args(["keys", str(tmp_path / "k"), "--add", "2"])
    assert args.func(args) == 0
    assert str(tmp_path / "k" / "peer-0" / "allow-list.json") in capsys.readouterr().out


# -- TLS against a real server -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_group(tmp_path_factory) -> Path:
    return provision_group(tmp_path_factory.mktemp("tls") / "group", 2, GROUP, tls=True)


@pytest.fixture(scope="module")
def peer0_server(tls_group):
    """redis-server with peer 0's server certificate."""
    srv = start_server("redis", tls=peer_tls(tls_group / "peer-0").server, require_tls=True)
    try:
        yield srv
    finally:
        srv.stop()


def _client(server, **kwargs) -> redis.Redis:
    return make_client(url=server.url, socket_timeout=5, connect_timeout=5, **kwargs)


@needs_redis
def test_a_client_pinned_to_the_peer_of_the_database_connects(tls_group, peer0_server):
    c = _client(peer0_server, **peer_tls(tls_group / "peer-1").client.client_kwargs(pin=peer_uri(GROUP, 0)))
    try:
        assert c.set("k", b"v") and c.get("k") == b"v"
        assert c.connection_pool.connection_class is PinnedSSLConnection
    finally:
        c.close()


@needs_redis
def test_a_client_pinned_to_another_peer_is_refused(tls_group, peer0_server):
    password = "pw-that-must-not-show-0123456789"
    c = _client(peer0_server, password=password,
                **peer_tls(tls_group / "peer-1").client.client_kwargs(pin=peer_uri(GROUP, 1)))
    try:
        with pytest.raises(redis.ConnectionError) as err:
            c.ping()
    finally:
        c.close()
    assert peer_uri(GROUP, 1) in str(err.value) and peer_uri(GROUP, 0) in str(err.value)
    assert password not in str(err.value)


@needs_redis
def test_the_server_refuses_a_server_certificate_presented_by_a_client(tls_group, peer0_server):
    def refusals() -> int:
        return peer0_server.logfile.read_text().count("certificate verify failed")

    server_only = peer_tls(tls_group / "peer-1").server
    before = refusals()
    c = _client(peer0_server, ssl_certfile=server_only.cert, ssl_keyfile=server_only.key,
                ssl_ca_certs=server_only.ca, ssl_cert_reqs="required")
    try:
        with pytest.raises(redis.ConnectionError):
            c.ping()
    finally:
        c.close()
    # the server sends its alert before it logs the refusal: the line may come a moment after the error
    deadline = time.monotonic() + 5
    while refusals() == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert refusals() == before + 1


@needs_redis
def test_a_client_refuses_a_server_presenting_a_client_certificate(tls_group):
    own = peer_tls(tls_group / "peer-0")
    srv = start_server("redis", tls=own.server, require_tls=True)
    admin = srv.client()
    try:
        client_kwargs = peer_tls(tls_group / "peer-1").client.client_kwargs()
        ok = _client(srv, **client_kwargs)
        assert ok.ping()  # with its server certificate, the server is accepted
        ok.close()
        # start_server's readiness probe would refuse the client certificate too: swap it in afterwards
        admin.execute_command("CONFIG", "SET", "tls-cert-file", own.client.cert, "tls-key-file", own.client.key)
        refused = _client(srv, **client_kwargs)
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            refused.ping()
        refused.close()
    finally:
        admin.close()
        srv.stop()
