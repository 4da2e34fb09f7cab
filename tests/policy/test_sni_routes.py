"""The SNI routing table: names, wildcards, ALPN conditions, and which route is the most specific."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnelkit.policy.sni_routes import RouteError, RouteMatch, SniRoutes, parse_route


def table(*written: str) -> SniRoutes[str]:
    """Routes as ``--route`` values, each routing to its backend text."""
    return SniRoutes(parse_route(text) for text in written)


def pick(routes: SniRoutes[str], name: str | None, *offered: bytes) -> str | None:
    picked = routes.pick(name, offered)
    return None if picked is None else picked[1]


def test_parse() -> None:
    """NAME=BACKEND and NAME,alpn=PROTOCOL=BACKEND; the backend keeps its own ``=`` and suffixes."""
    assert parse_route("API.Example.com.=10.0.0.5:443") == (
        RouteMatch("api.example.com"),
        "10.0.0.5:443",
    )
    assert parse_route("*.example.com,alpn=acme-tls/1=unix:path=/run/acme.sock,weight=2") == (
        RouteMatch("*.example.com", b"acme-tls/1"),
        "unix:path=/run/acme.sock,weight=2",
    )
    assert parse_route("*=127.0.0.1:8443") == (RouteMatch("*"), "127.0.0.1:8443")
    assert parse_route("a.test=[::1]:443") == (RouteMatch("a.test"), "[::1]:443")
    assert parse_route("bücher.example=127.0.0.1:1")[0] == RouteMatch("xn--bcher-kva.example")


def test_match_written_back() -> None:
    """A match reads as it is written (the access log's ``route`` field)."""
    assert str(parse_route("A.test,alpn=h2=x:1")[0]) == "a.test,alpn=h2"
    assert str(parse_route("*.test=x:1")[0]) == "*.test"


@pytest.mark.parametrize(
    "text",
    [
        "api.example.com",  # no backend
        "api.example.com=",
        "=10.0.0.5:443",
        "a.*.example.com=x:1",
        "*example.com=x:1",
        "*.*.example.com=x:1",
        "api example.com=x:1",
        "-api.example.com=x:1",
        "a..b=x:1",
        "a,b=x:1",
        "a.test,alpn==x:1",
        "a.test,alpn=h 2=x:1",
        "a.test,alpn=" + "x" * 256 + "=x:1",
        "a.test,weight=2=x:1",
        "a" * 64 + ".test=x:1",
    ],
)
def test_parse_errors(text: str) -> None:
    """A route that cannot be understood is an error that says what to write."""
    with pytest.raises(RouteError):
        parse_route(text)


def test_exact_and_case() -> None:
    """Names compare without regard to case or a trailing dot."""
    routes = table("api.example.com=a")
    assert pick(routes, "API.example.COM") == "a"
    assert pick(routes, "api.example.com.") == "a"
    assert pick(routes, "www.example.com") is None
    assert pick(routes, "api.example.com.evil") is None


def test_wildcards() -> None:
    """``*.domain`` matches names under it at any depth, not the domain itself; the longest wins."""
    routes = table("*.example.com=any", "*.eu.example.com=eu", "example.com=apex")
    assert pick(routes, "www.example.com") == "any"
    assert pick(routes, "a.b.example.com") == "any"
    assert pick(routes, "www.eu.example.com") == "eu"
    assert pick(routes, "eu.example.com") == "any"
    assert pick(routes, "example.com") == "apex"
    assert pick(routes, "badexample.com") is None


def test_exact_beats_wildcard_beats_any() -> None:
    """The most specific name wins, whatever the order the routes were given in."""
    routes = table("*=all", "*.example.com=wild", "api.example.com=api")
    assert pick(routes, "api.example.com") == "api"
    assert pick(routes, "www.example.com") == "wild"
    assert pick(routes, "other.test") == "all"


def test_no_sni_matches_nothing() -> None:
    """A client without SNI matches no route, not even ``*``: the default backend takes it."""
    assert pick(table("*=all"), None) is None


def test_alpn_condition() -> None:
    """An ALPN route takes clients offering its protocol; the others go by name alone."""
    routes = table("a.test=plain", "a.test,alpn=h2=h2")
    assert pick(routes, "a.test", b"h2", b"http/1.1") == "h2"
    assert pick(routes, "a.test", b"http/1.1") == "plain"
    assert pick(routes, "a.test") == "plain"
    assert pick(table("a.test,alpn=h2=h2"), "a.test", b"http/1.1") is None


def test_alpn_beats_a_more_specific_name() -> None:
    """``*,alpn=acme-tls/1`` takes ACME's challenges of every name, exact routes included."""
    routes = table("api.example.com=api", "*,alpn=acme-tls/1=acme")
    assert pick(routes, "api.example.com", b"acme-tls/1") == "acme"
    assert pick(routes, "api.example.com", b"h2") == "api"


def test_alpn_then_name_then_client_preference() -> None:
    """Among ALPN routes, the most specific name wins, then the protocol the client lists first."""
    routes = table("*.test,alpn=h2=wild-h2", "a.test,alpn=http/1.1=a-h1", "a.test,alpn=h2=a-h2")
    assert pick(routes, "a.test", b"http/1.1", b"h2") == "a-h1"
    assert pick(routes, "a.test", b"h2", b"http/1.1") == "a-h2"
    assert pick(routes, "b.test", b"http/1.1", b"h2") == "wild-h2"


def test_the_same_route_twice_is_an_error() -> None:
    """The table takes each match once (the listener balances a match's backends in one group)."""
    with pytest.raises(RouteError):
        table("a.test=x", "A.test.=y")


def test_length() -> None:
    """The table counts its routes."""
    assert len(table("a.test=x", "a.test,alpn=h2=y", "*=z")) == 3


@given(st.text(max_size=80), st.lists(st.binary(max_size=8), max_size=4))
def test_any_name(name: str, offered: list[bytes]) -> None:
    """Any server name and offer gives a route or none, never an exception."""
    routes = table("*.example.com=w", "a.example.com,alpn=h2=a", "*=all")
    assert pick(routes, name, *offered) in ("w", "a", "all", None)
