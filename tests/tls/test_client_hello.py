"""The ClientHello reader of SNI routing: any chunking, any number of records, strict and bounded."""

from __future__ import annotations

import itertools
import os

import pytest
from hellos import (
    alpn_extension,
    crafted,
    handshake,
    hello_body,
    real_hello,
    records,
    sni_extension,
    vector,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelkit.tls.client_hello import (
    DECODE_ERROR,
    MAX_HELLO,
    ClientHello,
    ClientHelloParser,
    HelloError,
)

REAL = real_hello("api.example.com", ["h2", "http/1.1"])
EXPECTED = ClientHello("api.example.com", (b"h2", b"http/1.1"), len(REAL))


def parse(data: bytes, limit: int = MAX_HELLO) -> ClientHello | HelloError | None:
    return ClientHelloParser(limit).feed(data)


def parse_chunks(chunks: list[bytes]) -> ClientHello | HelloError | None:
    parser = ClientHelloParser()
    outcome = None
    for chunk in chunks:
        outcome = parser.feed(chunk)
    return outcome


def test_real_hello() -> None:
    """An OpenSSL client's hello gives its server name as sent and its ALPN offer in order."""
    assert parse(real_hello("API.Example.COM", ["h2", "http/1.1"])) == ClientHello(
        "API.Example.COM", (b"h2", b"http/1.1"), len(REAL)
    )


def test_every_split_position() -> None:
    """A hello split in two at every byte position gives the same outcome, only once all of it came."""
    for at in range(1, len(REAL)):
        parser = ClientHelloParser()
        assert parser.feed(REAL[:at]) is None, at
        assert parser.feed(REAL[at:]) == EXPECTED, at


def test_byte_by_byte() -> None:
    """Fed one byte at a time, the hello is complete at its last byte, not before."""
    parser = ClientHelloParser()
    outcomes = [parser.feed(REAL[at : at + 1]) for at in range(len(REAL))]
    assert outcomes[:-1] == [None] * (len(REAL) - 1)
    assert outcomes[-1] == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 100, 511])
def test_across_records(size: int) -> None:
    """A hello fragmented over records of ``size`` bytes (the record layer allows any) reads the same."""
    message = handshake(hello_body([sni_extension(b"a.test"), alpn_extension(b"h2")]))
    data = records(message, size)
    assert parse(data) == ClientHello("a.test", (b"h2",), len(data))


def test_bytes_after_the_hello_are_not_its() -> None:
    """Early data after the hello's last record leaves the outcome and its size alone."""
    assert parse(REAL + b"\x17\x03\x03\x00\x05hello") == EXPECTED


def test_no_server_name() -> None:
    """A hello without SNI, or without extensions at all (TLS 1.2 allows it), has no server name."""
    assert parse(real_hello(None)) == ClientHello(None, (), len(real_hello(None)))
    assert parse(crafted(None)) == ClientHello(None, (), 5 + 4 + len(hello_body(None)))


def test_trailing_dot_and_underscore() -> None:
    """A host name may end in a dot and have underscores: routing normalizes it."""
    hello = parse(crafted([sni_extension(b"_srv.example.com.")]))
    assert isinstance(hello, ClientHello)
    assert hello.server_name == "_srv.example.com."


def test_other_name_types_ignored() -> None:
    """A server name entry of another type than host_name is skipped, as a TLS server does."""
    extension = (0, vector(2, b"\x01" + vector(2, b"x") + b"\x00" + vector(2, b"a.test")))
    hello = parse(crafted([extension]))
    assert isinstance(hello, ClientHello)
    assert hello.server_name == "a.test"


def error(data: bytes, limit: int = MAX_HELLO) -> HelloError:
    outcome = parse(data, limit)
    assert isinstance(outcome, HelloError), outcome
    return outcome


def test_not_tls_at_the_first_byte() -> None:
    """Plain text, or an SSLv2 hello, is refused at its first byte, with no TLS alert."""
    assert error(b"G") == HelloError("not a TLS handshake (first byte 0x47)", None)
    assert error(b"\x80").alert is None
    assert error(b"\x16\x01").alert is None  # not version 3.x


def test_malformed_records() -> None:
    """An empty record, an oversized one, or another record type mid-hello is a decode error."""
    assert error(b"\x16\x03\x01\x00\x00").reason == "an empty handshake record"
    assert error(b"\x16\x03\x01\x40\x01").reason == "a record of 16385 bytes (at most 16384)"
    message = handshake(hello_body([sni_extension(b"a.test")]))
    first = records(message[:10])
    assert (
        error(first + b"\x17\x03\x03\x00\x01x").reason
        == "a record of type 23 inside the ClientHello"
    )
    assert error(first + b"\x16\x02").alert == DECODE_ERROR


def test_too_big_is_refused_before_it_is_read() -> None:
    """A record or a hello longer than the limit is refused from its header, with nothing held."""
    assert (
        error(b"\x16\x03\x01\x01\x00", limit=200).reason
        == "the ClientHello takes more than 200 bytes"
    )
    claim = b"\x16\x03\x01\x00\x04" + b"\x01\x00\x40\x00"  # a 16 KiB hello in 4-byte records
    assert error(claim).alert is None


def test_many_tiny_records_stay_within_the_limit() -> None:
    """Record headers count: a hello in 1-byte records is refused once they pass the limit."""
    message = handshake(hello_body([sni_extension(b"a.test")]))
    data = records(message, 1)
    assert isinstance(parse(data, limit=len(data)), ClientHello)
    assert error(data, limit=len(data) - 1).alert is None


