"""The upstream proxies' negotiations (HTTP CONNECT, SOCKS5) in memory, in any chunking."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnelkit.backends.via_handshake import (
    MAX_HEAD,
    HTTPConnect,
    Negotiation,
    Refusal,
    Send,
    Socks5Connect,
    Step,
    Through,
)


def run(
    negotiation: Negotiation, replies: bytes, cuts: list[int]
) -> tuple[list[bytes], Step | None]:
    """Feed ``replies`` cut at ``cuts``; what was sent (start first) and the last step.

    After a :class:`Through` the chunks left are the backend's: they join its ``rest``,
    as the relay would get them.
    """
    sent = [negotiation.start()]
    step: Step | None = None
    bounds = sorted(cuts)
    chunks = [replies[a:b] for a, b in zip([0, *bounds], [*bounds, len(replies)], strict=True)]
    for index, chunk in enumerate(chunks):
        step = negotiation.feed(chunk)
        while isinstance(step, Send):
            sent.append(step.data)
            step = negotiation.feed(b"")
        if isinstance(step, Through):
            return sent, Through(step.rest + b"".join(chunks[index + 1 :]))
        if step is not None:
            break
    return sent, step


def cuts_of(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=8)


# -- HTTP CONNECT ---------------------------------------------------------------

OK = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: x\r\n\r\n"


def test_connect_request_with_credentials() -> None:
    """CONNECT names host:port (IPv6 bracketed) and carries Basic credentials."""
    request = HTTPConnect("::1", 443, "alice", "p:ss").start()
    pair = base64.b64encode(b"alice:p:ss").decode()
    assert (
        request
        == (
            f"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\nProxy-Authorization: Basic {pair}\r\n\r\n"
        ).encode()
    )
    assert b"Authorization" not in HTTPConnect("db.internal", 5432).start()


@given(st.data(), st.binary(max_size=300))
def test_connect_any_chunking(data: st.DataObject, rest: bytes) -> None:
    """Any 2xx opens the tunnel in any chunking, and the bytes after the head are the backend's."""
    replies = OK + rest
    _, step = run(HTTPConnect("h", 1), replies, data.draw(cuts_of(replies)))
    assert step == Through(rest)


