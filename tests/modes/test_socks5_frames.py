"""The SOCKS5 negotiation parser and replies in memory: every frame, every refusal, any chunking."""

from __future__ import annotations

import ipaddress
import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelkit.modes.socks5_frames import (
    MAX_CREDENTIALS,
    MAX_GREETING,
    MAX_REQUEST,
    Credentials,
    Frame,
    FrameError,
    Greeting,
    NegotiationParser,
    Reason,
    Reply,
    Request,
    auth_status,
    reply,
)

SOAK = os.environ.get("TUNNELKIT_SOAK") == "1"

NO_AUTH_GREETING = b"\x05\x01\x00"
AUTH_GREETING = b"\x05\x02\x00\x02"


def connect(atyp: int, address: bytes, port: int = 443) -> bytes:
    """A CONNECT request frame."""
    return bytes((5, 1, 0, atyp)) + address + port.to_bytes(2, "big")


def domain(name: bytes, port: int = 443) -> bytes:
    return connect(3, bytes((len(name),)) + name, port)


def credentials(user: bytes, password: bytes) -> bytes:
    return bytes((1, len(user))) + user + bytes((len(password),)) + password


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feed(chunks: list[bytes], *, authenticates: bool = False) -> tuple[list[Frame], bytes]:
    """Every frame the chunks give, and the bytes never fed (after the parser is done)."""
    parser = NegotiationParser(authenticates=authenticates)
    frames: list[Frame] = []
    for i, chunk in enumerate(chunks):
        frames += parser.feed(chunk)
        if parser.done:
            return frames, b"".join(chunks[i + 1 :])
    return frames, b""


def parse(data: bytes, *, authenticates: bool = False) -> list[Frame]:
    return feed([data], authenticates=authenticates)[0]


def last_error(data: bytes, *, authenticates: bool = False) -> FrameError:
    frames = parse(data, authenticates=authenticates)
    assert frames and isinstance(frames[-1], FrameError), frames
    return frames[-1]


# -- the frames ---------------------------------------------------------------------


def test_no_auth_greeting_and_ipv4_request() -> None:
    """Greeting, then a request for 93.184.216.34:443, with the bytes after it as rest."""
    data = NO_AUTH_GREETING + connect(1, bytes((93, 184, 216, 34))) + b"hello"
    assert parse(data) == [Greeting(0x00), Request("93.184.216.34", 443, b"hello")]


def test_ipv6_and_domain_targets() -> None:
    """IPv6 addresses come out in standard text (no brackets), names as sent."""
    v6 = ipaddress.IPv6Address("2001:db8::1").packed
    [_, request] = parse(NO_AUTH_GREETING + connect(4, v6, 8443))
    assert request == Request("2001:db8::1", 8443, b"")
    assert isinstance(request, Request) and request.authority == "[2001:db8::1]:8443"
    [_, request] = parse(NO_AUTH_GREETING + domain(b"Example.ORG.", 80))
    assert request == Request("Example.ORG.", 80, b"")


def test_auth_greeting_credentials_then_request() -> None:
    """With auth, 0x02 is chosen and the sub-negotiation comes before the request."""
    data = AUTH_GREETING + credentials(b"alice", "pässword".encode()) + domain(b"a.example")
    frames = parse(data, authenticates=True)
    assert frames == [
        Greeting(0x02),
        Credentials("alice", "pässword"),
        Request("a.example", 443, b""),
    ]
    assert "pässword" not in repr(frames)


def test_only_the_configured_method_is_chosen() -> None:
    """With auth configured 0x00 is never chosen, and without it 0x02 is never chosen."""
    assert last_error(NO_AUTH_GREETING, authenticates=True) == FrameError(
        Reason.NO_ACCEPTABLE_METHOD, b"\x05\xff"
    )
    assert last_error(b"\x05\x01\x02") == FrameError(Reason.NO_ACCEPTABLE_METHOD, b"\x05\xff")
    assert parse(b"\x05\x03\x02\x01\x00") == [Greeting(0x00)]
    assert last_error(b"\x05\x00") == FrameError(Reason.NO_ACCEPTABLE_METHOD, b"\x05\xff")


def test_empty_password_is_a_credential() -> None:
    """PLEN 0 is an empty password (the check decides); ULEN 0 is refused with 01 01."""
    frames = parse(AUTH_GREETING + credentials(b"bob", b""), authenticates=True)
    assert frames[-1] == Credentials("bob", "")
    error = last_error(AUTH_GREETING + credentials(b"", b"x"), authenticates=True)
    assert error == FrameError(Reason.EMPTY_USER, auth_status(False))