#: Malformed hellos and the reason each is refused with.
MALFORMED = [
    (records(handshake(b"", kind=2)), "handshake message 2 where a ClientHello must be"),
    (
        records(handshake(hello_body(None)) + b"\x01"),
        "bytes after the ClientHello in its record",
    ),
    (crafted(None, version=0x0200), "ClientHello version 0x0200"),
    (crafted(None, session_id=b"x" * 33), "a session id longer than 32 bytes"),
    (crafted(None, suites=b"\x13"), "cipher suites of 1 bytes"),
    (crafted(None, suites=b""), "cipher suites of 0 bytes"),
    (crafted(None, compression=b""), "no compression method"),
    (records(handshake(hello_body(None)[:-1])), "the ClientHello cut short"),
    (crafted([sni_extension(b"a.test"), sni_extension(b"b.test")]), "extension 0 twice"),
    (crafted([(0, vector(2, b""))]), "an empty server name list"),
    (crafted([(0, vector(2, b"") + b"x")]), "1 bytes left over in extension 0"),
    (crafted([sni_extension(b"a.test", b"b.test")]), "two host names in the server name list"),
    (crafted([sni_extension(b"")]), "server name b'' is not a host name"),
    (crafted([sni_extension(b"a..test")]), "server name b'a..test' is not a host name"),
    (crafted([sni_extension(b"a test")]), "server name b'a test' is not a host name"),
    (
        crafted([sni_extension("é.test".encode())]),
        "server name b'\\xc3\\xa9.test' is not a host name",
    ),
    (
        crafted([sni_extension(b"a" * 64 + b".test")]),
        f"server name {b'a' * 64!r} is not a host name",
    ),
    (crafted([(0, vector(2, b"\x00\x00\x09a.test"))]), "the server name list cut short"),
    (crafted([(16, vector(2, b""))]), "an empty ALPN list"),
    (crafted([alpn_extension(b"h2", b"")]), "an empty ALPN protocol name"),
    (crafted([(16, b"\x00")]), "extension 16 cut short"),
]


@pytest.mark.parametrize(("data", "reason"), MALFORMED, ids=[reason for _, reason in MALFORMED])
def test_strict(data: bytes, reason: str) -> None:
    """Every length must agree with its container; no extension twice; host names only."""
    assert error(data) == HelloError(reason, DECODE_ERROR)


def test_extensions_must_fill_the_hello() -> None:
    """An extensions block shorter or longer than the hello's remaining bytes is refused."""
    body = hello_body([sni_extension(b"a.test")])
    assert (
        error(records(handshake(body + b"\x00"))).reason == "1 bytes left over in the ClientHello"
    )
    assert "cut short" in error(records(handshake(body[:-1]))).reason


def test_outcome_is_kept() -> None:
    """After an outcome the parser ignores what comes and gives the same outcome again."""
    parser = ClientHelloParser()
    assert parser.feed(REAL) == EXPECTED
    assert parser.feed(b"G") == EXPECTED


# -- properties ------------------------------------------------------------------------------

#: Examples per property: the default run's, or a soak's (TUNNELKIT_SOAK=1).
EXAMPLES = 10_000 if os.environ.get("TUNNELKIT_SOAK") == "1" else 200
soak = settings(max_examples=EXAMPLES)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.soak
@soak
@given(st.lists(st.integers(min_value=0), max_size=20))
def test_any_chunking(cuts: list[int]) -> None:
    """However the hello is cut into segments, the outcome is the same."""
    assert parse_chunks(_chunks(REAL, cuts)) == EXPECTED


@pytest.mark.soak
@soak
@given(st.integers(min_value=0, max_value=len(REAL) - 1))
def test_truncated_waits(length: int) -> None:
    """A hello cut short is neither a hello nor an error: the deadline decides."""
    assert parse(REAL[:length]) is None


@pytest.mark.soak
@soak
@given(st.binary(max_size=600), st.lists(st.integers(min_value=0), max_size=8))
def test_random_input(data: bytes, cuts: list[int]) -> None:
    """Random bytes, in any chunking, never raise, and the outcome does not depend on the chunking."""
    assert parse_chunks(_chunks(data, cuts)) == parse(data)


@pytest.mark.soak
@soak
@given(
    st.lists(st.tuples(st.integers(min_value=0, max_value=len(REAL) - 1), st.integers(0, 255))),
    st.lists(st.integers(min_value=0), max_size=8),
)
def test_mutated_hello(changes: list[tuple[int, int]], cuts: list[int]) -> None:
    """A real hello with bytes changed never raises, whatever the chunking, and holds at most the limit."""
    data = bytearray(REAL)
    for at, value in changes:
        data[at] = value
    parser = ClientHelloParser(limit=600)
    outcome = None
    for chunk in _chunks(bytes(data), cuts):
        outcome = parser.feed(chunk)
        assert len(parser._record) + len(parser._message) <= 600 + 5
    assert outcome == parse(bytes(data), limit=600)


@pytest.mark.soak
@soak
@given(
    st.binary(max_size=64).map(sni_extension),
    st.lists(st.binary(max_size=8), max_size=4).map(lambda p: alpn_extension(*p)),
)
def test_random_extensions(server_name: tuple[int, bytes], alpn: tuple[int, bytes]) -> None:
    """Hellos with arbitrary names and protocols give a hello or a decode error, never an exception."""
    outcome = parse(crafted([server_name, alpn]))
    assert isinstance(outcome, ClientHello | HelloError)
    if isinstance(outcome, ClientHello) and outcome.server_name is not None:
        assert outcome.server_name.isascii()
