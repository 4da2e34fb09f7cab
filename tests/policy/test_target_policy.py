"""Destination and client policy (target_policy) and host classification (target_hosts)."""

from __future__ import annotations

import platform
import socket
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from loopback import NON_GLOBAL_HOSTS

from tunnelkit.policy.target_hosts import InvalidHost, classify_host, inet_aton, is_public
from tunnelkit.policy.targets import (
    ClientPolicy,
    Decision,
    DestinationRule,
    PortRange,
    PortSet,
    Refusal,
    RuleError,
    TargetPolicy,
)

DEFAULT = TargetPolicy()
LOOPBACK = IPv4Address("127.0.0.1")


# -- numeric hosts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0X7F.0.0.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("00", "0.0.0.0"),
        ("10.0x10000", "10.1.0.0"),
        ("134744072", "8.8.8.8"),
        ("::", "::"),
        ("::1", "::1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::FFFF:7f00:1", "127.0.0.1"),
        ("2001:DB8::1", "2001:db8::1"),
    ],
)
def test_numeric_hosts_are_the_addresses_they_mean(host: str, address: str) -> None:
    """inet_aton shorthand, octal, hex and mapped forms become the address they denote."""
    assert classify_host(host) == ip_address(address)


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("Example.ORG", "example.org"),
        ("example.org.", "example.org"),
        ("_srv.example", "_srv.example"),
        ("1.2.3.4.example", "1.2.3.4.example"),
        ("0x7f.example", "0x7f.example"),
        ("localhost", "localhost"),
        ("1e100", "1e100"),
    ],
)
def test_names_are_normalized(host: str, name: str) -> None:
    """Names are lower-cased without a trailing dot; numeric-looking inner labels are fine."""
    assert classify_host(host) == name


@pytest.mark.parametrize(
    "host",
    [
        "",
        ".",
        "256.1.1.1",
        "1.2.3.4.5",
        "08",
        "0x",
        "0x.1",
        "a.0x10",
        "example.123",
        "4294967296",
        "1.16777216",
        "a..b",
        ".a",
        "exa mple.org",
        "127.0.0.1 x",
        "127.0.0.1\x00.evil.example",
        "[::1]",
        "[example.com]",
        "fe80::1%eth0",
        "zz::1",
        "\u00e9.example",
        "a" * 64 + ".example",
        "a." * 127 + "aa",
    ],
)
def test_invalid_hosts_are_refused(host: str) -> None:
    """Junk, numeric-looking non-addresses, brackets, zones and over-long names are invalid."""
    with pytest.raises(InvalidHost):
        classify_host(host)
    assert DEFAULT.decide(host, 443, ["8.8.8.8"]).refusal is Refusal.INVALID_HOST


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="compares with glibc inet_aton")
@given(st.text("0123456789abcdefxX.", max_size=24))
def test_inet_aton_agrees_with_the_c_library(text: str) -> None:
    """Our reading of numeric hosts is exactly glibc's inet_aton (which getaddrinfo uses)."""
    try:
        expected: IPv4Address | None = IPv4Address(socket.inet_aton(text))
    except OSError:
        expected = None
    assert inet_aton(text) == expected


# -- default refusal ------------------------------------------------------------------


@pytest.mark.parametrize("host", NON_GLOBAL_HOSTS)
def test_default_refuses_non_global_addresses(host: str) -> None:
    """Loopback, private, metadata, CGNAT, ULA, multicast and their translated forms: refused."""
    decision = DEFAULT.precheck(host, 443)
    assert decision is not None
    assert decision.refusal is Refusal.NOT_GLOBAL
    assert decision.addresses == ()
    assert decision.address is None


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("8.8.8.8", "8.8.8.8"),
        ("134744072", "8.8.8.8"),
        ("::ffff:8.8.8.8", "8.8.8.8"),
        ("2606:4700:4700::1111", "2606:4700:4700::1111"),
        ("64:ff9b::808:808", "64:ff9b::808:808"),
        ("2002:808:808::1", "2002:808:808::1"),
    ],
)
def test_default_allows_global_addresses_on_any_port(host: str, address: str) -> None:
    """A globally reachable address (also via NAT64 or 6to4 of a global one) is allowed."""
    for port in (1, 22, 443, 65535):
        decision = DEFAULT.precheck(host, port)
        assert decision is not None
        assert decision.allowed
        assert decision.addresses == (ip_address(address),)
        assert decision.address == ip_address(address)


