"""Server TLS without sockets: certificate choice by name, file errors, reloading, option checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from certs import Pair, write_pair
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, globalLogPublisher

from tunnelkit.app.build import Listener, prepare
from tunnelkit.cli.plugin import Options
from tunnelkit.config.model import ConfigError
from tunnelkit.tls.server import (
    CertificatePair,
    Certificates,
    ServerTLS,
    ServerTLSSettings,
    TLSConfigError,
    served_names,
)
from tunnelkit.tls.transport import TLSError


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def settings(*pairs: Pair, **options: object) -> ServerTLSSettings:
    return ServerTLSSettings(
        pairs=tuple(CertificatePair(str(p.cert), str(p.key)) for p in pairs),
        **options,  # type: ignore[arg-type]
    )


def leaf_names(context: SSL.Context) -> list[str]:
    """The names of the certificate a context serves, read back through a connection."""
    cert = SSL.Connection(context, None).get_certificate()
    assert cert is not None
    return served_names(cert.to_cryptography().public_bytes(Encoding.PEM), "-")


def test_names_choose_the_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    first = write_pair(ca, tmp_path, "a.example", "www.a.example")
    wildcard = write_pair(ca, tmp_path, "*.b.example")
    exact = write_pair(ca, tmp_path, "x.b.example")
    certs = Certificates(settings(first, wildcard, exact))
    assert leaf_names(certs.for_name("www.a.example")) == ["a.example", "www.a.example"]
    assert leaf_names(certs.for_name("Y.B.Example.")) == ["*.b.example"]
    # An exact name beats the wildcard that also covers it.
    assert leaf_names(certs.for_name("x.b.example")) == ["x.b.example"]
    # A wildcard covers one label only; unknown names and no name get the first pair.
    assert certs.for_name("z.y.b.example") is certs.default
    assert certs.for_name("b.example") is certs.default
    assert certs.for_name(None) is certs.default


def test_strict_sni_has_no_default(ca: trustme.CA, tmp_path: Path) -> None:
    pair = write_pair(ca, tmp_path, "a.example")
    certs = Certificates(settings(pair, strict_sni=True))
    assert certs.for_name("a.example") is certs.default
    for name in ("other.example", None):
        refused = certs.for_name(name)
        assert refused is not certs.default
        assert SSL.Connection(refused, None).get_certificate() is None


def test_common_name_when_no_san(ca: trustme.CA, tmp_path: Path) -> None:
    pair = write_pair(ca, tmp_path, common_name="legacy.example", name="legacy")
    names = served_names(pair.cert.read_bytes(), str(pair.cert))
    assert names == ["legacy.example"]


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda p: p.cert.unlink(), "--tls-cert {cert}: No such file or directory"),
        (lambda p: p.cert.write_text("junk"), "--tls-cert {cert}: no PEM certificate"),
        (lambda p: p.key.write_text("junk"), "--tls-key {key}: "),
    ],
)
def test_unusable_files_are_named(
    ca: trustme.CA, tmp_path: Path, break_it: object, message: str
) -> None:
    pair = write_pair(ca, tmp_path, "a.example")
    break_it(pair)  # type: ignore[operator]
    with pytest.raises(TLSConfigError) as raised:
        Certificates(settings(pair))
    assert str(raised.value).startswith(message.format(cert=pair.cert, key=pair.key))


def test_key_of_another_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    a = write_pair(ca, tmp_path, "a.example")
    b = write_pair(ca, tmp_path, "b.example")
    with pytest.raises(TLSConfigError, match="does not match the certificate in"):
        Certificates(ServerTLSSettings(pairs=(CertificatePair(str(a.cert), str(b.key)),)))


def _encrypt(pair: Pair) -> None:
    key = serialization.load_pem_private_key(pair.key.read_bytes(), None)
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )


def _rsa_key(pair: Pair) -> None:
    rsa = trustme.CA().issue_cert("a.example", key_type=trustme.KeyType.RSA)
    rsa.private_key_pem.write_to_path(str(pair.key))


@pytest.mark.parametrize(
    ("combined", "break_it", "message"),
    [
        (True, lambda p: None, "--tls-cert {cert}: the file holds no private key;"),
        (False, _rsa_key, "--tls-key {key}: the key does not match the certificate in {cert}"),
        (False, _encrypt, "--tls-key {key}: the private key is encrypted; give it unencrypted"),
        (False, lambda p: p.key.write_bytes(p.cert.read_bytes()), "--tls-key {key}: the file"),
    ],
    ids=["no key with the certificate", "RSA key, EC certificate", "encrypted", "no key"],
)
def test_key_problems_are_said_plainly(
    ca: trustme.CA, tmp_path: Path, combined: bool, break_it: object, message: str
) -> None:
    """A missing, mismatched or encrypted key is named with what is wrong, not OpenSSL's words."""
    pair = write_pair(ca, tmp_path, "a.example")
    break_it(pair)  # type: ignore[operator]
    key = pair.cert if combined else pair.key
    with pytest.raises(TLSConfigError) as raised:
        Certificates(ServerTLSSettings(pairs=(CertificatePair(str(pair.cert), str(key)),)))
    assert str(raised.value).startswith(message.format(cert=pair.cert, key=pair.key))