@pytest.mark.parametrize(
    ("data", "reason", "answer"),
    [
        (b"\x04\x01\x00\x50", Reason.NOT_SOCKS5, b""),
        (b"GET / HTTP/1.1\r\n", Reason.NOT_SOCKS5, b""),
        (NO_AUTH_GREETING + b"\x04\x01\x00\x01", Reason.BAD_REQUEST_VERSION, b""),
        (
            NO_AUTH_GREETING + connect(1, bytes(4)).replace(b"\x05\x01", b"\x05\x02", 1),
            Reason.UNSUPPORTED_COMMAND,
            reply(Reply.COMMAND_NOT_SUPPORTED),
        ),
        (
            NO_AUTH_GREETING + b"\x05\x03",
            Reason.UNSUPPORTED_COMMAND,
            reply(Reply.COMMAND_NOT_SUPPORTED),
        ),
        (NO_AUTH_GREETING + b"\x05\x01\x01", Reason.BAD_RESERVED, reply(Reply.GENERAL_FAILURE)),
        (
            NO_AUTH_GREETING + b"\x05\x01\x00\x02",
            Reason.UNSUPPORTED_ADDRESS_TYPE,
            reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        ),
        (NO_AUTH_GREETING + domain(b""), Reason.BAD_NAME, reply(Reply.GENERAL_FAILURE)),
        (NO_AUTH_GREETING + domain(b"a b"), Reason.BAD_NAME, reply(Reply.GENERAL_FAILURE)),
        (NO_AUTH_GREETING + domain(b"a\x00b"), Reason.BAD_NAME, reply(Reply.GENERAL_FAILURE)),
        (NO_AUTH_GREETING + domain(b"a", 0), Reason.PORT_ZERO, reply(Reply.GENERAL_FAILURE)),
    ],
)
def test_bad_frames_end_with_a_fixed_answer(data: bytes, reason: Reason, answer: bytes) -> None:
    """Each problem has its fixed reason and answer: a reply code, or nothing for non-SOCKS5."""
    error = last_error(data)
    assert (error.reason, error.answer) == (reason, answer)


def test_unsupported_command_is_known_at_its_byte() -> None:
    """BIND (0x02) and UDP ASSOCIATE (0x03) are refused as soon as the command byte arrives."""
    for command in (2, 3):
        error = last_error(NO_AUTH_GREETING + bytes((5, command)))
        assert error.reply is Reply.COMMAND_NOT_SUPPORTED


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\x02\x05alice\x01x", Reason.BAD_AUTH_VERSION),
        (credentials(b"\xff\xfe", b"x"), Reason.CREDENTIALS_NOT_UTF8),
        (credentials(b"alice", b"\xc3"), Reason.CREDENTIALS_NOT_UTF8),
    ],
)
def test_bad_credentials_frames_answer_01_01(frame: bytes, reason: Reason) -> None:
    """A sub-negotiation of another version, or not UTF-8, gets status 1 (failure)."""
    assert last_error(AUTH_GREETING + frame, authenticates=True) == FrameError(reason, b"\x01\x01")


def test_feeding_after_the_outcome_is_a_bug() -> None:
    """Once done, more bytes belong to the caller (the hold), not the parser."""
    parser = NegotiationParser(authenticates=False)
    parser.feed(NO_AUTH_GREETING + domain(b"a"))
    assert parser.done
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


def test_replies() -> None:
    """Replies carry BND.ADDR/PORT in the address's own type; 0.0.0.0:0 when none."""
    v4 = ipaddress.IPv4Address("127.0.0.1")
    v6 = ipaddress.IPv6Address("::1")
    assert reply(Reply.SUCCEEDED, (v4, 0x1234)) == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x12\x34"
    assert reply(Reply.SUCCEEDED, (v6, 80)) == b"\x05\x00\x00\x04" + v6.packed + b"\x00\x50"
    assert reply(Reply.CONNECTION_REFUSED) == b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"


# -- any chunking, any input ----------------------------------------------------------

