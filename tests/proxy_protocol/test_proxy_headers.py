"""PROXY protocol headers: the builders, the strict incremental reader, HAProxy's fixtures."""

from __future__ import annotations

import ipaddress
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelkit.proxy_protocol.build import PP2_TYPE_AUTHORITY, PP2_TYPE_CRC32C, tlv, v1, v2
from tunnelkit.proxy_protocol.parse import (
    MAX_V1,
    MAX_V2,
    HeaderError,
    HeaderReader,
    ProxyHeader,
    crc32c,
)

SIGNATURE = bytes.fromhex("0d0a0d0a000d0a515549540a")

#: What HAProxy itself sent with send-proxy-v2 (172.19.0.1:42578 to 172.19.0.3:80).
HAPROXY_SENT_V2 = SIGNATURE + bytes.fromhex("2111000cac130001ac130003a6520050")

#: HAProxy's reg-tests/connection/proxy_protocol_tlv_validation.vtc: 127.0.0.1:42 to
#: 127.0.0.1:1337 with PP2_TYPE_AUTHORITY "12345" (a valid header) ...
HAPROXY_VALID = SIGNATURE + bytes.fromhex("21110014 7F000001 7F000001 002A0539 0200053132333435")
#: ... a TLV longer than the header's length, and TLVs ending short of it: both refused.
HAPROXY_TLV_TOO_LONG = SIGNATURE + bytes.fromhex(
    "21110014 7F000001 7F000001 002A0539 02000A31323334353132333435"
)
HAPROXY_TLV_SHORT = SIGNATURE + bytes.fromhex("21110014 7F000001 7F000001 002A0539 02000431323334")