def test_is_public_needs_a_global_embedded_ipv4() -> None:
    """An IPv6 form is only public if the IPv4 address it carries is public too."""
    assert is_public(IPv6Address("64:ff9b::808:808"))
    assert not is_public(IPv6Address("64:ff9b::a9fe:a9fe"))  # NAT64 of 169.254.169.254


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_ports_out_of_range_are_refused(port: int) -> None:
    """Port 0 and ports past 65535 are never allowed."""
    assert DEFAULT.decide("8.8.8.8", port).refusal is Refusal.INVALID_PORT


# -- names: resolve once, check every address ---------------------------------------------


def test_a_name_needs_resolving() -> None:
    """For a name with no deciding rule, precheck asks the caller to resolve it."""
    assert DEFAULT.precheck("example.org", 443) is None


def test_every_resolved_address_is_returned_in_order_without_duplicates() -> None:
    """The decision carries exactly the checked addresses, in resolver order."""
    decision = DEFAULT.decide(
        "Example.org", 443, ["2606:4700::1", IPv4Address("8.8.8.8"), "8.8.8.8", "::ffff:1.1.1.1"]
    )
    assert decision == Decision(
        "example.org",
        443,
        (IPv6Address("2606:4700::1"), IPv4Address("8.8.8.8"), IPv4Address("1.1.1.1")),
    )


def test_one_internal_address_refuses_the_whole_name() -> None:
    """A name that resolves to public and internal addresses is refused, not filtered."""
    decision = DEFAULT.decide("mixed.example", 443, ["8.8.8.8", "127.0.0.1"])
    assert decision.refusal is Refusal.NOT_GLOBAL
    assert decision.refused_address == LOOPBACK
    assert decision.addresses == ()


def test_mapped_resolved_address_is_judged_as_ipv4() -> None:
    """An IPv4-mapped answer is the IPv4 address it maps: 10.0.0.1 is refused."""
    assert DEFAULT.decide("a.example", 443, ["::ffff:10.0.0.1"]).refusal is Refusal.NOT_GLOBAL


def test_no_address_is_its_own_refusal() -> None:
    """An empty resolution is NO_ADDRESS, which the proxy answers with 502, not 403."""
    assert DEFAULT.decide("gone.example", 443, []).refusal is Refusal.NO_ADDRESS


def test_resolved_junk_is_a_caller_bug() -> None:
    """A resolver answer that is not an IP address raises instead of being guessed at."""
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        DEFAULT.decide("a.example", 443, ["localhost"])


def test_literal_hosts_ignore_resolved_addresses() -> None:
    """An address host is checked as itself; a resolver answer cannot replace it."""
    decision = DEFAULT.decide("127.1", 443, ["8.8.8.8"])
    assert decision.refusal is Refusal.NOT_GLOBAL
    assert decision.refused_address == LOOPBACK


