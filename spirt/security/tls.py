"""TLS material: a group CA and the certificates of servers and clients it signs.

Every database server presents a certificate for its address; every client (orchestrators, remote
peers, functions) presents one too, and both sides only accept certificates of the group CA.

A peer's certificates name it: both carry the URI :func:`peer_uri` as a subject alternative name (the
launcher's client certificate carries :func:`launcher_uri`). The server certificate is for server
authentication only and the client certificate for client authentication only, so a peer cannot pass
its client certificate off as a database server's, nor the other way round. A client that pins a URI
(:class:`PinnedSSLConnection`) accepts only the server certificate of that one peer, not just any
certificate of the group CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass, replace
from pathlib import Path

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: file names of the TLS CA in the folder that keeps its private key
TLS_CA_KEY = "tls-ca.key"
TLS_CA_CERT = "tls-ca.crt"


def peer_uri(group: str, index: int) -> str:
    """The name peer ``index`` of ``group`` carries in its TLS certificates."""
    return f"spirt://{group}/peer/{index}"


def launcher_uri(group: str) -> str:
    """The name the launcher of ``group`` carries in its TLS client certificate."""
    return f"spirt://{group}/launcher"


class PinnedSSLConnection(redis.connection.SSLConnection):
    """A TLS connection that also requires the server's certificate to carry the URI ``ssl_pin``.

    The CA check alone accepts every certificate the group CA signed, so any peer could stand in for
    another peer's database; the pin narrows it to the one peer meant. A certificate without the URI
    closes the connection before a command (or a password) is sent."""

    def __init__(self, *, ssl_pin: str, **kwargs):
        super().__init__(**kwargs)
        self.ssl_pin = ssl_pin

    def _wrap_socket_with_ssl(self, sock):
        sslsock = super()._wrap_socket_with_ssl(sock)
        presented = certificate_uris(sslsock.getpeercert() or {})
        if self.ssl_pin not in presented:
            sslsock.close()
            raise redis.ConnectionError(f"the database at {self._host_error()} is not {self.ssl_pin}: its TLS "
                                        f"certificate names {', '.join(presented) or 'no URI'}")
        return sslsock


def certificate_uris(peercert: dict) -> list[str]:
    """The URI subject alternative names of a certificate as :meth:`ssl.SSLSocket.getpeercert` gives it."""
    return [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]


@dataclass(frozen=True)
class TlsFiles:
    """A certificate, its private key and the CA certificate it is checked against.

    ``client``: for a server certificate good for server authentication only, the files the same party
    presents as a client, so that the clients made for its own database (the readiness probe of
    :func:`spirt.servers.start_server`, the peer itself) present a certificate the server accepts."""

    cert: str
    key: str
    ca: str
    client: TlsFiles | None = None

    def client_kwargs(self, pin: str | None = None) -> dict:
        """redis-py arguments of a client presenting this certificate (or ``client``'s) and trusting only
        the CA; with ``pin``, the server's certificate must also carry that URI
        (:class:`PinnedSSLConnection`)."""
        if self.client is not None:
            return self.client.client_kwargs(pin)
        kwargs = {"ssl_certfile": self.cert, "ssl_keyfile": self.key, "ssl_ca_certs": self.ca,
                  "ssl_cert_reqs": "required"}
        if pin is not None:
            # Clients of TLS servers are made from rediss:// URLs: ConnectionPool.from_url keeps a
            # connection_class given to it (it picks SSLConnection only when none is) and passes the other
            # keywords, ssl_pin among them, to that class. redis.Redis(host=...) takes neither keyword.
            kwargs.update(connection_class=PinnedSSLConnection, ssl_pin=pin)
        return kwargs

    def server_args(self) -> list[str]:
        return ["--tls-cert-file", self.cert, "--tls-key-file", self.key, "--tls-ca-cert-file", self.ca,
                "--tls-auth-clients", "yes"]


@dataclass(frozen=True)
class PeerTls:
    """A peer's TLS files: those of its database server (``None`` for a party without a database, such
    as the launcher) and those it presents as a client."""

    server: TlsFiles | None
    client: TlsFiles


def private_dir(path: str | os.PathLike) -> Path:
    """``path`` as a directory only its owner can enter (also when it existed), for private keys."""
    d = Path(path)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)  # mkdir leaves an existing directory's mode as it was
    return d


def write_private_key(path: str | os.PathLike, key) -> None:
    """``key`` as unencrypted PKCS#8 PEM, readable by its owner only."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        # open's mode only applies to a new file: an existing one keeps its own unless changed here,
        # before the key is in it
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    # a few minutes back, so that a host whose clock is slightly behind accepts a certificate just issued
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=days))