def read(data: bytes, chunk: int = 0) -> tuple[ProxyHeader | None, bytes]:
    """Feed ``data`` whole (``chunk`` 0) or in chunks of that size: the header and what followed."""
    reader = HeaderReader()
    parts = [data[i : i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    for part in parts:
        header = reader.feed(part)
        if header is not None:
            return header, reader.rest + b"".join(parts[parts.index(part) + 1 :])
    return None, b""


def test_v1_builds_what_haproxy_sends() -> None:
    """TCP4 and TCP6 lines as proxy-protocol.txt spells them; UNKNOWN for a UNIX peer."""
    assert v1(("192.0.2.1", 56324), ("198.51.100.2", 443)) == (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
    )
    assert v1(("2001:db8::1", 1), ("::1", 80)) == b"PROXY TCP6 2001:db8::1 ::1 1 80\r\n"
    assert v1(None, ("127.0.0.1", 80)) == b"PROXY UNKNOWN\r\n"


def test_v1_says_ipv4_mapped_addresses_as_inet_ntop_does() -> None:
    """A dual-stack listener's IPv4 client: TCP6 with ::ffff:a.b.c.d, as the engine writes it."""
    assert v1(("::ffff:127.0.0.1", 5), ("::ffff:127.0.0.1", 6)) == (
        b"PROXY TCP6 ::ffff:127.0.0.1 ::ffff:127.0.0.1 5 6\r\n"
    )
    # Families that differ (a carried IPv4 client, an IPv6 listener): both said as IPv6.
    assert v1(("192.0.2.1", 5), ("::1", 6)) == b"PROXY TCP6 ::ffff:192.0.2.1 ::1 5 6\r\n"


def test_v2_builds_what_haproxy_sends() -> None:
    """The bytes HAProxy's send-proxy-v2 wrote for the same addresses."""
    assert v2(("172.19.0.1", 42578), ("172.19.0.3", 80)) == HAPROXY_SENT_V2


def test_v2_without_addresses_is_local() -> None:
    """No IP addresses to say: a LOCAL header of no length, so the receiver uses the connection's."""
    assert v2(None, None) == SIGNATURE + bytes.fromhex("20000000")
    assert read(v2(None, None)) == (ProxyHeader(2), b"")


def test_haproxy_fixtures() -> None:
    """HAProxy's TLV validation cases: the valid one read with its TLV, the others refused."""
    header, rest = read(HAPROXY_VALID + b"GET /")
    assert header == ProxyHeader(
        2, ("127.0.0.1", 42), ("127.0.0.1", 1337), ((PP2_TYPE_AUTHORITY, b"12345"),)
    )
    assert rest == b"GET /"  # bytes after the header's length are the client's, not TLVs
    for bad in (HAPROXY_TLV_TOO_LONG, HAPROXY_TLV_SHORT):
        with pytest.raises(HeaderError, match="truncated TLV"):
            read(bad + b"GET / HTTP/1.1\r\n")  # the request HAProxy's test sends next


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 65535\r\n", (("192.0.2.1", 1), ("192.0.2.2", 65535))),
        (b"PROXY TCP6 2001:DB8::1 ::1 0 443\r\n", (("2001:db8::1", 0), ("::1", 443))),
        (b"PROXY UNKNOWN\r\n", (None, None)),
        (b"PROXY UNKNOWN 1.2.3.4 whatever follows\r\n", (None, None)),
    ],
)
def test_v1_lines_read(line: bytes, expected: tuple[object, object]) -> None:
    """Valid version 1 lines, at every split point, give their addresses and leave the rest."""
    for split in range(1, len(line) + 1):
        reader = HeaderReader()
        first = reader.feed(line[:split])
        header = first or reader.feed(line[split:] + b"data")
        assert header is not None and (header.source, header.destination) == expected
        assert reader.rest == (b"" if first else b"data")


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
        (b"PROXY", None),  # incomplete: more is needed
        (b"PROXX TCP4", "no PROXY protocol header"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2\n", "no CRLF"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2\rX", "no CRLF"),
        (b"PROXY TCP4 1.2.3.4  1.2.3.5 1 2\r\n", "four fields"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 1\r\n", "four fields"),
        (b"PROXY TCP5 1.2.3.4 1.2.3.5 1 2\r\n", "four fields"),
        (b"PROXY TCP4 ::1 1.2.3.5 1 2\r\n", "family"),
        (b"PROXY TCP6 ::1 1.2.3.5 1 2\r\n", "family"),
        (b"PROXY TCP4 1.2.3.04 1.2.3.5 1 2\r\n", "not an IP address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not an IP address"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 65536 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 01 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 +1 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 \xd9\xa1 2\r\n", "port"),  # an Arabic-Indic digit
        (b"PROXY UNKNOWN " + b"x" * MAX_V1 + b"\r\n", "within 107"),
        (SIGNATURE[:5] + b"X", "no PROXY protocol header"),
        (SIGNATURE + bytes.fromhex("22110000"), "command"),  # an unknown command
        (SIGNATURE + bytes.fromhex("11110000"), "command"),  # version 1 in a v2 header
        (SIGNATURE + bytes.fromhex("21120000"), "datagram"),  # UDP4
        (SIGNATURE + bytes.fromhex("21410000"), "unknown address family"),
        (SIGNATURE + bytes.fromhex("2111000b") + bytes(11), "too short for its addresses"),
        (SIGNATURE + bytes.fromhex("21210023") + bytes(35), "too short for its addresses"),
        (SIGNATURE + b"\x21\x11" + (MAX_V2 - 15).to_bytes(2, "big"), "longer than"),
    ],
)
def test_malformed_headers_are_refused(data: bytes, reason: str | None) -> None:
    """Each malformed header is refused with its reason (never guessed at); a prefix waits for more."""
    if reason is None:
        assert read(data) == (None, b"")
        return
    with pytest.raises(HeaderError, match=reason):
        read(data)


