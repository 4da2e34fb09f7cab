"""TLS termination: the server contexts, certificate choice by SNI, and reloading.

:class:`ServerTLS` is what a TLS listener asks for each new connection's
OpenSSL state. It holds one loaded :class:`Certificates` set (an OpenSSL
context per certificate, the names each one serves) and replaces the whole
set atomically on :meth:`ServerTLS.reload`: a handshake in progress keeps the
set it started with, a broken file keeps the old set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from tunnelkit.config.model import CertificatePair, ServerTLSSettings

log = Logger(namespace="tunnelkit.tls")

#: ``--tls-min-version`` values and the OpenSSL constants they mean.
MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

#: How many served names a strict SNI refusal lists.
_NAMES_SHOWN = 5

_OPTIONS = (
    SSL.OP_NO_COMPRESSION  # CRIME
    | SSL.OP_NO_RENEGOTIATION  # client-initiated renegotiation: a CPU-exhaustion lever
    | SSL.OP_CIPHER_SERVER_PREFERENCE
)


class TLSConfigError(Exception):
    """A certificate, key or CA file cannot be used; the message names it."""


def read_file(option: str, path: str) -> bytes:
    """The bytes of the file ``option`` names; an unreadable one is a :class:`TLSConfigError`."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{option} {path}: {e.strerror or e}") from None


def openssl_reason(error: SSL.Error) -> str:
    """The reasons in OpenSSL's error queue, without the library and function names."""
    queue = error.args[0] if error.args and isinstance(error.args[0], list) else []
    reasons = [entry[2] for entry in queue if isinstance(entry, tuple) and entry[2]]
    # Exception's own text: a subclass's __str__ may be this function.
    return ", ".join(reasons) or Exception.__str__(error) or type(error).__name__


def pem_certificates(option: str, path: str, data: bytes) -> list[x509.Certificate]:
    """Every certificate of PEM file ``path`` (given as ``option``), or what is wrong with it."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TLSConfigError(f"{option} {path}: no PEM certificate in the file")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(
            f"{option} {path}: its PEM certificate cannot be decoded (damaged or truncated)"
        ) from None


def _leaf(cert_pem: bytes, path: str) -> x509.Certificate:
    """The first (leaf) certificate of a ``--tls-cert`` file."""
    return pem_certificates("--tls-cert", path, cert_pem)[0]


def served_names(cert_pem: bytes, path: str) -> list[str]:
    """The DNS names the leaf certificate of ``cert_pem`` serves: its SAN, else its CN."""
    return _names(_leaf(cert_pem, path))


def _names(leaf: x509.Certificate) -> list[str]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [
            str(attribute.value)
            for attribute in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return [name.lower().rstrip(".") for name in names]


def private_key(
    cert: str,
    key: str,
    leaf: x509.Certificate,
    options: tuple[str, str] = ("--tls-cert", "--tls-key"),
) -> Any:
    """The key in file ``key`` for certificate ``leaf`` (from ``cert``), read here to say plainly what is wrong.

    OpenSSL's own words for these cases are "unsupported, PEM lib" (no key in
    the file, or a damaged one), "no certificate assigned" (a key of another
    type than the certificate's) or a passphrase prompt on the terminal (an
    encrypted key); and with the key inside the certificate file they named
    an option the user never gave. ``options`` name the certificate's and
    the key's options.
    """
    cert_option, key_option = options
    combined = key == cert
    where = f"{cert_option} {cert}" if combined else f"{key_option} {key}"
    data = read_file(cert_option if combined else key_option, key)
    if b"PRIVATE KEY-----" not in data:
        if combined:
            raise TLSConfigError(
                f"{where}: the file holds no private key; give the key's file with {key_option}"
            )
        raise TLSConfigError(f"{where}: the file holds no PEM private key")
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(
            f"{where}: the private key is encrypted; give it unencrypted"
            f" (openssl pkey -in {key} -out KEY)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError(
            f"{where}: its PEM private key cannot be decoded (damaged or truncated)"
        ) from None
    if _public_der(loaded) != _public_der(leaf):
        if combined:
            raise TLSConfigError(f"{where}: the private key does not match the certificate")
        raise TLSConfigError(f"{where}: the key does not match the certificate in {cert}")
    return loaded


def _public_der(holder: Any) -> bytes:
    """The DER public key of a private key or a certificate."""
    der: bytes = holder.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _alpn_chooser(ours: Sequence[bytes]) -> Any:
    def choose(connection: SSL.Connection, offered: list[bytes]) -> bytes:
        for protocol in ours:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

    return choose


def _context(
    settings: ServerTLSSettings, pair: CertificatePair | None = None, key: Any = None
) -> SSL.Context:
    """One server context; without ``pair``, one that can complete no handshake (strict SNI)."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(MIN_VERSIONS[settings.min_version])
    context.set_options(_OPTIONS)
    # An idle connection keeps no 16 KiB record buffers: 22 KB instead of 44
    # per idle TLS tunnel (docs/performance.md), as HAProxy and nginx do.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # Session resumption (and client certificates with it) needs an id context.
    context.set_session_id(b"tunnelkit")
    if settings.ciphers:
        try:
            context.set_cipher_list(settings.ciphers.encode())
        except SSL.Error as e:
            raise TLSConfigError(
                f"--tls-ciphers {settings.ciphers!r}: {openssl_reason(e)}"
            ) from None
    if settings.alpn:
        context.set_alpn_select_callback(_alpn_chooser(settings.alpn))
    if settings.client_ca:
        pem_certificates(
            "--tls-client-ca", settings.client_ca, read_file("--tls-client-ca", settings.client_ca)
        )
        try:
            context.load_verify_locations(settings.client_ca)
            context.load_client_ca(settings.client_ca.encode())
        except SSL.Error as e:
            raise TLSConfigError(
                f"--tls-client-ca {settings.client_ca}: {openssl_reason(e)}"
            ) from None
        mode = SSL.VERIFY_PEER
        if not settings.client_optional:
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        context.set_verify(mode)
    if pair is None:
        return context
    try:
        context.use_certificate_chain_file(pair.cert.encode())
    except SSL.Error as e:
        raise TLSConfigError(f"--tls-cert {pair.cert}: {openssl_reason(e)}") from None
    try:
        context.use_privatekey(key)
        context.check_privatekey()
    except (SSL.Error, TypeError) as e:
        # Not a key type a certificate can have (X25519, DH): OpenSSL refuses it.
        reason = openssl_reason(e) if isinstance(e, SSL.Error) else str(e)
        raise TLSConfigError(f"--tls-key {pair.key}: unusable key: {reason}") from None
    return context