def new_tls_ca(days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh TLS CA: its private key and self-signed certificate (it signs end certificates only)."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False)
    builder = (x509.CertificateBuilder().subject_name(_name("spirt group CA")).issuer_name(_name("spirt group CA"))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(usage, critical=True))
    return key, _validity(builder, days).sign(key, hashes.SHA256())


def save_tls_ca(directory: str | os.PathLike, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    """Keep the TLS CA in ``directory`` (``tls-ca.key``, ``tls-ca.crt``): a folder apart from any
    peer's, since whoever holds the key can issue certificates in any peer's name."""
    d = private_dir(directory)
    write_private_key(d / TLS_CA_KEY, key)
    _write_cert(d / TLS_CA_CERT, cert)


def load_tls_ca(directory: str | os.PathLike) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The TLS CA kept in ``directory`` by :func:`save_tls_ca`; ``None`` when it keeps none."""
    d = Path(directory)
    if not (d / TLS_CA_KEY).exists():
        return None
    key = serialization.load_pem_private_key((d / TLS_CA_KEY).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{d / TLS_CA_KEY} is not an elliptic-curve private key")
    return key, x509.load_pem_x509_certificate((d / TLS_CA_CERT).read_bytes())


def _loopback() -> list[x509.GeneralName]:
    return [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]


def _issue(ca_key, ca_cert: x509.Certificate, directory: Path, stem: str, cn: str, names: list[x509.GeneralName],
           usages: list[x509.ObjectIdentifier], days: int) -> TlsFiles:
    """A new key and end certificate signed by the CA, as ``<stem>.crt`` / ``<stem>.key`` next to the
    ``ca.crt`` of ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.SubjectAlternativeName(names), critical=False)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    cert = _validity(builder, days).sign(ca_key, hashes.SHA256())
    _write_cert(directory / f"{stem}.crt", cert)
    write_private_key(directory / f"{stem}.key", key)
    return TlsFiles(str(directory / f"{stem}.crt"), str(directory / f"{stem}.key"), str(directory / "ca.crt"))


def issue_peer_tls(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, directory: str | os.PathLike,
                   *, uri: str, server: bool = True, days: int = 365) -> PeerTls:
    """The TLS files of the party named ``uri`` in ``directory``: ``ca.crt`` (the CA certificate, no
    key), ``client.crt`` / ``client.key`` (client authentication only, URI ``uri``) and, with
    ``server``, ``server.crt`` / ``server.key`` (server authentication only, for localhost / 127.0.0.1
    and URI ``uri``). The clients of the returned server files present the client certificate."""
    d = private_dir(directory)
    _write_cert(d / "ca.crt", ca_cert)
    uri_name = x509.UniformResourceIdentifier(uri)
    client = _issue(ca_key, ca_cert, d, "client", uri, [uri_name], [ExtendedKeyUsageOID.CLIENT_AUTH], days)
    if not server:
        return PeerTls(None, client)
    own = _issue(ca_key, ca_cert, d, "server", uri, [*_loopback(), uri_name], [ExtendedKeyUsageOID.SERVER_AUTH], days)
    return PeerTls(replace(own, client=client), client)


def make_tls_material(directory: str | os.PathLike, names: list[str] = ("server", "client"),
                      days: int = 30) -> dict[str, TlsFiles]:
    """A fresh CA in ``directory`` and one certificate per name, valid for localhost / 127.0.0.1
    (server and client use at once).

    Throwaway material for tests and quick setups: the CA's private key is not written anywhere, so no
    further certificate can be issued by it (:func:`new_tls_ca` and :func:`issue_peer_tls` make a CA
    that lasts)."""
    d = private_dir(directory)
    ca_key, ca_cert = new_tls_ca(days)
    _write_cert(d / "ca.crt", ca_cert)
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    return {name: _issue(ca_key, ca_cert, d, name, name, _loopback(), both, days) for name in names}
