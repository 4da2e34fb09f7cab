"""The CONNECT request head parser and the Proxy-Authorization helper."""

from __future__ import annotations

import base64
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnelkit.modes.connect_request import (
    BasicCredentials,
    ConnectRequest,
    ConnectRequestParser,
    Reason,
    RequestError,
    proxy_credentials,
)

CLIENT_HELLO = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32))

# Request heads captured from real clients (docs: reliability-research.md, section 5).
CURL_P = (
    b"CONNECT example.invalid:8080 HTTP/1.1\r\nHost: example.invalid:8080\r\n"
    b"User-Agent: curl/7.88.1\r\nProxy-Connection: Keep-Alive\r\n\r\n"
)
OPENSSL = b"CONNECT example.invalid:443 HTTP/1.0\r\nProxy-Connection: Keep-Alive\r\n\r\n"
PYTHON_HTTP_CLIENT = b"CONNECT example.invalid:443 HTTP/1.0\r\n\r\n"


def parse(data: bytes, **limits: int) -> ConnectRequest | RequestError | None:
    return ConnectRequestParser(**limits).feed(data)


def feed_chunks(
    chunks: list[bytes], **limits: int
) -> tuple[ConnectRequest | RequestError | None, bytes]:
    """Feed chunks until an outcome; return it and the bytes that were never fed."""
    parser = ConnectRequestParser(**limits)
    for i, chunk in enumerate(chunks):
        result = parser.feed(chunk)
        if result is not None:
            return result, b"".join(chunks[i + 1 :])
    return None, b""


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def error(data: bytes, **limits: int) -> RequestError:
    result = parse(data, **limits)
    assert isinstance(result, RequestError), result
    return result


# -- accepted requests --------------------------------------------------------


def test_curl_request_parses() -> None:
    """curl's HTTP/1.1 CONNECT with Host gives target, version and headers in order."""
    result = parse(CURL_P)
    assert result == ConnectRequest(
        "CONNECT",
        "example.invalid",
        8080,
        "HTTP/1.1",
        (
            ("Host", "example.invalid:8080"),
            ("User-Agent", "curl/7.88.1"),
            ("Proxy-Connection", "Keep-Alive"),
        ),
        b"",
    )


@pytest.mark.parametrize("head", [OPENSSL, PYTHON_HTTP_CLIENT])
def test_http10_without_host_parses(head: bytes) -> None:
    """openssl s_client and Python http.client send HTTP/1.0 with no Host: accepted."""
    result = parse(head)
    assert isinstance(result, ConnectRequest)
    assert (result.host, result.port, result.version) == ("example.invalid", 443, "HTTP/1.0")


def test_http11_without_host_parses() -> None:
    """HTTP/1.1 without Host is accepted too (the authority is in the request line)."""
    result = parse(b"CONNECT example.org:443 HTTP/1.1\r\n\r\n")
    assert isinstance(result, ConnectRequest)
    assert result.headers == ()