def test_reload_swaps_or_keeps(ca: trustme.CA, tmp_path: Path) -> None:
    pair = write_pair(ca, tmp_path, "a.example")
    tls = ServerTLS(settings(pair))
    before = tls.certificates
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        # A new certificate on disk is served after a reload ...
        replacement = write_pair(ca, tmp_path / "..", "renamed.example", name="new")
        pair.cert.write_bytes(replacement.cert.read_bytes())
        pair.key.write_bytes(replacement.key.read_bytes())
        assert tls.reload()
        assert tls.certificates is not before
        assert leaf_names(tls.certificates.default) == ["renamed.example"]
        current = tls.certificates
        # ... and a broken one keeps what was loaded.
        pair.key.write_text("broken")
        assert not tls.reload()
        assert tls.certificates is current
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e["event"] for e in events if "event" in e] == ["tls_reloaded", "tls_reload_failed"]
    assert str(pair.key) in events[-1]["error"]


def parse(*args: str) -> Listener:
    """The listener these flags describe, loaded as a start loads it; errors end it likewise."""
    options = Options(reactor=MemoryReactorClock())
    options.parseOptions(["--listen", "0", "--to", "127.0.0.1:9", *args])
    assert options.settings is not None
    try:
        [listener] = prepare(options.settings, options.reactor).listeners
    except ConfigError as e:
        raise SystemExit(options.error_lines(e)) from None
    return listener


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-key", "k.pem"], "--tls-key needs --tls-cert"),
        (["--alpn", "h2"], "--alpn needs --tls-cert"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert"),
        (["--backend-ca", "ca.pem"], "--backend-ca needs a tls:HOST:PORT backend or --backend-tls"),
        (["--backend-insecure"], "--backend-insecure needs a tls:HOST:PORT backend"),
        (["--tls-min-version", "1.1"], "--tls-min-version: must be one of 1.2, 1.3, not '1.1'"),
        (["--tls-cert", "/nonexistent/c.pem"], "--tls-cert /nonexistent/c.pem: No such file"),
        (["--backend-tls", "--backend-ca", "/nonexistent/ca.pem"], "--backend-ca /nonexistent"),
        (["--tls-cert", "c.pem", "--alpn", ", ,"], "--alpn ', ,': no protocol name"),
    ],
)
def test_option_errors(args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as raised:
        parse(*args)
    assert str(raised.value).startswith(f"tunnelkit: error: {message}")


def test_one_key_per_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    a = write_pair(ca, tmp_path, "a.example")
    b = write_pair(ca, tmp_path, "b.example")
    args = ["--tls-cert", str(a.cert), "--tls-cert", str(b.cert), "--tls-key", str(a.key)]
    with pytest.raises(SystemExit, match="2 --tls-cert but 1 --tls-key"):
        parse(*args)
    # Without any --tls-key, each certificate file holds its key (HAProxy's crt form).
    options = parse("--tls-cert", str(a.combined), "--tls-cert", str(b.combined))
    assert options.tls is not None
    assert leaf_names(options.tls.certificates.for_name("b.example")) == ["b.example"]


def test_alpn_and_version_reach_the_settings(ca: trustme.CA, tmp_path: Path) -> None:
    a = write_pair(ca, tmp_path, "a.example")
    options = parse(
        "--tls-cert", str(a.cert), "--tls-key", str(a.key),
        "--alpn", "h2, http/1.1", "--tls-min-version", "1.3", "--tls-handshake-timeout", "3",
    )  # fmt: skip
    assert options.tls is not None
    tls_settings = options.tls.settings
    assert tls_settings.alpn == (b"h2", b"http/1.1")
    assert (tls_settings.min_version, tls_settings.handshake_timeout) == ("1.3", 3.0)
    # Plain TCP configurations load no TLS state at all.
    assert parse().tls is None and parse().backend_tls is None


def test_direct_openssl_path_available() -> None:
    """The pinned pyOpenSSL exposes what tls_direct needs, so the TLS suites exercise it."""
    from tunnelkit.tls import direct as tls_direct
    from tunnelkit.tls.transport import RelayTLSProtocol

    assert tls_direct.AVAILABLE
    assert RelayTLSProtocol.direct_openssl


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (([("SSL routines", "", "tlsv1 alert unknown ca")],), "tlsv1 alert unknown ca"),
        (([("SSL routines", "", "a"), ("SSL routines", "", "b")],), "a, b"),
        (([],), "[]"),
        ((), "TLSError"),
    ],
)
def test_tls_errors_read_as_their_reasons(args: tuple[object, ...], text: str) -> None:
    """A TLS leg's error reads as OpenSSL's reasons; an empty or missing queue still reads as something."""
    assert str(TLSError(*args)) == text