def test_dns_rebinding_cannot_switch_the_checked_address() -> None:
    """With a resolver that answers public then 127.0.0.1, the connect address is the first answer."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    calls = []

    def resolve(name: str) -> list[str]:
        calls.append(name)
        return next(answers)

    host = "rebind.example"
    assert DEFAULT.precheck(host, 443) is None
    decision = DEFAULT.decide(host, 443, resolve(host))
    assert decision.addresses == (IPv4Address("93.184.216.34"),)
    assert calls == [host]
    # Had the caller looked the name up again, that answer would have been refused.
    assert DEFAULT.decide(host, 443, resolve(host)).refusal is Refusal.NOT_GLOBAL


# -- rules ------------------------------------------------------------------------------


def policy(
    allow: Sequence[str] = (), deny: Sequence[str] = (), ports: Sequence[str] = ()
) -> TargetPolicy:
    return TargetPolicy.from_options(allow=allow, deny=deny, ports=ports)


@pytest.mark.parametrize(
    ("text", "network", "name", "ports"),
    [
        ("10.0.0.0/8", "10.0.0.0/8", None, None),
        ("10.0.0.0/8:5432", "10.0.0.0/8", None, PortRange(5432, 5432)),
        ("10.1.2.3:80-90", "10.1.2.3/32", None, PortRange(80, 90)),
        ("[2001:db8::/32]:443", "2001:db8::/32", None, PortRange(443, 443)),
        ("[::1]", "::1/128", None, None),
        ("2001:db8::/32", "2001:db8::/32", None, None),
        ("::1", "::1/128", None, None),
        ("Example.ORG.:443", None, "example.org", PortRange(443, 443)),
        ("*.example.org:8000-8100", None, "*.example.org", PortRange(8000, 8100)),
        ("db.internal", None, "db.internal", None),
    ],
)
def test_rule_forms(
    text: str, network: str | None, name: str | None, ports: PortRange | None
) -> None:
    """CIDRs, bracketed IPv6, names and *.domain patterns parse, each with optional ports."""
    rule = DestinationRule.parse(text)
    assert (str(rule.network) if rule.network else None, rule.name, rule.ports) == (
        network,
        name,
        ports,
    )
    assert rule.text == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10.0.0.0/33",
        "10.0.0.1/8",
        "010.0.0.1",
        "127.1",
        "2130706433",
        "0x7f.1",
        "[10.0.0.0/8]:1",
        "[::1",
        "[::1]:x",
        "[::1]443",
        "2001:db8::/32:443",
        "example.org:",
        "example.org:0",
        "example.org:65536",
        "example.org:+1",
        "example.org:0443",
        "example.org:80-70",
        "example.org:80-",
        "*",
        "*:443",
        "*.",
        "a.*.b",
        "exa mple.org",
        "example.org:443:1",
    ],
)
def test_bad_rules_raise_one_line_errors(text: str) -> None:
    """Unreadable rules raise RuleError (a ValueError) with a one-line message."""
    with pytest.raises(RuleError) as info:
        DestinationRule.parse(text)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)
    assert str(info.value)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: DestinationRule.parse("10.0.0.1/8:5432"),
            "destination rule '10.0.0.1/8:5432': host bits set (the network is 10.0.0.0/8)",
        ),
        (
            lambda: DestinationRule.parse("db.example:0"),
            "destination rule 'db.example:0': bad port: expected 1-65535 or LOW-HIGH, such as 443 or 8000-8100",
        ),
        (
            lambda: DestinationRule.parse("127.1"),
            "destination rule '127.1': not an IPv4 or IPv6 address or CIDR",
        ),
        (lambda: PortSet.parse(["443,70000"]), "port '443,70000': ports go from 1 to 65535"),
        (
            lambda: ClientPolicy.from_options(deny=["example.org"]),
            "client rule 'example.org': not an IPv4 or IPv6 address or CIDR",
        ),
    ],
)
def test_rule_errors_quote_the_rule_and_the_problem(
    make: Callable[[], object], message: str
) -> None:
    """Each error names the kind of rule, quotes it whole and says what is wrong."""
    with pytest.raises(RuleError) as info:
        make()
    assert str(info.value) == message


def test_cidr_allow_overrides_the_default_refusal_on_its_ports_only() -> None:
    """``--allow-dest 10.0.0.0/8:5432`` admits 10.x on 5432 and nothing else."""
    p = policy(allow=["10.0.0.0/8:5432"])
    allowed = p.decide("10.1.2.3", 5432)
    assert allowed.allowed
    assert allowed.rule == "10.0.0.0/8:5432"
    assert p.decide("10.1.2.3", 5433).refusal is Refusal.NOT_GLOBAL
    assert p.decide("192.168.0.1", 5432).refusal is Refusal.NOT_GLOBAL


def test_loopback_allow_admits_every_numeric_loopback_form() -> None:
    """``--allow-dest 127.0.0.0/8`` (the test set-up) admits 127.1 as 127.0.0.1."""
    decision = policy(allow=["127.0.0.0/8"]).decide("127.1", 8080)
    assert decision.addresses == (LOOPBACK,)


def test_name_allow_trusts_that_names_addresses() -> None:
    """An allowed name may resolve to internal addresses; other names still may not."""
    p = policy(allow=["db.internal:5432"])
    assert p.decide("DB.internal.", 5432, ["10.0.0.5"]).allowed
    assert p.decide("db.internal", 5433, ["10.0.0.5"]).refusal is Refusal.NOT_GLOBAL
    assert p.decide("other.internal", 5432, ["10.0.0.5"]).refusal is Refusal.NOT_GLOBAL


def test_wildcard_matches_subdomains_at_any_depth_but_not_the_domain() -> None:
    """``*.corp.example`` covers a.corp.example and a.b.corp.example, not corp.example."""
    p = policy(allow=["*.corp.example"])
    assert p.decide("a.corp.example", 443, ["10.0.0.1"]).allowed
    assert p.decide("a.b.corp.example", 443, ["10.0.0.1"]).allowed
    assert not p.decide("corp.example", 443, ["10.0.0.1"]).allowed
    assert not p.decide("xcorp.example", 443, ["10.0.0.1"]).allowed


def test_deny_beats_allow() -> None:
    """An address both allowed and denied is denied, naming the deny rule."""
    p = policy(allow=["10.0.0.0/8"], deny=["10.0.0.5"])
    assert p.decide("10.0.0.6", 22).allowed
    decision = p.decide("10.0.0.5", 22)
    assert (decision.refusal, decision.rule) == (Refusal.DENIED, "10.0.0.5")


def test_name_deny_refuses_before_dns_even_if_allowed() -> None:
    """A denied name is refused by precheck, so it is never resolved."""
    p = policy(allow=["*.example.org"], deny=["secret.example.org"])
    decision = p.precheck("Secret.Example.org", 443)
    assert decision is not None
    assert (decision.refusal, decision.rule) == (Refusal.DENIED, "secret.example.org")


def test_cidr_deny_catches_any_resolved_address() -> None:
    """One resolved address inside a denied network refuses the whole request."""
    p = policy(deny=["8.8.4.0/24"])
    decision = p.decide("dns.example", 53, ["8.8.8.8", "8.8.4.4"])
    assert (decision.refusal, decision.refused_address) == (Refusal.DENIED, IPv4Address("8.8.4.4"))


def test_cidr_deny_sees_through_translated_ipv6() -> None:
    """Denying 8.8.8.8 also denies its NAT64 and 6to4 forms."""
    p = policy(deny=["8.8.8.8"])
    assert p.decide("64:ff9b::808:808", 443).refusal is Refusal.DENIED
    assert p.decide("2002:808:808::1", 443).refusal is Refusal.DENIED


def test_port_scoped_deny() -> None:
    """``--deny-dest 0.0.0.0/0:25`` stops SMTP relaying and nothing else."""
    p = policy(deny=["0.0.0.0/0:25", "[::/0]:25"])
    assert p.decide("8.8.8.8", 25).refusal is Refusal.DENIED
    assert p.decide("2606:4700::1", 25).refusal is Refusal.DENIED
    assert p.decide("8.8.8.8", 443).allowed


# -- ports ------------------------------------------------------------------------------


def test_allow_port_narrows_the_default() -> None:
    """``--allow-port 443`` (Squid's default) refuses other ports, for names before DNS."""
    p = policy(ports=["443"])
    assert p.decide("8.8.8.8", 443).allowed
    assert p.decide("8.8.8.8", 80).refusal is Refusal.PORT_NOT_ALLOWED
    early = p.precheck("example.org", 80)
    assert early is not None
    assert early.refusal is Refusal.PORT_NOT_ALLOWED


def test_allow_rule_with_ports_admits_them_outside_allow_port() -> None:
    """An allow rule naming its port admits it even when --allow-port does not list it."""
    p = policy(allow=["10.0.0.0/8:5432", "partner.example:8443"], ports=["443"])
    assert p.decide("10.0.0.9", 5432).allowed
    assert p.precheck("example.org", 5432) is None  # a CIDR rule might admit its addresses
    assert p.decide("example.org", 5432, ["8.8.8.8"]).refusal is Refusal.PORT_NOT_ALLOWED
    assert p.decide("partner.example", 8443, ["8.8.8.8"]).allowed


def test_allow_rule_without_port_keeps_the_port_list() -> None:
    """An allow rule without a port admits its targets only on --allow-port ports."""
    p = policy(allow=["10.0.0.0/8"], ports=["443"])
    assert p.decide("10.0.0.9", 443).allowed
    assert p.decide("10.0.0.9", 22).refusal is Refusal.NOT_GLOBAL


def test_port_set_forms() -> None:
    """--allow-port takes ports, ranges and comma lists."""
    ports = PortSet.parse(["443,8443", "8000-8100"])
    assert [p in ports for p in (443, 8443, 8000, 8100, 8101, 80)] == [
        True,
        True,
        True,
        True,
        False,
        False,
    ]


@pytest.mark.parametrize("value", ["", "0", "65536", "443,", "a", "1-0", " 443", "+443"])
def test_bad_port_values(value: str) -> None:
    """Unreadable --allow-port values raise RuleError."""
    with pytest.raises(RuleError):
        PortSet.parse([value])


_HOSTS = ["127.1", "8.8.8.8", "example.org", "db.internal", "a.corp.example", "x y", "::1"]
_ADDRESSES = [
    "8.8.8.8",
    "10.0.0.5",
    "127.0.0.1",
    "2606:4700::1",
    "::ffff:10.0.0.1",
    "64:ff9b::a00:5",
]
_RULES = [
    "10.0.0.0/8",
    "10.0.0.5:5432",
    "db.internal",
    "*.corp.example:22",
    "8.8.8.8",
    "[::/0]:443",
]


_POLICIES = st.builds(
    policy,
    allow=st.lists(st.sampled_from(_RULES), max_size=3),
    deny=st.lists(st.sampled_from(_RULES), max_size=2),
    ports=st.sampled_from([[], ["443"], ["22,5432"]]),
)


@given(
    _POLICIES,
    st.sampled_from(_HOSTS),
    st.sampled_from([0, 22, 443, 5432, 65535]),
    st.lists(st.sampled_from(_ADDRESSES), max_size=3),
)
def test_precheck_never_contradicts_decide(
    p: TargetPolicy, host: str, port: int, resolved: list[str]
) -> None:
    """A precheck answer is final, and an allowed decision lists only checked addresses."""
    early = p.precheck(host, port)
    decision = p.decide(host, port, resolved)
    if early is not None:
        assert decision == early
    if decision.allowed:
        pool = [host] if not isinstance(classify_host(host), str) else resolved
        assert {str(a) for a in decision.addresses} <= {str(classify_host(a)) for a in pool}


# -- clients ------------------------------------------------------------------------------


def test_client_policy_default_allows_everyone() -> None:
    """With no client rules every peer may connect (forward mode shares this default)."""
    assert ClientPolicy().allows("203.0.113.9")
    assert ClientPolicy().allows(IPv6Address("::1"))


def test_client_allow_list_restricts() -> None:
    """With --allow-client only peers inside the networks may connect."""
    p = ClientPolicy.from_options(allow=["127.0.0.0/8", "10.0.0.0/8", "::1"])
    assert p.allows("127.0.0.1")
    assert p.allows("::1")
    assert not p.allows("192.168.1.1")
    assert not p.allows("::2")


def test_client_deny_beats_allow() -> None:
    """A peer in both an allowed and a denied network is refused."""
    p = ClientPolicy.from_options(allow=["10.0.0.0/8"], deny=["10.9.0.0/16"])
    assert p.allows("10.1.0.1")
    assert not p.allows("10.9.0.1")


def test_mapped_client_is_matched_as_ipv4() -> None:
    """A dual-stack listener's ::ffff:10.0.0.1 peer matches IPv4 client rules."""
    p = ClientPolicy.from_options(allow=["10.0.0.0/8"])
    assert p.allows("::ffff:10.0.0.1")
    assert not ClientPolicy.from_options(deny=["10.0.0.0/8"]).allows("::ffff:10.0.0.1")


@pytest.mark.parametrize("text", ["", "10.0.0.1/8", "10.0.0.0/33", "example.org", "127.1", "[::1]"])
def test_bad_client_rules(text: str) -> None:
    """Client rules are addresses or CIDRs with host bits clear; anything else is a RuleError."""
    with pytest.raises(RuleError) as info:
        ClientPolicy.from_options(allow=[text])
    assert "\n" not in str(info.value)