def test_ipv6_authority() -> None:
    """``[v6]:port`` gives the host without brackets; ``authority`` puts them back."""
    result = parse(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\r\n")
    assert isinstance(result, ConnectRequest)
    assert (result.host, result.port, result.authority) == ("2001:db8::1", 443, "[2001:db8::1]:443")


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        (b"a:1", "a", 1),
        (b"example.org.:65535", "example.org.", 65535),
        (b"10.0.0.1:22", "10.0.0.1", 22),
        (b"_srv.example:8443", "_srv.example", 8443),
        (b"[::ffff:127.0.0.1]:80", "::ffff:127.0.0.1", 80),
    ],
)
def test_authority_forms(target: bytes, host: str, port: int) -> None:
    """Names, IPv4 and IPv6 literals and ports 1 and 65535 are accepted as sent."""
    result = parse(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n")
    assert isinstance(result, ConnectRequest)
    assert (result.host, result.port) == (host, port)


def test_pipelined_bytes_are_returned_exactly() -> None:
    """A ClientHello sent in the same write as the head comes back untouched in ``rest``."""
    result = parse(PYTHON_HTTP_CLIENT + CLIENT_HELLO)
    assert isinstance(result, ConnectRequest)
    assert result.rest == CLIENT_HELLO


def test_rest_that_looks_like_a_request_is_not_parsed() -> None:
    """Bytes after the blank line are tunnel data, even when they look like HTTP."""
    smuggled = b"GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n"
    result = parse(OPENSSL + smuggled)
    assert isinstance(result, ConnectRequest)
    assert result.rest == smuggled


def test_byte_at_a_time_gives_the_same_request() -> None:
    """Feeding one byte per call yields the same request and no rest bytes lost."""
    data = CURL_P + CLIENT_HELLO
    result, unfed = feed_chunks([data[i : i + 1] for i in range(len(data))])
    assert isinstance(result, ConnectRequest)
    assert result.rest + unfed == CLIENT_HELLO
    assert result.headers == parse(CURL_P).headers  # type: ignore[union-attr]


def test_header_value_whitespace_is_trimmed_and_obs_text_kept() -> None:
    """Spaces and tabs around a value go; inner ones and obs-text bytes stay (as Latin-1)."""
    result = parse(b"CONNECT a:1 HTTP/1.1\r\nX-A:\t one  two \t\r\nX-B:\xe9\r\nX-C:\r\n\r\n")
    assert isinstance(result, ConnectRequest)
    assert result.headers == (("X-A", "one  two"), ("X-B", "\xe9"), ("X-C", ""))


def test_header_values_lookup_is_case_insensitive() -> None:
    """``header_values`` finds every field of a name whatever its case."""
    result = parse(b"CONNECT a:1 HTTP/1.1\r\nX-Y: 1\r\nx-y: 2\r\n\r\n")
    assert isinstance(result, ConnectRequest)
    assert result.header_values("X-y") == ["1", "2"]


def test_repr_hides_credentials_and_tunnel_bytes() -> None:
    """The repr shows neither the Proxy-Authorization value nor the rest bytes."""
    result = parse(
        b"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Basic c2VjcmV0OnB3\r\n\r\nTOPSECRET"
    )
    assert isinstance(result, ConnectRequest)
    text = repr(result)
    assert "c2VjcmV0OnB3" not in text
    assert "TOPSECRET" not in text
    assert "<9 bytes>" in text


def test_feeding_after_the_outcome_is_a_bug() -> None:
    """Once the head is complete the parser refuses more input instead of losing it."""
    parser = ConnectRequestParser()
    assert parser.feed(PYTHON_HTTP_CLIENT) is not None
    with pytest.raises(RuntimeError):
        parser.feed(b"more")


def test_incomplete_head_returns_none() -> None:
    """Without the blank line there is no outcome yet."""
    parser = ConnectRequestParser()
    assert parser.feed(b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n") is None
    assert parser.feed(b"\r") is None
    assert isinstance(parser.feed(b"\n"), ConnectRequest)


# -- refused request lines ------------------------------------------------------


@pytest.mark.parametrize("method", [b"GET", b"POST", b"connect", b"OPTIONS", b"PRI"])
def test_other_methods_get_405_with_allow(method: bytes) -> None:
    """Any other method token (methods are case-sensitive) is 405 with ``Allow: CONNECT``."""
    result = error(method + b" http://a/ HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (result.status, result.reason) == (405, Reason.METHOD_NOT_ALLOWED)
    assert result.headers == (("Allow", "CONNECT"),)
    assert result.phrase == "Method Not Allowed"


def test_405_is_answered_before_the_headers_arrive() -> None:
    """A wrong method is refused as soon as the request line ends."""
    assert isinstance(parse(b"GET / HTTP/1.1\r\n"), RequestError)


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9"])
def test_other_versions_get_505(version: bytes) -> None:
    """Well-formed versions other than 1.0 and 1.1 are 505."""
    assert error(b"CONNECT a:1 " + version + b"\r\n\r\n").status == 505


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"CONNECT a:1 http/1.1", Reason.BAD_VERSION),
        (b"CONNECT a:1 HTTP/1.1.1", Reason.BAD_VERSION),
        (b"CONNECT a:1 HTTP/11", Reason.BAD_VERSION),
        (b"CONNECT  a:1 HTTP/1.1", Reason.BAD_REQUEST_LINE),
        (b"CONNECT a:1  HTTP/1.1", Reason.BAD_REQUEST_LINE),
        (b"CONNECT a:1 HTTP/1.1 ", Reason.BAD_REQUEST_LINE),
        (b" CONNECT a:1 HTTP/1.1", Reason.BAD_REQUEST_LINE),
        (b"CONNECT\ta:1\tHTTP/1.1", Reason.BAD_REQUEST_LINE),
        (b"CONNECT a:1", Reason.BAD_REQUEST_LINE),
        (b"CONNECT", Reason.BAD_REQUEST_LINE),
        (b"CONN(ECT a:1 HTTP/1.1", Reason.BAD_METHOD),
        (b"", Reason.EMPTY_REQUEST_LINE),
    ],
)
def test_malformed_request_lines_get_400(line: bytes, reason: Reason) -> None:
    """Extra or missing spaces, tabs, bad versions and bad method tokens are 400."""
    result = error(line + b"\r\n\r\n")
    assert (result.status, result.reason) == (400, reason)


