"""TLS towards backends: certificate checks, client certificates, and the endpoint.

A backend written ``tls:HOST:PORT`` (or any ``HOST:PORT`` with
``--backend-tls``) is dialled with :class:`TLSClientEndpoint`: TCP first,
then the handshake, and only a verified handshake counts as connected, so a
backend with a wrong certificate is a failed attempt and the backend group moves on
to the next one. Names are checked by Twisted with ``service_identity``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelkit.config.model import BackendTLSSettings
from tunnelkit.tls.server import (
    openssl_reason,
    pem_certificates,
    private_key,
    read_file,
)
from tunnelkit.tls.transport import RelayTLSFactory, RelayTLSProtocol

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover - a pyOpenSSL without these bindings
    _ffi = _lib = None


class BackendTLSError(Exception):
    """A TLS backend's handshake failed; the message says what was checked, against what."""


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """``--backend-insecure``: TLS with the SNI name sent and no certificate checked."""

    def __init__(self, name: str, context: SSL.Context) -> None:
        self.name = name.encode("idna") if not _is_ip(name) else None
        self.context = context

    def clientConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        if self.name is not None:
            connection.set_tlsext_host_name(self.name)
        connection.set_app_data(protocol)
        return connection


def _client_certificate(cert: str, key: str | None) -> ssl.PrivateCertificate:
    """``--backend-cert`` and its key (``--backend-key``, else in the certificate file), checked."""
    leaf = pem_certificates("--backend-cert", cert, read_file("--backend-cert", cert))[0]
    loaded = private_key(cert, key or cert, leaf, ("--backend-cert", "--backend-key"))
    pem = leaf.public_bytes(serialization.Encoding.PEM) + loaded.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    certificate: ssl.PrivateCertificate = ssl.PrivateCertificate.loadPEM(pem)
    return certificate


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class BackendTLS:
    """Makes the connection creator for each TLS backend from the ``--backend-*`` settings.

    Files are read once, here, so that a bad one is a command-line error.
    """

    def __init__(self, settings: BackendTLSSettings) -> None:
        self.settings = settings
        self.trust: Any = None
        if settings.ca is not None:
            # Every CA of the file (a bundle), each through its own PEM.
            cas = pem_certificates(
                "--backend-ca", settings.ca, read_file("--backend-ca", settings.ca)
            )
            self.trust = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(ca.public_bytes(serialization.Encoding.PEM)) for ca in cas]
            )
        self.client_certificate: ssl.PrivateCertificate | None = None
        if settings.cert is not None:
            self.client_certificate = _client_certificate(settings.cert, settings.key)

    def creator(self, host: str, *, exact: bool = False) -> IOpenSSLClientConnectionCreator:
        """How to open TLS to backend ``host``: verified against ``--backend-sni`` or ``host``.

        ``exact``: against ``host`` itself (an ``https://`` ``--via`` proxy).
        """
        name = self._checked(host, exact)
        if self.settings.insecure:
            options = ssl.CertificateOptions(
                verify=False,
                **self._client_key_options(),
            )
            return _Unverified(name, options.getContext())
        creator: IOpenSSLClientConnectionCreator = ssl.optionsForClientTLS(
            name,
            trustRoot=self.trust,
            clientCertificate=self.client_certificate,
        )
        return creator

    def _checked(self, host: str, exact: bool) -> str:
        """The name a certificate must match: ``--backend-sni``, unless ``exact``, else ``host``."""
        return host if exact else self.settings.sni or host

    def diagnose(
        self, host: str, connection: Any, failure: Failure, *, exact: bool = False
    ) -> str | None:
        """Why the handshake with backend ``host`` failed, in words; None if it was not TLS's doing.

        OpenSSL says only "certificate verify failed" and service_identity
        ``VerificationError(errors=[DNSMismatch(...)])``: this adds the name
        that was checked, the CAs it was checked against and OpenSSL's
        verify reason ("self-signed certificate", "certificate has expired").
        """
        error = failure.value
        if isinstance(error, (VerificationError, CertificateError)):
            why = f"hostname mismatch, the certificate is for {_peer_names(connection)}"
        elif isinstance(error, SSL.Error):
            reason = openssl_reason(error)
            if "certificate verify failed" not in reason:
                return f"TLS handshake failed: {reason}"
            why = _verify_reason(connection) or "OpenSSL gave no reason"
        else:
            return None
        trust = f"--backend-ca {self.settings.ca}" if self.settings.ca else "the system's CAs"
        name = self._checked(host, exact)
        return f"certificate verify failed: {why} (name checked: {name!r}; CAs: {trust})"

    def _client_key_options(self) -> dict[str, Any]:
        if self.client_certificate is None:
            return {}
        return {
            "privateKey": self.client_certificate.privateKey.original,
            "certificate": self.client_certificate.original,
        }


def _verify_reason(connection: Any) -> str | None:
    """OpenSSL's reason the peer's certificate chain did not verify, if it did not."""
    if connection is None or _lib is None or not hasattr(_lib, "X509_verify_cert_error_string"):
        return None
    code = _lib.SSL_get_verify_result(connection._ssl)
    if code == _lib.X509_V_OK:
        return None
    reason: bytes = _ffi.string(_lib.X509_verify_cert_error_string(code))
    return reason.decode("ascii", "replace")


def _peer_names(connection: Any) -> str:
    """The DNS names and IP addresses the peer's certificate is for, for a mismatch message."""
    # Twisted checks the name while OpenSSL verifies the chain, before the
    # certificate becomes the peer's: it is only in the chain received.
    chain = connection.get_peer_cert_chain(as_cryptography=True) if connection else None
    if not chain:
        return "no name"
    try:
        san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return "no subjectAltName"
    names = [str(n) for n in san.value.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)]
    return ", ".join(names) or "no DNS name or IP address"


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """TLS over another client endpoint; connected means handshaken and verified."""

    def __init__(
        self,
        inner: IStreamClientEndpoint,
        creator: IOpenSSLClientConnectionCreator,
        *,
        read_size: int,
        write_through: bool = True,
        diagnose: Callable[[Any, Failure], str | None] | None = None,
    ) -> None:
        self.inner = inner
        self.creator = creator
        self.read_size = read_size
        self.write_through = write_through
        #: Words for a failed handshake (:meth:`BackendTLS.diagnose`, its host bound).
        self.diagnose = diagnose

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        wrapping = RelayTLSFactory(
            self.creator,
            True,
            protocolFactory,
            read_size=self.read_size,
            write_through=self.write_through,
            connect_after_handshake=True,
        )

        def handshake(protocol: RelayTLSProtocol) -> Deferred[IProtocol]:
            assert protocol.handshake is not None
            # Kept here: the protocol lets go of it when the connection is lost.
            connection = protocol._tlsConnection
            return protocol.handshake.addErrback(self._explain, connection)

        connecting: Deferred[Any] = self.inner.connect(wrapping)
        return connecting.addCallback(handshake)

    def _explain(self, failure: Failure, connection: Any) -> Failure:
        why = self.diagnose(connection, failure) if self.diagnose is not None else None
        if why is None:
            return failure
        raise BackendTLSError(why)