class Certificates:
    """One load of every certificate: a context each, and which names each serves.

    An exact name beats a wildcard (``*.example.com`` covers one label), and
    an earlier ``--tls-cert`` beats a later one for the same name. Clients
    with no name or an unknown one get the first certificate, or with
    ``strict_sni`` a context without any, whose handshake fails.
    """

    def __init__(self, settings: ServerTLSSettings) -> None:
        if not settings.pairs:
            raise TLSConfigError("--tls-cert is required for TLS")
        self.exact: dict[str, SSL.Context] = {}
        self.wildcard: dict[str, SSL.Context] = {}
        #: Every name served, in --tls-cert order (for the log of a strict SNI refusal).
        self.names: list[str] = []
        contexts = []
        for pair in settings.pairs:
            leaf = _leaf(read_file("--tls-cert", pair.cert), pair.cert)
            context = _context(settings, pair, private_key(pair.cert, pair.key, leaf))
            contexts.append(context)
            for name in _names(leaf):
                if name not in self.names:
                    self.names.append(name)
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], context)
                else:
                    self.exact.setdefault(name, context)
        self.default = contexts[0]
        self.fallback = _context(settings, None) if settings.strict_sni else self.default
        # One certificate and no strict SNI: every name gets the default, so
        # no handshake pays for a call into Python to choose it.
        if len(contexts) > 1 or settings.strict_sni:
            self.default.set_tlsext_servername_callback(self._choose)

    def for_name(self, name: str | None) -> SSL.Context:
        """The context serving ``name`` (as sent in SNI)."""
        if not name:
            return self.fallback
        name = name.lower().rstrip(".")
        context = self.exact.get(name)
        if context is None:
            _, _, parent = name.partition(".")
            context = self.wildcard.get(parent, self.fallback)
        return context

    def _choose(self, connection: SSL.Connection) -> None:
        sent = connection.get_servername()
        context = self.for_name(sent.decode("ascii", "replace") if sent else None)
        if context is not self.default:
            connection.set_context(context)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The TLS state of every listener of a process; reloadable."""

    def __init__(self, settings: ServerTLSSettings) -> None:
        self.settings = settings
        self.certificates = Certificates(settings)
        #: Handshakes that failed or timed out, since start (all listeners).
        self.handshake_failures = 0

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        """A new connection's OpenSSL state, from the current certificates."""
        return SSL.Connection(self.certificates.default, None)

    def refusal(self, name: str | None) -> str | None:
        """Why ``--tls-strict-sni`` turns away a client asking for ``name``; None if it does not."""
        certificates = self.certificates
        if certificates.fallback is certificates.default or (
            certificates.for_name(name) is not certificates.fallback
        ):
            return None
        if not name:
            return "the client sent no SNI name"
        names = certificates.names
        served = ", ".join(names[:_NAMES_SHOWN])
        if len(names) > _NAMES_SHOWN:
            served += f" and {len(names) - _NAMES_SHOWN} more"
        return f"no certificate for SNI name {name!r} (served: {served})"

    def reload(self) -> bool:
        """Load every file again; keep the current certificates if anything fails."""
        try:
            self.certificates = Certificates(self.settings)
        except TLSConfigError as e:
            log.error(
                "TLS reload failed: {error}; the certificates loaded before stay in use",
                event="tls_reload_failed",
                error=str(e),
            )
            return False
        log.info(
            "TLS certificates reloaded ({count})",
            event="tls_reloaded",
            count=len(self.settings.pairs),
        )
        return True