@pytest.mark.parametrize(
    "target",
    [
        b"example.org",
        b"example.org:",
        b":443",
        b"/",
        b"*",
        b"http://example.org:80",
        b"example.org:80/",
        b"example.org:0",
        b"example.org:65536",
        b"example.org:99999",
        b"example.org:123456",
        b"example.org:+443",
        b"example.org:-1",
        b"example.org:0443",
        b"user@example.org:443",
        b"exa%6dple.org:443",
        b"a..b:443",
        b".example.org:443",
        b"example.org..:443",
        b"[::1]",
        b"::1:443",
        b"[zz::1]:443",
        b"[fe80::1%25eth0]:443",
        b"[example.com]:443",
        b"[v1.x]:443",
        b"\xc3\xa9.example:443",
        b"a" * 64 + b".example:443",
        b"a." * 127 + b"aa:443",
    ],
)
def test_non_authority_targets_get_400(target: bytes) -> None:
    """Only ``host:port`` and ``[v6]:port`` with port 1-65535 (one spelling) are accepted."""
    result = error(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n")
    assert (result.status, result.reason) == (400, Reason.BAD_AUTHORITY)


# -- refused header sections -----------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"CONNECT a:1 HTTP/1.1\nHost: a:1\r\n\r\n", Reason.BARE_LF),
        (b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\n\r\n", Reason.BARE_LF),
        (b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\n", Reason.BARE_LF),
        (b"CONNECT a:1 HTTP/1.1\rHost: a:1\r\n\r\n", Reason.BARE_CR),
        (b"CONNECT a:1 HTTP/1.1\r\nX: a\rb\r\n\r\n", Reason.BARE_CR),
        (b"CONNECT a:1 HTTP/1.1\r\nX: a\r\r\n\r\n", Reason.BARE_CR),
        (b"CONNECT a:1 HTTP/1.1\r\nX: a\x00b\r\n\r\n", Reason.NUL),
        (b"CONNECT a:1\x00 HTTP/1.1\r\n\r\n", Reason.NUL),
        (b"CONNECT a:1 HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", Reason.OBS_FOLD),
        (b"CONNECT a:1 HTTP/1.1\r\n\tX: a\r\n\r\n", Reason.OBS_FOLD),
        (b"CONNECT a:1 HTTP/1.1\r\nX : a\r\n\r\n", Reason.SPACE_BEFORE_COLON),
        (b"CONNECT a:1 HTTP/1.1\r\nX\t: a\r\n\r\n", Reason.SPACE_BEFORE_COLON),
        (b"CONNECT a:1 HTTP/1.1\r\nX(Y): a\r\n\r\n", Reason.BAD_HEADER_NAME),
        (b"CONNECT a:1 HTTP/1.1\r\n: a\r\n\r\n", Reason.BAD_HEADER_NAME),
        (b"CONNECT a:1 HTTP/1.1\r\nX\xe9: a\r\n\r\n", Reason.BAD_HEADER_NAME),
        (b"CONNECT a:1 HTTP/1.1\r\nNoColon\r\n\r\n", Reason.NO_COLON),
        (b"CONNECT a:1 HTTP/1.1\r\nX: a\x01b\r\n\r\n", Reason.BAD_HEADER_VALUE),
        (b"CONNECT a:1 HTTP/1.1\r\nX: a\x7f\r\n\r\n", Reason.BAD_HEADER_VALUE),
        (b"CONNECT a:1 HTTP/1.1\r\nContent-Length: 0\r\n\r\n", Reason.BODY_FRAMING),
        (b"CONNECT a:1 HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", Reason.BODY_FRAMING),
        (b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\nhost: a:1\r\n\r\n", Reason.DUPLICATE_HOST),
        (b"CONNECT a:1 HTTP/1.1\r\nHost: a b\r\n\r\n", Reason.BAD_HOST),
        (b"CONNECT a:1 HTTP/1.1\r\nHost:\r\n\r\n", Reason.BAD_HOST),
        (b"CONNECT a:1 HTTP/1.1\r\nHost: a:0\r\n\r\n", Reason.BAD_HOST),
    ],
)
def test_strict_grammar_violations_get_400(head: bytes, reason: Reason) -> None:
    """Bare CR/LF, NUL, obs-fold, space before colon, bad names/values, CL/TE, bad Host: 400."""
    result = error(head)
    assert (result.status, result.reason) == (400, reason)
    assert result.headers == ()


@pytest.mark.parametrize("host", [b"a", b"a:1", b"other.example:8080", b"[::1]", b"[::1]:443"])
def test_host_forms_accepted(host: bytes) -> None:
    """One Host with or without a port, even one that differs from the target, is accepted."""
    assert isinstance(parse(b"CONNECT a:1 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"), ConnectRequest)


# -- limits ---------------------------------------------------------------------------


def test_request_line_at_the_limit_parses_and_one_more_byte_is_414() -> None:
    """The request line may be exactly max_request_line bytes; one more is 414."""
    line = b"CONNECT " + b"a" * 12 + b":1 HTTP/1.1"
    limit = len(line)
    assert isinstance(parse(line + b"\r\n\r\n", max_request_line=limit), ConnectRequest)
    result = error(line + b"\r\n\r\n", max_request_line=limit - 1)
    assert (result.status, result.reason) == (414, Reason.REQUEST_LINE_TOO_LONG)


def test_header_section_at_the_limit_parses_and_one_more_byte_is_431() -> None:
    """The header section (lines, CRLFs and the final CRLF) may fill max_header_bytes exactly."""
    section = b"X-A: 12345\r\nX-B: 6\r\n\r\n"
    head = b"CONNECT a:1 HTTP/1.1\r\n" + section
    assert isinstance(parse(head, max_header_bytes=len(section)), ConnectRequest)
    result = error(head, max_header_bytes=len(section) - 1)
    assert (result.status, result.reason) == (431, Reason.HEADERS_TOO_LARGE)


def test_header_count_limit_is_431() -> None:
    """100 header fields are accepted by default; the 101st is 431."""
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(100))
    assert isinstance(parse(b"CONNECT a:1 HTTP/1.1\r\n" + fields + b"\r\n"), ConnectRequest)
    result = error(b"CONNECT a:1 HTTP/1.1\r\n" + fields + b"X-Last: v\r\n\r\n")
    assert (result.status, result.reason) == (431, Reason.TOO_MANY_HEADERS)
    assert result.phrase == "Request Header Fields Too Large"


def test_ten_thousand_headers_stop_at_the_limit() -> None:
    """A flood of tiny headers is refused without reading it all."""
    flood = b"CONNECT a:1 HTTP/1.1\r\n" + b"X: v\r\n" * 10_000
    assert error(flood).status == 431


def test_endless_request_line_fails_before_its_end() -> None:
    """1 MiB with no CRLF is refused at the chunk that crosses 8 KiB, holding at most 8 KiB."""
    parser = ConnectRequestParser()
    chunk = b"a" * 1000
    fed = 0
    result = None
    for _ in range(1024):
        result = parser.feed(chunk)
        fed += len(chunk)
        if result is not None:
            break
        assert parser.buffered <= 8192 + 1
    assert isinstance(result, RequestError)
    assert result.status == 414
    assert fed == 9000


def test_endless_header_line_fails_before_its_end() -> None:
    """A header value that never ends is refused at the chunk that crosses 16 KiB."""
    parser = ConnectRequestParser()
    assert parser.feed(b"CONNECT a:1 HTTP/1.1\r\nCookie: ") is None
    fed = 0
    result = None
    while result is None and fed < 1 << 20:
        result = parser.feed(b"c" * 1000)
        fed += 1000
        assert result is not None or parser.buffered <= 16384
    assert isinstance(result, RequestError)
    assert result.status == 431
    assert fed == 17000


@pytest.mark.parametrize("limit", ["max_request_line", "max_header_bytes", "max_headers"])
def test_limits_must_be_positive(limit: str) -> None:
    """A zero limit is a configuration error, not a parser that refuses everything."""
    with pytest.raises(ValueError, match="positive"):
        ConnectRequestParser(**{limit: 0})


# -- properties ---------------------------------------------------------------------

_label = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=10)
_name = st.lists(_label, min_size=1, max_size=4).map(".".join).filter(lambda n: not n.isdigit())
_authority = st.one_of(
    _name,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
)
_token = st.text(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    min_size=1,
    max_size=12,
).filter(lambda n: n.lower() not in ("host", "content-length", "transfer-encoding"))
_value = st.binary(max_size=30).map(
    lambda b: bytes(c for c in b if c in (9, 32) or 0x21 <= c <= 0x7E or c >= 0x80)
)
_ows = st.sampled_from([b"", b" ", b"\t", b"  \t"])


