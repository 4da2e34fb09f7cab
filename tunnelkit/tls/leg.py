"""The client leg of a TLS listener: the tunnel starts once the handshake is done.

Until then the mode is not told about the client, so a silent or garbage
client never opens a backend connection; a handshake that fails or does not
finish within the timeout ends the tunnel with one ``tunnel_closed`` record
saying so, and counts in :attr:`ServerTLS.handshake_failures`.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelkit.relay.tunnel import CloseKind, Leg, Side, Tunnel
from tunnelkit.tls.server import ServerTLS, openssl_reason


def connection_details(connection: Any) -> dict[str, object]:
    """What the access log says of an established TLS connection (docs/tls.md)."""
    details: dict[str, object] = {
        "tls_version": connection.get_protocol_version_name(),
        "tls_cipher": connection.get_cipher_name(),
    }
    name = connection.get_servername()
    if name:
        details["sni"] = name.decode("ascii", "replace")
    alpn = connection.get_alpn_proto_negotiated()
    if alpn:
        details["alpn"] = alpn.decode("ascii", "replace")
    peer = connection.get_peer_certificate()
    if peer is not None:
        details.update(certificate_details(peer.to_cryptography()))
    return details


def certificate_details(cert: x509.Certificate) -> dict[str, object]:
    """A client certificate's subject, subjectAltName entries and SHA-256 fingerprint."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [str(getattr(entry, "value", entry)) for entry in san.value]
    except x509.ExtensionNotFound:
        names = []
    return {
        "client_subject": cert.subject.rfc4514_string(),
        "client_san": ",".join(names),
        "client_fingerprint": hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
    }


@implementer(IHandshakeListener)
class HandshakeLeg(Leg):
    """A client leg over :class:`~tunnelkit.tls.transport.RelayTLSProtocol`."""

    def __init__(self, tunnel: Tunnel, tls: ServerTLS) -> None:
        super().__init__(tunnel, Side.CLIENT)
        self.tls = tls
        self.handshaken = False

    def connectionMade(self) -> None:
        # Not Leg.connectionMade: the mode hears of the client after the handshake.
        timeout = self.tls.settings.handshake_timeout
        self.tunnel.arm("handshake", timeout, self._timed_out)

    def handshakeCompleted(self) -> None:
        self.handshaken = True
        self.tunnel.disarm("handshake")
        self.tunnel.details.update(connection_details(self.transport.getHandle()))
        self.tunnel.leg_connected(self)

    def _timed_out(self) -> None:
        timeout = self.tls.settings.handshake_timeout
        self.tunnel.note(Side.PROXY, CloseKind.TIMEOUT, f"TLS handshake timeout ({timeout:g} s)")
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        if not self.handshaken:
            self.handshake_failed = True
            refused, details = failed_handshake(self.tls, self.transport.getHandle())
            self.tunnel.details.update(details)
            why = refused or f"TLS handshake failed: {_why(reason)}"
            self.tunnel.note(Side.CLIENT, CloseKind.ERROR, why)
        elif reason.check(SSL.Error):
            # Worded as the native engine words it, not as a reset with a raw error list.
            self.tunnel.note(Side.CLIENT, CloseKind.ERROR, f"client TLS error: {_why(reason)}")
        super().connectionLost(reason)


def failed_handshake(tls: ServerTLS, connection: Any) -> tuple[str | None, dict[str, object]]:
    """Count a handshake that did not complete; say if strict SNI refused it, and its SNI name.

    Shared by Twisted's path and the native engine's records, so both
    count and word failures alike.
    """
    tls.handshake_failures += 1
    sent = connection.get_servername() if connection is not None else None
    name = sent.decode("ascii", "replace") if sent else None
    details: dict[str, object] = {"sni": name} if name else {}
    refusal = tls.refusal(name)
    if refusal is not None:
        return f"TLS handshake refused by --tls-strict-sni: {refusal}", details
    return None, details


def _why(reason: Failure) -> str:
    error = reason.value
    if isinstance(error, SSL.Error):
        return openssl_reason(error)
    return reason.getErrorMessage()