@pytest.mark.parametrize(
    ("reply", "credentials", "reason"),
    [
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", False, "proxy refused CONNECT h:1: HTTP 403 Forbidden"),
        (b"HTTP/1.0 502 Bad\x00Gateway\n\n", False, "proxy refused CONNECT h:1: HTTP 502 Bad?Gateway"),
        (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", False, "proxy authentication required: HTTP 407 Proxy Authentication Required (--via has none)"),
        (b"HTTP/1.1 407 No\r\n\r\n", True, "proxy authentication required: HTTP 407 No (the credentials of --via were refused)"),
        (b"\x05\x00", False, "not an HTTP proxy: its reply to CONNECT began '\\x05\\x00'".replace("\\x05\\x00", "??")),
        (b"HTTP/1.1 abc\r\n\r\n", False, "not an HTTP proxy: its reply to CONNECT began 'HTTP/1.1 abc????'"),
    ],
)  # fmt: skip
def test_connect_refusals(reply: bytes, credentials: bool, reason: str) -> None:
    """A refusal carries the proxy's status and phrase (printable only); non-HTTP is said so."""
    negotiation = HTTPConnect("h", 1, "u" if credentials else None, "p" if credentials else None)
    negotiation.start()
    assert negotiation.feed(reply) == Refusal(reason)


def test_connect_head_bounded() -> None:
    """A head that never ends is refused once it passes MAX_HEAD bytes."""
    negotiation = HTTPConnect("h", 1)
    assert negotiation.feed(b"HTTP/1.1 200 OK\r\n") is None
    step = negotiation.feed(b"X-Pad: " + b"a" * MAX_HEAD)
    assert isinstance(step, Refusal)


def test_connect_closed() -> None:
    """A proxy that closes says whether it had begun to answer."""
    negotiation = HTTPConnect("h", 1)
    assert negotiation.closed() == "the proxy closed the connection without answering CONNECT"
    negotiation.feed(b"HTTP/1.1 2")
    assert "in the middle of its reply" in negotiation.closed()


@given(st.binary(max_size=200), st.data())
def test_connect_random_replies(reply: bytes, data: st.DataObject) -> None:
    """Random replies in any chunking end in a step or a wait, never an exception."""
    run(HTTPConnect("h", 1), reply, data.draw(cuts_of(reply)))


# -- SOCKS5 ---------------------------------------------------------------------

SOCKS_OK_V4 = bytes([5, 0, 0, 1, 10, 0, 0, 1, 0x1F, 0x90])


@given(st.data(), st.binary(max_size=300), st.sampled_from(["v4", "v6", "name"]))
def test_socks5_any_chunking(data: st.DataObject, rest: bytes, bound: str) -> None:
    """With credentials: greeting, RFC 1929, request, then the backend's bytes, in any chunking."""
    bnd = {"v4": bytes([1, 1, 2, 3, 4]), "v6": bytes([4]) + bytes(16), "name": b"\x03\x04host"}[
        bound
    ]
    replies = b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00" + bnd + b"\x00\x50" + rest
    sent, step = run(
        Socks5Connect("db.internal", 5432, "alice", "pw"), replies, data.draw(cuts_of(replies))
    )
    assert step == Through(rest)
    assert sent == [
        b"\x05\x02\x00\x02",
        b"\x01\x05alice\x02pw",
        b"\x05\x01\x00\x03\x0bdb.internal\x15\x38",
    ]


def test_socks5_addresses() -> None:
    """IPv4 and IPv6 backends are sent as addresses, without credentials only method 0 is offered."""
    ipv4 = Socks5Connect("10.0.0.5", 443)
    assert ipv4.start() == b"\x05\x01\x00"
    assert ipv4.feed(b"\x05\x00") == Send(b"\x05\x01\x00\x01\x0a\x00\x00\x05\x01\xbb")
    ipv6 = Socks5Connect("::1", 1)
    ipv6.start()
    assert ipv6.feed(b"\x05\x00") == Send(b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x01")


@pytest.mark.parametrize(
    ("replies", "reason"),
    [
        (b"\x05\xff", "SOCKS5 proxy accepts no method offered (no authentication): reply 0xff"),
        (b"\x04\x00", "not a SOCKS5 proxy: it answered the greeting with 0400"),
        (b"\x05\x02", "SOCKS5 proxy chose a method not offered: 0x02"),
        (b"\x05\x00\x05\x02\x00\x01" + bytes(6), "SOCKS5 proxy refused CONNECT h:1: reply 0x02 (connection not allowed by ruleset)"),
        (b"\x05\x00\x05\x05\x00\x01" + bytes(6), "SOCKS5 proxy refused CONNECT h:1: reply 0x05 (connection refused)"),
        (b"\x05\x00\x05\x09\x00\x01" + bytes(6), "SOCKS5 proxy refused CONNECT h:1: reply 0x09 (unassigned)"),
        (b"\x05\x00\x05\x00\x00\x07" + bytes(6), "SOCKS5 proxy replied with an unknown address type 0x07"),
    ],
)  # fmt: skip
def test_socks5_refusals(replies: bytes, reason: str) -> None:
    """Each refusal carries the proxy's reply code and its RFC 1928 meaning."""
    _, step = run(Socks5Connect("h", 1), replies, [])
    assert step == Refusal(reason)


def test_socks5_bad_credentials() -> None:
    """An RFC 1929 failure status is a refusal that names it, never the password."""
    _, step = run(Socks5Connect("h", 1, "alice", "secret"), b"\x05\x02\x01\x01", [])
    assert step == Refusal("SOCKS5 proxy refused the credentials of --via: status 0x01")


def test_socks5_closed() -> None:
    """A proxy that closes mid-way says at which stage."""
    negotiation = Socks5Connect("h", 1, "a", "b")
    assert negotiation.closed().endswith("SOCKS5 greeting")
    run(negotiation, b"\x05\x02", [])
    assert negotiation.closed().endswith("SOCKS5 credentials")


@given(st.binary(max_size=300), st.data(), st.booleans())
def test_socks5_random_replies(reply: bytes, data: st.DataObject, credentials: bool) -> None:
    """Random replies in any chunking end in a step or a wait, never an exception."""
    negotiation = Socks5Connect("h", 1, *(("u", "p") if credentials else (None, None)))
    run(negotiation, reply, data.draw(cuts_of(reply)))