@st.composite
def valid_heads(draw: st.DrawFn) -> tuple[bytes, ConnectRequest]:
    """A valid CONNECT head, the bytes after it, and the request the parser must return."""
    authority = draw(_authority)
    port = draw(st.integers(1, 65535))
    version = draw(st.sampled_from(["HTTP/1.0", "HTTP/1.1"]))
    head = f"CONNECT {authority}:{port} {version}\r\n".encode()
    headers: list[tuple[str, str]] = []
    if draw(st.booleans()):
        head += f"Host: {authority}:{port}\r\n".encode()
        headers.append(("Host", f"{authority}:{port}"))
    for _ in range(draw(st.integers(0, 12))):
        name, value = draw(_token), draw(_value)
        head += name.encode() + b":" + draw(_ows) + value + draw(_ows) + b"\r\n"
        headers.append((name, value.strip(b" \t").decode("latin-1")))
    rest = draw(st.binary(max_size=64) | st.sampled_from([b"\r\n", b"\r\n\r\n", CURL_P]))
    host = authority.strip("[]")
    return head + b"\r\n" + rest, ConnectRequest(
        "CONNECT", host, port, version, tuple(headers), rest
    )


@given(valid_heads(), st.lists(st.integers(0, 2000), max_size=20))
def test_any_chunking_of_a_valid_request_parses_the_same(
    case: tuple[bytes, ConnectRequest], cuts: list[int]
) -> None:
    """Whatever the chunking, the same request comes out and rest plus unfed bytes is exact."""
    data, expected = case
    result, unfed = feed_chunks(split(data, cuts))
    assert isinstance(result, ConnectRequest)
    assert attrs_without_rest(result) == attrs_without_rest(expected)
    assert result.rest + unfed == expected.rest


