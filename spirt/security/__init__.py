"""Security of a peer group: identities and admission, database access control, signed updates.

- :mod:`.identity`: Ed25519 identities, the group's trust (allow-list or CA), challenge-response;
- :mod:`.admission`: the challenge-response carried over the verifier's database;
- :mod:`.acl`: the users of one peer's database, each limited to the keys it needs;
- :mod:`.signing`: signed envelopes binding a published average to (sender, round, digest);
- :mod:`.tls`: TLS material for servers and clients.
"""

from .identity import AdmissionError, Identity, MalformedInput, TrustStore

__all__ = ["AdmissionError", "Identity", "MalformedInput", "TrustStore"]
