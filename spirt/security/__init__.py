"""Security of a peer group: identities and admission, database access control, signed updates.

- :mod:`.identity`: Ed25519 identities, the group's trust (allow-list or CA), challenge-response;
- :mod:`.admission`: the challenge-response carried over the verifier's database (its bounded
  pre-admission area);
- :mod:`.acl`: the users of one peer's database, each limited to the keys it needs;
- :mod:`.signing`: signed envelopes binding a published average to (sender, round, digest);
- :mod:`.tls`: TLS certificates naming their peer (server use, client use) and the pinned client connection;
- :mod:`.provision`: the key folders of a group (``spirt keys``): one per peer, the CA keys apart;
- :mod:`.context`: :class:`~.context.PeerSecurity`, what a secured peer does, and the limits on what
  others can write into its database.
"""

from .identity import AdmissionError, Identity, MalformedInput, TrustStore

__all__ = ["AdmissionError", "Identity", "MalformedInput", "TrustStore"]