def attrs_without_rest(request: ConnectRequest) -> tuple[object, ...]:
    return (request.method, request.host, request.port, request.version, request.headers)


@given(valid_heads())
def test_byte_at_a_time_loses_no_byte(case: tuple[bytes, ConnectRequest]) -> None:
    """One byte per call: the outcome arrives with the last LF and every later byte is kept."""
    data, expected = case
    result, unfed = feed_chunks([data[i : i + 1] for i in range(len(data))])
    assert isinstance(result, ConnectRequest)
    assert result.rest == b""
    assert unfed == expected.rest


_PIECES = [
    b"CONNECT",
    b"GET",
    b" ",
    b"  ",
    b"a:1",
    b"[::1]:443",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"\r\n",
    b"\r",
    b"\n",
    b"\x00",
    b"\t",
    b":",
    b"X",
    b"Host: a:1",
    b"Content-Length: 0",
    b"X: v\r\n",
    b"\r\n\r\n",
    b"xxxxxxxxxxxxxxxx",
]


@given(
    st.sampled_from([b"", b"CONNECT a:1 HTTP/1.1\r\n"]),
    st.lists(st.sampled_from(_PIECES), max_size=30),
    st.lists(st.integers(0, 400), max_size=12),
)
def test_outcome_never_depends_on_chunking(
    prefix: bytes, pieces: list[bytes], cuts: list[int]
) -> None:
    """Valid or not, any input gives the same outcome whole, in random chunks and byte by byte."""
    data = prefix + b"".join(pieces)
    limits = {"max_request_line": 24, "max_header_bytes": 40, "max_headers": 3}

    def outcome(chunks: list[bytes]) -> object:
        result, unfed = feed_chunks(chunks, **limits)
        if isinstance(result, ConnectRequest):
            return (attrs_without_rest(result), result.rest + unfed)
        return result

    whole = outcome([data])
    assert outcome(split(data, cuts)) == whole
    assert outcome([data[i : i + 1] for i in range(len(data))]) == whole