def test_crc32c_is_checked() -> None:
    """A CRC32C TLV is verified: the right checksum passes, any other is refused."""
    body_len = 12 + 7
    start = SIGNATURE + bytes([0x21, 0x11]) + body_len.to_bytes(2, "big")
    addresses = bytes.fromhex("7F000001 7F000002 0001 0002")
    zeroed = start + addresses + tlv(PP2_TYPE_CRC32C, bytes(4))
    good = start + addresses + tlv(PP2_TYPE_CRC32C, crc32c(zeroed).to_bytes(4, "big"))
    header, _ = read(good)
    assert header is not None and header.source == ("127.0.0.1", 1)
    with pytest.raises(HeaderError, match="CRC32C does not match"):
        read(zeroed)
    assert crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C


def test_local_and_unix_headers_carry_no_address() -> None:
    """LOCAL (a proxy's health check) and the UNIX family leave the connection's addresses."""
    local = SIGNATURE + bytes.fromhex("2011000c") + bytes.fromhex("7F000001 7F000002 0001 0002")
    assert read(local)[0] == ProxyHeader(2)
    unix = SIGNATURE + bytes.fromhex("213100d8") + bytes(216)
    assert read(unix)[0] == ProxyHeader(2)


addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535)),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535)),
)


@given(addresses, addresses, st.integers(1, 2), st.lists(st.integers(1, 40), max_size=8))
def test_built_headers_read_back_in_any_chunking(
    source: tuple[str, int], destination: tuple[str, int], version: int, cuts: list[int]
) -> None:
    """What the builders make reads back to the same addresses, however it is cut, the rest intact."""
    data = (v1 if version == 1 else v2)(source, destination) + b"payload"
    reader, at, header = HeaderReader(), 0, None
    for cut in [*cuts, len(data)]:
        header = reader.feed(data[at : at + cut])
        at += cut
        if header is not None:
            break
    assert header is not None
    pair = [header.source, header.destination]
    if source[0].count(":") != destination[0].count(":") and ":" in source[0] + destination[0]:
        return  # mixed families are said as IPv6: checked above
    assert pair == [(str(ipaddress.ip_address(a[0])), a[1]) for a in (source, destination)]
    assert reader.rest + data[at:] == b"payload"


def _never_escapes(data: bytes, cuts: list[int]) -> None:
    reader, at = HeaderReader(), 0
    try:
        for cut in [*cuts, len(data)]:
            if reader.feed(data[at : at + cut]) is not None:
                break
            at += cut
            assert len(reader._buffer) <= MAX_V2  # memory stays bounded
    except HeaderError:
        pass


@given(st.binary(max_size=300), st.lists(st.integers(1, 50), max_size=10))
def test_random_input_never_escapes(data: bytes, cuts: list[int]) -> None:
    """Random bytes: a header, more needed, or a HeaderError; nothing else, memory bounded."""
    _never_escapes(data, cuts)


@given(
    st.sampled_from([b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", HAPROXY_VALID, HAPROXY_SENT_V2]),
    st.integers(0, 40),
    st.binary(max_size=8),
)
def test_truncated_and_mutated_headers_never_escape(base: bytes, at: int, noise: bytes) -> None:
    """A real header cut short or with bytes changed: more needed or refused, never an exception."""
    _never_escapes(base[: min(at, len(base))] + noise, [])
    mutated = bytearray(base)
    for i, byte in enumerate(noise):
        mutated[(at + i) % len(mutated)] = byte
    _never_escapes(bytes(mutated), [])


@pytest.mark.soak
@pytest.mark.skipif(os.environ.get("TUNNELKIT_SOAK") != "1", reason="TUNNELKIT_SOAK=1 only")
@settings(max_examples=10_000)
@given(st.binary(max_size=2000), st.lists(st.integers(1, 500), max_size=20))
def test_random_input_never_escapes_soak(data: bytes, cuts: list[int]) -> None:
    """The random-input property with 10,000 examples (TUNNELKIT_SOAK=1)."""
    _never_escapes(data, cuts)
