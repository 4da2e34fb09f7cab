"""Who may use the proxy, and which targets it may reach.

An open CONNECT or SOCKS proxy is an SSRF device: left alone it reaches
127.0.0.1, RFC 1918 networks, the cloud metadata service at 169.254.169.254
and the proxy's own admin ports. :class:`TargetPolicy` closes that by default
and makes exceptions explicit:

* **Addresses, not names, are the boundary.** The caller resolves a name once,
  passes every resolved address to :meth:`TargetPolicy.decide`, and connects to
  the addresses in the returned :class:`Decision`, never to the name: a second
  lookup could answer differently (DNS rebinding).
* **Every resolved address must pass.** If any address of a name is refused,
  the whole request is refused rather than filtered to the acceptable ones: a
  name that mixes public and internal addresses is the rebinding trick itself,
  and refusing makes the operator's rule, not the resolver's answer order,
  decide.
* **Numeric hosts mean what the resolver would make of them.** ``127.1``,
  ``2130706433``, ``0x7f.1``, ``0177.0.0.1`` and ``0`` are all loopback or
  unspecified to ``inet_aton`` and ``getaddrinfo``.
  :func:`~tunnelkit.policy.target_hosts.classify_host` reads them with the same
  rules and hands back the address, so they are checked as addresses and
  never sent to DNS; a host that only looks numeric (``256.1.1.1``,
  ``1.2.3.4.5``) is invalid.
* **Default refusal:** any address that is not globally reachable. Python's
  ``is_global`` is the base, plus gaps in its tables on older Pythons
  (multicast, IPv4-compatible ``::/96``, ...). IPv4-mapped addresses count as
  the IPv4 address they carry; 6to4, NAT64 (``64:ff9b::/96``) and Teredo
  addresses must also carry a global IPv4 address.
* **Rules:** ``--allow-dest`` overrides the default refusal; ``--deny-dest``
  beats everything. A rule is a CIDR or address (``10.0.0.0/8``,
  ``[2001:db8::/32]``), a host name (``db.example``) or a ``*.domain`` pattern
  (any depth of subdomain, not the domain itself), optionally followed by
  ``:PORT`` or ``:LOW-HIGH``. CIDR rules match the resolved addresses; name
  rules match the name as the client sent it (lower-cased, one trailing dot
  dropped), so a name allow trusts that name's DNS: prefer CIDR allows for
  internal targets, and CIDR denies as the real boundary.
* **Ports:** all ports are allowed by default (as tinyproxy without
  ``ConnectPort``), because an allowed address is already a deliberate choice.
  ``--allow-port 443`` narrows that to Squid's default (its stock config denies
  ``CONNECT !SSL_ports``, port 443 only). An allow rule that names its own
  ports admits those ports even outside ``--allow-port``; an allow rule without
  a port admits only the ``--allow-port`` ports.

Everything here is pure; values are ``attrs.frozen`` and rule strings that
cannot be understood raise :class:`RuleError` with a one-line message.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable

import attrs

from tunnelkit.policy.target_hosts import (
    HOST_LABEL,
    NUMERIC_LABEL,
    InvalidHost,
    IPAddress,
    IPNetwork,
    classify_host,
    embedded_ipv4,
    is_public,
    plain_address,
)


class RuleError(ValueError):
    """A ``--allow-dest``/``--deny-dest``/``--allow-port``/client rule that cannot be understood.

    The message is one line that quotes the rule and says what is wrong.
    """


class _Problem(Exception):
    """What is wrong with part of a rule; the public parsers add which rule."""


_PORT_SPEC = re.compile(r"([1-9][0-9]{0,4})(?:-([1-9][0-9]{0,4}))?")
_BRACKETED = re.compile(r"\[([^\]]*)\](?::(.*))?")
_IPV4_ISH = re.compile(r"[0-9./]+")


@attrs.frozen
class PortRange:
    """Ports ``low`` to ``high`` inclusive."""

    low: int
    high: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


def _port_range(text: str) -> PortRange:
    m = _PORT_SPEC.fullmatch(text)
    if m is None:
        raise _Problem("bad port: expected 1-65535 or LOW-HIGH, such as 443 or 8000-8100")
    low = int(m[1])
    high = low if m[2] is None else int(m[2])
    if high > 65535 or low > 65535:
        raise _Problem("ports go from 1 to 65535")
    if low > high:
        raise _Problem("empty port range (low port above high port)")
    return PortRange(low, high)


def parse_port_range(text: str) -> PortRange:
    """``443`` or ``8000-8100``: decimal, 1-65535, no sign or leading zero."""
    try:
        return _port_range(text)
    except _Problem as e:
        raise RuleError(f"port {text!r}: {e}") from None


@attrs.frozen
class PortSet:
    """The ports ``--allow-port`` admits (each value a port, range or comma list)."""

    ranges: tuple[PortRange, ...]

    @classmethod
    def parse(cls, values: Iterable[str]) -> PortSet:
        """Parse ``--allow-port`` values such as ``443``, ``8000-8100`` or ``443,8443``."""
        ranges: list[PortRange] = []
        for value in values:
            try:
                ranges.extend(_port_range(part) for part in value.split(","))
            except _Problem as e:
                raise RuleError(f"port {value!r}: {e}") from None
        if not ranges:
            raise RuleError("no ports given")
        return cls(tuple(ranges))

    def __contains__(self, port: object) -> bool:
        return any(port in r for r in self.ranges)


def _network(text: str, version: int | None = None) -> IPNetwork:
    """An address or CIDR written the standard way (dotted quads, no host bits)."""
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise _Problem("not an IPv4 or IPv6 address or CIDR") from None
        raise _Problem(f"host bits set (the network is {loose})") from None
    if version is not None and network.version != version:
        raise _Problem("brackets are for IPv6 only")
    return network


def _name_pattern(text: str) -> str:
    name = text.lower().removesuffix(".")
    bare = name.removeprefix("*.")
    labels = bare.split(".")
    if len(bare) > 253 or not all(HOST_LABEL.fullmatch(label) for label in labels):
        raise _Problem("not a CIDR, an address, a host name or a *.domain pattern")
    if NUMERIC_LABEL.fullmatch(labels[-1]):
        raise _Problem("numeric host: write addresses as dotted quads or CIDRs")
    return name


@attrs.frozen
class DestinationRule:
    """One ``--allow-dest`` or ``--deny-dest`` rule.

    Exactly one of ``network`` (matched against addresses) and ``name`` (an
    exact name or ``*.domain``, matched against the client's host name) is set.
    ``ports`` is ``None`` when the rule names no port.
    """

    text: str
    network: IPNetwork | None = None
    name: str | None = None
    ports: PortRange | None = None

    @classmethod
    def parse(cls, text: str) -> DestinationRule:
        """Parse ``CIDR``, ``[V6CIDR]``, ``NAME`` or ``*.DOMAIN``, each with optional ``:PORTS``."""
        try:
            return cls._parse(text)
        except _Problem as e:
            raise RuleError(f"destination rule {text!r}: {e}") from None

    @classmethod
    def _parse(cls, text: str) -> DestinationRule:
        if not text:
            raise _Problem("empty")
        if text.startswith("["):
            m = _BRACKETED.fullmatch(text)
            if m is None:
                raise _Problem("expected [IPv6 address or CIDR], optionally followed by :PORTS")
            ports = None if m[2] is None else _port_range(m[2])
            return cls(text, network=_network(m[1], 6), ports=ports)
        if text.count(":") > 1:
            if "/" in text and text.rsplit(":", 1)[-1].isdigit():
                raise _Problem("put an IPv6 network in brackets to add a port: [NETWORK]:PORTS")
            return cls(text, network=_network(text, 6))
        host, colon, port_text = text.partition(":")
        ports = _port_range(port_text) if colon else None
        if _IPV4_ISH.fullmatch(host):
            return cls(text, network=_network(host, 4), ports=ports)
        return cls(text, name=_name_pattern(host), ports=ports)

    def matches_name(self, name: str) -> bool:
        """Whether this name rule covers the normalized host ``name``."""
        if self.name is None:
            return False
        if self.name.startswith("*."):
            return name.endswith(self.name[1:])
        return name == self.name

    def matches_address(self, ip: IPAddress) -> bool:
        """Whether this CIDR rule covers ``ip`` itself."""
        return (
            self.network is not None and ip.version == self.network.version and ip in self.network
        )


class Refusal(enum.Enum):
    """Why a target was refused; the CONNECT mode answers 502 for NO_ADDRESS, else 403."""

    INVALID_HOST = "invalid host"
    INVALID_PORT = "invalid port"
    PORT_NOT_ALLOWED = "port not allowed"
    DENIED = "denied by rule"
    NOT_GLOBAL = "not a globally reachable address"
    NO_ADDRESS = "no address"


@attrs.frozen
class Decision:
    """The policy's answer for one target.

    When allowed, ``addresses`` are the checked addresses to connect to, in the
    resolver's order without duplicates (IPv4-mapped ones as IPv4): connect to
    these and nothing else. ``rule`` is the rule text that decided, if a rule
    did; ``refused_address`` the address that caused a refusal, if one did.
    """

    target: IPAddress | str | None
    port: int
    addresses: tuple[IPAddress, ...] = ()
    refusal: Refusal | None = None
    rule: str | None = None
    refused_address: IPAddress | None = None

    @property
    def allowed(self) -> bool:
        """True if the caller may connect to :attr:`addresses`."""
        return self.refusal is None

    @property
    def address(self) -> IPAddress | None:
        """The first address to try, or ``None`` when refused."""
        return self.addresses[0] if self.allowed else None


@attrs.frozen
class TargetPolicy:
    """The destination policy of a CONNECT or SOCKS listener (see the module docstring).

    ``ports`` is ``None`` when every port is allowed.
    """

    allow: tuple[DestinationRule, ...] = ()
    deny: tuple[DestinationRule, ...] = ()
    ports: PortSet | None = None

    @classmethod
    def from_options(
        cls,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        ports: Iterable[str] = (),
    ) -> TargetPolicy:
        """Build from ``--allow-dest``, ``--deny-dest`` and ``--allow-port`` values."""
        port_values = list(ports)
        return cls(
            allow=tuple(DestinationRule.parse(text) for text in allow),
            deny=tuple(DestinationRule.parse(text) for text in deny),
            ports=PortSet.parse(port_values) if port_values else None,
        )

    def precheck(self, host: str, port: int) -> Decision | None:
        """Decide what can be decided before any DNS lookup.

        Returns the final :class:`Decision` for an address host (literal or
        numeric form) and for a refused name (invalid, denied by a name rule, or
        a port no rule could admit); ``None`` for a name that must be resolved
        and passed to :meth:`decide`. A refusal here is always what
        :meth:`decide` would answer.
        """
        try:
            target = classify_host(host)
        except InvalidHost:
            return Decision(None, port, refusal=Refusal.INVALID_HOST)
        if not 1 <= port <= 65535:
            return Decision(target, port, refusal=Refusal.INVALID_PORT)
        if not isinstance(target, str):
            return self._check_addresses(target, port, [target])
        for rule in self.deny:
            if rule.matches_name(target) and self._rule_port(rule, port, deny=True):
                return Decision(target, port, refusal=Refusal.DENIED, rule=rule.text)
        if not self._port_possible(target, port):
            return Decision(target, port, refusal=Refusal.PORT_NOT_ALLOWED)
        return None

    def decide(self, host: str, port: int, resolved: Iterable[IPAddress | str] = ()) -> Decision:
        """Check ``host:port`` and every address ``resolved`` for it.

        ``resolved`` is what the caller's single lookup of a name returned
        (strings or address objects); it is ignored for address hosts, which
        are never resolved. An empty result for a name is refused with
        :attr:`Refusal.NO_ADDRESS`. A string that is not an IP address raises
        ``ValueError``: resolvers only produce addresses.
        """
        early = self.precheck(host, port)
        if early is not None:
            return early
        target = classify_host(host)
        addresses: list[IPAddress] = []
        for item in resolved:
            ip = plain_address(ipaddress.ip_address(item) if isinstance(item, str) else item)
            if ip not in addresses:
                addresses.append(ip)
        return self._check_addresses(target, port, addresses)

    def _rule_port(self, rule: DestinationRule, port: int, *, deny: bool) -> bool:
        """A port-less deny rule covers every port; a port-less allow only ``--allow-port``."""
        if rule.ports is not None:
            return port in rule.ports
        return deny or self._default_port(port)

    def _default_port(self, port: int) -> bool:
        return self.ports is None or port in self.ports

    def _port_possible(self, name: str, port: int) -> bool:
        if self._default_port(port):
            return True
        return any(
            rule.ports is not None
            and port in rule.ports
            and (rule.network is not None or rule.matches_name(name))
            for rule in self.allow
        )

    def _check_addresses(
        self, target: IPAddress | str, port: int, addresses: list[IPAddress]
    ) -> Decision:
        if not addresses:
            return Decision(target, port, refusal=Refusal.NO_ADDRESS)
        for ip in addresses:
            facets = [ip, *embedded_ipv4(ip)]
            for rule in self.deny:
                if self._rule_port(rule, port, deny=True) and any(
                    rule.matches_address(facet) for facet in facets
                ):
                    return Decision(
                        target, port, refusal=Refusal.DENIED, rule=rule.text, refused_address=ip
                    )
        used_rule: str | None = None
        for ip in addresses:
            allowed_by = self._explicit_allow(target, ip, port)
            if allowed_by is not None:
                used_rule = used_rule or allowed_by.text
                continue
            if not is_public(ip):
                return Decision(target, port, refusal=Refusal.NOT_GLOBAL, refused_address=ip)
            if not self._default_port(port):
                return Decision(target, port, refusal=Refusal.PORT_NOT_ALLOWED, refused_address=ip)
        return Decision(target, port, addresses=tuple(addresses), rule=used_rule)

    def _explicit_allow(
        self, target: IPAddress | str, ip: IPAddress, port: int
    ) -> DestinationRule | None:
        for rule in self.allow:
            if not self._rule_port(rule, port, deny=False):
                continue
            if rule.matches_address(ip):
                return rule
            if isinstance(target, str) and rule.matches_name(target):
                return rule
        return None


def parse_client_rule(text: str) -> IPNetwork:
    """An ``--allow-client``/``--deny-client`` value: an address or CIDR, host bits clear."""
    try:
        return _network(text)
    except _Problem as e:
        raise RuleError(f"client rule {text!r}: {e}") from None


@attrs.frozen
class ClientPolicy:
    """Which peers may use a listener at all (shared by every mode).

    With no ``allow`` networks everyone may, except the ``deny`` networks; with
    some, only peers inside them may. Deny beats allow. IPv4-mapped peers (a
    dual-stack listener's view of IPv4 clients) are matched as IPv4. UNIX-socket
    peers have no address: the socket's file permissions guard them, so callers
    do not ask this policy about them.
    """

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_options(cls, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> ClientPolicy:
        """Build from ``--allow-client`` and ``--deny-client`` values."""
        return cls(
            allow=tuple(parse_client_rule(text) for text in allow),
            deny=tuple(parse_client_rule(text) for text in deny),
        )

    @property
    def restricts(self) -> bool:
        """False when every peer is allowed (no rules): callers can skip the check."""
        return bool(self.allow or self.deny)

    def allows(self, address: IPAddress | str) -> bool:
        """Whether the peer at ``address`` may use the listener.

        A string that is not an IP address raises ``ValueError``: transports
        report addresses, so anything else is a caller's bug.
        """
        ip = plain_address(ipaddress.ip_address(address) if isinstance(address, str) else address)
        if any(ip.version == net.version and ip in net for net in self.deny):
            return False
        return not self.allow or any(ip.version == net.version and ip in net for net in self.allow)
