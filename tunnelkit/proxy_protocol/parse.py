"""A strict, incremental reader of one PROXY protocol header (version 1 or 2).

Fed the first bytes of a connection in any chunking, :class:`HeaderReader`
says "more" (``None``), gives the :class:`ProxyHeader` and the bytes after
it, or raises :class:`HeaderError` with a fixed reason. Nothing is guessed:
a connection that does not start with a header, a malformed field, a
truncated TLV or a failed CRC32C is refused, and no more than
:data:`MAX_V1` or :data:`MAX_V2` bytes are ever kept. Imports nothing of the
reactor.
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

from tunnelkit.proxy_protocol.build import (
    LOCAL,
    PP2_TYPE_CRC32C,
    PROXY,
    TCP4,
    TCP6,
    UNSPEC,
    V2_SIGNATURE,
    Address,
)

#: The longest version 1 header, CRLF included (proxy-protocol.txt 2.1).
MAX_V1 = 107
#: The longest version 2 header accepted: its 16 fixed bytes and up to 16 KiB
#: of addresses and TLVs (HAProxy's default buffer holds no more).
MAX_V2 = 16 + 16384

_V1_PREFIX = b"PROXY "
#: Version 2 families whose addresses are read: (address bytes, IP version).
_FAMILIES = {TCP4: (4, 4), TCP6: (16, 6)}
_UNIX_STREAM, _UDP4, _UDP6, _UNIX_DGRAM = 0x31, 0x12, 0x22, 0x32


class HeaderError(ValueError):
    """The bytes are not one valid PROXY header; the message says why (fixed text)."""


@attrs.frozen
class ProxyHeader:
    """What a header said: its version, and the client's and the proxy's listening addresses.

    ``source`` and ``destination`` are ``None`` when the header carries no
    address to use (``PROXY UNKNOWN``, a ``LOCAL`` command such as a health
    check, the ``UNSPEC`` or UNIX families): the connection's own then stand.
    """

    version: int
    source: Address | None = None
    destination: Address | None = None
    #: Version 2's TLVs, ``(type, value)``, in order.
    tlvs: tuple[tuple[int, bytes], ...] = ()


class HeaderReader:
    """Reads one header from the bytes fed to it; :attr:`rest` is what followed it."""

    def __init__(self) -> None:
        self._buffer = b""
        self.rest = b""

    def feed(self, data: bytes) -> ProxyHeader | None:
        """The header once complete, ``None`` while more is needed; :class:`HeaderError` if invalid."""
        buffer = self._buffer = self._buffer + data
        if not buffer:
            return None
        if buffer[:1] == b"P":
            return self._v1(buffer)
        if buffer[:1] == b"\r":
            return self._v2(buffer)
        raise HeaderError("no PROXY protocol header")

    def _v1(self, buffer: bytes) -> ProxyHeader | None:
        if not buffer.startswith(_V1_PREFIX[: len(buffer)]):
            raise HeaderError("no PROXY protocol header")
        end = buffer.find(b"\r\n", 0, MAX_V1)
        if end < 0:
            if len(buffer) >= MAX_V1 or b"\n" in buffer or b"\r" in buffer[:-1]:
                raise HeaderError("PROXY v1 header: no CRLF within 107 bytes")
            return None
        self.rest = buffer[end + 2 :]
        self._buffer = b""
        return parse_v1(buffer[:end])

    def _v2(self, buffer: bytes) -> ProxyHeader | None:
        if not buffer.startswith(V2_SIGNATURE[: len(buffer)]):
            raise HeaderError("no PROXY protocol header")
        if len(buffer) < 16:
            return None
        (length,) = struct.unpack_from("!H", buffer, 14)
        if 16 + length > MAX_V2:
            raise HeaderError(f"PROXY v2 header: longer than {MAX_V2} bytes")
        if len(buffer) < 16 + length:
            return None
        self.rest = buffer[16 + length :]
        self._buffer = b""
        return parse_v2(buffer[: 16 + length])


def parse_v1(line: bytes) -> ProxyHeader:
    """A version 1 header line without its CRLF."""
    fields = line.split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return ProxyHeader(1)  # what follows UNKNOWN is to be ignored
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise HeaderError("PROXY v1 header: not TCP4, TCP6 or UNKNOWN with four fields")
    version = 4 if fields[1] == b"TCP4" else 6
    source = _v1_address(fields[2], fields[4], version)
    destination = _v1_address(fields[3], fields[5], version)
    return ProxyHeader(1, source, destination)


def _v1_address(host: bytes, port: bytes, version: int) -> Address:
    try:
        if b"%" in host:  # a zone index means nothing to the receiver
            raise ValueError(host)
        ip = ipaddress.ip_address(host.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise HeaderError("PROXY v1 header: an address is not an IP address") from None
    if ip.version != version:
        raise HeaderError("PROXY v1 header: an address is not of the family named")
    return str(ip), _v1_port(port)


def _v1_port(text: bytes) -> int:
    # Decimal digits only, no sign, no leading zero: int() would take more.
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[:1] == b"0"):
        raise HeaderError("PROXY v1 header: a port is not a number from 0 to 65535")
    port = int(text)
    if port > 65535:
        raise HeaderError("PROXY v1 header: a port is not a number from 0 to 65535")
    return port


def parse_v2(header: bytes) -> ProxyHeader:
    """A whole version 2 header (its 16 fixed bytes and the length they announce)."""
    command, family = header[12], header[13]
    if command not in (LOCAL, PROXY):
        raise HeaderError("PROXY v2 header: not version 2, or a command other than LOCAL and PROXY")
    body = header[16:]
    if family in (_UDP4, _UDP6, _UNIX_DGRAM):
        raise HeaderError("PROXY v2 header: a datagram family on a stream connection")
    if family not in (UNSPEC, TCP4, TCP6, _UNIX_STREAM):
        raise HeaderError("PROXY v2 header: an unknown address family")
    size = 216 if family == _UNIX_STREAM else 0
    source = destination = None
    if family in _FAMILIES:
        width, version = _FAMILIES[family]
        size = 2 * width + 4
        if len(body) < size:
            raise HeaderError("PROXY v2 header: too short for its addresses")
        make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        ports = struct.unpack_from("!HH", body, 2 * width)
        source = (str(make(body[:width])), ports[0])
        destination = (str(make(body[width : 2 * width])), ports[1])
    elif len(body) < size:
        raise HeaderError("PROXY v2 header: too short for its addresses")
    tlvs = _tlvs(header, 16 + size)
    if command == LOCAL or family in (UNSPEC, _UNIX_STREAM):
        # Not a proxied client (LOCAL: the proxy's own health check) or no IP
        # address to stand for one: the connection's own addresses stand.
        return ProxyHeader(2, tlvs=tlvs)
    return ProxyHeader(2, source, destination, tlvs)


def _tlvs(header: bytes, at: int) -> tuple[tuple[int, bytes], ...]:
    found = []
    while at < len(header):
        if len(header) - at < 3:
            raise HeaderError("PROXY v2 header: a truncated TLV")
        kind, length = struct.unpack_from("!BH", header, at)
        value = header[at + 3 : at + 3 + length]
        if len(value) != length:
            raise HeaderError("PROXY v2 header: a truncated TLV")
        if kind == PP2_TYPE_CRC32C:
            _check_crc(header, at + 3, value)
        found.append((kind, value))
        at += 3 + length
    return tuple(found)


def _check_crc(header: bytes, at: int, value: bytes) -> None:
    """The CRC32C TLV: the checksum of the whole header with its own value zeroed."""
    if len(value) != 4:
        raise HeaderError("PROXY v2 header: a CRC32C TLV of other than 4 bytes")
    zeroed = header[:at] + b"\0\0\0\0" + header[at + 4 :]
    if struct.unpack("!I", value)[0] != crc32c(zeroed):
        raise HeaderError("PROXY v2 header: its CRC32C does not match")


def _crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the ``PP2_TYPE_CRC32C`` TLV holds it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