_names = st.text("abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=255).map(str.encode)
_text_bytes = st.text(max_size=40).map(str.encode).filter(lambda b: 0 < len(b) < 256)


@st.composite
def negotiations(draw: st.DrawFn) -> tuple[bytes, bool, list[Frame]]:
    """A valid negotiation (with or without auth), the bytes after it, and the frames it gives."""
    authenticates = draw(st.booleans())
    others = draw(st.lists(st.integers(0, 254), max_size=6))
    wanted = 0x02 if authenticates else 0x00
    methods = bytes([*others, wanted])
    data = bytes((5, len(methods))) + methods
    frames: list[Frame] = [Greeting(wanted)]
    if authenticates:
        user = draw(_text_bytes)
        password = draw(_text_bytes | st.just(b""))
        data += credentials(user, password)
        frames.append(Credentials(user.decode(), password.decode()))
    port = draw(st.integers(1, 65535))
    kind = draw(st.sampled_from(["v4", "v6", "name"]))
    if kind == "name":
        name = draw(_names)
        data += domain(name, port)
        host = name.decode()
    else:
        address = ipaddress.ip_address(draw(st.binary(min_size=4, max_size=4)))
        if kind == "v6":
            address = ipaddress.ip_address(draw(st.binary(min_size=16, max_size=16)))
        data += connect(1 if kind == "v4" else 4, address.packed, port)
        host = str(address)
    rest = draw(st.binary(max_size=64))
    frames.append(Request(host, port, rest))
    return data + rest, authenticates, frames


def without_rest(frames: list[Frame]) -> list[Frame]:
    return [Request(f.host, f.port, b"") if isinstance(f, Request) else f for f in frames]


def rest_of(frames: list[Frame]) -> bytes:
    return b"".join(f.rest for f in frames if isinstance(f, Request))


@given(negotiations(), st.lists(st.integers(0, 1200), max_size=20))
def test_any_chunking_of_a_valid_negotiation_parses_the_same(
    case: tuple[bytes, bool, list[Frame]], cuts: list[int]
) -> None:
    """Whatever the chunking, the same frames come out and rest plus unfed bytes is exact."""
    data, authenticates, expected = case
    frames, unfed = feed(split(data, cuts), authenticates=authenticates)
    assert without_rest(frames) == without_rest(expected)
    assert rest_of(frames) + unfed == rest_of(expected)


_PIECES = [
    b"\x05",
    b"\x01",
    b"\x00",
    b"\x02",
    b"\x03",
    b"\x04",
    b"\xff",
    b"\x05\x01\x00",
    b"\x05\x02\x00\x02",
    b"\x01\x05alice\x03pwd",
    b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
    b"\x05\x01\x00\x03\x09a.example\x01\xbb",
    b"\x05\x01\x00\x04" + bytes(16) + b"\x00\x01",
    b"a",
    b"\x00\x00\x00\x00",
]


def _outcome(chunks: list[bytes], authenticates: bool) -> tuple[object, ...]:
    parser = NegotiationParser(authenticates=authenticates)
    frames: list[Frame] = []
    unfed = b""
    for i, chunk in enumerate(chunks):
        frames += parser.feed(chunk)
        assert parser.buffered <= max(MAX_GREETING, MAX_CREDENTIALS, MAX_REQUEST)
        if parser.done:
            # After a request the unfed bytes are the target's; after an error, nobody's.
            unfed = b"".join(chunks[i + 1 :]) if isinstance(frames[-1], Request) else b""
            break
    return tuple(without_rest(frames)), rest_of(frames) + unfed, parser.done


def _check_any_input(authenticates: bool, data: bytes, cuts: list[int]) -> None:
    whole = _outcome([data], authenticates)
    assert _outcome(split(data, cuts), authenticates) == whole
    assert _outcome([data[i : i + 1] for i in range(len(data))], authenticates) == whole
    # A truncated input gives the first frames of the whole, never another verdict.
    frames, _, _ = _outcome([data[: len(data) // 2]], authenticates)
    assert frames == whole[0][: len(frames)]


_any_input = (
    st.booleans(),
    st.lists(st.sampled_from(_PIECES), max_size=12).map(b"".join) | st.binary(max_size=600),
    st.lists(st.integers(0, 700), max_size=12),
)


@given(*_any_input)
def test_outcome_never_depends_on_chunking(
    authenticates: bool, data: bytes, cuts: list[int]
) -> None:
    """Valid, random or truncated input: the same outcome whole, in chunks and byte by byte; no exception; bounded buffer."""
    _check_any_input(authenticates, data, cuts)


@pytest.mark.soak
@pytest.mark.skipif(not SOAK, reason="10,000 examples: TUNNELKIT_SOAK=1")
@settings(max_examples=10_000)
@given(*_any_input)
def test_outcome_never_depends_on_chunking_soak(
    authenticates: bool, data: bytes, cuts: list[int]
) -> None:
    """The same property over 10,000 inputs."""
    _check_any_input(authenticates, data, cuts)