@given(
    st.sampled_from([b"", b"CONNECT a:1 HTTP/1.1\r\nX: "]),
    st.integers(1, 60_000),
    st.integers(1, 5000),
)
def test_oversized_input_fails_with_a_bounded_buffer(prefix: bytes, size: int, chunk: int) -> None:
    """An endless line fails at the first chunk past the limit; the buffer never exceeds it."""
    parser = ConnectRequestParser()
    bound = max(parser.max_request_line, parser.max_header_bytes) + 1
    data = prefix + b"z" * size
    # The byte that proves the limit crossed: 8193rd of the request line, or the
    # first one that cannot fit in 16 KiB with its CRLF (22 bytes are the request line).
    proof = 8193 if not prefix else 22 + 16384 - 2 + 1
    result = None
    fed = last = 0
    for start in range(0, len(data), chunk):
        piece = data[start : start + chunk]
        result = parser.feed(piece)
        fed, last = fed + len(piece), len(piece)
        if result is not None:
            break
        assert parser.buffered <= bound
    if len(data) < proof:
        assert result is None
    else:
        assert isinstance(result, RequestError)
        assert result.status == (431 if prefix else 414)
        assert fed - last < proof <= fed


# -- Proxy-Authorization ----------------------------------------------------------------


def basic(user_pass: bytes) -> str:
    return "Basic " + base64.b64encode(user_pass).decode()


def test_basic_credentials_are_decoded() -> None:
    """A single Basic field gives the user and the password (which may contain colons)."""
    creds = proxy_credentials((("Proxy-Authorization", basic(b"alice:pa:ss w\xc3\xb6rd")),))
    assert creds == BasicCredentials("alice", "pa:ss wörd")


def test_scheme_is_case_insensitive_and_password_may_be_empty() -> None:
    """``basic`` in any case is Basic; an empty password is still a credential."""
    token = base64.b64encode(b"bob:").decode()
    assert proxy_credentials((("proxy-authorization", f"bAsIc {token}"),)) == BasicCredentials(
        "bob", ""
    )


def test_credentials_repr_hides_the_password() -> None:
    """The password never appears in the repr."""
    assert "hunter2" not in repr(BasicCredentials("alice", "hunter2"))


@pytest.mark.parametrize(
    "fields",
    [
        (),
        (("Authorization", basic(b"a:b")),),
        (("Proxy-Authorization", basic(b"a:b")), ("Proxy-Authorization", basic(b"a:b"))),
        (("Proxy-Authorization", "Bearer abc"),),
        (("Proxy-Authorization", "Basic"),),
        (("Proxy-Authorization", "Basic YTpiYw"),),  # missing padding
        (("Proxy-Authorization", "Basic YTpiYx=="),),  # non-zero trailing bits
        (("Proxy-Authorization", "Basic YT piYw=="),),
        (("Proxy-Authorization", "Basic YTpi*w=="),),
        (("Proxy-Authorization", "Basic YTpiYw==,x"),),
        (("Proxy-Authorization", basic(b"no-colon")),),
        (("Proxy-Authorization", basic(b":password")),),
        (("Proxy-Authorization", basic(b"a:\xff\xfe")),),
        (("Proxy-Authorization", basic(b"a:b\x00c")),),
        (("Proxy-Authorization", basic(b"a\nb:c")),),
        (("Proxy-Authorization", basic("a:b\u0085".encode())),),
    ],
)
def test_doubtful_credentials_count_as_missing(fields: tuple[tuple[str, str], ...]) -> None:
    """Missing, duplicate, other-scheme, non-canonical base64, non-UTF-8 or odd text: None."""
    assert proxy_credentials(fields) is None


def test_credentials_from_a_parsed_request() -> None:
    """The helper works on ``ConnectRequest.headers`` for HTTP/1.0 and 1.1 alike."""
    for version in (b"HTTP/1.0", b"HTTP/1.1"):
        head = b"CONNECT a:1 " + version + b"\r\nProxy-Authorization: " + basic(b"u:p").encode()
        result = parse(head + b"\r\n\r\n")
        assert isinstance(result, ConnectRequest)
        assert proxy_credentials(result.headers) == BasicCredentials("u", "p")
