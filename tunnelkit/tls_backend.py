"""TLS towards backends: certificate checks, client certificates, and the endpoint.

A backend written ``tls:HOST:PORT`` (or any ``HOST:PORT`` with
``--backend-tls``) is dialled with :class:`TLSClientEndpoint`: TCP first,
then the handshake, and only a verified handshake counts as connected, so a
backend with a wrong certificate is a failed attempt and the dialer moves on
to the next one. Names are checked by Twisted with ``service_identity``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from zope.interface import implementer

from tunnelkit.tls_server import TLSConfigError
from tunnelkit.tls_transport import RelayTLSFactory, RelayTLSProtocol


@attrs.frozen
class BackendTLSSettings:
    """What ``--backend-*`` says about TLS towards backends."""

    ca: str | None = None
    sni: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure: bool = False


def _pem(option: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{option} {path}: {e.strerror or e}") from None


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
            try:
                self.trust = ssl.trustRootFromCertificates(
                    [ssl.Certificate.loadPEM(_pem("--backend-ca", settings.ca))]
                )
            except SSL.Error as e:
                raise TLSConfigError(f"--backend-ca {settings.ca}: not a PEM certificate") from e
        self.client_certificate: ssl.PrivateCertificate | None = None
        if settings.cert is not None:
            cert = _pem("--backend-cert", settings.cert)
            key = _pem("--backend-key", settings.key) if settings.key else cert
            try:
                self.client_certificate = ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)
            except Exception as e:
                raise TLSConfigError(
                    f"--backend-cert {settings.cert}: no usable certificate and key ({e})"
                ) from None

    def creator(self, host: str) -> IOpenSSLClientConnectionCreator:
        """How to open TLS to backend ``host``: verified against ``--backend-sni`` or ``host``."""
        name = self.settings.sni or host
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

    def _client_key_options(self) -> dict[str, Any]:
        if self.client_certificate is None:
            return {}
        return {
            "privateKey": self.client_certificate.privateKey.original,
            "certificate": self.client_certificate.original,
        }


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
    ) -> None:
        self.inner = inner
        self.creator = creator
        self.read_size = read_size
        self.write_through = write_through

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
            return protocol.handshake

        connecting: Deferred[Any] = self.inner.connect(wrapping)
        return connecting.addCallback(handshake)
